"""Preemption: Slurm (and most schedulers) send SIGTERM, or a chosen signal such as SIGUSR1,
some time before they kill a job. We note it, finish the current step, save a checkpoint and
exit with PREEMPTED_EXIT_CODE, so the requeued job resumes where this one stopped."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionSignals:
    """While entered, SIGTERM and SIGUSR1 set `requested` (the signal's name) instead of killing
    the process; the previous handlers come back on exit."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "PreemptionSignals":
        if threading.current_thread() is threading.main_thread():  # Python only signals the main thread
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _note(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is None:
            log.warning("received %s: saving a checkpoint after this step, then exiting",
                        signal.Signals(signum).name)
        self.requested = signal.Signals(signum).name
