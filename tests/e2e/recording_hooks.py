"""Eval hooks for tests/e2e/test_eval_hooks.py: importable by spec, also from a spawned process."""

from __future__ import annotations

import json
from pathlib import Path


def record(checkpoint: str, step: int, config, log_file: str) -> dict:
    """Append what it was called with to `log_file`; return a metric derived from the step."""
    with open(log_file, "a") as f:
        f.write(json.dumps({"checkpoint": checkpoint, "step": step, "out_dir": config.out_dir,
                            "manifest": (Path(checkpoint) / "manifest.json").is_file()}) + "\n")
    return {"double_step": 2 * step, "note": "not a number: kept in the jsonl, not logged"}


def explode(checkpoint: str, step: int, config) -> dict:
    raise RuntimeError(f"hook failure at step {step}")
