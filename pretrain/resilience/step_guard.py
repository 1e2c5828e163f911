"""Judging each step before its update lands: a NaN/inf loss or gradient norm, or a loss spike
(a z-score over the recent losses), gets the policy the config names (train.on_nonfinite,
train.on_loss_spike): skip the update, stop, or roll back to the last checkpoint and skip the
data since it. Every rank judges the same all-reduced numbers, so all take the same decision.

Decisions are appended to the bad-batch ledger, out_dir/bad_batches.jsonl, which outlives
restarts: a resume from a checkpoint that a rollback went back to skips the same data again."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from pretrain.config.schema import TrainConfig

log = logging.getLogger(__name__)

LEDGER = "bad_batches.jsonl"
MIN_HISTORY = 20  # losses needed before a spike can be called


@dataclass(frozen=True)
class Verdict:
    action: str  # "ok", "warn", "skip", "stop" or "rollback"
    reason: str = ""

    @property
    def applies_update(self) -> bool:
        return self.action in ("ok", "warn")


OK = Verdict("ok")


class StepGuard:
    """Holds the recent losses (part of the checkpoint, so a resumed run judges as the
    uninterrupted one would) and turns each step's loss and gradient norm into a Verdict."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.recent: deque[float] = deque(maxlen=cfg.spike_window)

    def judge(self, loss: float, grad_norm: float) -> Verdict:
        """The verdict on a step whose global mean loss and gradient norm are given (identical on
        every rank); a step that applies its update joins the recent losses."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return Verdict(self.cfg.on_nonfinite, f"non-finite loss {loss} / gradient norm {grad_norm}")
        verdict = self._spike(loss)
        if verdict.applies_update:
            self.recent.append(loss)
        return verdict

    def _spike(self, loss: float) -> Verdict:
        assert self.recent.maxlen is not None  # built with maxlen=cfg.spike_window
        if len(self.recent) < min(MIN_HISTORY, self.recent.maxlen):
            return OK
        mean = sum(self.recent) / len(self.recent)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.recent) / len(self.recent))
        # A floor on the spread: after a flat stretch a tiny wobble must not count as a spike.
        z = (loss - mean) / max(std, 1e-3 * abs(mean), 1e-8)
        if z <= self.cfg.spike_zscore:
            return OK
        return Verdict(self.cfg.on_loss_spike, f"loss spike: {loss:.4f} is {z:.1f} standard deviations above the "
                                               f"mean {mean:.4f} of the last {len(self.recent)} steps")

    def state_dict(self) -> dict:
        return {"recent": list(self.recent)}

    def load_state_dict(self, state: dict | None) -> None:
        self.recent.clear()
        self.recent.extend((state or {}).get("recent", []))


class BadBatchLedger:
    """out_dir/bad_batches.jsonl: one JSON line per judged-bad step (step, data cursor, reason,
    action; for a rollback the checkpoint step it went back to and the data position after the
    skipped window). Appended by rank 0, read by every rank."""

    def __init__(self, out_dir: str | Path, is_main: bool):
        self.path, self.is_main = Path(out_dir) / LEDGER, is_main

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        entries = []
        for line in self.path.read_text().splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s: ignoring a damaged line (a crash mid-write?): %.80s", self.path, line)
        return entries

    def record(self, entry: dict) -> None:
        if not self.is_main:
            return
        line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **entry}) + "\n"
        with self.path.open("a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())  # the rollback that follows must find it after any crash

    def start_afresh(self) -> None:
        """Set an earlier run's ledger aside (kept as bad_batches.<time>.jsonl) when this out_dir
        starts training from step 0."""
        if self.is_main and self.path.exists():
            self.path.rename(self.path.with_name(f"bad_batches.{time.strftime('%Y%m%d-%H%M%S')}.jsonl"))

    def bad_steps(self) -> int:
        """Steps skipped or rolled back so far in this run (all attempts)."""
        return sum(1 for e in self.entries() if e.get("action") in ("skip", "rollback"))

    def skip_after_resume(self, checkpoint_step: int) -> dict | None:
        """The data position to continue from after resuming the checkpoint of `checkpoint_step`,
        if a rollback went back to it (the furthest, when several did); else None."""
        rollbacks = [e for e in self.entries() if e.get("action") == "rollback" and e.get("rollback_to") == checkpoint_step]
        if not rollbacks:
            return None
        return max(rollbacks, key=lambda e: e["data_state"]["step"])["data_state"]
