"""The planner's memory estimate against the measured peak memory of real CPU training runs.

Each run is a `pretrain train` process with glibc told to mmap every allocation over 64 KiB
(MALLOC_MMAP_THRESHOLD_), so freed tensors leave the resident set at once and its anonymous
resident memory follows the live tensors; the test polls it. A tiny model run the same way measures what is not the model (Python, torch,
data); the estimate must match the rest within 20%."""

from __future__ import annotations

import os
import subprocess
import sys
import time
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
    """Peak anonymous resident memory of a `pretrain train` process, polled every 2 ms (file-backed
    pages such as torch's libraries are left out: the kernel may drop them at any time)."""
    overrides = tiny_overrides(run_dir, corpus, tokenizer, **{k.replace(".", "__"): v for k, v in settings.items()})
    overrides += ["--train.max_steps=2", "--optim.warmup_steps=1"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    config = run_dir.parent / "empty.yaml"
    config.write_text("{}\n")
    run_dir.mkdir()
    with open(run_dir / "log.txt", "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "pretrain", "train", str(config), *overrides], env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
        peak, status = 0, Path(f"/proc/{process.pid}/status")
        while process.poll() is None:
            try:
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
                peak = max(peak, int(fields["RssAnon"].split()[0]) * 1024)
            except (OSError, KeyError, ValueError):
                pass  # the process is exiting
            time.sleep(0.002)
    assert process.returncode == 0, (run_dir / "log.txt").read_text()[-3000:]
    return peak, overrides


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
    print(f"measured {measured / 2**20:.0f} MiB ({peak / 2**20:.0f} - {base_peak / 2**20:.0f}), estimated {estimate / 2**20:.0f} MiB")
    assert 0.8 < measured / estimate < 1.2, f"measured {measured / 2**20:.0f} MiB, estimated {estimate / 2**20:.0f} MiB"
