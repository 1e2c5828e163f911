"""Every parallel backend on 2 gloo processes trains exactly like one process that accumulates
gradients to the same global batch: same losses step by step, same weights at the end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from pretrain.parallel import dist_info_from_env
from pretrain.trainer import Trainer
from tests.conftest import read_metrics, tiny_overrides
from tests.distributed.ranks import run_ranks

pytestmark = pytest.mark.slow

STEPS = 12
# 8 sequences per step: one process accumulates 4 micro-batches of 2, each of 2 ranks 2 of 2.
SHARED = {"train__max_steps": STEPS, "train__micro_batch_size": 2, "train__global_batch_sequences": 8,
          "optim__warmup_steps": 3, "model__n_layers": 3, "logging__every": 1}


def train(run_dir: Path, corpus: Path, tokenizer: Path, world_size: int, **extra: object) -> None:
    """Train (in this process, which is one rank of `world_size`) and save rank 0's final weights."""
    cfg = load_config(None, tiny_overrides(run_dir, corpus, tokenizer, **SHARED, **extra), world_size=world_size)
    trainer = Trainer(cfg, dist_info_from_env("cpu"))
    trainer.train()
    weights = trainer.engine.full_state_dict()
    if weights:
        torch.save(weights, run_dir / "weights.pt")


def _rank_train(rank: int, world_size: int, run_dir: Path, corpus: Path, tokenizer: Path, extra: dict) -> None:
    train(run_dir, corpus, tokenizer, world_size, **extra)


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, corpus_file, tokenizer_file) -> Path:
    run_dir = tmp_path_factory.mktemp("none")
    train(run_dir, corpus_file, tokenizer_file, 1)
    return run_dir


BACKENDS = {
    "ddp": {"parallel__backend": "ddp"},
    "fsdp": {"parallel__backend": "fsdp"},
    "fsdp-no-reshard": {"parallel__backend": "fsdp", "parallel__reshard_after_forward": "false"},
    "hsdp-1x2": {"parallel__backend": "fsdp", "parallel__replicate": 1, "parallel__shard": 2},
    "hsdp-2x1": {"parallel__backend": "fsdp", "parallel__replicate": 2, "parallel__shard": 1},
    "zero1": {"parallel__backend": "deepspeed", "parallel__zero_stage": 1},
    "zero2": {"parallel__backend": "deepspeed", "parallel__zero_stage": 2},
    "zero3": {"parallel__backend": "deepspeed", "parallel__zero_stage": 3},
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_match_one_process(backend, single_process, tmp_path, corpus_file, tokenizer_file):
    run_ranks(_rank_train, 2, tmp_path, corpus_file, tokenizer_file, BACKENDS[backend])
    expected, got = losses(single_process), losses(tmp_path)
    assert len(got) == STEPS
    assert got == pytest.approx(expected, rel=2e-5), json.dumps({"expected": expected, "got": got})
    assert expected[-1] < expected[0] - 0.5  # it learned, so matching is not trivial
    reference = torch.load(single_process / "weights.pt")
    weights = torch.load(tmp_path / "weights.pt")
    assert weights.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5, msg=name)
