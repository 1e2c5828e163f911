"""DistributedDataParallel: every rank holds the whole model; gradients are all-reduced.
The simplest backend, and the fastest while the model and its optimizer state fit on one device."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)


def apply_ddp(model: nn.Module, device: torch.device,
              group: dist.ProcessGroup | None = None) -> DistributedDataParallel:
    """Wrap a materialised model, replicated over `group` (the data-parallel ranks, ParallelDims.
    dp_group; None: all ranks). DDP broadcasts the group's first rank's parameters at construction,
    so every replica starts from the same weights even if their initialisation differed."""
    device_ids = [device.index] if device.type == "cuda" else None
    wrapped = DistributedDataParallel(model, device_ids=device_ids, process_group=group)
    log.info("DDP: the model is replicated on every rank, gradients are all-reduced")
    return wrapped
