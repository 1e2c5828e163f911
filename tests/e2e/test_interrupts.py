"""Ctrl-C as a person uses it: the first saves after the current step and says how to stop at
once; the second stops at once and says what was kept; under torchrun each is said once, without
a traceback. Config errors under the launch script are reported once, before any process starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.resilience.preemption import INTERRUPTED_EXIT_CODE
from tests.conftest import consistent_losses as losses
from tests.conftest import tiny_overrides, wait_for_step

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def config_file(run: Path) -> str:
    path = run.parent / "config.yaml"
    path.write_text(f"out_dir: {run}\n")
    return str(path)


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(json.loads(p.read_text())["step"] for p in (run / "checkpoints").glob("step_*/manifest.json"))


def train(run: Path, args: list[str], env: dict | None = None) -> subprocess.Popen:
    """In a process group of its own, as a terminal runs a command: a Ctrl-C reaches the group."""
    return subprocess.Popen([sys.executable, "-m", "pretrain", "train", config_file(run), *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
                            start_new_session=True)


def ctrl_c(proc: subprocess.Popen) -> None:
    """What a terminal does on Ctrl-C: SIGINT to every process of the foreground group (the
    trainer and its data workers alike)."""
    os.killpg(proc.pid, signal.SIGINT)


def wait_for(condition, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_ctrl_c_saves_after_the_step_and_a_rerun_resumes(tmp_path, corpus_file, tokenizer_file):
    """No step is lost; the data workers and the background eval-hook process, which got the
    Ctrl-C too, keep serving until the last checkpoint is written and evaluated."""
    run = tmp_path / "run"
    hook_log = tmp_path / "hooks.jsonl"
    args = tiny_overrides(run, corpus_file, tokenizer_file, train__max_steps=100000, checkpoint__every=3,
                          data__num_workers=2, eval__hooks="[tests.e2e.recording_hooks:record]", eval__hooks_async=True,
                          eval__hook_options=f"{{tests.e2e.recording_hooks:record: {{log_file: '{hook_log}'}}}}")
    proc = train(run, args)
    wait_for(lambda: hook_log.exists(), proc)  # the hook process is up
    wait_for_step(run, 4, proc)
    ctrl_c(proc)
    output, stopped = stopped_with_a_checkpoint(proc, run, 4, timeout_s=120)
    assert "Traceback" not in output and "failed" not in output, output[-3000:]
    assert json.loads(hook_log.read_text().splitlines()[-1])["step"] == stopped
    assert output.count("Press Ctrl-C again to stop at once without saving") == 1
    assert f"interrupted: stopped after step {stopped} with a checkpoint" in output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    resumed = subprocess.run([sys.executable, "-m", "pretrain", "train", config_file(run), *args,
                              f"--train.stop_at={stopped + 2}"], cwd=REPO, text=True, capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{stopped:08d}'}" in resumed.stdout + resumed.stderr


def test_a_second_ctrl_c_stops_at_once_and_says_what_is_kept(tmp_path, corpus_file, tokenizer_file):
    run = tmp_path / "run"
    args = tiny_overrides(run, corpus_file, tokenizer_file, train__max_steps=100000, checkpoint__every=4)
    proc = train(run, args, {"PRETRAIN_FAULTS": "sleep@6:seconds=60"})  # step 6 takes a minute
    wait_for_step(run, 5, proc)
    wait_for(lambda: checkpoint_steps(run) == [4], proc)
    time.sleep(1.0)  # into step 6's sleep
    ctrl_c(proc)
    time.sleep(0.5)
    ctrl_c(proc)
    stdout, stderr = proc.communicate(timeout=30)  # not the minute of the sleep
    output = stdout + stderr
    assert proc.returncode == INTERRUPTED_EXIT_CODE, output[-3000:]
    assert checkpoint_steps(run) == [4]
    assert (f"interrupted: stopped at once after step 5 without saving (the steps since the last checkpoint are lost); "
            f"the newest complete checkpoint, "
            f"{run / 'checkpoints' / 'step_00000004'}, is intact") in output
    assert "Traceback" not in output
    assert not (run / ".train.lock").exists()  # the next run may start at once


def test_ctrl_c_during_a_save_keeps_the_previous_checkpoint_and_says_so(tmp_path, corpus_file, tokenizer_file):
    """The first Ctrl-C lets the save go on; the second interrupts it half-way through its write."""
    run = tmp_path / "run"
    args = tiny_overrides(run, corpus_file, tokenizer_file, train__max_steps=100000, checkpoint__every=4)
    proc = train(run, args, {"PRETRAIN_FAULTS": "slow_save@8:seconds=60"})
    wait_for(lambda: any((run / "checkpoints").glob(".tmp_step_00000008/*.distcp")), proc)
    ctrl_c(proc)
    time.sleep(0.5)
    ctrl_c(proc)
    stdout, stderr = proc.communicate(timeout=30)
    output = stdout + stderr
    assert proc.returncode == INTERRUPTED_EXIT_CODE, output[-3000:]
    assert checkpoint_steps(run) == [4]
    assert ("interrupted: during the write of the checkpoint of step 8: that checkpoint was not kept; the newest "
            f"complete checkpoint, {run / 'checkpoints' / 'step_00000004'}, is intact") in output
    assert "Free disk space" not in output and "failed" not in output
    resumed = subprocess.run([sys.executable, "-m", "pretrain", "train", config_file(run), *args,
                              "--train.stop_at=6"], cwd=REPO, text=True, capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_00000004'}" in resumed.stdout + resumed.stderr


def stopped_with_a_checkpoint(proc: subprocess.Popen, run: Path, at_least: int, timeout_s: float) -> tuple[str, int]:
    """The output of a run stopped by Ctrl-C, and the step of its last checkpoint, which holds
    every step the run trained."""
    stdout, stderr = proc.communicate(timeout=timeout_s)
    output = stdout + stderr
    assert proc.returncode == INTERRUPTED_EXIT_CODE, output[-3000:]
    stopped = checkpoint_steps(run)[-1]
    assert stopped >= at_least and stopped == max(losses(run))
    return output, stopped


def launch_script(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(["bash", "launch/torchrun.sh", *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHON": sys.executable, "NPROC": "2", **env},
                            start_new_session=True)


def test_ctrl_c_under_the_launch_script_saves_once_and_ends_quietly(tmp_path, corpus_file, tokenizer_file):
    """A terminal's Ctrl-C reaches torchrun only (its ranks run in sessions of their own)."""
    run = tmp_path / "run"
    args = [config_file(run), *tiny_overrides(run, corpus_file, tokenizer_file, train__max_steps=100000),
            "--parallel.backend=fsdp", "--train.micro_batch_size=2", "--train.global_batch_sequences=8"]
    proc = launch_script(args)
    wait_for_step(run, 3, proc)
    ctrl_c(proc)
    output, stopped = stopped_with_a_checkpoint(proc, run, 3, timeout_s=180)
    assert output.count("Press Ctrl-C again to stop at once without saving") == 1, output[-3000:]
    assert output.count(f"interrupted: stopped after step {stopped} with a checkpoint") == 1, output[-3000:]
    assert "Traceback" not in output and "SignalException" not in output, output[-3000:]


def test_a_config_error_under_the_launch_script_is_reported_once_before_any_process(tmp_path):
    run = tmp_path / "run"
    started = time.monotonic()
    proc = launch_script([config_file(run), "--train.max_stepz=10"], MAX_RESTARTS="3")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stdout + stderr
    assert stderr.count("train.max_stepz") >= 1 and stderr.count("error:") == 1, stderr
    assert "ChildFailedError" not in stdout + stderr and "Traceback" not in stdout + stderr
    assert not run.exists()  # no rank started
    assert time.monotonic() - started < 60
