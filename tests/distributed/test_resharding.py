"""A DCP checkpoint written by 2 ranks resumes on 1 process and vice versa (fsdp, ddp): the run
continues the same global data stream with the same global batch, so every step's loss matches
the uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.distributed.ranks import run_ranks
from tests.distributed.test_backends import SHARED, STEPS, _rank_train, losses

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus_file, tokenizer_file) -> list[float]:
    run = tmp_path_factory.mktemp("uninterrupted")
    run_ranks(_rank_train, 2, run, corpus_file, tokenizer_file, {"parallel__backend": "fsdp"})
    return losses(run)


@pytest.mark.parametrize("backend", ["fsdp", "ddp"])
@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_resume_at_another_world_size_continues_the_same_run(backend, first, then, uninterrupted, tmp_path,
                                                             corpus_file, tokenizer_file):
    extra = {"parallel__backend": backend, "checkpoint__every": 100}
    run_ranks(_rank_train, first, tmp_path, corpus_file, tokenizer_file, {**extra, "train__stop_at": STEPS // 2})
    manifest = json.loads((tmp_path / "checkpoints" / f"step_{STEPS // 2:08d}" / "manifest.json").read_text())
    assert manifest["world_size"] == first
    run_ranks(_rank_train, then, tmp_path, corpus_file, tokenizer_file, extra)
    got = losses(tmp_path)
    assert len(got) == STEPS == SHARED["train__max_steps"]
    assert got == pytest.approx(uninterrupted, rel=1e-5), json.dumps({"expected": uninterrupted, "got": got})
    assert Path(tmp_path / "checkpoints" / f"step_{STEPS:08d}" / "manifest.json").is_file()
