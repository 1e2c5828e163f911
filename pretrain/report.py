"""`pretrain report OUT_DIR [OUT_DIR...]`: one or more runs' metrics.jsonl drawn as report.png
(training and validation loss, learning rate, tokens/s, per-source validation perplexity) and
report.html (the figure embedded, a summary table per run; one self-contained file), so runs can
be compared without wandb or TensorBoard."""

from __future__ import annotations

import argparse
import base64
import html
import io
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pretrain.atomic_dir import write_file
from pretrain.errors import PretrainError

PANELS = ("training loss", "validation loss", "learning rate", "tokens/s", "validation perplexity")
SOURCE_LINESTYLES = ("-", "--", ":", "-.")


@dataclass
class RunMetrics:
    """The records of one run's metrics.jsonl by kind, in step order, one per step: a resumed run
    logs some steps again, and the last record written for a (step, kind) is the one kept."""

    name: str
    path: Path
    train: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)
    skipped_lines: int = 0  # not a JSON object with a "step", e.g. the half-written last line of a crash
    replaced_records: int = 0  # earlier copies of a (step, kind) that a resume logged again

    @property
    def sources(self) -> list[str]:
        """The data sources that have a per-source validation perplexity, sorted."""
        return sorted({name for r in self.validation for name in r.get("val_ppl_by_source") or {}})


def record_kind(record: dict) -> str | None:
    """"train", "validation", "checkpoint", or None for records the report does not draw (eval hooks)."""
    if "val_loss" in record:
        return "validation"
    if "loss" in record:
        return "train"
    if "checkpoint_blocked_s" in record:
        return "checkpoint"
    return None


def load_metrics(out_dir: str | Path) -> RunMetrics:
    """Read `out_dir/metrics.jsonl`. Unreadable lines are counted in `skipped_lines`, not fatal."""
    run_dir = Path(out_dir)
    if not run_dir.is_dir():
        raise PretrainError(f"{run_dir}: no such run directory; give the run's out_dir (the config's out_dir)")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PretrainError(f"{path} does not exist: {run_dir} has logged no metrics; train it first "
                            f"(pretrain train CONFIG) or give the run's out_dir")
    by_kind: dict[str, dict[int, dict]] = {"train": {}, "validation": {}, "checkpoint": {}}
    skipped = replaced = 0
    # errors="replace": a crash can leave NUL bytes or a cut multi-byte character in the last line
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                skipped += 1
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                skipped += 1
                continue
            kind = record_kind(record)
            if kind is not None:
                replaced += record["step"] in by_kind[kind]
                by_kind[kind][record["step"]] = record
    if not any(by_kind.values()):
        raise PretrainError(f"{path} holds no training or validation records ({skipped} unreadable lines); "
                            f"train the run until it logs a step, or give another run's out_dir")

    def in_step_order(records: dict[int, dict]) -> list[dict]:
        return [records[step] for step in sorted(records)]

    return RunMetrics(name=run_dir.resolve().name, path=run_dir, train=in_step_order(by_kind["train"]),
                      validation=in_step_order(by_kind["validation"]),
                      checkpoints=in_step_order(by_kind["checkpoint"]), skipped_lines=skipped,
                      replaced_records=replaced)


def write_report(run_dirs: list[str], out: str | None = None) -> tuple[Path, Path]:
    """Write report.png and report.html for the runs into `out` (default: the first run's dir).
    Runs whose directory names collide are named by the path given instead."""
    if not run_dirs:
        raise PretrainError("no run given; give at least one run's out_dir")
    runs = [load_metrics(run_dir) for run_dir in run_dirs]
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = str(run.path)
    out_dir = Path(out if out is not None else run_dirs[0])
    if out_dir.exists() and not out_dir.is_dir():
        raise PretrainError(f"--out {out_dir} is a file; give a directory for report.png and report.html")
    png, _ = render_figure(runs)
    png_path = write_file(out_dir / "report.png", png)
    html_path = write_file(out_dir / "report.html", report_html(runs, png))
    return png_path, html_path


