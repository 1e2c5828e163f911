"""report.html of `pretrain report`: the runs side by side (final and best losses with their
steps, tokens, realised mixture, eval results, backend and world size), the config keys in which
the runs differ, the notes under the figure, and the figure; one self-contained file."""

from __future__ import annotations

import base64
import html
import json
import math
from types import SimpleNamespace
from typing import TYPE_CHECKING, Callable, cast

from pretrain.observability.report_data import RunMetrics, number

if TYPE_CHECKING:
    from pretrain.config.schema import ParallelConfig

Row = tuple[str, list[str], list[float | None] | None]  # label, one cell per run, values to mark the lowest of


def comparison_rows(runs: list[RunMetrics]) -> list[Row]:
    """The rows of the comparison table, one cell per run; loss rows carry their values so that
    the lowest can be marked."""
    tokens = [fmt(_last(sorted(run.train + run.validation, key=lambda r: r["step"]), "tokens"), "{:,.0f}")
              for run in runs]
    rows: list[Row] = [("out_dir", [str(run.path) for run in runs], None),
                       ("last step", [_last_step(run) for run in runs], None), ("tokens seen", tokens, None)]

    def loss_row(label: str, records: Callable[[RunMetrics], list[dict]], value: Callable[[dict], object],
                 best: bool = False) -> None:
        found = [_pick(records(run), value, best) for run in runs]
        if any(f is not None for f in found):
            cells = [f"{f[0]:.4f} (step {f[1]:,})" if f else "—" for f in found]
            # a diverged run's NaN counts as the worst value, a run without this value not at all
            rank = [None if f is None else math.inf if number(f[0]) is None else f[0] for f in found]
            rows.append((label, cells, rank))

    loss_row("final training loss", lambda r: r.train, lambda r: r.get("loss"))
    loss_row("best training loss", lambda r: r.train, lambda r: r.get("loss"), best=True)
    loss_row("final validation loss", lambda r: r.validation, lambda r: r.get("val_loss"))
    loss_row("best validation loss", lambda r: r.validation, lambda r: r.get("val_loss"), best=True)
    loss_row("final validation bits per byte", lambda r: r.validation, lambda r: r.get("val_bpb"))
    sources = list(dict.fromkeys(s for run in runs for s in run.sources))
    for source in sources:
        loss_row(f"final validation loss: {source}", lambda r: r.validation,
                 _by_source("val_loss_by_source", source))
    for source in sources:
        cells = []
        for run in runs:
            share = _last(run.train, _by_source("mix_share", source))
            target = run.configured_shares.get(source)
            cells.append(fmt(share, "{:.3f}") + (f" (configured {target:.3f})" if target is not None else ""))
        if any(cell != "—" for cell in cells):
            rows.append((f"share of training tokens: {source}", cells, None))
    for label, best in (("final", False), ("best", True)):
        loss_row(f"pretrain eval: {label} validation loss", lambda r: r.checkpoint_evals, lambda r: r.get("val_loss"),
                 best)
    hook_metrics = dict.fromkeys((hook, m) for run in runs for hook, recs in run.hooks.items()
                                 for r in recs for m in r if m != "step")
    for hook, metric in hook_metrics:
        found = [_pick(run.hooks.get(hook, []), _field(metric)) for run in runs]
        cells = [f"{f[0]:.5g} (step {f[1]:,})" if f else "—" for f in found]
        rows.append((f"eval hook {hook}: {metric} (last)", cells, None))
    for hook in sorted({h for run in runs for h in run.hook_errors}):
        failed = [str(run.hook_errors.get(hook, 0)) for run in runs]
        rows.append((f"eval hook {hook}: failed checkpoints", failed, None))
    rows.append(("backend / world size", [_backend(run) for run in runs], None))
    rows.append(("mean tokens/s", [fmt(_mean(run.train, "tokens_per_s"), "{:,.0f}") for run in runs], None))
    rows.append(("peak memory (GiB)", [fmt(max((v for r in run.train if (v := number(r.get("memory_gib"))) is not None),
                                               default=None), "{:.2f}") for run in runs], None))
    rows.append(("checkpoints", [f"{len(run.checkpoints)} (training blocked "
                                 f"{sum(number(r.get('checkpoint_blocked_s')) or 0.0 for r in run.checkpoints):.1f} s)"
                                 for run in runs], None))
    if any(run.replaced_records for run in runs):
        rows.append(("steps logged again after a resume (last copy shown)", [str(run.replaced_records) for run in runs],
                     None))
    if any(run.skipped_lines for run in runs):
        rows.append(("unreadable lines skipped", [str(run.skipped_lines) for run in runs], None))
    return rows


