"""`pretrain report`: metrics.jsonl of a resumed, crashed run and of a second run, drawn and tabulated."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from pretrain.errors import PretrainError
from pretrain.observability.report import add_command, load_metrics, plot_report, write_report
from pretrain.observability.report_html import comparison_rows, config_differences, flatten_config
from pretrain.observability.report_plots import TRAIN, VAL, build_figure

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
    assert (baseline.skipped_lines, baseline.replaced_records) == (0, 0)
    assert baseline.sources == ["finance", "web"]  # from its mix_share: no per-source validation
    assert len(baseline.checkpoints) == 1 and len(baseline.train) == 10


def test_one_curve_per_run_and_per_source(runs, tmp_path):
    curves = plot_report([load_metrics(d) for d in runs], tmp_path / "figure.png")
    assert curves == {"training loss": 2, "validation loss": 2, "learning rate": 2, "throughput": 2,
                      "validation loss by source": 2,  # mixed: finance and web; baseline has none
                      "data mixture": 4,  # both runs log the realised share of finance and web
                      "eval hook hellaswag: acc": 1}
    assert (tmp_path / "figure.png").read_bytes().startswith(PNG_SIGNATURE)


def test_panels_without_data_are_left_out(runs, tmp_path):
    baseline = load_metrics(runs[1])
    for record in baseline.train:
        record.pop("mix_share")
    curves = plot_report([baseline], tmp_path / "figure.png")
    assert "validation loss by source" not in curves and "data mixture" not in curves
    assert curves["training loss"] == curves["validation loss"] == 1


def test_report_goes_into_the_first_run_dir(runs):
    png, page = write_report([str(d) for d in runs])
    assert (png, page) == (runs[0] / "report.png", runs[0] / "report.html")
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    text = page.read_text()
    assert "data:image/png;base64," in text
    assert "mixed" in text and "baseline" in text
    assert "final validation loss: finance" in text and "final validation loss: web" in text
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


def with_config(run_dir: Path, lr: float = 3e-4, sources: dict | None = None, parallel: dict | None = None) -> Path:
    sources = sources or {"finance": 0.3, "web": 0.7}
    config = {"out_dir": str(run_dir), "optim": {"lr": lr, "warmup_steps": 20},
              "data": {"sources": [{"name": n, "path": f"/data/{n}", "weight": w} for n, w in sources.items()]},
              "parallel": parallel or {"backend": "none", "zero_stage": 2, "replicate": 1}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir


def test_eval_results_config_and_world_size_are_read(runs):
    run_dir = with_config(runs[1], parallel={"backend": "deepspeed", "zero_stage": 3, "replicate": 1})
    eval_dir = run_dir / "eval"
    eval_dir.mkdir()
    (eval_dir / "validation.jsonl").write_text(
        "".join(json.dumps(val_record(s, 5.0, by_source=True)) + "\n" for s in (50, 100)) + '{"step": 15')
    hook_records = [{"step": 50, "acc": 0.25, "nested": {"n": 3}},
                    {"step": 100, "hook": "m:hellaswag", "error": "boom"}]
    (eval_dir / "hellaswag.jsonl").write_text("".join(json.dumps(r) + "\n" for r in hook_records))
    checkpoint = run_dir / "checkpoints" / "step_00000100"
    checkpoint.mkdir(parents=True)
    (checkpoint / "manifest.json").write_text(json.dumps({"step": 100, "world_size": 8}))
    run = load_metrics(run_dir)
    assert [r["step"] for r in run.checkpoint_evals] == [50, 100] and run.skipped_lines == 1
    # step 50 from eval/hellaswag.jsonl, step 100 from metrics.jsonl's eval/hellaswag/acc
    assert run.hooks == {"hellaswag": [{"step": 50, "acc": 0.25, "nested/n": 3}, {"step": 100, "acc": 0.3}]}
    assert run.hook_errors == {"hellaswag": 1}
    assert run.world_size == 8 and run.configured_shares == pytest.approx({"finance": 0.3, "web": 0.7})
    rows = {label: cells for label, cells, _ in comparison_rows([run])}
    assert rows["backend / world size"] == ["deepspeed ZeRO-3 / 8 ranks"]
    assert rows["pretrain eval: final validation loss"] == ["5.0000 (step 100)"]
    assert rows["eval hook hellaswag: acc (last)"] == ["0.3 (step 100)"]
    assert rows["eval hook hellaswag: failed checkpoints"] == ["1"]
    assert rows["share of training tokens: web"] == ["0.700 (configured 0.700)"]


def test_config_differences_name_sources_and_skip_out_dir(tmp_path):
    assert flatten_config({"data": {"sources": [{"name": "web", "path": "w", "weight": 0.7}]}, "eval": {"hooks": []},
                           "optim": {"lr": 3e-4, "betas": None}}) == {
        "data.sources.web.path": "w", "data.sources.web.weight": "0.7", "eval.hooks": "[]", "optim.lr": "0.0003",
        "optim.betas": "null"}
    records = [train_record(10, 5.0), val_record(10, 5.1, by_source=False)]
    first = with_config(write_metrics(tmp_path / "first", records))
    second = with_config(write_metrics(tmp_path / "second", records), lr=1e-3,
                         sources={"finance": 0.3, "web": 0.6, "code": 0.1})
    differences = config_differences([load_metrics(first), load_metrics(second)])
    assert differences == {"optim.lr": ["0.0003", "0.001"], "data.sources.web.weight": ["0.7", "0.6"],
                           "data.sources.code.path": ["—", "/data/code"], "data.sources.code.weight": ["—", "0.1"]}
    _, page = write_report([str(first), str(second)])
    assert "<code>optim.lr</code></th><td>0.0003</td><td>0.001</td>" in page.read_text()


def test_identical_runs_are_said_to_be_and_stay_visible(runs, tmp_path):
    records = [train_record(s, 5.0 - s / 50) for s in range(10, 110, 10)]
    records += [val_record(s, 5.2 - s / 50, by_source=True) for s in (0, 50, 100)]
    copies = [write_metrics(tmp_path / name, records) for name in ("a", "b")]
    figure = build_figure([load_metrics(d) for d in [*copies, runs[1]]])
    assert figure.notes[0].startswith("runs a and b have identical curves in every panel: their lines coincide")
    # (the made-up records of all three have the same learning rate, throughput and mixture)
    assert figure.notes[1].startswith("runs a, b and baseline have identical curves in every panel but training loss "
                                      "and validation loss")
    lines = figure.axes[TRAIN].get_lines()
    assert len(lines) == 3 and len({(line.get_marker(), line.get_linestyle()) for line in lines}) == 3
    figure.figure.canvas.draw()
    for ax in figure.axes.values():
        assert not figure.legend.get_window_extent().overlaps(ax.get_window_extent())


def test_loss_axes_are_linear_and_zoomed_past_the_first_steps(tmp_path):
    records = [train_record(s, 10.4 if s == 1 else 4.0 - s / 1000) for s in range(1, 101)]
    records += [val_record(s, 10.4 if s == 0 else 4.0 - s / 1000, by_source=False) for s in (0, 50, 100)]
    figure = build_figure([load_metrics(write_metrics(tmp_path / "run", records))])
    for title in (TRAIN, VAL):
        low, high = figure.axes[title].get_ylim()
        assert figure.axes[title].get_yscale() == "linear" and 3.85 < low < 3.9 and 3.95 < high < 4.0, title
        assert "nats/token" in figure.axes[title].get_ylabel()
    assert "training loss (up to 10.4)" in figure.notes[-1]


def test_a_diverged_run_shows_nan_as_its_final_loss_and_is_not_marked_best(tmp_path):
    healthy = write_metrics(tmp_path / "healthy", [train_record(s, 5.0 - s / 100) for s in (10, 20)])
    diverged = [train_record(10, 4.0), train_record(20, float("nan"))]
    runs = [load_metrics(healthy), load_metrics(write_metrics(tmp_path / "diverged", diverged))]
    rows = {label: (cells, values) for label, cells, values in comparison_rows(runs)}
    assert rows["final training loss"][0] == ["4.8000 (step 20)", "nan (step 20)"]
    assert rows["best training loss"][0] == ["4.8000 (step 20)", "4.0000 (step 10)"]
    assert rows["tokens seen"][0] == [f"{20 * TOKENS_PER_STEP:,}"] * 2
    _, page = write_report([str(healthy), str(tmp_path / "diverged")])
    assert "<td class=best>4.8000 (step 20)</td><td>nan (step 20)</td>" in page.read_text()