def plot_report(runs: list[RunMetrics], path: str | Path) -> dict[str, int]:
    """Write the report's figure to `path`; return the number of curves drawn in each panel."""
    png, curves = render_figure(runs)
    write_file(path, png)
    return curves


def x_axis(runs: list[RunMetrics]) -> str:
    """"tokens" when every training and validation record has them (runs of different batch sizes
    compare better by tokens seen), else "step" (metrics files from before tokens were logged)."""
    records = [r for run in runs for r in run.train + run.validation]
    return "tokens" if all(_number(r.get("tokens")) is not None for r in records) else "step"


def render_figure(runs: list[RunMetrics]) -> tuple[bytes, dict[str, int]]:
    """The PNG bytes of the report's figure and the number of curves in each panel.

    One colour per run. A curve is drawn for each run that logged the panel's value at least once.
    "validation perplexity" draws val_ppl_by_source, one line per source of each run (one line
    style per source), and val_ppl for runs without per-source values."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import EngFormatter

    x_key = x_axis(runs)
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5), layout="constrained")
    panels = dict(zip(PANELS, axes.flat))
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(runs))]
    any_sources = any(run.sources for run in runs)

    def draw(panel: str, records: list[dict], value: str | Callable[[dict], object], **style) -> None:
        xs, ys = _series(records, x_key, value)
        if xs:
            panels[panel].plot(xs, ys, **style)

    for run, color in zip(runs, colors):
        draw("training loss", run.train, "loss", color=color, linewidth=1)
        draw("validation loss", run.validation, "val_loss", color=color, marker="o", markersize=3)
        draw("learning rate", run.train, "lr", color=color)
        draw("tokens/s", run.train, "tokens_per_s", color=color, linewidth=1)
        for source, linestyle in zip(run.sources, itertools.cycle(SOURCE_LINESTYLES)):
            draw("validation perplexity", run.validation,
                 lambda r, source=source: (r.get("val_ppl_by_source") or {}).get(source),
                 color=color, linestyle=linestyle, marker="o", markersize=3, label=f"{run.name}: {source}")
        if not run.sources:
            label = f"{run.name} (all sources)" if any_sources else run.name
            draw("validation perplexity", run.validation, "val_ppl", color=color, marker="o", markersize=3,
                 label=label)

    for title, ax in panels.items():
        ax.set_title(title + (" by source" if title == "validation perplexity" and any_sources else ""))
        ax.set_xlabel(x_key)
        ax.grid(alpha=0.3)
        if x_key == "tokens":
            ax.xaxis.set_major_formatter(EngFormatter())
        if not ax.get_lines():
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")
    if panels["validation perplexity"].get_lines():
        panels["validation perplexity"].set_yscale("log")  # perplexity falls by orders of magnitude early on
        if any_sources:
            panels["validation perplexity"].legend(fontsize="small")
    legend_ax = axes.flat[len(PANELS)]
    legend_ax.axis("off")
    legend_ax.legend(handles=[Line2D([], [], color=c, label=run.name) for run, c in zip(runs, colors)],
                     loc="center", title="runs", frameon=False)
    curves = {title: len(ax.get_lines()) for title, ax in panels.items()}
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue(), curves


def summary_rows(run: RunMetrics) -> list[tuple[str, str]]:
    """(label, value) rows of a run's table in report.html."""
    last_train = run.train[-1] if run.train else {}
    last_val = run.validation[-1] if run.validation else {}
    records = run.train + run.validation
    last = max(records, key=lambda r: r["step"])
    max_steps = last_train.get("max_steps")
    rows = [("last step", f"{last['step']:,}" + (f" / {max_steps:,}" if isinstance(max_steps, int) else "")),
            ("tokens", _fmt(last.get("tokens"), "{:,.0f}")),
            ("final training loss", _fmt(last_train.get("loss"))),
            ("final validation loss / ppl",
             f"{_fmt(last_val.get('val_loss'))} / {_fmt(last_val.get('val_ppl'), '{:.2f}')}")]
    if "val_bpb" in last_val:
        rows.append(("final validation bits per byte", _fmt(last_val["val_bpb"])))
    scored = [r for r in run.validation if _number(r.get("val_loss")) is not None]
    if scored:
        best = min(scored, key=lambda r: r["val_loss"])
        rows.append(("best validation loss", f"{best['val_loss']:.4f} (step {best['step']:,})"))
    throughputs = [v for v in (_number(r.get("tokens_per_s")) for r in run.train) if v is not None]
    rows.append(("mean tokens/s", _fmt(sum(throughputs) / len(throughputs) if throughputs else None, "{:,.0f}")))
    memory = [v for v in (_number(r.get("memory_gib")) for r in run.train) if v is not None]
    rows.append(("peak memory (GiB)", _fmt(max(memory) if memory else None, "{:.2f}")))
    for source in run.sources:
        final = [r["val_ppl_by_source"][source] for r in run.validation if source in (r.get("val_ppl_by_source") or {})]
        rows.append((f"final validation ppl: {source}", _fmt(final[-1], "{:.2f}")))
    if run.checkpoints:
        blocked = sum(_number(r.get("checkpoint_blocked_s")) or 0.0 for r in run.checkpoints)
        rows.append(("checkpoints", f"{len(run.checkpoints)} (training blocked {blocked:.1f} s in all)"))
    if run.replaced_records:
        rows.append(("steps logged again after a resume", f"{run.replaced_records} (the last copy is shown)"))
    if run.skipped_lines:
        rows.append(("unreadable lines skipped", str(run.skipped_lines)))
    return rows


