"""A DCP checkpoint written by 2 ranks resumes on 1 process and vice versa (fsdp, ddp): the run
continues the same global data stream with the same global batch, so every step's loss matches
the uninterrupted run. Full weights (init_from) load into sharded models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from pretrain.export import load_weights
from pretrain.parallel import dist_info_from_env
from pretrain.trainer import Trainer
from tests.conftest import tiny_overrides
from tests.distributed.ranks import run_ranks
from tests.distributed.runs import SHARED, STEPS, losses, rank_train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def uninterrupted(fsdp_two_ranks) -> list[float]:
    return losses(fsdp_two_ranks)


@pytest.mark.parametrize("backend", ["fsdp", "ddp"])
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_resume_at_another_world_size_continues_the_same_run(backend, first, then, uninterrupted, tmp_path,
                                                             corpus_file, tokenizer_file):
    extra = {"parallel__backend": backend, "checkpoint__every": 100}
    run_ranks(rank_train, first, tmp_path, corpus_file, tokenizer_file, {**extra, "train__stop_at": STEPS // 2})
    manifest = json.loads((tmp_path / "checkpoints" / f"step_{STEPS // 2:08d}" / "manifest.json").read_text())
    assert manifest["world_size"] == first
    run_ranks(rank_train, then, tmp_path, corpus_file, tokenizer_file, extra)
    got = losses(tmp_path)
    assert len(got) == STEPS == SHARED["train__max_steps"]
    assert got == pytest.approx(uninterrupted, rel=1e-5), json.dumps({"expected": uninterrupted, "got": got})
    assert Path(tmp_path / "checkpoints" / f"step_{STEPS:08d}" / "manifest.json").is_file()


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_resumes_at_another_world_size_through_its_universal_checkpoint(stage, tmp_path, corpus_file,
                                                                                  tokenizer_file):
    """2 ranks -> 1 process, against the same ZeRO stage uninterrupted on 1 process."""
    extra = {"parallel__backend": "deepspeed", "parallel__zero_stage": stage, "checkpoint__every": 100}
    run_ranks(rank_train, 1, tmp_path / "straight", corpus_file, tokenizer_file, extra)
    uninterrupted = losses(tmp_path / "straight")
    run_ranks(rank_train, 2, tmp_path, corpus_file, tokenizer_file, {**extra, "train__stop_at": STEPS // 2})
    run_ranks(rank_train, 1, tmp_path, corpus_file, tokenizer_file, extra)
    got = losses(tmp_path)
    assert len(got) == STEPS
    assert got[STEPS // 2] == pytest.approx(uninterrupted[STEPS // 2], rel=1e-6)  # the restored weights
    assert got == pytest.approx(uninterrupted, rel=1e-5), json.dumps({"expected": uninterrupted, "got": got})
    assert (tmp_path / "checkpoints" / f".universal_step_{STEPS // 2:08d}" / "universal").is_dir()


def _rank_initial_weights(rank: int, world_size: int, run_dir: Path, corpus: Path, tokenizer: Path,
                          extra: dict) -> None:
    cfg = load_config(None, tiny_overrides(run_dir, corpus, tokenizer, **SHARED, **extra), world_size=world_size)
    trainer = Trainer(cfg, dist_info_from_env("cpu"))
    weights = trainer.engine.full_state_dict()
    if weights:
        torch.save(weights, run_dir / "initial.pt")
    trainer.close()


@pytest.mark.parametrize("backend", ["fsdp", "deepspeed"])
def test_init_from_loads_full_weights_into_a_sharded_model(backend, tmp_path, corpus_file, tokenizer_file):
    source = tmp_path / "source"
    run_ranks(rank_train, 1, source, corpus_file, tokenizer_file, {"checkpoint__every": 100, "train__stop_at": 2})
    checkpoint = source / "checkpoints" / "step_00000002"
    extra = {"parallel__backend": backend, "parallel__zero_stage": 3, "checkpoint__init_from": str(checkpoint)}
    if backend == "fsdp":
        del extra["parallel__zero_stage"]
    run_ranks(_rank_initial_weights, 2, tmp_path / "new", corpus_file, tokenizer_file, extra)
    expected, got = load_weights(checkpoint), torch.load(tmp_path / "new" / "initial.pt")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[name], value) for name, value in expected.items())
