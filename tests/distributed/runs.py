"""The tiny training run the multi-process tests compare, as one rank of a job (in this process,
or under run_ranks), keeping rank 0's final weights in run_dir/weights.pt."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pretrain.config import load_config
from pretrain.parallel import dist_info_from_env
from pretrain.trainer import Trainer
from tests.conftest import read_metrics, tiny_overrides

STEPS = 12
# 8 sequences per step: one process accumulates 4 micro-batches of 2, each of 2 ranks 2 of 2.
SHARED = {"train__max_steps": STEPS, "train__micro_batch_size": 2, "train__global_batch_sequences": 8,
          "optim__warmup_steps": 3, "model__n_layers": 3, "logging__every": 1, "eval__every": 6, "eval__batches": 4}


def train(run_dir: Path, corpus: Path, tokenizer: Path, world_size: int, **extra: object) -> None:
    """Train (in this process, which is one rank of `world_size`) and save rank 0's final weights."""
    cfg = load_config(None, tiny_overrides(run_dir, corpus, tokenizer, **{**SHARED, **extra}), world_size=world_size)
    trainer = Trainer(cfg, dist_info_from_env("cpu"))
    trainer.train()
    weights = trainer.engine.full_state_dict()
    if weights:
        torch.save(weights, run_dir / "weights.pt")
        blocks = getattr(trainer.model, "layers", [])  # DeepSpeed's engine wraps the model: not recorded
        compiled = sum(getattr(block, "_compiled_call_impl", None) is not None for block in blocks)
        (run_dir / "structure.json").write_text(json.dumps({"compiled_blocks": compiled}))


def rank_train(rank: int, world_size: int, run_dir: Path, corpus: Path, tokenizer: Path, extra: dict) -> None:
    """`train` in the signature run_ranks calls."""
    train(run_dir, corpus, tokenizer, world_size, **extra)


def losses(run_dir: Path, key: str = "loss") -> list[float]:
    return [r[key] for r in read_metrics(run_dir) if key in r]
