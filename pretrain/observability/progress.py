"""A live progress bar for training on a terminal; on a cluster log (not a TTY) nothing but the
plain log lines, which carry step/total, tokens/s and ETA already."""

from __future__ import annotations

import contextlib
import logging
import sys
import time


class TrainingProgress:
    """step/total, tokens/s and ETA on one line that the log lines scroll above."""

    def __init__(self, enabled: bool, first_step: int, last_step: int, tokens_per_step: int):
        self.bar = None
        self._redirect = contextlib.nullcontext()
        if not enabled:
            return
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self.bar = tqdm(total=last_step, initial=first_step, unit="step", dynamic_ncols=True, file=sys.stderr,
                        unit_scale=False,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
        self.tokens_per_step, self.start = tokens_per_step, time.perf_counter()
        self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger()])

    def __enter__(self) -> TrainingProgress:
        self._redirect.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()
        self._redirect.__exit__(*exc)

    def advance(self) -> None:
        if self.bar is None:
            return
        steps = self.bar.n + 1 - self.bar.initial  # this run's, not the resumed ones
        seconds = time.perf_counter() - self.start
        self.bar.set_postfix_str(f"{steps * self.tokens_per_step / seconds:,.0f} tok/s", refresh=False)
        self.bar.update(1)

    def rewind(self, step: int) -> None:
        """Show `step` as the current one again (after a rollback to an earlier checkpoint)."""
        if self.bar is not None:
            self.bar.n = self.bar.initial = step
            self.start = time.perf_counter()
            self.bar.refresh()


def progress_enabled(setting: bool | None, is_main: bool) -> bool:
    """On rank 0 only; `None` means when stderr is a terminal."""
    if not is_main:
        return False
    return sys.stderr.isatty() if setting is None else setting
