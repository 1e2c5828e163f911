"""One training run per out_dir: rank 0 holds a lock file there for the life of the run, so a
second job started into the same out_dir (a double-submitted Slurm job, a copied launch command)
is refused with a message naming the holder instead of training beside it and writing the same
checkpoints and metrics.

The lock is out_dir/.train.lock, created with O_CREAT|O_EXCL (atomic on local filesystems and
across NFS v3+ clients), holding the holder's JSON. A holder that died without releasing it is
detected without its help: on the same machine its process is gone; from another machine its
heartbeat (the file's mtime, touched every HEARTBEAT_INTERVAL_S by a daemon thread) stops.
A restart of the same job (torchrun --max-restarts, a Slurm requeue) carries the same job id and
takes the lock over."""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

from pretrain.errors import PretrainError

log = logging.getLogger(__name__)

LOCK_FILE_NAME = ".train.lock"
HEARTBEAT_INTERVAL_S = 30.0
# Ten missed heartbeats before another machine may take the lock: wide enough for clock skew
# between nodes, a filesystem that stalls for minutes, and native calls that hold the interpreter
# lock (and so the heartbeat thread) for a long time.
STALE_AFTER_S = 10 * HEARTBEAT_INTERVAL_S
# The same job across restarts, in order of preference. PRETRAIN_JOB_ID is for launchers that
# set none of the others (on Kubernetes, e.g. the PyTorchJob's name through the downward API).
JOB_ID_VARIABLES = ("PRETRAIN_JOB_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID")
UNSET_RUN_ID = "none"  # torchrun's TORCHELASTIC_RUN_ID when no --rdzv_id was given: not a job's own
TAKE_ATTEMPTS = 5  # a stale lock removed by us may be re-created by a competitor before our create


class OutDirLocked(PretrainError):
    """Another run holds out_dir's lock."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: what the lock file says, plus its heartbeat (mtime)."""

    host: str | None
    pid: int | None
    machine: str | None  # host, boot and pid namespace: where `pid` means the same process
    process_start: str | None  # the process's start time in /proc, so a reused pid is not taken for it
    job_id: str | None
    started: float | None
    token: str | None  # unique to one acquisition: tells our lock from a successor's
    heartbeat: float = 0.0

    @classmethod
    def this_process(cls) -> Holder:
        pid = os.getpid()
        return cls(socket.gethostname(), pid, machine_id(), process_start(pid), current_job_id(), time.time(),
                   uuid.uuid4().hex)

    def to_json(self) -> str:
        fields = asdict(self)
        del fields["heartbeat"]  # the file's mtime
        return json.dumps(fields)

    def is_this_process(self) -> bool:
        pid = os.getpid()
        return self.machine == machine_id() and self.pid == pid and self.process_start == process_start(pid)

    def is_running_here(self) -> bool:
        """Whether the holder's process still runs on this machine (False if it runs elsewhere)."""
        return self.machine == machine_id() and self.pid is not None and process_alive(self.pid, self.process_start)

    def describe(self, now: float) -> str:
        if self.host is None:
            return (f"an unreadable lock file (its writer may have died while writing it), "
                    f"touched {now - self.heartbeat:.0f}s ago")
        job = f", job {self.job_id}" if self.job_id else ""
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started)) if self.started else "an unknown time"
        return f"pid {self.pid} on host {self.host}{job}, since {since}, last heartbeat {now - self.heartbeat:.0f}s ago"


