"""Crashes and hangs of a real 2-process job launched with launch/torchrun.sh: a rank killed
with SIGKILL at a random step is restarted by torchrun and the job ends exactly where an
uninterrupted one does; a rank stuck in a step is caught by the watchdog instead of hanging."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.export.weights import load_weights
from pretrain.resilience.watchdog import HUNG_EXIT_CODE
from tests.conftest import read_metrics, tiny_overrides

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
STEPS = 10
JOB = ["--parallel.backend=fsdp", "--train.micro_batch_size=2", "--train.global_batch_sequences=8",
       "--checkpoint.every=2"]


def launch(run: Path, corpus: Path, tokenizer: Path, *extra: str, max_restarts: int = 2, env: dict | None = None,
           ) -> subprocess.Popen:
    """launch/torchrun.sh with 2 processes on the tiny model, writing into `run`."""
    args = [*tiny_overrides(run, corpus, tokenizer, train__max_steps=STEPS), *JOB, *extra]
    env = {**os.environ, "NPROC": "2", "MAX_RESTARTS": str(max_restarts), "PYTHON": sys.executable, **(env or {})}
    config = run.parent / f"{run.name}.yaml"
    config.write_text(f"out_dir: {run}\n")
    return subprocess.Popen(["bash", "launch/torchrun.sh", str(config), *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc: subprocess.Popen, timeout_s: float = 300) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return output


def last_losses(run: Path) -> dict[int, float]:
    """step -> loss, the last record of each step (a step trained again after a restart)."""
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def worker_pids(agent_pid: int) -> list[int]:
    """The training processes torchrun's agent started (its children)."""
    children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
    return [int(pid) for pid in children]


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout_s: float = 180) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        if (run / "metrics.jsonl").exists():
            reached = max((r.get("step", 0) for r in read_metrics(run)), default=0)
            if reached >= step:
                return reached
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout_s}s")


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_weights(run / "checkpoints" / f"step_{STEPS:08d}")


def test_a_rank_killed_at_a_random_step_restarts_by_itself_and_ends_identical(tmp_path, corpus_file, tokenizer_file):
    straight = tmp_path / "straight"
    output = finish(launch(straight, corpus_file, tokenizer_file))
    assert sorted(last_losses(straight)) == list(range(1, STEPS + 1)), output[-3000:]

    seed = random.randrange(10**6)
    rng = random.Random(seed)
    kill_at, victim = rng.randint(3, STEPS - 2), rng.randint(0, 1)
    crashed = tmp_path / "crashed"
    proc = launch(crashed, corpus_file, tokenizer_file)
    reached = wait_for_step(crashed, kill_at, proc)
    os.kill(sorted(worker_pids(proc.pid))[victim], signal.SIGKILL)
    output = finish(proc)
    context = f"seed {seed}: rank {victim} killed after step {reached}\n{output[-4000:]}"
    assert proc.returncode == 0, context
    assert "restart 1 of this job" in output and "resumed from" in output, context
    assert last_losses(crashed) == last_losses(straight), context
    expected, got = final_weights(straight), final_weights(crashed)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), context


def test_a_rank_stuck_in_a_step_is_caught_by_the_watchdog(tmp_path, corpus_file, tokenizer_file):
    run = tmp_path / "run"
    start = time.monotonic()
    proc = launch(run, corpus_file, tokenizer_file, "--train.hang_timeout_s=4", "--parallel.timeout_s=300",
                  max_restarts=0, env={"PRETRAIN_FAULTS": "sleep@3:rank=1:seconds=600"})
    output = finish(proc, timeout_s=240)
    assert proc.returncode != 0 and time.monotonic() - start < 200, output[-4000:]
    assert "watchdog: rank 1 has been in step 3" in output, output[-4000:]
    # Both ranks dump (rank 0 waits in a collective); each rank's lines stay whole and tagged.
    stuck_rank_frames = [line for line in output.splitlines() if line.startswith("[rank 1] ")]
    assert "rank 1: Python stacks after" in output, output[-4000:]
    assert any("in step_started" in line for line in stuck_rank_frames), output[-4000:]
    assert f"exitcode: {HUNG_EXIT_CODE}" in output or f"exit code {HUNG_EXIT_CODE}" in output, output[-4000:]
