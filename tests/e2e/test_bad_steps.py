"""Non-finite losses and loss spikes (injected with PRETRAIN_FAULTS) under each policy of
train.on_nonfinite / train.on_loss_spike, the bad-batch ledger, and failed checkpoint writes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pretrain.errors import PretrainError
from pretrain.export.weights import load_weights
from pretrain.resilience.step_guard import LEDGER
from pretrain.trainer import Trainer
from tests.conftest import read_metrics

pytestmark = pytest.mark.slow  # ~30 short training runs: too long for the inner loop


def train(cfg, monkeypatch, faults: str = "") -> Trainer:
    monkeypatch.setenv("PRETRAIN_FAULTS", faults)
    trainer = Trainer(cfg)
    trainer.train()
    return trainer


def ledger(cfg) -> list[dict]:
    path = Path(cfg.out_dir) / LEDGER
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def weights(cfg, step: int) -> dict[str, torch.Tensor]:
    return load_weights(Path(cfg.out_dir) / "checkpoints" / f"step_{step:08d}")


def data_step(cfg, step: int) -> int:
    state = torch.load(Path(cfg.out_dir) / "checkpoints" / f"step_{step:08d}" / "trainer_state.pt", weights_only=True)
    return state["data"]["step"]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_skip_drops_the_update_of_a_nan_step_and_training_goes_on(tiny_config, monkeypatch):
    cfg = tiny_config(train__max_steps=6, train__on_nonfinite="skip", checkpoint__every=1)
    train(cfg, monkeypatch, "nan@4")
    assert same(weights(cfg, 4), weights(cfg, 3))  # step 4 changed nothing
    assert not same(weights(cfg, 5), weights(cfg, 4))
    assert all(torch.isfinite(w).all() for w in weights(cfg, 6).values())
    [entry] = ledger(cfg)
    assert entry["step"] == 4 and entry["action"] == "skip" and "non-finite loss nan" in entry["reason"]
    assert entry["data_step"] == 4  # its batch was consumed
    assert all(r["loss"] == r["loss"] for r in read_metrics(cfg.out_dir) if "loss" in r and r["step"] != 4)


def test_rollback_reloads_the_last_checkpoint_and_never_trains_on_the_window(tiny_config, monkeypatch, tmp_path):
    cfg = tiny_config(train__max_steps=8, train__on_nonfinite="rollback", checkpoint__every=3)
    train(cfg, monkeypatch, "nan@5")
    [entry] = ledger(cfg)
    assert (entry["step"], entry["action"], entry["rollback_to"], entry["data_state"]["step"]) == (5, "rollback", 3, 5)
    assert data_step(cfg, 8) == 10  # 8 steps trained on 10 batches: those of steps 4 and 5 were skipped
    steps = [r["step"] for r in read_metrics(cfg.out_dir) if "loss" in r]
    assert steps == [1, 2, 3, 4, 4, 5, 6, 7, 8]  # step 5 went back to 3, and 4-8 were trained again
    final = weights(cfg, 8)
    assert all(torch.isfinite(w).all() for w in final.values())

    # A crash after the rollback, before the next checkpoint: the restart resumes from step 3 and
    # the ledger makes it skip the same window, so it ends on exactly the same weights.
    run = Path(cfg.out_dir)
    for later in ("step_00000006", "step_00000008"):
        shutil.rmtree(run / "checkpoints" / later)
    train(cfg, monkeypatch)
    assert same(weights(cfg, 8), final)
    # Without the ledger the same restart replays the window and ends elsewhere.
    for later in ("step_00000006", "step_00000008"):
        shutil.rmtree(run / "checkpoints" / later)
    (run / LEDGER).unlink()
    train(cfg, monkeypatch)
    assert data_step(cfg, 8) == 8 and not same(weights(cfg, 8), final)


def test_rollback_without_a_checkpoint_stops_with_the_fix(tiny_config, monkeypatch):
    cfg = tiny_config(train__max_steps=6, train__on_nonfinite="rollback", checkpoint__every=0)
    with pytest.raises(PretrainError, match=r"step 2: non-finite.*no checkpoint to roll back to yet.*checkpoint\.every"):
        train(cfg, monkeypatch, "nan@2")
    assert [e["action"] for e in ledger(cfg)] == ["stop"]


def test_stop_names_the_step_and_the_ledger(tiny_config, monkeypatch):
    cfg = tiny_config(train__max_steps=6, train__on_nonfinite="stop")
    with pytest.raises(PretrainError, match=r"step 3: non-finite loss nan.*bad_batches\.jsonl"):
        train(cfg, monkeypatch, "nan@3")
    assert [(e["step"], e["action"]) for e in ledger(cfg)] == [(3, "stop")]


def test_too_many_bad_steps_stop_the_run(tiny_config, monkeypatch):
    cfg = tiny_config(train__max_steps=6, train__on_nonfinite="skip", train__max_bad_steps=2)
    with pytest.raises(PretrainError, match=r"2 steps of this run were skipped.*max_bad_steps=2"):
        train(cfg, monkeypatch, "nan@2,nan@4")


SPIKE = {"train__max_steps": 30, "train__spike_window": 20, "optim__warmup_steps": 5, "optim__lr": 1e-3}


def test_a_loss_spike_is_skipped_and_clean_training_has_none(tiny_config, monkeypatch):
    cfg = tiny_config(**SPIKE, train__on_loss_spike="skip", checkpoint__every=1)
    train(cfg, monkeypatch)
    assert ledger(cfg) == []  # no false alarm over 30 ordinary steps
    shutil.rmtree(cfg.out_dir)
    train(cfg, monkeypatch, "spike@26:factor=50")
    [entry] = ledger(cfg)
    assert entry["step"] == 26 and entry["action"] == "skip" and "loss spike" in entry["reason"]
    assert same(weights(cfg, 26), weights(cfg, 25))


def test_a_warned_spike_keeps_its_update(tiny_config, monkeypatch):
    cfg = tiny_config(**SPIKE, checkpoint__every=1)  # on_loss_spike=warn is the default
    train(cfg, monkeypatch, "spike@26:factor=50")
    assert [(e["step"], e["action"]) for e in ledger(cfg)] == [(26, "warn")]
    assert not same(weights(cfg, 26), weights(cfg, 25))


def test_a_full_disk_keeps_the_previous_checkpoint_and_a_restart_ends_where_a_clean_run_does(
        tiny_config, monkeypatch, tmp_path):
    cfg = tiny_config(train__max_steps=6, checkpoint__every=2)
    with pytest.raises(PretrainError, match=r"writing checkpoint .*step_00000004 failed \(\[Errno 28\] No space left.*"
                                            r"step_00000002, is intact"):
        train(cfg, monkeypatch, "disk_full@4")
    checkpoints = Path(cfg.out_dir) / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000002"]  # no half-written step 4
    train(cfg, monkeypatch)
    clean = tiny_config(train__max_steps=6, checkpoint__every=2, out_dir=str(tmp_path / "clean"))
    train(clean, monkeypatch)
    assert same(weights(cfg, 6), weights(clean, 6))
