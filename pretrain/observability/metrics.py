"""One MetricLogger for numbers: a console line, a JSON record in out_dir/metrics.jsonl, and the
trackers the config enables."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pretrain.config.schema import Config

log = logging.getLogger("pretrain")

METRICS_FILE = "metrics.jsonl"  # in out_dir; `pretrain report` and the scaling fit read it


class MetricLogger:
    """Writes metric records (dicts with a "step") as JSON lines, one readable console line, and
    to any tracker the config turns on (pretrain/observability/tracking.py: wandb, TensorBoard).

    Only the rank that owns the output (rank 0) writes; other ranks pass `enabled=False`."""

    def __init__(self, out_dir: str, enabled: bool = True, trackers: list | None = None):
        self.enabled = enabled
        self._file = None
        self.trackers = list(trackers or []) if enabled else []
        if enabled:
            path = Path(out_dir) / METRICS_FILE
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", encoding="utf-8")

    @classmethod
    def for_config(cls, cfg: Config, enabled: bool = True) -> MetricLogger:
        """The logger of a run: metrics.jsonl and console, plus the trackers `cfg.logging` enables."""
        from pretrain.observability.tracking import run_trackers

        return cls(cfg.out_dir, enabled, run_trackers(cfg) if enabled else [])

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        assert self._file is not None, "MetricLogger.log() after close()"
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        line = format_record(record)
        if line:
            log.info(line)
        for tracker in self.trackers:
            tracker.write(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def format_record(r: dict) -> str:
    """`step 20/200 | loss 5.1234 | lr 3.00e-04 | ...` for a training or validation record,
    `step 10 | eval/finance_terms/acc 0.41` for an eval hook's numbers; "" for a record with
    nothing to show beyond its step (a checkpoint's timing: the checkpoint code logs its own line)."""
    parts = [f"step {r['step']}" + (f"/{r['max_steps']}" if "max_steps" in r else "")]
    if "loss" in r:
        parts.append(f"loss {r['loss']:.4f}")
    if "val_loss" in r:
        bpb = f", {r['val_bpb']:.3f} bits/byte" if "val_bpb" in r else ""
        parts.append(f"val_loss {r['val_loss']:.4f} (ppl {r['val_ppl']:.2f}{bpb})")
        parts += [f"{name} ppl {ppl:.2f}" for name, ppl in r.get("val_ppl_by_source", {}).items()]
    if "lr" in r:
        parts.append(f"lr {r['lr']:.2e}")
    if "grad_norm" in r:
        parts.append(f"grad_norm {r['grad_norm']:.3f}")
    if "tokens_per_s" in r:
        parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
    if r.get("mfu") is not None:
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    if "memory_gib" in r:
        parts.append(f"mem {r['memory_gib']:.2f} GiB")
    if "eta_s" in r:
        parts.append(f"ETA {format_duration(r['eta_s'])}")
    parts += [f"{key} {format_number(value)}" for key, value in r.items() if key.startswith("eval/")]
    return " | ".join(parts) if len(parts) > 1 else ""


def format_number(value: float) -> str:
    """An eval hook's number as it came (an int whole, a float to 5 significant digits)."""
    return f"{value:,}" if isinstance(value, int) else f"{value:.5g}"


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
