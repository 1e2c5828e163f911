"""Spreading one plain model over processes, applied from outside the model in a fixed order:
activation checkpointing -> compile -> FSDP2 (or DDP / DeepSpeed), then materialise and init.

`build_engine` is the one entry point; each technique lives in its own module. ParallelDims
(dims.py) says how the ranks divide the work and holds the mesh, built once per job."""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, cast

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor.experimental import implicit_replication

from pretrain.checkpoint.layout import check_shapes
from pretrain.config.schema import Config
from pretrain.models import model_spec
from pretrain.optim import build_optimizer, build_scheduler
from pretrain.parallel.activation import apply_activation_checkpointing
from pretrain.parallel.compile import apply_compile, compile_decision
from pretrain.parallel.ddp import apply_ddp
from pretrain.parallel.dims import ParallelDims
from pretrain.parallel.distributed import (
    DistInfo,
    any_rank,
    barrier,
    collective_failures_named,
    destroy_process_group,
    dist_info_from_env,
    exit_process,
    first_failure,
    init_process_group,
    main_rank_first,
    select_device,
    side_group,
    sum_over_ranks,
)
from pretrain.parallel.engine import Engine, TorchEngine, model_shapes
from pretrain.parallel.fsdp import apply_fsdp
from pretrain.parallel.launch_env import LaunchEnv, launch_env

if TYPE_CHECKING:
    from torch.distributed.checkpoint.state_dict import ValueType

    from pretrain.models.transformer import OutputHead

__all__ = ["DistInfo", "Engine", "LaunchEnv", "ParallelDims", "any_rank", "barrier", "build_engine",
           "collective_failures_named", "destroy_process_group", "dist_info_from_env", "exit_process",
           "first_failure", "init_process_group", "launch_env", "main_rank_first", "materialize", "select_device",
           "side_group", "sum_over_ranks"]

log = logging.getLogger(__name__)


def build_engine(model: nn.Module, cfg: Config, dist: DistInfo, dims: ParallelDims, precision: str,
                 initial_weights: dict[str, torch.Tensor] | None = None) -> Engine:
    """Parallelize `model` (built on the meta device by its family's ModelSpec) as cfg.parallel
    says, give it real storage and seeded initial weights (or `initial_weights`, a full state dict
    by parameter name), and pair it with its optimizer and LR schedule, built here for every
    backend. `dims` holds the mesh FSDP shards over (ParallelDims.with_mesh)."""
    p, bf16 = cfg.parallel, precision == "bf16"
    schedule = functools.partial(build_scheduler, cfg=cfg.optim, max_steps=cfg.train.max_steps)
    spec = model_spec(cfg.model)  # which modules are its blocks
    apply_activation_checkpointing(spec.blocks(model), p.activation_checkpointing, p.ac_every)
    compile_blocks, why = compile_decision(cfg, dist.device, precision, dist.world_size)
    if dist.is_main:
        log.info("compile %s (%s)", "on" if compile_blocks else "off", why)
    if compile_blocks:
        apply_compile(spec.blocks(model), cast("OutputHead", spec.output_head(model)))  # ModelSpec: an OutputHead
    if p.backend == "fsdp":
        apply_fsdp(model, spec.blocks(model), dims.fsdp_mesh, bf16, p.reshard_after_forward, p.cpu_offload)
    materialize(model, dist.device, cfg.train.seed)
    if initial_weights is not None:  # before DeepSpeed copies the weights into its own buffers
        assert cfg.checkpoint.init_from is not None  # the weights are those of checkpoint.init_from
        load_full_weights(model, initial_weights, cfg.checkpoint.init_from)
    if p.backend == "deepspeed":
        from pretrain.parallel.deepspeed_engine import DeepSpeedEngine  # imports deepspeed: slow, only when used

        # DeepSpeed builds its optimizer (DeepSpeedCPUAdam when offloaded); the schedule drives it
        # It lacks Engine.save_async (DCP engines only): validate() refuses checkpoint.async with DeepSpeed.
        return DeepSpeedEngine(model, cfg, dims.dp_size, dist.device, bf16, schedule)  # type: ignore[return-value]
    optimizer = build_optimizer(model, cfg.optim, dist.device)
    if p.backend == "ddp":
        model = apply_ddp(model, dist.device, dims.dp_group)
    return TorchEngine(model, optimizer, schedule(optimizer), dist.device,
                       autocast_bf16=bf16 and p.backend != "fsdp")


def materialize(model: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate the (possibly sharded) parameters on `device` and initialise them from `seed`.

    The model's init draws each weight at full size and copies it in; with implicit replication
    a sharded parameter keeps its slice of that draw. So every backend and world size starts from
    exactly the weights of a single process, holding one full parameter at a time, never the model."""
    ties = shared_parameters(model)
    model.to_empty(device=device)
    for module, name, owner, owner_name in ties:
        # Moving off the meta device gives every module a new Parameter object, which would untie
        # shared weights (a tied output head would keep uninitialised memory): share them again.
        if getattr(module, name) is not getattr(owner, owner_name):
            setattr(module, name, getattr(owner, owner_name))
    torch.manual_seed(seed)
    with torch.no_grad(), implicit_replication():
        model.init_weights()  # type: ignore[operator]  # ModelSpec's method; nn.Module.__getattr__ says Tensor | Module


def load_full_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy a full state dict into `model`, plain or FSDP-sharded (each rank keeps its slice);
    a parameter whose shape differs is named in the error."""
    check_shapes(model_shapes(model), weights, source)
    set_model_state_dict(model, cast("dict[str, ValueType]", weights), options=StateDictOptions(full_state_dict=True))


def shared_parameters(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module, str]]:
    """(module, name, owner, owner_name) for every parameter that is the same object as one
    registered earlier (tied weights such as an output head sharing the embedding)."""
    first: dict[int, tuple[nn.Module, str]] = {}
    ties = []
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None:
                continue
            if id(param) in first:
                ties.append((module, name, *first[id(param)]))
            else:
                first[id(param)] = (module, name)
    return ties
