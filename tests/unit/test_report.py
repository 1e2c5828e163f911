"""`pretrain report`: metrics.jsonl of a resumed, crashed run and of a second run, drawn and tabulated."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from pretrain.errors import PretrainError
from pretrain.report import add_command, load_metrics, plot_report, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOKENS_PER_STEP = 2048


def train_record(step: int, loss: float) -> dict:
    return {"step": step, "max_steps": 100, "loss": loss, "lr": 3e-4 * min(1.0, step / 20), "grad_norm": 0.5,
            "tokens": step * TOKENS_PER_STEP, "tokens_per_s": 5000.0 + step, "mfu": 0.4,
            "memory_gib": 1.0 + step / 100, "eta_s": 100.0 - step, "mix_share": {"finance": 0.3, "web": 0.7}}


def val_record(step: int, loss: float, by_source: bool) -> dict:
    record = {"step": step, "tokens": step * TOKENS_PER_STEP, "val_loss": loss, "val_ppl": 2.718 ** loss}
    if by_source:
        record |= {"val_bpb": loss / 3, "val_loss_by_source": {"finance": loss - 0.1, "web": loss + 0.1},
                   "val_ppl_by_source": {"finance": 2.718 ** (loss - 0.1), "web": 2.718 ** (loss + 0.1)},
                   "val_bpb_by_source": {"finance": 1.0, "web": 1.2}}
    return record


def write_metrics(run_dir: Path, records: list[dict], tail: str = "") -> Path:
    run_dir.mkdir(parents=True)
    lines = [json.dumps(r) for r in records]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + tail)
    return run_dir


@pytest.fixture
def runs(tmp_path) -> tuple[Path, Path]:
    """`mixed`: per-source validation, resumed at step 40 after a crash at 60 (steps 50 and 60 logged
    twice, the first time with loss 9.0), then crashed for good mid-line. `baseline`: overall
    validation only, plus a checkpoint and an eval hook's record."""
    first_attempt = [train_record(s, 5.0 - s / 50) for s in range(10, 70, 10)]
    first_attempt[-2]["loss"] = first_attempt[-1]["loss"] = 9.0
    first_attempt += [val_record(s, 5.2 - s / 50, by_source=True) for s in (0, 50)]
    second_attempt = [train_record(s, 5.0 - s / 50) for s in range(50, 110, 10)]
    second_attempt += [val_record(s, 5.2 - s / 50, by_source=True) for s in (50, 100)]
    mixed = write_metrics(tmp_path / "mixed", first_attempt + second_attempt, tail='{"step": 110, "loss": 3.')
    baseline = [train_record(s, 5.5 - s / 60) for s in range(10, 110, 10)]
    baseline += [val_record(s, 5.6 - s / 60, by_source=False) for s in (0, 50, 100)]
    baseline += [{"step": 100, "tokens": 100 * TOKENS_PER_STEP, "checkpoint_blocked_s": 0.5, "checkpoint_async": True},
                 {"step": 100, "eval/hellaswag/acc": 0.3}]
    return mixed, write_metrics(tmp_path / "baseline", baseline)


def test_resumed_steps_count_once_and_a_truncated_line_is_skipped(runs):
    mixed = load_metrics(runs[0])
    assert [r["step"] for r in mixed.train] == list(range(10, 110, 10))
    assert [r["step"] for r in mixed.validation] == [0, 50, 100]
    assert mixed.replaced_records == 3  # training steps 50 and 60, validation step 50
    assert mixed.skipped_lines == 1
    assert all(r["loss"] != 9.0 for r in mixed.train)  # the second attempt's copy wins
    assert mixed.sources == ["finance", "web"]
    baseline = load_metrics(runs[1])
    assert (baseline.skipped_lines, baseline.replaced_records, baseline.sources) == (0, 0, [])
    assert len(baseline.checkpoints) == 1 and len(baseline.train) == 10


def test_one_curve_per_run_and_per_source(runs, tmp_path):
    curves = plot_report([load_metrics(d) for d in runs], tmp_path / "figure.png")
    assert curves == {"training loss": 2, "validation loss": 2, "learning rate": 2, "tokens/s": 2,
                      # mixed: finance and web; baseline: its overall val_ppl
                      "validation perplexity": 3}
    assert (tmp_path / "figure.png").read_bytes().startswith(PNG_SIGNATURE)


def test_overall_perplexity_when_no_run_has_sources(runs, tmp_path):
    curves = plot_report([load_metrics(runs[1])], tmp_path / "figure.png")
    assert curves["validation perplexity"] == 1 and curves["training loss"] == 1


def test_report_goes_into_the_first_run_dir(runs):
    png, page = write_report([str(d) for d in runs])
    assert (png, page) == (runs[0] / "report.png", runs[0] / "report.html")
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    text = page.read_text()
    assert "data:image/png;base64," in text
    assert "mixed" in text and "baseline" in text
    assert "final validation ppl: finance" in text and "final validation ppl: web" in text
    assert "http://" not in text and "https://" not in text and "<script" not in text
    assert not list(runs[0].glob(".tmp_*"))  # written via a temporary sibling, renamed


def test_report_goes_into_out_when_given(runs, tmp_path):
    out = tmp_path / "reports" / "compare"
    png, page = write_report([str(d) for d in runs], out=str(out))
    assert png == out / "report.png" and page == out / "report.html"
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    assert not (runs[0] / "report.png").exists()


def test_runs_with_the_same_dir_name_are_named_by_path(tmp_path):
    records = [train_record(10, 5.0), val_record(10, 5.1, by_source=False)]
    first = write_metrics(tmp_path / "a" / "out", records)
    second = write_metrics(tmp_path / "b" / "out", records)
    _, page = write_report([str(first), str(second)], out=str(tmp_path))
    text = page.read_text()
    assert str(first) in text and str(second) in text


def test_missing_run_dir_or_metrics_file_is_named(tmp_path):
    missing = tmp_path / "never_trained"
    with pytest.raises(PretrainError, match="never_trained"):
        write_report([str(missing)])
    missing.mkdir()
    with pytest.raises(PretrainError, match=r"metrics\.jsonl.*train it first"):
        load_metrics(missing)
    (missing / "metrics.jsonl").write_text('{"step": 1, "lo')
    with pytest.raises(PretrainError, match="no training or validation records"):
        load_metrics(missing)


def test_command_line(runs, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="pretrain")
    add_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", *map(str, runs), "--out", str(tmp_path / "out")])
    assert args.run(args, []) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "out" / "report.png"),
                                               str(tmp_path / "out" / "report.html")]
