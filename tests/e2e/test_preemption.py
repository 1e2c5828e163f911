"""Preemption of real multi-process jobs (torchrun, 2 processes): SIGTERM saves a checkpoint and
exits for requeueing (faults during a save: test_checkpoint_faults.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.errors import PREEMPTED_EXIT_CODE
from tests.conftest import consistent_losses as losses
from tests.conftest import tiny_overrides, wait_for_step

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TWO_RANKS = ["--parallel.backend=fsdp", "--train.micro_batch_size=2", "--train.global_batch_sequences=8"]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


def config_file(run: Path) -> str:
    path = run.parent / "config.yaml"
    path.write_text(f"out_dir: {run}\n")
    return str(path)


def newest_checkpoint(run: Path) -> dict:
    manifests = [json.loads(p.read_text()) for p in (run / "checkpoints").glob("step_*/manifest.json")]
    return max(manifests, key=lambda m: m["step"])


def test_sigterm_saves_a_checkpoint_and_exits_for_requeue(tmp_path, corpus_file, tokenizer_file):
    """Checkpointing is even off (checkpoint.every=0): the preemption checkpoint is written anyway."""
    run = tmp_path / "run"
    args = [*tiny_overrides(run, corpus_file, tokenizer_file, train__max_steps=100000, checkpoint__every=0),
            *TWO_RANKS]
    proc = subprocess.Popen(torchrun("-m", "pretrain", "train", config_file(run), *args), cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_step(run, 3, proc)
    proc.send_signal(signal.SIGTERM)  # what Slurm sends; torchrun passes it on to every rank
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    manifest = newest_checkpoint(run)
    stopped = manifest["step"]
    assert 3 <= stopped < 100000 and manifest["world_size"] == 2
    assert f"preempted: stopped after step {stopped} with a checkpoint; exiting with code {PREEMPTED_EXIT_CODE}" in stdout + stderr
    # the requeued job resumes from it
    resumed = subprocess.run(torchrun("-m", "pretrain", "train", config_file(run), *args, f"--train.stop_at={stopped + 2}"), cwd=REPO,
                             text=True, capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped:08d}'}" in resumed.stdout + resumed.stderr
    assert max(losses(run)) == stopped + 2


def test_sigterm_to_a_single_process_exits_with_the_preempted_code(tmp_path, corpus_file, tokenizer_file):
    run = tmp_path / "run"
    args = tiny_overrides(run, corpus_file, tokenizer_file, train__max_steps=100000)
    proc = subprocess.Popen([sys.executable, "-m", "pretrain", "train", config_file(run), *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_step(run, 2, proc)
    proc.send_signal(signal.SIGUSR1)
    proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE
    assert newest_checkpoint(run)["step"] >= 2
