"""The figure of `pretrain report`: one panel per quantity, several runs overlaid.

Encoding, the same in every panel: a data source has one colour; a run has one line style and
marker (and, where a panel shows whole runs, one dark colour that no source uses). Runs whose
curves coincide are named in a note under the figure, and their markers differ in shape and size
so that both stay visible. Loss axes are linear and zoomed to the later part of training: the
first ~10% (where the loss falls from ln(vocab)) would otherwise flatten every difference that
matters; what is cut off is said in the panel."""

from __future__ import annotations

import io
import math
import textwrap
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pretrain.observability.report_data import RunMetrics, number

if TYPE_CHECKING:  # matplotlib is imported when a figure is drawn
    import matplotlib.axes
    import matplotlib.figure
    import matplotlib.legend

TRAIN, VAL, VAL_SOURCES, MIX, LR, THROUGHPUT = ("training loss", "validation loss", "validation loss by source",
                                                "data mixture", "learning rate", "throughput")
NATS = "nats/token"
SOURCE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#e377c2", "#bcbd22", "#17becf",
                  "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#f7b6d2", "#dbdb8d", "#9edae5")
RUN_COLOURS = ("#000000", "#8c564b", "#7f7f7f", "#483d8b", "#2f4f4f", "#b8860b")  # dark: no source has them
RUN_LINESTYLES = ("-", "-.", ":", (0, (5, 1, 1, 1, 1, 1)))  # "--" is kept for the configured mixture
RUN_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
MAX_HOOK_PANELS = 6
COLUMNS, WIDTH, PANEL_HEIGHT = 3, 17.0, 3.9  # inches
NOTE_CHARS = 190  # a line of notes under the figure
LATER = 0.1  # y-limits come from the points after this fraction of the x range


@dataclass
class Curve:
    run: int
    xs: list[float]
    ys: list[float]
    source: str | None = None  # coloured by source; None: coloured by run
    hollow: bool = False  # a `pretrain eval` of a checkpoint: markers only


@dataclass
class Panel:
    title: str
    ylabel: str
    curves: list[Curve] = field(default_factory=list)
    zoom: str = "loss"  # "loss": clip the early spike; "zero": from 0 to the top; "share": around the data
    targets: dict[str, float] = field(default_factory=dict)  # source -> configured share (dashed)
    smooth: bool = False
    xlabel: str = "tokens seen"


@dataclass
class Figure:
    figure: matplotlib.figure.Figure
    axes: dict[str, matplotlib.axes.Axes]  # panel title -> its axes
    legend: matplotlib.legend.Legend  # the one legend, below the panels
    notes: list[str]  # identical runs, clipped axes, left-out hook metrics
    curves: dict[str, int]  # panel title -> curves drawn (checkpoint evaluations included)


def x_axis(runs: list[RunMetrics]) -> str:
    """"tokens" when every training and validation record has them (runs of different batch sizes
    compare better by tokens seen), else "step" (metrics files from before tokens were logged)."""
    records = [r for run in runs for r in run.train + run.validation]
    return "tokens" if all(number(r.get("tokens")) is not None for r in records) else "step"


def source_colours(runs: list[RunMetrics]) -> dict[str, str]:
    """One colour per source name over all runs, in the order the runs name them."""
    names: list[str] = []
    for run in runs:
        names += [s for s in run.sources if s not in names]
    return {name: SOURCE_COLOURS[i % len(SOURCE_COLOURS)] for i, name in enumerate(names)}


