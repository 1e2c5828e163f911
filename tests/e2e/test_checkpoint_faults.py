"""Faults that bite while a checkpoint is being written, in real 2-process jobs (torchrun): a rank
killed half-way through its shard (DCP, and a background write of checkpoint.async), and a
disk that fills up on one rank half-way through its write (DCP and DeepSpeed). Each is injected
inside the engine's own file write (PRETRAIN_FAULTS kill_mid_save / disk_full, pretrain.resilience.faults):
part of the rank's file is on disk when it bites. The newest complete checkpoint must survive,
nothing half-written may look like a checkpoint, and a restart must resume from it to the same
losses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import consistent_losses as losses
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TWO_RANKS = ["--train.micro_batch_size=2", "--train.global_batch_sequences=8", "--checkpoint.every=2"]
# Long enough that a rank left waiting for a failed peer would outlast the test's own timeout.
PATIENT = "--parallel.timeout_s=600"


def torchrun(run: Path, corpus: Path, tokenizer: Path, *extra: str, faults: str = "",
             timeout_s: float = 240) -> subprocess.CompletedProcess:
    config = run.parent / f"{run.name}.yaml"
    config.write_text(f"out_dir: {run}\n")
    args = [*tiny_overrides(run, corpus, tokenizer, train__max_steps=6), *TWO_RANKS, PATIENT, *extra]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "pretrain", "train", str(config), *args]
    env = {**os.environ, "PRETRAIN_FAULTS": faults} if faults else {k: v for k, v in os.environ.items()
                                                                     if k != "PRETRAIN_FAULTS"}
    proc = subprocess.Popen(command, cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the ranks too, not only torchrun
        raise
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def checkpoints(run: Path) -> list[str]:
    """Every name under out_dir/checkpoints: whole checkpoints and anything left half-written."""
    return sorted(p.name for p in (run / "checkpoints").iterdir())


@pytest.mark.parametrize("write", ["sync", "async"])
def test_a_rank_killed_while_writing_its_shard_leaves_the_previous_checkpoint_and_a_restart_resumes(
        tmp_path, corpus_file, tokenizer_file, write):
    run = tmp_path / "run"
    job = ["--parallel.backend=fsdp", f"--checkpoint.async={str(write == 'async').lower()}"]
    crashed = torchrun(run, corpus_file, tokenizer_file, *job, faults="kill_mid_save@4:rank=1")
    assert crashed.returncode != 0
    half = run / "checkpoints" / ".tmp_step_00000004" / "__1_0.distcp"
    assert half.is_file(), "the kill did not happen inside rank 1's write of its shard:\n" + crashed.stderr[-3000:]
    assert checkpoints(run) == [".tmp_step_00000004", "step_00000002"]
    assert max(losses(run)) >= 4

    restarted = torchrun(run, corpus_file, tokenizer_file, *job)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'}" in restarted.stdout + restarted.stderr
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6]  # steps 3-4 retrained to the same losses (see losses())
    assert checkpoints(run) == ["step_00000002", "step_00000004", "step_00000006"]


BACKENDS = {"fsdp": ["--parallel.backend=fsdp"],
            "zero2": ["--parallel.backend=deepspeed", "--parallel.zero_stage=2"]}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_disk_full_on_one_rank_mid_write_stops_every_rank_at_once_with_its_reason(
        tmp_path, corpus_file, tokenizer_file, backend):
    """Rank 0 writes its whole shard; rank 1's disk fills half-way through its own. Both stop
    (DeepSpeed's ranks used to wait for each other until parallel.timeout_s), both name rank 1's
    full disk, and the checkpoint of step 2 is what a restart resumes from."""
    run = tmp_path / "run"
    failed = torchrun(run, corpus_file, tokenizer_file, *BACKENDS[backend], faults="disk_full@4:rank=1",
                      timeout_s=180)  # far below parallel.timeout_s: nobody waited for it
    assert failed.returncode != 0
    reason = "on rank 1: [Errno 28] No space left on device (injected by PRETRAIN_FAULTS)"
    stopped = [line for line in failed.stderr.splitlines() if line.startswith("error: writing checkpoint")]
    assert len(stopped) == 2 and all(reason in line for line in stopped), failed.stderr[-3000:]
    assert all("step_00000002, is intact" in line for line in stopped)
    assert checkpoints(run) == ["step_00000002"]  # the temporary directory of step 4 is gone

    restarted = torchrun(run, corpus_file, tokenizer_file, *BACKENDS[backend])
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / 'step_00000002'}" in restarted.stdout + restarted.stderr
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6]
