"""The planner's memory estimate against the measured peak memory of real CPU training runs.

Each run is a `pretrain train` process with glibc told to mmap every allocation over 64 KiB
(MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set at once and its peak follows
the live tensors. A tiny model run the same way measures what is not the model (Python, torch,
data); the estimate must match the rest within 20%."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import load_config
from pretrain.scaling.memory import training_memory
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow

MODEL = {"model.d_model": 512, "model.n_layers": 8, "model.n_heads": 8, "model.n_kv_heads": 8,
         "model.ffn_hidden": 1408}
TINY = {"model.d_model": 32, "model.n_layers": 1, "model.n_heads": 1, "model.n_kv_heads": 1, "model.ffn_hidden": 32}


def measured_peak_bytes(run_dir: Path, corpus: Path, tokenizer: Path, settings: dict) -> tuple[float, list[str]]:
    overrides = tiny_overrides(run_dir, corpus, tokenizer, **{k.replace(".", "__"): v for k, v in settings.items()})
    overrides += ["--train.max_steps=2", "--optim.warmup_steps=1"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    config = run_dir.parent / "empty.yaml"
    config.write_text("{}\n")
    subprocess.run([sys.executable, "-m", "pretrain", "train", str(config), *overrides], env=env, check=True,
                   capture_output=True, timeout=240)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return max(r["memory_gib"] for r in records if "memory_gib" in r) * 2**30, overrides


def estimated_bytes(overrides: list[str]) -> float:
    cfg = load_config(None, overrides)
    p = cfg.parallel
    return training_memory(cfg.model, cfg.data.seq_len, cfg.train.micro_batch_size, 1, p.backend,
                           checkpointing=p.activation_checkpointing, bf16=cfg.train.precision == "bf16").total


@pytest.mark.parametrize("settings", [
    {"train.precision": "fp32", "data.seq_len": 128, "train.micro_batch_size": 8},
    {"train.precision": "bf16", "data.seq_len": 256, "train.micro_batch_size": 8,
     "parallel.activation_checkpointing": "full"},
], ids=["fp32", "bf16-checkpointed"])
def test_estimate_within_20_percent_of_measured_peak(tmp_path, corpus_file, tokenizer_file, settings):
    common = {**settings, "train.global_batch_sequences": 8}
    base_peak, base_overrides = measured_peak_bytes(tmp_path / "tiny", corpus_file, tokenizer_file,
                                                    {**common, **TINY})
    peak, overrides = measured_peak_bytes(tmp_path / "model", corpus_file, tokenizer_file, {**common, **MODEL})
    measured = peak - base_peak
    estimate = estimated_bytes(overrides) - estimated_bytes(base_overrides)
    assert estimate > 300 * 2**20  # the model dominates what is measured
    print(f"measured {measured / 2**20:.0f} MiB, estimated {estimate / 2**20:.0f} MiB")
    assert 0.8 < measured / estimate < 1.2, f"measured {measured / 2**20:.0f} MiB, estimated {estimate / 2**20:.0f} MiB"
