"""A NaN on one rank of two is judged the same on both: the step's update is skipped everywhere
(FSDP) and the run goes on, with one ledger entry."""

from __future__ import annotations

import json

import pytest

from pretrain.export.weights import load_weights
from pretrain.resilience.step_guard import LEDGER
from tests.distributed.ranks import run_ranks
from tests.distributed.runs import rank_train

pytestmark = pytest.mark.slow


def test_a_nan_on_one_rank_skips_the_update_on_every_rank(tmp_path, corpus_file, tokenizer_file, monkeypatch):
    monkeypatch.setenv("PRETRAIN_FAULTS", "nan@3:rank=1")  # the spawned ranks inherit it
    extra = {"parallel__backend": "fsdp", "train__on_nonfinite": "skip", "checkpoint__every": 1,
             "train__max_steps": 5, "eval__every": 0}
    run_ranks(rank_train, 2, tmp_path, corpus_file, tokenizer_file, extra)
    [entry] = [json.loads(line) for line in (tmp_path / LEDGER).read_text().splitlines()]
    assert (entry["step"], entry["action"]) == (3, "skip") and "non-finite" in entry["reason"]
    before, skipped, after = (load_weights(tmp_path / "checkpoints" / f"step_{s:08d}") for s in (2, 3, 4))
    assert all((before[k] == skipped[k]).all() for k in before)
    assert any((skipped[k] != after[k]).any() for k in before)
