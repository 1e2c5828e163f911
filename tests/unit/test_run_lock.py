"""The out_dir lock: a live holder is refused with its name, a dead or silent one is taken over,
a restart of the same job takes over, and a lock is only ever removed by its own holder."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.resilience.run_lock import (
    LOCK_FILE_NAME,
    STALE_AFTER_S,
    Holder,
    OutDirLocked,
    RunLock,
    current_job_id,
    lock_out_dir,
    machine_id,
    process_start,
    read_holder,
)

OTHER_HOST = {"host": "node-17", "machine": "node-17/boot/pid:[1]", "pid": 4242, "process_start": "999"}


@pytest.fixture(autouse=True)
def no_job_id(monkeypatch):
    """Tests start outside any job unless they set one (CI may run under Slurm)."""
    for name in ("PRETRAIN_JOB_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def warnings():
    """The messages pretrain.resilience.run_lock logs (pytest's logging plugin is off in our runs)."""
    records: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("pretrain.resilience.run_lock")
    logger.addHandler(handler)
    previous = logger.level
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(previous)


def write_lock(out_dir: Path, heartbeat_age_s: float = 0.0, **fields: object) -> Path:
    """A lock file as another run writes it, with a heartbeat `heartbeat_age_s` seconds old."""
    out_dir.mkdir(parents=True, exist_ok=True)
    holder = {"host": socket.gethostname(), "pid": None, "machine": machine_id(), "process_start": None,
              "job_id": None, "started": time.time() - 3600, "token": "theirs", **fields}
    path = out_dir / LOCK_FILE_NAME
    path.write_text(json.dumps(holder))
    then = time.time() - heartbeat_age_s
    os.utime(path, (then, then))
    return path


@contextlib.contextmanager
def live_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the pid names no process
    return proc.pid


def test_a_free_out_dir_is_created_locked_with_the_holder_and_released(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "123")
    lock = RunLock(tmp_path / "new" / "run")
    lock.acquire()
    holder = json.loads(lock.path.read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert holder["job_id"] == "SLURM_JOB_ID=123" and holder["started"] <= time.time()
    lock.release()
    assert not lock.path.exists()
    lock.release()  # twice: nothing more to do


def test_a_live_run_on_this_machine_is_refused_with_its_name_and_the_fixes(tmp_path):
    with live_process() as pid:
        path = write_lock(tmp_path, heartbeat_age_s=10 * STALE_AFTER_S, pid=pid, process_start=process_start(pid),
                          job_id="SLURM_JOB_ID=7")
        before = path.read_bytes()
        with pytest.raises(OutDirLocked) as refused:
            RunLock(tmp_path).acquire()
    message = str(refused.value)
    for part in (f"pid {pid}", f"host {socket.gethostname()}", "job SLURM_JOB_ID=7", "since ", "last heartbeat",
                 "still running on this machine", "Wait for that run", "another --out_dir", f"delete {path}"):
        assert part in message, (part, message)
    assert path.read_bytes() == before  # refused: the holder's lock is untouched


def test_the_same_job_id_does_not_take_over_from_a_process_still_running_here(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")  # e.g. two runs started in one allocation
    with live_process() as pid:
        write_lock(tmp_path, pid=pid, process_start=process_start(pid), job_id="SLURM_JOB_ID=7")
        with pytest.raises(OutDirLocked, match=f"pid {pid}"):
            RunLock(tmp_path).acquire()


def test_a_lock_whose_process_died_on_this_machine_is_taken_over(tmp_path, warnings):
    pid = dead_pid()
    write_lock(tmp_path, pid=pid)
    lock = RunLock(tmp_path)
    lock.acquire()
    assert read_holder(lock.path).pid == os.getpid()
    assert any("taking over" in w and f"pid {pid}" in w for w in warnings), warnings
    lock.release()


def test_a_reused_pid_is_not_taken_for_the_holder(tmp_path):
    with live_process() as pid:
        write_lock(tmp_path, pid=pid, process_start="1")  # that pid, but a process started long ago
        lock = RunLock(tmp_path)
        lock.acquire()
    assert read_holder(lock.path).pid == os.getpid()
    lock.release()


def test_another_host_with_a_fresh_heartbeat_is_refused(tmp_path):
    write_lock(tmp_path, heartbeat_age_s=STALE_AFTER_S / 2, **OTHER_HOST)
    with pytest.raises(OutDirLocked, match="pid 4242 on host node-17.*heartbeat is fresher"):
        RunLock(tmp_path).acquire()


def test_another_host_with_an_old_heartbeat_is_taken_over(tmp_path, warnings):
    write_lock(tmp_path, heartbeat_age_s=STALE_AFTER_S + 60, **OTHER_HOST)
    lock = RunLock(tmp_path)
    lock.acquire()
    assert read_holder(lock.path).token == lock.holder.token
    assert any("stale" in w and "pid 4242 on host node-17" in w for w in warnings), warnings
    lock.release()


def test_a_restart_of_the_same_job_on_another_host_takes_over(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "991")  # a requeued job keeps its id; rank 0 may land elsewhere
    write_lock(tmp_path, job_id="SLURM_JOB_ID=991", **OTHER_HOST)
    lock = RunLock(tmp_path)
    lock.acquire()
    assert read_holder(lock.path).pid == os.getpid()
    lock.release()


def test_another_job_on_another_host_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "992")
    write_lock(tmp_path, job_id="SLURM_JOB_ID=991", **OTHER_HOST)
    with pytest.raises(OutDirLocked, match="job SLURM_JOB_ID=991"):
        RunLock(tmp_path).acquire()


def test_job_ids_come_from_the_first_variable_set_and_ignore_torchruns_default():
    assert current_job_id({}) is None
    assert current_job_id({"TORCHELASTIC_RUN_ID": "none"}) is None
    assert current_job_id({"TORCHELASTIC_RUN_ID": "ab12"}) == "TORCHELASTIC_RUN_ID=ab12"
    assert current_job_id({"TORCHELASTIC_RUN_ID": "ab12", "SLURM_JOB_ID": "5"}) == "SLURM_JOB_ID=5"
    assert current_job_id({"SLURM_JOB_ID": "5", "PRETRAIN_JOB_ID": "pj"}) == "PRETRAIN_JOB_ID=pj"


def test_a_second_lock_in_the_same_process_takes_over_and_release_removes_only_its_own(tmp_path):
    first, second = RunLock(tmp_path), RunLock(tmp_path)
    first.acquire()
    second.acquire()  # a Trainer built twice in one process (resume tests, sweeps)
    first.release()
    assert read_holder(second.path).token == second.holder.token  # the first no longer held it
    second.release()
    assert not second.path.exists()


def test_release_never_removes_another_runs_lock(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    path = write_lock(tmp_path, **OTHER_HOST)  # e.g. it judged ours stale and took over
    lock.release()
    assert read_holder(path).token == "theirs"


def test_the_heartbeat_refreshes_the_lock_and_stops_once_it_is_not_ours(tmp_path, warnings):
    lock = RunLock(tmp_path, heartbeat_s=0.05)
    lock.acquire()
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    deadline = time.monotonic() + 10
    while read_holder(lock.path).heartbeat < time.time() - 60:
        assert time.monotonic() < deadline, "no heartbeat within 10s"
        time.sleep(0.02)
    write_lock(tmp_path, heartbeat_age_s=1000, **OTHER_HOST)
    time.sleep(0.5)
    assert time.time() - read_holder(lock.path).heartbeat > 900  # not refreshed: not ours
    assert any("taken over by another run" in w for w in warnings), warnings
    lock.release()
    assert read_holder(lock.path).token == "theirs"


def test_an_unreadable_lock_is_refused_while_fresh_and_taken_over_once_old(tmp_path):
    path = tmp_path / LOCK_FILE_NAME
    path.write_text("")  # a holder that died between creating and writing it
    with pytest.raises(OutDirLocked, match="unreadable lock file"):
        RunLock(tmp_path).acquire()
    old = time.time() - STALE_AFTER_S - 60
    os.utime(path, (old, old))
    lock = RunLock(tmp_path)
    lock.acquire()
    assert read_holder(path).pid == os.getpid()
    lock.release()


def test_a_lock_replaced_after_it_was_judged_stale_is_put_back(tmp_path):
    """Two runs found the same stale lock; the first replaced it with its own before the second
    removes it: the second must not remove the fresh one."""
    stale = read_holder(write_lock(tmp_path, heartbeat_age_s=STALE_AFTER_S + 60, **OTHER_HOST))
    path = write_lock(tmp_path, **{**OTHER_HOST, "token": "winner"})
    RunLock(tmp_path)._remove_if_unchanged(stale)
    assert read_holder(path).token == "winner"
    assert [p.name for p in tmp_path.iterdir()] == [LOCK_FILE_NAME]


def test_every_rank_learns_that_rank_0_was_refused(tmp_path):
    write_lock(tmp_path, **OTHER_HOST)
    votes: list[bool] = []

    def any_rank(flag: bool) -> bool:  # the job's OR: here rank 0's vote is the job's
        votes.append(flag)
        return flag

    with pytest.raises(OutDirLocked, match="pid 4242"):
        lock_out_dir(tmp_path, True, any_rank)
    assert votes == [True]  # rank 0 joined the collective before raising
    with pytest.raises(OutDirLocked, match="rank 0 could not take the lock"):
        lock_out_dir(tmp_path, False, lambda flag: True)
    assert lock_out_dir(tmp_path, False, lambda flag: False) is None  # other ranks never touch it
    assert read_holder(tmp_path / LOCK_FILE_NAME).token == "theirs"


def test_a_holder_read_back_is_the_one_written(tmp_path):
    me = Holder.this_process()
    (tmp_path / LOCK_FILE_NAME).write_text(me.to_json())
    back = read_holder(tmp_path / LOCK_FILE_NAME)
    assert back.is_this_process() and back.is_running_here() and back.token == me.token
    assert read_holder(tmp_path / "missing") is None