def panels_of(runs: list[RunMetrics], x_key: str) -> tuple[list[Panel], list[str]]:
    """The panels with data (the four core ones always), and notes on hook metrics left out."""
    x_label = "tokens seen" if x_key == "tokens" else "optimizer step"
    core = [Panel(TRAIN, f"training loss ({NATS})", smooth=True),
            Panel(VAL, f"validation loss ({NATS}, mixture-weighted)"),
            Panel(VAL_SOURCES, f"validation loss ({NATS})"),
            Panel(MIX, "share of training tokens so far", zoom="share"),
            Panel(LR, "learning rate", zoom="zero"),
            Panel(THROUGHPUT, "throughput (tokens/s)", zoom="zero", smooth=True)]
    panels = {p.title: p for p in core}
    hook_panels: dict[str, Panel] = {}
    for i, run in enumerate(runs):
        x_of = _x_by_step(run, x_key)

        def add(title: str, records: list[dict], get, source: str | None = None, hollow: bool = False,
                i: int = i, x_of=x_of) -> None:  # this run's index and x axis, bound as the lambdas bind theirs
            points = [(x, y) for r in records if (x := x_of(r)) is not None and (y := number(get(r))) is not None]
            if points:
                panels[title].curves.append(Curve(i, [x for x, _ in points], [y for _, y in points], source, hollow))

        add(TRAIN, run.train, lambda r: r.get("loss"))
        add(VAL, run.validation, lambda r: r.get("val_loss"))
        add(VAL, run.checkpoint_evals, lambda r: r.get("val_loss"), hollow=True)
        for source in run.sources:
            add(VAL_SOURCES, run.validation, lambda r, s=source: _source_loss(r, s), source)
            add(VAL_SOURCES, run.checkpoint_evals, lambda r, s=source: _source_loss(r, s), source, hollow=True)
            add(MIX, run.train, lambda r, s=source: (r.get("mix_share") or {}).get(s), source)
        if len(run.sources) > 1:
            panels[MIX].targets.update(run.configured_shares)
        add(LR, run.train, lambda r: r.get("lr"))
        add(THROUGHPUT, run.train, lambda r: r.get("tokens_per_s"))
        for hook, records in run.hooks.items():
            for metric in dict.fromkeys(k for r in records for k in r if k != "step"):
                title = f"eval hook {hook}: {metric}"
                panels[title] = hook_panels.setdefault(title, Panel(title, f"{metric} (as the hook returns it)"))
                add(title, records, lambda r, m=metric: r.get(m))
    if not any(len({c.source for c in panels[MIX].curves if c.run == i}) > 1 for i in range(len(runs))):
        del panels[MIX]  # one source per run: the share is 1 throughout
    if not panels[VAL_SOURCES].curves:
        del panels[VAL_SOURCES]
    notes = []
    constant = [t for t, p in hook_panels.items()
                if len({y for c in p.curves for y in c.ys}) == 1 and sum(len(c.ys) for c in p.curves) > 1]
    shown = [t for t in hook_panels if t not in constant][:MAX_HOOK_PANELS]
    left_out = [t for t in hook_panels if t not in shown]
    for title in left_out:
        del panels[title]
    if left_out:
        notes.append(f"not drawn (constant, or more than {MAX_HOOK_PANELS} hook metrics; their last values are in "
                     "report.html): " + ", ".join(left_out))
    for panel in panels.values():
        panel.xlabel = x_label
    return list(panels.values()), notes


def identical_runs(panel: Panel, names: list[str]) -> list[list[str]]:
    """Groups of two or more runs whose curves in `panel` are the same (same sources, points)."""
    keys: dict[tuple, list[str]] = {}
    for i, name in enumerate(names):
        # checkpoint evaluations aside: another measurement of the same checkpoints, not run by every run
        curves = tuple(sorted((c.source or "", tuple(c.xs), tuple(c.ys)) for c in panel.curves
                              if c.run == i and not c.hollow))
        if curves:
            keys.setdefault(curves, []).append(name)
    return [group for group in keys.values() if len(group) > 1]


def identical_notes(panels: list[Panel], names: list[str]) -> list[str]:
    """One sentence per group of runs with coinciding curves, naming the panels (or, when they are
    most of them, the panels where the runs differ)."""
    groups = {panel.title: identical_runs(panel, names) for panel in panels}
    notes = []
    for group in dict.fromkeys(tuple(g) for gs in groups.values() for g in gs):
        members = [names.index(name) for name in group]
        shared = [p.title for p in panels if all(any(c.run == i and not c.hollow for c in p.curves) for i in members)]
        # where a larger group is identical these runs are too, but that group's note says so
        titles = [t for t in shared if tuple(group) in map(tuple, groups[t])]
        differ = [t for t in shared if not any(set(group) <= set(g) for g in groups[t])]
        what = (f"curves in every panel but {_and(differ)}" if differ and len(differ) < len(titles)
                else "curves in every panel" if not differ else _and(titles))
        notes.append(f"runs {_and(group)} have identical {what}: their lines coincide (the markers differ, so that "
                     f"each stays visible)")
    return notes


