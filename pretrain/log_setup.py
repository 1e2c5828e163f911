"""Rank-aware text logging: rank 0 speaks, other ranks only warn (unless asked)."""

from __future__ import annotations

import logging
import sys


def setup_logging(rank: int = 0, all_ranks: bool = False) -> None:
    level = logging.INFO if rank == 0 or all_ranks else logging.WARNING
    prefix = f"[rank{rank}] " if all_ranks else ""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix}%(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # DeepSpeed's op builders log compiler command lines through distutils/setuptools at INFO.
    for noisy in ("datasets", "fsspec", "urllib3", "filelock", "torch.distributed.elastic", "distutils", "setuptools"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
