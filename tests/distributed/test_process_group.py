"""The process group: joined from torchrun's environment, and a stalled peer becomes an error
that names the rank and the fix instead of a hang."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from pretrain.errors import PretrainError
from pretrain.parallel import (
    DistInfo,
    collective_failures_named,
    destroy_process_group,
    dist_info_from_env,
    init_process_group,
)
from tests.distributed.ranks import run_ranks

pytestmark = pytest.mark.slow


def _stalled_peer(rank: int, world_size: int) -> None:
    info = dist_info_from_env("cpu")
    assert init_process_group(info, timeout_s=2) and dist.get_backend() == "gloo"
    try:
        if rank == 1:
            time.sleep(6)  # a stalled rank: never joins the all-reduce in time
            return
        with pytest.raises(PretrainError) as error:
            with collective_failures_named(info, timeout_s=2):
                dist.all_reduce(torch.ones(1))
        message = str(error.value)
        assert message.startswith("rank 0 of 2: a collective operation failed or waited longer than "
                                  "parallel.timeout_s=2s"), message
        assert "raise --parallel.timeout_s" in message
    finally:
        destroy_process_group()


def test_stalled_peer_becomes_an_error_naming_the_rank():
    run_ranks(_stalled_peer, 2, process_group=False)


def test_other_errors_pass_through_unchanged():
    info = DistInfo(rank=0, local_rank=0, world_size=2, device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="^shape mismatch$"):
        with collective_failures_named(info, timeout_s=2):
            raise RuntimeError("shape mismatch")