def build_figure(runs: list[RunMetrics]) -> Figure:
    """The report's figure, not yet saved (tests look at its axes, lines and legend)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    x_key = x_axis(runs)
    names = [run.name for run in runs]
    colours = source_colours(runs)
    panels, notes = panels_of(runs, x_key)
    notes[:0] = identical_notes(panels, names)
    rows = math.ceil(len(panels) / COLUMNS)
    fig = plt.figure(figsize=(WIDTH, 1), layout="constrained")  # the height is set once the footer is known
    axes = {}
    clipped = []
    grid = fig.add_gridspec(rows + 1, COLUMNS)
    for n, panel in enumerate(panels):
        ax = axes[panel.title] = fig.add_subplot(grid[n // COLUMNS, n % COLUMNS])
        _draw(ax, panel, runs, colours, x_key)
        cut = _set_ylim(ax, panel)
        if cut is not None:
            clipped.append(f"{panel.title} (up to {cut:.4g})")
    if clipped:
        notes.append("y-axes zoomed to the later part of training; points above the axis are not shown in: "
                     + "; ".join(clipped))
    handles, legend_rows = _legend_entries(runs, colours, panels)
    text = "\n".join(textwrap.fill(note, NOTE_CHARS, subsequent_indent="    ") for note in notes)
    footer = 0.3 + 0.3 * legend_rows + 0.21 * (text.count("\n") + 1 if text else 0)
    fig.set_figheight(PANEL_HEIGHT * rows + footer)
    grid.set_height_ratios([PANEL_HEIGHT] * rows + [footer])
    footer_ax = fig.add_subplot(grid[rows, :])
    footer_ax.axis("off")
    legend = footer_ax.legend(handles=handles, loc="upper center", ncol=len(handles) // legend_rows,
                              frameon=False, fontsize="medium", handlelength=3.5, columnspacing=2.5)
    footer_ax.text(0.0, 0.0, text, transform=footer_ax.transAxes, ha="left", va="bottom", fontsize="medium",
                   color="#333333")
    fig.suptitle("pretrain report: " + ", ".join(names), fontsize="x-large")
    curves = {panel.title: len(panel.curves) for panel in panels}
    return Figure(fig, axes, legend, notes, curves)


def render_png(runs: list[RunMetrics]) -> tuple[bytes, Figure]:
    """The PNG bytes of the figure, and the figure's description (closed: only for its numbers)."""
    import matplotlib.pyplot as plt

    figure = build_figure(runs)
    buffer = io.BytesIO()
    figure.figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure.figure)
    return buffer.getvalue(), figure


def run_style(i: int) -> dict:
    """Line style, marker and (for whole-run panels) colour of the i-th run."""
    return {"linestyle": RUN_LINESTYLES[i % len(RUN_LINESTYLES)], "marker": RUN_MARKERS[i % len(RUN_MARKERS)],
            "color": RUN_COLOURS[i % len(RUN_COLOURS)]}


