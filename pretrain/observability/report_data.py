"""What `pretrain report` reads from a run's out_dir: metrics.jsonl (training, validation,
checkpoint and eval-hook records), out_dir/eval/ (`pretrain eval --watch` results in
validation.jsonl, one <hook>.jsonl per eval hook), config.yaml and the newest checkpoint's manifest
(world size). Only metrics.jsonl is required; everything else is drawn when it is there."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import yaml

from pretrain.checkpoint.layout import CONFIG, complete_checkpoints, read_manifest
from pretrain.config.parse import load_yaml_text
from pretrain.errors import PretrainError
from pretrain.evaluation.validation import EVAL_DIR, VALIDATION_FILE
from pretrain.observability.metrics import METRICS_FILE
from pretrain.observability.tracking import flatten

HOOK_PREFIX = "eval/"  # eval hooks' numbers in metrics.jsonl: eval/<hook>/<key> (pretrain.evaluation.hook_runner)


@dataclass
class RunMetrics:
    """The records of one run by kind, in step order, one per step: a resumed run logs some steps
    again, and the last record written for a (step, kind) is the one kept."""

    name: str
    path: Path
    train: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)
    checkpoint_evals: list[dict] = field(default_factory=list)  # `pretrain eval` of the run's checkpoints
    hooks: dict[str, list[dict]] = field(default_factory=dict)  # hook name -> {"step", metric: number} records
    hook_errors: dict[str, int] = field(default_factory=dict)  # hook name -> checkpoints it failed on
    config: dict | None = None  # config.yaml as written by the run; None when it is missing
    world_size: int | None = None  # from the newest complete checkpoint's manifest
    skipped_lines: int = 0  # not a JSON object with a "step", e.g. the half-written last line of a crash
    replaced_records: int = 0  # earlier copies of a (step, kind) that a resume logged again

    @property
    def sources(self) -> list[str]:
        """The run's data sources: in config order, then any other source its records name."""
        names = list(self.configured_shares)
        for r in self.train + self.validation + self.checkpoint_evals:
            for key in ("mix_share", "val_loss_by_source", "val_ppl_by_source"):
                names += [name for name in r.get(key) or {} if name not in names]
        return names

    @property
    def configured_shares(self) -> dict[str, float]:
        """Each source's configured weight over the sum of weights (the share it should get)."""
        sources = ((self.config or {}).get("data") or {}).get("sources") or []
        weights = {s["name"]: w for s in sources if isinstance(s, dict) and (w := number(s.get("weight"))) is not None}
        total = sum(weights.values())
        return {name: w / total for name, w in weights.items()} if total > 0 else {}


def record_kind(record: dict) -> str | None:
    """"train", "validation", "checkpoint", "hook" (eval/<hook>/<key> numbers), or None."""
    if "val_loss" in record:
        return "validation"
    if "loss" in record:
        return "train"
    if "checkpoint_blocked_s" in record:
        return "checkpoint"
    if any(key.startswith(HOOK_PREFIX) for key in record):
        return "hook"
    return None


def read_records(path: Path) -> tuple[list[dict], int]:
    """The JSON objects with an integer "step" in a .jsonl file, and how many lines were not one."""
    records, skipped = [], 0
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
            step = record.get("step") if isinstance(record, dict) else None
            if isinstance(step, int) and not isinstance(step, bool):
                records.append(record)
            else:
                skipped += 1
    return records, skipped


def load_metrics(out_dir: str | Path) -> RunMetrics:
    """Read a run's out_dir. Unreadable lines are counted in `skipped_lines`, not fatal."""
    run_dir = Path(out_dir)
    if not run_dir.is_dir():
        raise PretrainError(f"{run_dir}: no such run directory; give the run's out_dir (the config's out_dir)")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise PretrainError(f"{path} does not exist: {run_dir} has logged no metrics; train it first "
                            f"(pretrain train CONFIG) or give the run's out_dir")
    records, skipped = read_records(path)
    by_kind: dict[str, dict[int, dict]] = {"train": {}, "validation": {}, "checkpoint": {}}
    hooks: dict[str, dict[int, dict]] = {}
    replaced = 0
    for record in records:
        kind = record_kind(record)
        if kind == "hook":
            for hook, values in _hook_values(record):
                hooks.setdefault(hook, {}).setdefault(record["step"], {"step": record["step"]}).update(values)
        elif kind is not None:
            replaced += record["step"] in by_kind[kind]
            by_kind[kind][record["step"]] = record
    if not any(by_kind.values()):
        raise PretrainError(f"{path} holds no training or validation records ({skipped} unreadable lines); "
                            f"train the run until it logs a step, or give another run's out_dir")
    run = RunMetrics(name=run_dir.resolve().name, path=run_dir, train=_in_step_order(by_kind["train"]),
                     validation=_in_step_order(by_kind["validation"]),
                     checkpoints=_in_step_order(by_kind["checkpoint"]), skipped_lines=skipped,
                     replaced_records=replaced)
    _read_eval_dir(run, hooks)
    run.hooks = {name: _in_step_order(steps) for name, steps in sorted(hooks.items())}
    run.config = _read_config(run_dir / CONFIG)
    newest = complete_checkpoints(run_dir / "checkpoints")[-1:]
    world_size = (read_manifest(newest[0]) or {}).get("world_size") if newest else None
    run.world_size = world_size if isinstance(world_size, int) else None
    return run


def number(value: object) -> float | None:
    """`value` as a finite float, or None (missing, null, NaN after a divergence, not a number)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def _read_eval_dir(run: RunMetrics, hooks: dict[str, dict[int, dict]]) -> None:
    """out_dir/eval/validation.jsonl into run.checkpoint_evals; every other *.jsonl there is one
    hook's results (or failures), merged with what metrics.jsonl logged of it."""
    eval_dir = run.path / EVAL_DIR
    for path in sorted(eval_dir.glob("*.jsonl")) if eval_dir.is_dir() else []:
        records, skipped = read_records(path)
        run.skipped_lines += skipped
        if path.name == VALIDATION_FILE:
            scored = {r["step"]: r for r in records if number(r.get("val_loss")) is not None}
            run.checkpoint_evals = _in_step_order(scored)
            continue
        for record in records:
            if "error" in record:
                run.hook_errors[path.stem] = run.hook_errors.get(path.stem, 0) + 1
                continue
            values = flatten({k: v for k, v in record.items() if k != "step"})
            if values:
                hooks.setdefault(path.stem, {}).setdefault(record["step"], {"step": record["step"]}).update(values)


def _hook_values(record: dict) -> Iterator[tuple[str, dict]]:
    """(hook, {metric: value}) of a metrics.jsonl record with eval/<hook>/<metric> keys."""
    by_hook: dict[str, dict] = {}
    for key, value in record.items():
        hook, _, metric = key[len(HOOK_PREFIX):].partition("/") if key.startswith(HOOK_PREFIX) else ("", "", "")
        if hook and metric:
            by_hook.setdefault(hook, {})[metric] = value
    yield from by_hook.items()


def _read_config(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        config = load_yaml_text(path.read_text(encoding="utf-8", errors="replace"))
    except yaml.YAMLError:
        return None  # the report is still worth having without the config table
    return config if isinstance(config, dict) else None


def _in_step_order(records: dict[int, dict]) -> list[dict]:
    return [records[step] for step in sorted(records)]
