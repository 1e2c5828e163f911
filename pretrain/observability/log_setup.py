"""Rank-aware text logging: rank 0 speaks, other ranks only warn (unless asked). Also keeps the
output of tools we run (compilers) out of the log unless they fail."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from typing import IO, Iterator

log = logging.getLogger("pretrain")


def setup_logging(rank: int = 0, all_ranks: bool = False, stream: IO[str] | None = None) -> None:
    """Log lines to `stream` (default stdout; `pretrain eval --json` keeps stdout for its JSON)."""
    level = logging.INFO if rank == 0 or all_ranks else logging.WARNING
    prefix = f"[rank{rank}] " if all_ranks else ""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # setuptools' distutils logs compiler command lines through the root logger, which no level
    # here can single out: DeepSpeed's op builds run inside output_captured (deepspeed_engine.py).
    for noisy in ("datasets", "fsspec", "urllib3", "filelock", "torch.distributed.elastic", "distutils", "setuptools"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@contextlib.contextmanager
def output_captured(what: str, tail_lines: int = 40) -> Iterator[None]:
    """Send everything written to this process's stdout and stderr while the block runs to a
    temporary file: file descriptors 1 and 2, which compilers and other subprocesses inherit, so
    their output is caught as well as Python's prints and log lines. If the block raises, the last
    `tail_lines` lines of that output are logged as an error (naming `what`) and the exception
    goes on; otherwise the output is dropped."""
    _flush_std_streams()
    saved = os.dup(1), os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as capture:
        try:
            os.dup2(capture.fileno(), 1)
            os.dup2(capture.fileno(), 2)
            yield
        except BaseException:
            failed = True
            raise
        finally:
            _flush_std_streams()  # what Python buffered belongs to the capture
            for fd, original in zip((1, 2), saved):
                os.dup2(original, fd)
                os.close(original)
            if failed:
                capture.seek(0)
                lines = capture.read().decode(errors="replace").splitlines()[-tail_lines:]
                log.error("%s failed; the last %d lines of its output:\n%s", what, len(lines), "\n".join(lines))


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(ValueError, AttributeError):  # closed, or replaced by something without flush
            stream.flush()
