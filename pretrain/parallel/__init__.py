"""Where this process runs and how the model is spread over processes.

Parallelism is applied to a plain model from outside, one function per backend. Only the
single-process backend exists so far; the sharded backends plug in at `parallelize`."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from pretrain.config import ParallelConfig
from pretrain.errors import PretrainError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (from torchrun's environment variables)."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info_from_env(device: str = "auto") -> DistInfo:
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return DistInfo(rank, local_rank, world_size, select_device(device, local_rank))


def select_device(requested: str, local_rank: int = 0) -> torch.device:
    """`auto` picks this rank's GPU when there is one, else the CPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise PretrainError("train.device='cuda' but no CUDA device is available; use train.device=cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def parallelize(model: nn.Module, cfg: ParallelConfig, dist: DistInfo) -> nn.Module:
    """Apply the configured backend to `model` (built on the meta device) and return it."""
    if cfg.backend == "none":
        return model
    raise ValueError(f"unknown parallel.backend {cfg.backend!r}")  # validate() rules this out