def report_html(runs: list[RunMetrics], png: bytes) -> str:
    """A self-contained page: the figure as a data: URI and one table per run (no external resources)."""
    names = ", ".join(run.name for run in runs)
    tables = []
    for run in runs:
        rows = "\n".join(f"<tr><th>{html.escape(label)}</th><td>{html.escape(value)}</td></tr>"
                         for label, value in summary_rows(run))
        tables.append(f"<h2>{html.escape(run.name)}</h2>\n<p class=\"path\">{html.escape(str(run.path))}"
                      f"/metrics.jsonl</p>\n<table>\n{rows}\n</table>")
    image = base64.b64encode(png).decode("ascii")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>pretrain report: {html.escape(names)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
img {{ max-width: 100%; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.75em; text-align: left; }}
th {{ font-weight: normal; color: #555; }}
td {{ font-family: monospace; }}
.path {{ color: #777; font-size: small; }}
</style></head>
<body>
<h1>pretrain report: {html.escape(names)}</h1>
<img alt="training and validation curves of {html.escape(names)}" src="data:image/png;base64,{image}">
{chr(10).join(tables)}
</body></html>
"""


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register `pretrain report`."""
    report = commands.add_parser(
        "report", help="plot and compare runs' metrics (losses, LR, tokens/s, per-source perplexity)",
        description="Read OUT_DIR/metrics.jsonl of one or more runs and write report.png (training and validation "
                    "loss, learning rate, tokens/s, validation perplexity by source; several runs overlay, one "
                    "colour per run, against tokens when every run logged them, else steps) and report.html (the "
                    "figure and a summary table per run, in one self-contained file).")
    report.add_argument("runs", nargs="+", metavar="OUT_DIR", help="a run's out_dir, holding metrics.jsonl")
    report.add_argument("--out", metavar="DIR", help="directory for report.png and report.html "
                                                     "(default: the first OUT_DIR)")
    report.set_defaults(run=run_report)


def run_report(args: argparse.Namespace, extra: list[str]) -> int:
    png_path, html_path = write_report(args.runs, args.out)
    print(png_path)
    print(html_path)
    return 0


def _number(value: object) -> float | None:
    """`value` as a finite float, or None (missing, null, NaN after a divergence, not a number)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _series(records: list[dict], x_key: str, value: str | Callable[[dict], object]) -> tuple[list, list]:
    get = value if callable(value) else (lambda r: r.get(value))
    points = [(_number(r.get(x_key)), _number(get(r))) for r in records]
    points = [(x, y) for x, y in points if x is not None and y is not None]
    return [x for x, _ in points], [y for _, y in points]


def _fmt(value: object, spec: str = "{:.4f}") -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return spec.format(value)  # NaN shows as "nan": a diverged run should say so
    return "—"
