"""torch.compile per transformer block: every block has the same code, so one compiled graph
serves all of them, and FSDP can still gather parameters block by block."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from typing import TYPE_CHECKING

import torch
from torch import nn

from pretrain.config.schema import Config
from pretrain.hardware.devices import measure_matmul_flops
from pretrain.models import flops_per_token

if TYPE_CHECKING:
    from pretrain.models.transformer import OutputHead

log = logging.getLogger(__name__)

# Compiling the blocks took about 30 s on 2 CPU cores (empty cache) and gained 5-15% per step
# (benchmarks/README.md): under `auto` a run must be expected to compute at least this long.
AUTO_COMPILE_MIN_SECONDS = 600.0
CPU_FLOPS_UPPER_BOUND = 2e14  # above any CPU socket's matmul rate (AMX bf16 included)


def apply_compile(blocks: nn.ModuleList, head: OutputHead) -> None:
    """Compile each transformer block, and the loss's per-chunk kernel of the output `head` (an
    OutputHead; about 2% of a step)."""
    for layer in blocks:
        layer.compile()  # in place: the module and its parameter names stay the same
    head.loss_kernel = torch.compile(head.loss_kernel, dynamic=False)
    log.info("torch.compile applied to %d transformer blocks and the loss kernel", len(blocks))


def missing_compiler(device: torch.device) -> str | None:
    """Why TorchInductor cannot compile for `device` here, or None if it can."""
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") else "triton is not installed"
    if device.type != "cpu":
        return f"not tried on {device.type}"
    if any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++")):
        return None
    return "no C++ compiler for TorchInductor on this CPU (install g++)"


def compile_decision(cfg: Config, device: torch.device, precision: str, world_size: int) -> tuple[bool, str]:
    """Whether to compile the blocks, and why (logged): train.compile (validate() sets it from
    the older parallel.compile), or under `auto` whether a compiler for the device is installed
    and the run is long enough to earn back the compile time."""
    if cfg.train.compile != "auto":
        return cfg.train.compile, f"train.compile={str(cfg.train.compile).lower()}"
    missing = missing_compiler(device)
    if missing:
        return False, f"train.compile=auto: {missing}"
    if device.type == "cuda":
        return True, "train.compile=auto on a GPU"
    assert cfg.train.global_batch_tokens is not None  # filled in by validate()
    rank_flops = (cfg.train.max_steps * flops_per_token(cfg.model, cfg.data.seq_len) * cfg.train.global_batch_tokens
                  / world_size)
    seconds = rank_flops / CPU_FLOPS_UPPER_BOUND  # short even on the fastest CPU: no need to measure
    if seconds >= AUTO_COMPILE_MIN_SECONDS:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        seconds = rank_flops / measure_matmul_flops(device, dtype, size=1024, seconds=0.1)
    if seconds < AUTO_COMPILE_MIN_SECONDS:
        return False, ("train.compile=auto: the run needs less than 10 minutes of compute, too short to earn back "
                       "the compile time")
    return True, f"train.compile=auto: a run of about {seconds / 60:.0f} min of compute on the CPU"
