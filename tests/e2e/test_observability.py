"""What a researcher watches: validation per source with bits per byte, an offline wandb run
holding the metrics (and resumed after a restart), TensorBoard scalars, the progress bar and
the report of a real run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pretrain.config import load_config
from pretrain.data import IGNORE_INDEX
from pretrain.observability.tracking import WANDB_RUN_ID_FILE, flatten
from pretrain.trainer import Trainer
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow


def test_flatten_keeps_numbers_under_slash_joined_keys():
    record = {"loss": 2.5, "mix_share": {"web": 0.7, "finance": 0.3}, "checkpoint_async": False, "note": "x"}
    assert flatten(record) == {"loss": 2.5, "mix_share/web": 0.7, "mix_share/finance": 0.3}


def test_offline_wandb_run_holds_the_metrics_and_a_restart_resumes_it(tmp_path, corpus_file, tokenizer_file):
    run = tmp_path / "run"
    overrides = tiny_overrides(run, corpus_file, tokenizer_file, train__max_steps=4, checkpoint__every=2,
                               eval__every=2, logging__wandb__mode="offline")
    assert Trainer(load_config(None, [*overrides, "--train.stop_at=2"])).train() == 0
    run_id = (run / WANDB_RUN_ID_FILE).read_text().strip()
    assert Trainer(load_config(None, overrides)).train() == 0  # resumes from step 2
    assert (run / WANDB_RUN_ID_FILE).read_text().strip() == run_id

    # one directory per process (wandb adds "-1" to the second within the same second), all of one run id
    runs = sorted(p for p in (run / "wandb").glob("offline-run-*") if p.is_dir())
    assert len(runs) == 2 and all(f"-{run_id}" in p.name for p in runs), runs
    # the runs' history records (protobuf): every metric's key and the final validation loss's value
    history = b"".join(path.read_bytes() for directory in runs for path in directory.glob("*.wandb"))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final_val = [r for r in records if "val_loss" in r][-1]
    for key in ("loss", "grad_norm", "tokens_per_s", "mfu", "memory_gib", "val_loss", "val_bpb", "checkpoint_blocked_s"):
        assert key.encode() in history, key
    assert b"mix_share" in history and json.dumps(final_val["val_loss"]).encode() in history


def test_progress_bar_on_request_and_plain_lines_otherwise(tmp_path, corpus_file, tokenizer_file, capfd):
    overrides = tiny_overrides(tmp_path / "bar", corpus_file, tokenizer_file, train__max_steps=6, logging__every=3,
                               logging__progress=True)
    assert Trainer(load_config(None, overrides)).train() == 0
    err = capfd.readouterr().err
    assert "6/6 [" in err and "tok/s" in err  # the bar: count, then [elapsed<remaining, tokens/s]

    overrides = tiny_overrides(tmp_path / "plain", corpus_file, tokenizer_file, train__max_steps=6, logging__every=3)
    assert Trainer(load_config(None, overrides)).train() == 0  # under pytest stderr is no terminal
    err = capfd.readouterr().err
    assert "6/6 [" not in err


def test_validation_reports_each_source_and_bits_per_byte(tmp_path, corpus_file, tokenizer_file, tokenizer):
    docs = corpus_file.read_text().split("\n\n")
    finance, web = tmp_path / "finance.txt", tmp_path / "web.txt"
    finance.write_text("\n\n".join(docs[: len(docs) // 2]))
    web.write_text("\n\n".join(docs[len(docs) // 2:]))
    sources = (f"[{{name: finance, path: '{finance}', weight: 3.0}}, "
               f"{{name: web, path: '{web}', weight: 1.0}}]")
    run = tmp_path / "run"
    overrides = tiny_overrides(run, corpus_file, tokenizer_file, train__max_steps=2, eval__every=2,
                               eval__batches=2, data__sources=sources, data__val_fraction=0.2)
    trainer = Trainer(load_config(None, overrides))
    assert trainer.train() == 0
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "val_loss" in line][-1]
    by_source = final["val_loss_by_source"]
    assert set(by_source) == {"finance", "web"} and by_source["finance"] != by_source["web"]
    assert final["val_loss"] == pytest.approx((3 * by_source["finance"] + by_source["web"]) / 4)
    assert final["val_ppl_by_source"]["web"] == pytest.approx(math.exp(by_source["web"]))
    # bits per byte: the same nats over the UTF-8 bytes the scored tokens stand for
    lengths = tokenizer.token_byte_lengths()
    labels = torch.cat([y.flatten() for _, y in trainer.val_sets["web"]])
    size = lengths[labels[labels != IGNORE_INDEX].numpy()].sum()
    tokens = int((labels != IGNORE_INDEX).sum())
    assert final["val_bpb_by_source"]["web"] == pytest.approx(by_source["web"] * tokens / (size * math.log(2)))


def test_report_of_a_real_run_draws_its_sources(tmp_path, corpus_file, tokenizer_file, capsys):
    from pretrain.cli import main
    from pretrain.observability.report import load_metrics, plot_report

    docs = corpus_file.read_text().split("\n\n")
    halves = [tmp_path / "a.txt", tmp_path / "b.txt"]
    halves[0].write_text("\n\n".join(docs[::2]))
    halves[1].write_text("\n\n".join(docs[1::2]))
    sources = f"[{{name: a, path: '{halves[0]}'}}, {{name: b, path: '{halves[1]}'}}]"
    run = tmp_path / "run"
    overrides = tiny_overrides(run, corpus_file, tokenizer_file, train__max_steps=4, eval__every=2, eval__batches=1,
                               data__sources=sources, data__val_fraction=0.2)
    assert Trainer(load_config(None, overrides)).train() == 0
    assert main(["report", str(run)]) == 0
    assert (run / "report.png").stat().st_size > 10_000 and "data:image/png;base64," in (run / "report.html").read_text()
    curves = plot_report([load_metrics(run)], tmp_path / "again.png")
    assert curves["validation loss by source"] == 2 and curves["data mixture"] == 2 and curves["training loss"] == 1


def test_tensorboard_gets_the_same_scalars(tmp_path, corpus_file, tokenizer_file):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    overrides = tiny_overrides(run, corpus_file, tokenizer_file, train__max_steps=4, logging__every=2, eval__every=4,
                               logging__tensorboard=True)
    assert Trainer(load_config(None, overrides)).train() == 0
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("loss")] == losses
    assert "mix_share/corpus" in events.Tags()["scalars"] and "val_bpb" in events.Tags()["scalars"]


def test_mfu_keeps_the_peak_measured_at_the_runs_first_start(tmp_path, corpus_file, tokenizer_file, monkeypatch):
    """A busy machine measures a different peak at each start (1e11, then 3.8e11 FLOP/s): a resumed
    run keeps dividing by the first, so its MFU does not jump."""
    import pretrain.hardware.devices

    measurements = iter([1e11, 3.8e11, 3.8e11])
    monkeypatch.setattr(pretrain.hardware.devices, "measure_matmul_flops", lambda *a, **k: next(measurements))
    overrides = tiny_overrides(tmp_path / "run", corpus_file, tokenizer_file, train__max_steps=4,
                               checkpoint__every=2, logging__peak_flops=None)
    first = Trainer(load_config(None, [*overrides, "--train.stop_at=2"]))
    first.train()
    resumed = Trainer(load_config(None, overrides))
    assert resumed.step == 2 and resumed.peak_flops == first.peak_flops == 1e11
    resumed.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    mfu_per_token_rate = {r["mfu"] / r["tokens_per_s"] for r in records if "mfu" in r}
    assert len(records) > 4 and max(mfu_per_token_rate) == pytest.approx(min(mfu_per_token_rate))
    # another device (or precision) measures again
    other = Trainer(load_config(None, [*overrides, "--train.max_steps=6"]))
    assert other.peak_flops == 1e11
    other.close()
    monkeypatch.setattr(pretrain.hardware.devices, "device_name", lambda device: "another cpu")
    moved = Trainer(load_config(None, [*overrides, "--train.max_steps=6"]))
    assert moved.peak_flops == 3.8e11
    moved.close()
