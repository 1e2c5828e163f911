"""A watchdog on step time: a rank stuck in a step (a hung collective, a stalled filesystem, a
deadlocked data worker) dumps every thread's Python stack and exits non-zero, so the launcher
restarts the job instead of it idling until the allocation ends."""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import tempfile
import threading
import time

log = logging.getLogger(__name__)

HUNG_EXIT_CODE = 124  # as coreutils' `timeout`


class HangWatchdog:
    """While entered, a background thread checks that `beat()` is called at least every
    `timeout_s` seconds; if not, it logs what was running, dumps all threads' stacks to stderr and
    ends the process with HUNG_EXIT_CODE. A thread needs the interpreter lock to run, so
    faulthandler's C-level timer (which does not) backs it up in case a call never releases it.
    timeout_s=0 disables it."""

    def __init__(self, timeout_s: float, rank: int):
        self.timeout_s, self.rank = timeout_s, rank
        self.activity = "starting"
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "HangWatchdog":
        if self.timeout_s > 0:
            self.beat(self.activity)
            self._thread = threading.Thread(target=self._watch, name="pretrain-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            faulthandler.cancel_dump_traceback_later()

    def beat(self, activity: str) -> None:
        """Note progress; `activity` (e.g. "step 12") names what runs until the next beat."""
        if self.timeout_s <= 0:
            return
        self._last, self.activity = time.monotonic(), activity
        # The backstop fires a minute after the watchdog thread should have.
        faulthandler.dump_traceback_later(self.timeout_s + 60, exit=True,
                                          file=sys.__stderr__)  # type: ignore[arg-type]  # None = sys.stderr

    def _watch(self) -> None:
        while not self._stop.wait(min(self.timeout_s / 4, 10.0)):
            waited = time.monotonic() - self._last
            if waited > self.timeout_s:
                self._fire(waited)

    def _fire(self, waited: float) -> None:
        log.error("watchdog: rank %d has been in %s for %.0fs (train.hang_timeout_s=%g); dumping every thread's "
                  "stack and exiting with code %d so the job can restart from its last checkpoint. If steps are "
                  "legitimately this slow, raise --train.hang_timeout_s", self.rank, self.activity, waited,
                  self.timeout_s, HUNG_EXIT_CODE)
        # Every stuck rank dumps at about the same moment into the same log, and faulthandler
        # writes a stack in many small pieces, so the dump goes to a file first and then out in one
        # write with each line tagged by rank: several ranks' stacks stay readable.
        header = f"--- rank {self.rank}: Python stacks after {waited:.0f}s in {self.activity} ---\n"
        # The process's real stderr: sys.stderr may be replaced by an object without a file
        # descriptor (wandb's console capture, pytest's).
        assert sys.__stderr__ is not None  # None only for a process started without one
        stderr = sys.__stderr__.fileno()
        try:
            with tempfile.TemporaryFile() as dump:
                faulthandler.dump_traceback(file=dump, all_threads=True)
                dump.seek(0)
                stacks = dump.read().decode(errors="replace")
        except OSError:  # no room for the file: dump straight to stderr rather than not exit
            write_fully(stderr, header.encode())
            faulthandler.dump_traceback(file=stderr, all_threads=True)
        else:
            tag = f"[rank {self.rank}] "
            write_fully(stderr, (header + "".join(tag + line + "\n" for line in stacks.splitlines())).encode())
        os._exit(HUNG_EXIT_CODE)


def write_fully(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]
