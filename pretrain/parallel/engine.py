"""The four verbs the trainer uses to learn, whatever the backend: backward, step, save, load.

`TorchEngine` serves none, ddp and fsdp (a torch optimizer over the model's own, possibly
sharded, parameters; checkpoints through torch.distributed.checkpoint). DeepSpeed, which takes
over the optimizer and the checkpoint format, has its own adapter with the same verbs."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Protocol, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LRScheduler

from pretrain.checkpoint.layout import check_shapes, dcp_model_shapes
from pretrain.checkpoint.safe_load import load_dcp, read_dcp_metadata

WrapFile = Callable[[BinaryIO], BinaryIO]

# DCP warns on every save and load without a process group (also from an asynchronous save's
# thread, which a warnings context in the caller does not cover); one process is intended there.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


class Engine(Protocol):
    model: nn.Module  # called for forward passes (training, evaluation, generation)
    optimizer: torch.optim.Optimizer  # the torch optimizer whose param_groups the LR schedule drives
    scheduler: LRScheduler  # that schedule (optim.build_scheduler), stepped by the trainer after each step
    checkpoint_format: str  # recorded in each checkpoint's manifest

    def autocast(self) -> contextlib.AbstractContextManager: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    # Clip and update, unless approve(grad norm) says no: then the gradients are dropped. DeepSpeed
    # updates inside its own step, so there approve is asked afterwards and cannot veto.
    can_veto_update: bool
    def step(self, max_norm: float, approve: Callable[[torch.Tensor], bool] | None = None) -> torch.Tensor: ...
    # wrap_file (fault injection, pretrain.resilience.faults): wraps each file the engine writes
    def save(self, path: Path, wrap_file: WrapFile | None = None) -> None: ...
    def save_async(self, path: Path, group: dist.ProcessGroup | None,  # DCP engines only
                   wrap_file: WrapFile | None = None) -> Future: ...
    def load(self, path: Path) -> None: ...  # refuses a checkpoint whose parameter shapes differ, naming one
    def full_state_dict(self) -> dict[str, torch.Tensor]: ...


class TorchEngine:
    """A plain, DDP-wrapped or FSDP-sharded model with a torch optimizer."""

    checkpoint_format = "dcp"
    can_veto_update = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LRScheduler,
                 device: torch.device, autocast_bf16: bool):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.device, self.autocast_bf16 = device, autocast_bf16

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 compute with fp32 master weights; FSDP casts through its mixed-precision policy instead."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast_bf16)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, max_norm: float, approve: Callable[[torch.Tensor], bool] | None = None) -> torch.Tensor:
        """Clip the global gradient norm (0 = no clipping), step unless approve(norm) is False,
        clear gradients; return the norm before clipping."""
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        total = nn.utils.get_total_norm(cast("list[torch.Tensor]", [p.grad for p in parameters]), foreach=True)
        # FSDP: the norm over all shards, replicated on every rank
        norm = total.full_tensor() if isinstance(total, DTensor) else total
        if approve is None or approve(norm):
            # Scaling is a pass over every gradient; clip_grad_norm_ makes it even when the factor
            # is 1. Reading the norm back here costs no sync that approve (the step guard) has not
            # already made. The factor is clip_grads_with_norm_'s own, so results are unchanged.
            if max_norm and max_norm / (float(norm) + 1e-6) < 1:
                nn.utils.clip_grads_with_norm_(parameters, max_norm, total, foreach=True)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, path: Path, wrap_file: WrapFile | None = None) -> None:
        """Every rank writes its own shards in parallel (DCP); the result loads at any world size.
        A rank's failed write fails the save on every rank (DCP gathers each rank's result)."""
        dcp.save(self._state(), checkpoint_id=str(path), storage_writer=_writer(path, wrap_file))

    def save_async(self, path: Path, group: dist.ProcessGroup | None, wrap_file: WrapFile | None = None) -> Future:
        """Copy this rank's state to CPU memory now, write it in a background thread whose
        collectives run on `group` (not the training loop's); the future completes on every rank
        once the checkpoint's metadata is written, i.e. all ranks' shards are on disk."""
        # A Future: DCP returns an AsyncSaveResponse only when staging is asynchronous (ours blocks)
        return cast(Future, dcp.async_save(self._state(), checkpoint_id=str(path),
                                           storage_writer=_writer(path, wrap_file), process_group=group))

    def _state(self) -> dict:
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optim_state}

    def load(self, path: Path) -> None:
        check_shapes(model_shapes(self.model), dcp_model_shapes(read_dcp_metadata(path)), str(path))
        state = self._state()
        load_dcp(state, path)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on rank 0's CPU; other ranks get {} (a collective under FSDP)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state = cast("dict[str, torch.Tensor]", get_model_state_dict(self.model, options=options))  # model: tensors
        return {k: v.detach().cpu() for k, v in state.items()}


def _writer(path: Path, wrap_file: WrapFile | None) -> FileSystemWriter:
    """DCP's file writer for `path`, its files passed through `wrap_file` when one is given."""
    writer = FileSystemWriter(str(path))
    if wrap_file is not None:
        writer.fs = _WrappingFileSystem(wrap_file)
    return writer


class _WrappingFileSystem(FileSystem):
    """DCP's local file system, with every file opened for writing passed through `wrap_file`."""

    def __init__(self, wrap_file: WrapFile):
        super().__init__()
        self.wrap_file = wrap_file

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[io.IOBase]:
        with super().create_stream(path, mode) as stream:
            yield self.wrap_file(stream) if "w" in mode else stream  # type: ignore[arg-type,misc]


def model_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Full (unsharded) shape of every state-dict entry by the model's own names, whatever wraps it."""
    state = cast("dict[str, torch.Tensor]", get_model_state_dict(model))  # a model's state dict holds tensors
    return {name: value.shape for name, value in state.items()}
