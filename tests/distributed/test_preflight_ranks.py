"""Preflight over two gloo ranks: both answer, the all-reduce bandwidth is measured, and a check
that fails on one rank (a full disk, a read-only out_dir) fails the preflight of every rank."""

from __future__ import annotations

import contextlib
import errno
import math
import os
import time
from types import SimpleNamespace
from unittest import mock

import pytest

from pretrain.config import Config
from pretrain.hardware.preflight import check_ranks, run_preflight
from pretrain.parallel import dist_info_from_env
from tests.distributed.ranks import run_ranks

pytestmark = pytest.mark.slow


def _preflight(rank: int, world_size: int, cfg: Config) -> None:
    info = dist_info_from_env("cpu")
    start = time.perf_counter()
    report = check_ranks(info, timeout_s=60)
    elapsed = time.perf_counter() - start
    assert [r.rank for r in report.ranks] == [0, 1]
    assert report.ranks[rank].pid == os.getpid() != report.ranks[1 - rank].pid
    assert report.allreduce_bytes == 8 * 2**20  # the CPU default
    assert math.isfinite(report.algbw) and report.algbw > 0
    assert report.busbw == pytest.approx(report.algbw)  # 2(n-1)/n = 1 for two ranks
    assert elapsed < 5, f"check_ranks took {elapsed:.2f}s; it runs before every training run"

    # Rank 1's disk is full (a node-local out_dir): both ranks fail, and both know it was rank 1.
    full = mock.patch("shutil.disk_usage", return_value=SimpleNamespace(total=2**30, used=2**30, free=0))
    with full if rank == 1 else contextlib.nullcontext():
        failures = run_preflight(cfg, info, measure=False).failures
    assert len(failures) == 1 and failures[0].startswith(f"on rank 1: out_dir {cfg.out_dir} "), failures

    # Rank 1's out_dir is on a read-only mount: both ranks stop, naming rank 1 and the cause.
    read_only = mock.patch("tempfile.NamedTemporaryFile", side_effect=OSError(errno.EROFS, "Read-only file system"))
    with read_only if rank == 1 else contextlib.nullcontext():
        failures = run_preflight(cfg, info, measure=False).failures
    assert failures == [f"on rank 1: out_dir {cfg.out_dir} cannot be written: [Errno 30] Read-only file system "
                        f"(creating a file in {cfg.out_dir}); choose another --out_dir or make it writable "
                        "(permissions, a read-write mount)"], failures


def test_two_ranks_answer_and_a_failure_on_one_fails_both(tiny_config):
    run_ranks(_preflight, 2, tiny_config(checkpoint__every=5))
