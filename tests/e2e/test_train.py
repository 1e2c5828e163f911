"""Short real training runs on CPU: the loss falls, outputs are written, runs are reproducible."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from pretrain.trainer import Trainer
from tests.conftest import read_metrics

pytestmark = pytest.mark.slow


def run(cfg) -> tuple[Trainer, list[dict]]:
    trainer = Trainer(cfg)
    trainer.train()
    return trainer, read_metrics(cfg.out_dir)


def train_losses(records: list[dict]) -> list[float]:
    return [r["loss"] for r in records if "loss" in r]


def test_loss_falls_and_outputs_are_written(tiny_config):
    cfg = tiny_config(train__max_steps=150, eval__every=75, eval__batches=4, eval__sample_tokens=8,
                      eval__sample_prompts="[The]", logging__every=5)
    trainer, records = run(cfg)
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in train] == list(range(5, 151, 5))
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_gib", "tokens", "eta_s"):
        assert key in train[0], key
    assert train[-1]["tokens"] == 150 * cfg.train.global_batch_tokens
    assert [r["step"] for r in val] == [0, 75, 150]
    assert val[0]["val_loss"] == pytest.approx(math.log(cfg.model.vocab_size), abs=0.3)  # untrained ~ uniform
    assert val[-1]["val_loss"] < 0.8 * val[0]["val_loss"]
    assert val[-1]["val_ppl"] == pytest.approx(math.exp(val[-1]["val_loss"]))
    out = Path(cfg.out_dir)
    assert load_config(str(out / "config.yaml"), [], world_size=1) == cfg
    assert (out / "samples.txt").read_text().startswith("=== step 150 ===\nThe")


def test_same_seed_same_losses_other_seed_differs(tiny_config, tmp_path):
    losses = []
    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        cfg = tiny_config(train__max_steps=6, train__seed=seed, out_dir=str(tmp_path / name))
        losses.append(train_losses(run(cfg)[1]))
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


def test_gradient_accumulation_equals_one_large_micro_batch(tiny_config, tmp_path):
    accumulated = tiny_config(train__micro_batch_size=2, train__global_batch_sequences=8,
                              train__global_batch_tokens=None, train__max_steps=5, out_dir=str(tmp_path / "acc"))
    single = tiny_config(train__micro_batch_size=8, train__global_batch_sequences=8,
                         train__global_batch_tokens=None, train__max_steps=5, out_dir=str(tmp_path / "one"))
    trainer_a, records_a = run(accumulated)
    trainer_b, records_b = run(single)
    assert trainer_a.grad_accum == 4 and trainer_b.grad_accum == 1
    assert train_losses(records_a) == pytest.approx(train_losses(records_b), rel=1e-5)
    # Adam is blind to a constant gradient scale, so check the scale on the gradient norm.
    norms_a, norms_b = ([r["grad_norm"] for r in rec] for rec in (records_a, records_b))
    assert norms_a == pytest.approx(norms_b, rel=1e-4)
    # Adam also magnifies rounding in near-zero gradients (rare tokens' embedding rows): atol 1e-4.
    for (name, a), b in zip(trainer_a.model.state_dict().items(), trainer_b.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")


def test_stop_at_ends_like_a_preemption(tiny_config, tmp_path):
    """It saves a checkpoint even with checkpointing off, and the rerun without stop_at goes on
    from there exactly."""
    full = run(tiny_config(train__max_steps=10, out_dir=str(tmp_path / "full")))[1]
    stop = tmp_path / "stop"
    stopped = [r for r in run(tiny_config(train__max_steps=10, train__stop_at=4, checkpoint__every=0,
                                          out_dir=str(stop)))[1] if "loss" in r]
    assert [r["step"] for r in stopped] == [1, 2, 3, 4]
    assert [r["lr"] for r in stopped] == [r["lr"] for r in full[:4]]  # the schedule still spans max_steps
    assert train_losses(stopped) == train_losses(full)[:4]
    assert [p.name for p in (stop / "checkpoints").glob("step_*")] == ["step_00000004"]
    records = run(tiny_config(train__max_steps=10, checkpoint__every=0, out_dir=str(stop)))[1]
    assert train_losses(records) == train_losses(full)  # bit-exact, as every resume
    assert [p.name for p in (stop / "checkpoints").glob("step_*")] == ["step_00000004"]  # every=0: no more


def test_bf16_run_trains(tiny_config):
    records = run(tiny_config(train__precision="bf16", train__max_steps=20))[1]
    losses = train_losses(records)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]


def test_metrics_log_the_realised_mixture(mixed_config):
    cfg = mixed_config(train__max_steps=150, logging__every=50)
    records = [r for r in run(cfg)[1] if "loss" in r]
    assert [r["step"] for r in records] == [50, 100, 150]
    for record in records:  # cumulative since step 0, within 1% of the weights
        assert record["mix_share"] == pytest.approx({"topics": 0.3, "paragraphs": 0.7}, abs=0.01)