class RunLock:
    """out_dir's lock for this process. acquire() takes it or raises OutDirLocked; release()
    removes it if it is still ours (at the latest when the interpreter exits)."""

    def __init__(self, out_dir: str | Path, heartbeat_s: float = HEARTBEAT_INTERVAL_S,
                 stale_after_s: float = STALE_AFTER_S):
        self.path = Path(out_dir) / LOCK_FILE_NAME
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.holder: Holder | None = None  # set while we hold it
        self._stop = threading.Event()
        self._mutex = threading.Lock()  # a heartbeat never touches a lock that release() is removing

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = Holder.this_process()
        for _ in range(TAKE_ATTEMPTS):
            if self._create(me):
                self.holder = me
                atexit.register(self.release)  # the error path; a crash is left to the stale checks
                threading.Thread(target=self._beat, name="pretrain-run-lock", daemon=True).start()
                return
            current = read_holder(self.path)
            if current is not None and self._may_take_over(current, me):
                self._remove_if_unchanged(current)
        raise OutDirLocked(f"could not take the lock {self.path} in {TAKE_ATTEMPTS} attempts: other runs keep taking "
                           "it. Start one run per out_dir, or choose another --out_dir")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours; never another run's."""
        self._stop.set()
        atexit.unregister(self.release)
        with self._mutex:
            # A forked child (a data worker) inherits this object; only the acquiring process releases.
            if self.holder is None or self.holder.pid != os.getpid():
                return
            current = read_holder(self.path)
            if current is not None and current.token == self.holder.token:
                self.path.unlink(missing_ok=True)
            self.holder = None

    def _create(self, me: Holder) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise PretrainError(f"cannot create the run lock {self.path} ({exc}); out_dir must be writable: fix its "
                                "permissions or choose another --out_dir") from exc
        with os.fdopen(fd, "w") as f:
            f.write(me.to_json())
            f.flush()
            os.fsync(f.fileno())
        return True

    def _may_take_over(self, current: Holder, me: Holder) -> bool:
        """Whether `current`'s lock may be removed (logged); raises OutDirLocked if not."""
        now = time.time()
        if current.is_this_process():  # a second Trainer in one process (tests, sweeps)
            return True
        if current.is_running_here():  # alive, whatever its job id: two runs in one allocation
            raise self._refusal(current, now, "its process is still running on this machine")
        if current.machine == me.machine and current.pid is not None:
            log.warning("taking over the lock of out_dir from a run that is gone (%s; process %d no longer runs): %s",
                        current.describe(now), current.pid, self.path)
            return True
        if current.job_id is not None and current.job_id == me.job_id:
            log.info("out_dir lock held by an earlier attempt of this job (%s): taking it over", current.describe(now))
            return True
        if now - current.heartbeat > self.stale_after_s:
            log.warning("taking over the stale lock of out_dir (%s; no heartbeat for more than %.0fs): %s",
                        current.describe(now), self.stale_after_s, self.path)
            return True
        raise self._refusal(current, now, f"its heartbeat is fresher than {self.stale_after_s:.0f}s")

    def _refusal(self, current: Holder, now: float, why: str) -> OutDirLocked:
        return OutDirLocked(
            f"out_dir {self.path.parent} is in use by another training run ({current.describe(now)}; {why}). Two runs "
            f"in one out_dir would write the same checkpoints and metrics. Wait for that run to finish, choose another "
            f"--out_dir, or, if you are sure that run is gone, delete {self.path}")

    def _remove_if_unchanged(self, judged: Holder) -> None:
        """Remove the lock judged removable, unless a competitor replaced it meanwhile: it is moved
        to a name of our own first (atomic), checked, and put back if it is not the one judged."""
        grabbed = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}")
        try:
            os.rename(self.path, grabbed)
        except FileNotFoundError:  # a competitor removed it first
            return
        moved = read_holder(grabbed)
        if moved is not None and moved.token != judged.token and not self.path.exists():
            os.rename(grabbed, self.path)  # a competitor's fresh lock: put it back
            return
        # Either the one judged, or (three runs racing) a fresh lock replaced in the meantime by a
        # third: its holder's heartbeat notices and warns.
        grabbed.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._mutex:
                if self.holder is None:
                    return
                try:
                    current = read_holder(self.path)
                    if current is None or current.token != self.holder.token:
                        if current is None or current.pid != os.getpid():
                            log.warning("the lock %s was removed or taken over by another run (%s) while this run held "
                                        "it: two runs may now write to this out_dir", self.path,
                                        current.describe(time.time()) if current else "deleted")
                        return
                    now = time.time()
                    os.utime(self.path, (now, now))
                except OSError as exc:  # a filesystem hiccup: the next beat tries again
                    log.debug("run lock heartbeat failed: %s", exc)


def read_holder(path: Path, attempts: int = 10) -> Holder | None:
    """The holder recorded in the lock file at `path`, None if there is none. A lock that stays
    unreadable (a holder died between creating and writing it) is a holder of unknown identity."""
    for attempt in range(attempts):
        try:
            with open(path, encoding="utf-8") as f:  # open, then fstat: NFS revalidates on open
                heartbeat = os.fstat(f.fileno()).st_mtime
                text = f.read()
        except FileNotFoundError:
            return None
        try:
            fields = json.loads(text)
            return Holder(**{name: fields.get(name) for name in Holder.__dataclass_fields__ if name != "heartbeat"},
                          heartbeat=heartbeat)
        except (ValueError, TypeError, AttributeError):
            if attempt < attempts - 1:
                time.sleep(0.05)  # its creator may be writing it right now
    return Holder(None, None, None, None, None, None, None, heartbeat)


def lock_out_dir(out_dir: str | Path, is_main: bool, any_rank: Callable[[bool], bool]) -> RunLock | None:
    """Rank 0 takes out_dir's lock; every rank calls this, and if rank 0 is refused every rank
    raises OutDirLocked (`any_rank`, the job's collective OR, carries the outcome). Returns the
    lock on rank 0, None on the others."""
    lock, failure = RunLock(out_dir) if is_main else None, None
    if lock is not None:
        try:
            lock.acquire()
        except Exception as exc:  # noqa: BLE001 - re-raised below, once the other ranks know
            failure = exc
    if any_rank(failure is not None):
        raise failure or OutDirLocked(f"rank 0 could not take the lock of out_dir {out_dir}, which is probably in "
                                      "use by another training run (rank 0's error names it and the fixes)")
    return lock


def current_job_id(environ: Mapping[str, str] | None = None) -> str | None:
    """`VARIABLE=value` of the first of JOB_ID_VARIABLES that is set, None if none is."""
    environ = os.environ if environ is None else environ
    for name in JOB_ID_VARIABLES:
        value = environ.get(name, "")
        if value and value != UNSET_RUN_ID:
            return f"{name}={value}"
    return None


def machine_id() -> str:
    """Host, boot and pid namespace: two processes with the same machine_id see the same pids."""
    parts = [socket.gethostname()]
    for read in (lambda: Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
                 lambda: os.readlink("/proc/self/ns/pid")):
        try:
            parts.append(read())
        except OSError:  # not Linux: the hostname alone
            pass
    return "/".join(parts)


def _stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may contain spaces): state first,
    the start time at index 19. Raises OSError where /proc or the process is missing."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_start(pid: int) -> str | None:
    """The start time of process `pid` in clock ticks since boot (/proc/PID/stat, field 22);
    None where /proc is missing or the process is gone."""
    try:
        return _stat_fields(pid)[19]
    except OSError:
        return None


def process_alive(pid: int, started: str | None) -> bool:
    """Whether process `pid` runs and, where its start time is known, is the one that started then."""
    try:
        state = _stat_fields(pid)
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if state[0] in ("Z", "X"):  # exited, not yet reaped by its parent
        return False
    return started is None or state[19] == started
