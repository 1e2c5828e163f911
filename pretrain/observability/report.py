"""`pretrain report OUT_DIR [OUT_DIR...]`: one or more runs drawn as report.png and compared in
report.html (one self-contained file), so runs can be compared without wandb or TensorBoard.

report_data.py reads a run's out_dir (metrics.jsonl, eval/, config.yaml, the newest checkpoint's
manifest); report_plots.py draws the figure (training and validation loss, validation loss by
source, realised against configured data mixture, learning rate, throughput, eval-hook metrics);
report_html.py writes the page (the runs side by side, the config keys in which they differ,
notes such as runs with identical curves, the figure)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pretrain.errors import PretrainError
from pretrain.observability.report_data import RunMetrics, load_metrics, record_kind
from pretrain.observability.report_html import report_html
from pretrain.observability.report_plots import render_png
from pretrain.resilience.atomic_dir import write_file

__all__ = ["RunMetrics", "add_command", "load_metrics", "plot_report", "record_kind", "write_report"]


def load_runs(run_dirs: list[str]) -> list[RunMetrics]:
    """The runs of `run_dirs`; runs whose directory names collide are named by the path given."""
    if not run_dirs:
        raise PretrainError("no run given; give at least one run's out_dir")
    runs = [load_metrics(run_dir) for run_dir in run_dirs]
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = str(run.path)
    return runs


def write_report(run_dirs: list[str], out: str | None = None) -> tuple[Path, Path]:
    """Write report.png and report.html for the runs into `out` (default: the first run's dir)."""
    runs = load_runs(run_dirs)
    out_dir = Path(out if out is not None else run_dirs[0])
    if out_dir.exists() and not out_dir.is_dir():
        raise PretrainError(f"--out {out_dir} is a file; give a directory for report.png and report.html")
    png, figure = render_png(runs)
    png_path = write_file(out_dir / "report.png", png)
    html_path = write_file(out_dir / "report.html", report_html(runs, png, figure.notes))
    return png_path, html_path


def plot_report(runs: list[RunMetrics], path: str | Path) -> dict[str, int]:
    """Write the report's figure to `path`; return the number of curves drawn in each panel."""
    png, figure = render_png(runs)
    write_file(path, png)
    return figure.curves


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register `pretrain report`."""
    report = commands.add_parser(
        "report", help="plot and compare runs (losses, data mixture, eval results, config differences)",
        description="Read one or more runs' OUT_DIR (metrics.jsonl; eval/ results of eval hooks and of `pretrain "
                    "eval --watch`; config.yaml) and write report.png (training and validation loss, validation "
                    "loss by source, realised against configured data mixture, learning rate, throughput, "
                    "eval-hook metrics; one colour per data source, one line style and marker per run, against "
                    "tokens when every run logged them, else steps) and report.html (the runs side by side, the "
                    "config keys in which they differ, and the figure, in one self-contained file).")
    report.add_argument("runs", nargs="+", metavar="OUT_DIR", help="a run's out_dir, holding metrics.jsonl")
    report.add_argument("--out", metavar="DIR", help="directory for report.png and report.html "
                                                     "(default: the first OUT_DIR)")
    report.set_defaults(run=run_report)


def run_report(args: argparse.Namespace, extra: list[str]) -> int:
    png_path, html_path = write_report(args.runs, args.out)
    print(png_path)
    print(html_path)
    return 0