def flatten_config(config: dict, prefix: str = "") -> dict[str, str]:
    """Dotted keys of a config.yaml, values as text; data.sources entries by their name
    (data.sources.web.weight), so adding a source shows as new keys, not shifted ones."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
            for entry in value:
                flat.update(flatten_config({k: v for k, v in entry.items() if k != "name"}, f"{name}.{entry['name']}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, dict, bool)) or value is None else str(value)
    return flat


def config_differences(runs: list[RunMetrics]) -> dict[str, list[str]]:
    """Config keys whose values are not the same in every run (out_dir aside), one value per run
    ("—" where a run lacks the key)."""
    flat = [flatten_config(run.config) if run.config is not None else {} for run in runs]
    keys = dict.fromkeys(k for f in flat for k in f if k != "out_dir")
    return {k: [f.get(k, "—") for f in flat] for k in keys if len({f.get(k) for f in flat}) > 1}


def report_html(runs: list[RunMetrics], png: bytes, notes: list[str]) -> str:
    """A self-contained page (no external resources): the comparison table, the config
    differences, the notes and the figure as a data: URI."""
    names = ", ".join(run.name for run in runs)
    head = "".join(f"<th>{html.escape(run.name)}</th>" for run in runs)
    body = "\n".join(_table_row(label, cells, values) for label, cells, values in comparison_rows(runs))
    missing = [run.name for run in runs if run.config is None]
    if len(runs) == 1:
        config_part = "<p>One run: nothing to compare.</p>"
    else:
        differences = config_differences(runs)
        config_rows = "\n".join(_table_row(key, values, None, code=True) for key, values in differences.items())
        config_part = (f"<table>\n<tr><th>key</th>{head}</tr>\n{config_rows}\n</table>" if differences
                       else "<p>The configs are the same (apart from out_dir).</p>")
    if missing:
        config_part += f"<p>No readable config.yaml in: {html.escape(', '.join(missing))}.</p>"
    notes_part = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
    image = base64.b64encode(png).decode("ascii")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>pretrain report: {html.escape(names)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
img {{ max-width: 100%; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 0.25em 0.75em; text-align: left; }}
th {{ font-weight: normal; color: #555; }}
tr:first-child th {{ font-weight: bold; color: #222; }}
td {{ font-family: monospace; }}
td.best {{ font-weight: bold; background: #eef6ee; }}
</style></head>
<body>
<h1>pretrain report: {html.escape(names)}</h1>
<h2>Runs side by side</h2>
<table id="comparison">
<tr><th></th>{head}</tr>
{body}
</table>
<p>Losses are in nats per token; the lowest of the runs is in bold.</p>
<h2>Config differences</h2>
{config_part}
{f"<h2>Notes</h2><ul>{notes_part}</ul>" if notes else ""}
<h2>Curves</h2>
<img alt="training and validation curves of {html.escape(names)}" src="data:image/png;base64,{image}">
</body></html>
"""


def fmt(value: object, spec: str = "{:.4f}") -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return spec.format(value)  # NaN shows as "nan": a diverged run should say so
    return "—"


def _table_row(label: str, cells: list[str], values: list[float | None] | None, code: bool = False) -> str:
    known = [v for v in values or [] if v is not None]
    lowest = min(known) if len(known) > 1 and len(set(known)) > 1 else None
    tds = "".join(f"<td{' class=best' if lowest is not None and v == lowest else ''}>{html.escape(cell)}</td>"
                  for cell, v in zip(cells, values or [None] * len(cells)))
    label_html = f"<code>{html.escape(label)}</code>" if code else html.escape(label)
    return f"<tr><th>{label_html}</th>{tds}</tr>"


def _pick(records: list[dict], value: Callable[[dict], object], best: bool = False) -> tuple[float, int] | None:
    """(value, step) of the last record with a value (NaN after a divergence too: the table should
    say so), or of the lowest finite one with `best`."""
    found = [(float(v), r["step"]) for r in records
             if isinstance(v := value(r), (int, float)) and not isinstance(v, bool)]
    if best:
        found = [(v, step) for v, step in found if number(v) is not None]
        return min(found, key=lambda f: f[0]) if found else None
    return found[-1] if found else None


def _last(records: list[dict], value: str | Callable[[dict], object]) -> float | None:
    picked = _pick(records, value if callable(value) else _field(value))
    return picked[0] if picked else None


def _field(key: str) -> Callable[[dict], object]:
    """record -> its value of `key` (None when it has none)."""
    return lambda r: r.get(key)


def _by_source(key: str, source: str) -> Callable[[dict], object]:
    """record -> the value for `source` of its per-source `key` (a {source: value} dict)."""
    return lambda r: (r.get(key) or {}).get(source)


def _mean(records: list[dict], key: str) -> float | None:
    values = [v for r in records if (v := number(r.get(key))) is not None]
    return sum(values) / len(values) if values else None


def _last_step(run: RunMetrics) -> str:
    last = max(r["step"] for r in run.train + run.validation)
    max_steps = run.train[-1].get("max_steps") if run.train else None
    return f"{last:,}" + (f" / {max_steps:,}" if isinstance(max_steps, int) else "")


def _backend(run: RunMetrics) -> str:
    from pretrain.trainer import backend_name  # the name the training log uses

    parallel = (run.config or {}).get("parallel")
    backend = "—"
    if isinstance(parallel, dict) and "backend" in parallel:
        # the saved section as it is (not validated): only the keys backend_name reads
        section = SimpleNamespace(**{"zero_stage": "?", "replicate": 1, **parallel})
        backend = backend_name(cast("ParallelConfig", section))
    size = "—" if run.world_size is None else f"{run.world_size} rank" + ("s" if run.world_size != 1 else "")
    return f"{backend} / {size}"