def _draw(ax, panel: Panel, runs: list[RunMetrics], colours: dict[str, str], x_key: str) -> None:
    from matplotlib.ticker import EngFormatter

    n_runs = len(runs)
    for curve in panel.curves:
        style = run_style(curve.run)
        colour = colours[curve.source] if curve.source is not None else style["color"]
        # earlier runs get bigger markers, so that identical curves show every run's marker
        size = max(3.0, 7.5 - 4.0 * curve.run / max(n_runs - 1, 1)) if n_runs > 1 else 5.0
        # markers on every stride-th point, each run starting elsewhere: coinciding lines show all runs' markers
        stride = max(1, len(curve.xs) // 12)
        stride = max(stride, n_runs) if len(curve.xs) >= 3 * n_runs else 1
        marks = {"marker": style["marker"], "markersize": size, "markevery": (curve.run * stride // n_runs, stride)}
        if curve.hollow:
            ax.plot(curve.xs, curve.ys, linestyle="none", color=colour, markerfacecolor="none", marker=style["marker"],
                    markersize=size + 3, markeredgewidth=1.3, zorder=3)
        elif panel.smooth and len(curve.xs) >= 40:
            window = max(5, len(curve.xs) // 25)
            ax.plot(curve.xs, curve.ys, color=colour, linewidth=0.7, alpha=0.25)
            ax.plot(curve.xs, _moving_average(curve.ys, window), color=colour, linestyle=style["linestyle"],
                    linewidth=1.6, **marks)
        else:
            ax.plot(curve.xs, curve.ys, color=colour, linestyle=style["linestyle"], linewidth=1.4, **marks)
    if panel.targets:
        for source, share in panel.targets.items():
            ax.axhline(share, color=colours.get(source, "gray"), linestyle="--", linewidth=1.2, alpha=0.8)
    ax.set_title(panel.title + (" (faint: each logged step; bold: moving average)" if panel.smooth and any(
        len(c.xs) >= 40 for c in panel.curves) else ""), fontsize="large")
    ax.set_xlabel(panel.xlabel)
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    if x_key == "tokens":
        ax.xaxis.set_major_formatter(EngFormatter())
    if not panel.curves:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")


def _set_ylim(ax, panel: Panel) -> float | None:
    """Zoom the y-axis; return the highest value cut off, if any."""
    points = [(x, y) for c in panel.curves for x, y in zip(c.xs, c.ys)]
    if not points:
        return None
    ys = sorted(y for _, y in points)
    if panel.zoom == "zero":
        ax.set_ylim(0, max(ys) * 1.08 or 1.0)
        return None
    x_max = max(x for x, _ in points)
    later = sorted(y for x, y in points if x >= LATER * x_max) or ys
    lo = later[0]
    hi = later[-1] if len(later) < 50 else later[int(0.995 * (len(later) - 1))]
    if panel.zoom == "share":
        lo, hi = min([lo, *panel.targets.values()]), max([hi, *panel.targets.values()])
    pad = 0.08 * (hi - lo) or 0.05 * abs(hi) or 0.1
    ax.set_ylim(lo - pad, hi + pad)
    return ys[-1] if ys[-1] > hi + pad else None


def _legend_entries(runs: list[RunMetrics], colours: dict[str, str], panels: list[Panel]) -> tuple[list, int]:
    """Legend handles in columns (runs, sources, what the marks mean), each headed by a title and
    padded to the same number of rows; and that number."""
    from matplotlib.lines import Line2D

    def blank(label: str = "") -> Line2D:
        return Line2D([], [], linestyle="none", marker="none", label=label)

    groups = [[blank("runs (line style, marker)")]
              + [Line2D([], [], linewidth=1.6, markersize=6, label=run.name, **run_style(i))
                 for i, run in enumerate(runs)]]
    if colours:
        groups.append([blank("data sources (colour)")] + [Line2D([], [], color=c, linewidth=3, label=s)
                                                           for s, c in colours.items()])
    marks = [Line2D([], [], color="gray", linestyle="--", label="configured share")
             if any(p.targets for p in panels) else None,
             Line2D([], [], color="gray", linestyle="none", marker="o", markerfacecolor="none", markersize=9,
                    label="pretrain eval of a checkpoint") if any(c.hollow for p in panels for c in p.curves) else None]
    if any(marks):
        groups.append([blank("marks")] + [m for m in marks if m is not None])
    rows = min(max(len(g) for g in groups), 9)
    columns = []
    for group in groups:
        for start in range(0, len(group), rows):
            column = group[start:start + rows]
            columns.append(column + [blank() for _ in range(rows - len(column))])
    return [handle for column in columns for handle in column], rows


def _x_by_step(run: RunMetrics, x_key: str):
    """record -> its step, or the tokens seen at its step (a hook's own "tokens" are something else)."""
    tokens = {r["step"]: number(r.get("tokens")) for r in run.train + run.validation + run.checkpoints
              + run.checkpoint_evals}

    def x_of(record: dict) -> float | None:
        return float(record["step"]) if x_key == "step" else tokens.get(record["step"])

    return x_of


def _source_loss(record: dict, source: str) -> float | None:
    loss = (record.get("val_loss_by_source") or {}).get(source)
    if loss is None:  # metrics from before per-source losses were logged: only perplexities
        ppl = number((record.get("val_ppl_by_source") or {}).get(source))
        loss = math.log(ppl) if ppl else None
    return loss


def _moving_average(ys: list[float], window: int) -> list[float]:
    """Centred (no lag), over `window` points; fewer at the ends."""
    sums = [0.0]
    for y in ys:
        sums.append(sums[-1] + y)
    half = window // 2
    spans = [(max(i - half, 0), min(i + half + 1, len(ys))) for i in range(len(ys))]
    return [(sums[end] - sums[start]) / (end - start) for start, end in spans]


def _and(items) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
