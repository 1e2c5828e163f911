"""One run per out_dir with real trainers and processes: a second `pretrain train` into a busy
out_dir is refused before it writes anything, on every rank of a torchrun job; once the holder
is killed, the next run takes its lock over and resumes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.resilience.run_lock import LOCK_FILE_NAME, OutDirLocked
from pretrain.trainer import Trainer
from tests.conftest import tiny_overrides, wait_for_step

REPO = Path(__file__).resolve().parents[2]
# A run on another node, alive (its heartbeat is fresh): to be refused.
OTHER_RUN = {"host": "node-17", "machine": "node-17/boot/pid:[1]", "pid": 4242, "process_start": "999",
             "job_id": "SLURM_JOB_ID=991", "started": 0.0, "token": "theirs"}


def write_other_run_lock(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_FILE_NAME
    path.write_text(json.dumps({**OTHER_RUN, "started": time.time() - 60}))
    return path


def config_file(run: Path) -> str:
    path = run.parent / "config.yaml"
    path.write_text(f"out_dir: {run}\n")
    return str(path)


def files(run: Path) -> dict[str, tuple[int, int]]:
    """relative path -> (size, mtime in ns) of every file under `run`."""
    return {str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}


def without_job_ids() -> dict[str, str]:
    """This environment minus the job ids, so each test process counts as its own job."""
    return {k: v for k, v in os.environ.items() if k not in ("PRETRAIN_JOB_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")}


def test_a_trainer_refuses_a_locked_out_dir_before_writing_anything(tiny_config):
    cfg = tiny_config(train__max_steps=2)
    lock = write_other_run_lock(Path(cfg.out_dir))
    with pytest.raises(OutDirLocked, match="pid 4242 on host node-17"):
        Trainer(cfg)
    assert [p.name for p in Path(cfg.out_dir).iterdir()] == [LOCK_FILE_NAME]
    lock.unlink()
    Trainer(cfg).train()  # the lock is gone: it trains, and releases its own lock at the end
    assert not lock.exists() and (Path(cfg.out_dir) / "config.yaml").is_file()


@pytest.mark.slow
def test_a_second_run_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path, corpus_file, tokenizer_file):
    run = tmp_path / "run"
    args = tiny_overrides(run, corpus_file, tokenizer_file, train__max_steps=100000, checkpoint__every=2)
    train = [sys.executable, "-m", "pretrain", "train", config_file(run), *args]
    first = subprocess.Popen(train, cwd=REPO, env=without_job_ids(), text=True, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        wait_for_step(run, 3, first)
        # Paused, the first run writes nothing more, so "the second wrote nothing" is exact; its
        # process still runs, which is what the lock checks on this machine.
        os.kill(first.pid, signal.SIGSTOP)
        before = files(run)
        start = time.monotonic()
        second = subprocess.run(train, cwd=REPO, env=without_job_ids(), text=True, capture_output=True, timeout=60)
        assert second.returncode != 0, second.stderr[-3000:]
        assert time.monotonic() - start < 45
        assert f"pid {first.pid} on host {socket.gethostname()}" in second.stderr, second.stderr[-3000:]
        assert "in use by another training run" in second.stderr and str(run / LOCK_FILE_NAME) in second.stderr
        assert files(run) == before  # no metrics line, no checkpoint, not even config.yaml rewritten
    finally:
        first.kill()  # SIGKILL: no chance to release the lock
        first.wait()
    newest = max(int(p.name.removeprefix("step_")) for p in (run / "checkpoints").glob("step_*"))
    third = subprocess.run([*train, f"--train.stop_at={newest + 2}"], cwd=REPO, env=without_job_ids(), text=True,
                           capture_output=True, timeout=60)
    output = third.stdout + third.stderr
    assert third.returncode == 0, output[-3000:]
    assert f"pid {first.pid}" in output and "taking over the lock" in output, output[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{newest:08d}'}" in output, output[-3000:]
    assert not (run / LOCK_FILE_NAME).exists()


@pytest.mark.slow
def test_every_rank_of_a_torchrun_job_stops_when_out_dir_is_locked(tmp_path, corpus_file, tokenizer_file):
    run = tmp_path / "run"
    lock = write_other_run_lock(run)
    args = [*tiny_overrides(run, corpus_file, tokenizer_file), "--parallel.backend=fsdp",
            "--train.micro_batch_size=2", "--train.global_batch_sequences=8"]
    start = time.monotonic()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    job = subprocess.run([*torchrun, "-m", "pretrain", "train", config_file(run), *args], cwd=REPO,
                         env=without_job_ids(), text=True, capture_output=True, timeout=120)
    output = job.stdout + job.stderr
    assert job.returncode != 0 and time.monotonic() - start < 60, output[-3000:]
    assert "pid 4242 on host node-17" in output and "rank 0 could not take the lock" in output, output[-3000:]
    assert [p.name for p in run.iterdir()] == [LOCK_FILE_NAME] and json.loads(lock.read_text())["token"] == "theirs"
