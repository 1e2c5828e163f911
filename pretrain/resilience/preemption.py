"""Stopping on a signal without losing work.

Slurm (and most schedulers) send SIGTERM, or a chosen signal such as SIGUSR1, some time before
they kill a job; a person presses Ctrl-C (SIGINT). Either way we note it, finish the current
step, save a checkpoint and exit: with PREEMPTED_EXIT_CODE after a scheduler's signal, so the
requeued job resumes where this one stopped, and with INTERRUPTED_EXIT_CODE after Ctrl-C. A
second Ctrl-C stops at once, without saving. Under torchrun the children run in their own
sessions: torchrun passes the first Ctrl-C on as SIGINT and a second one as SIGTERM, so after a
Ctrl-C any further signal stops at once."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any, Callable

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT, what shells report for a Ctrl-C


class StopNow(KeyboardInterrupt):
    """A second Ctrl-C: stop at once, without saving. Its text says what was lost and kept."""


class StopSignals:
    """While entered, SIGTERM, SIGUSR1 and SIGINT set `requested` (the signal's name) instead of
    killing the process; after a SIGINT, the next signal raises StopNow. The previous handlers come
    back on exit."""

    def __init__(self, announce: bool = True) -> None:
        self.requested: str | None = None
        self.announce = announce  # one rank says it; every rank acts on it
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | signal.Handlers | None] = {}

    @property
    def interrupted(self) -> bool:
        """Whether a person asked to stop (Ctrl-C), as opposed to a scheduler."""
        return self.requested == "SIGINT"

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python only signals the main thread
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _note(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.interrupted or (self.requested is not None and name == "SIGINT"):
            raise StopNow()
        if self.requested is not None:
            return  # a scheduler repeating itself
        self.requested = name
        if not self.announce:
            return
        if name == "SIGINT":
            log.warning("Ctrl-C: saving a checkpoint after this step, then stopping. Press Ctrl-C again to stop "
                        "at once without saving")
        else:
            log.warning("received %s: saving a checkpoint after this step, then exiting", name)


def ignore_interrupts() -> None:
    """For helper processes (data workers, eval hooks): a Ctrl-C in the terminal reaches the
    whole process group, and only the trainer decides what it means."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
