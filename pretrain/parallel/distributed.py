"""Where this process runs and how it joins the others: its place in the job (torchrun's
environment, read by launch_env.py), the device, the process group and its timeout."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from pretrain.errors import PretrainError
from pretrain.parallel.launch_env import LaunchEnv, launch_env


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (from torchrun's environment variables)."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    local_world_size: int | None = None  # ranks on this host (torchrun's LOCAL_WORLD_SIZE); None: unknown

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def single_host(self) -> bool:
        """Whether every rank of the job runs on this machine."""
        return self.world_size == 1 or self.local_world_size == self.world_size


def dist_info_from_env(device: str = "auto") -> DistInfo:
    env = launch_env()
    return DistInfo(env.rank, env.local_rank, env.world_size, select_device(device, env.local_rank),
                    env.local_world_size)


def select_device(requested: str, local_rank: int = 0) -> torch.device:
    """`auto` picks this rank's GPU when there is one, else the CPU."""
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise PretrainError("train.device='cuda' but no CUDA device is available; use train.device=cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_process_group(info: DistInfo, timeout_s: float, always: bool = False) -> bool:
    """Join the job's process group (NCCL between GPUs, gloo between CPU processes) when there
    are several processes, or `always` (a sharding backend needs a group even alone); returns
    whether this call created it (an existing group is used as it is).

    Every collective then fails after `timeout_s` instead of hanging forever."""
    if dist.is_initialized() or (info.world_size == 1 and not always):
        return False
    kwargs: dict[str, Any] = {"timeout": datetime.timedelta(seconds=timeout_s)}
    env = launch_env()
    if info.single_host:
        bind_to_loopback()
    if info.world_size == 1 and env.master_addr is None:
        kwargs.update(store=dist.HashStore(), rank=0, world_size=1)  # started without torchrun
    elif env.agent_store:
        kwargs.update(store=_attempt_store(env, kwargs["timeout"]), rank=info.rank, world_size=info.world_size)
    if info.device.type == "cuda":
        # Without async error handling a timed-out NCCL collective blocks forever; with it the
        # watchdog aborts the process and logs the rank and the collective.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        # gloo beside NCCL for CPU tensors: the preemption flag is agreed on without a GPU sync,
        # and DCP's asynchronous save requires a CPU backend.
        dist.init_process_group("cpu:gloo,cuda:nccl", device_id=info.device, **kwargs)
    else:
        dist.init_process_group("gloo", **kwargs)
    return True


def bind_to_loopback() -> None:
    """Make gloo and NCCL listen on the loopback interface only (unless GLOO_SOCKET_IFNAME /
    NCCL_SOCKET_IFNAME are set): by default they bind the address the hostname resolves to, which
    on a cluster node is its network address, so a single-host job would accept connections from
    the network on an unauthenticated port. Call before any process group is created."""
    name = loopback_interface()
    if name is None:
        return
    for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.setdefault(variable, name)


def loopback_interface() -> str | None:
    """The loopback interface's name ("lo" on Linux), or None where it cannot be found."""
    for _, name in socket.if_nameindex():
        try:
            flags = int(Path(f"/sys/class/net/{name}/flags").read_text(), 16)
        except (OSError, ValueError):
            flags = 0x8 if name in ("lo", "lo0") else 0  # no sysfs: go by the usual names
        if flags & 0x8:  # IFF_LOOPBACK
            return name
    return None


def _attempt_store(env: LaunchEnv, timeout: datetime.timedelta) -> dist.Store:
    """torchrun's key-value store with a namespace of this attempt's own. The agent keeps one
    store for the whole job, so after a restart (--max-restarts) the keys of the failed attempt
    are still there, and the new processes read the dead ones' addresses from them: gloo then
    fails to connect and the next attempt hangs (seen with torch 2.13)."""
    assert env.master_addr and env.master_port is not None, "torchrun's agent store comes with MASTER_ADDR/PORT"
    store = dist.TCPStore(env.master_addr, env.master_port, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"pretrain_attempt_{env.restart_count}", store)


@contextlib.contextmanager
def main_rank_first(info: DistInfo) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. trains and writes the tokenizer), then the other ranks
    (which now find its result). Without a process group it just runs the block."""
    group = dist.is_initialized() and info.world_size > 1
    if group and not info.is_main:
        dist.barrier()
    yield
    if group and info.is_main:
        dist.barrier()


def sum_over_ranks(value: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """`value` summed over the ranks of `group` (default: all ranks); a new tensor, or the value
    itself without a process group or in a group of one."""
    if not (dist.is_initialized() and dist.get_world_size(group) > 1):
        return value
    total = value.clone()
    dist.all_reduce(total, group=group)
    return total


def any_rank(flag: bool) -> bool:
    """Whether `flag` is true on at least one rank (a CPU tensor: gloo, no device sync)."""
    return bool(sum_over_ranks(torch.tensor(int(flag))).item())


def first_failure(reason: str | None) -> str | None:
    """The first of the ranks' failure reasons (None = no failure there), or None when no rank
    failed: the same on every rank, so all can stop together with the cause. Call on every rank.
    When no rank failed (every checkpoint save, almost always) it costs one any_rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1) or not any_rank(reason is not None):
        return reason
    reasons: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, reason)
    return next((r for r in reasons if r is not None), None)


def barrier() -> None:
    """Wait for every rank (nothing to wait for without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def side_group() -> dist.ProcessGroup | None:
    """A separate gloo group for collectives issued from a background thread (an asynchronous
    checkpoint), which must not interleave with the training loop's on the default group.
    Call on every rank at the same point; None without a process group."""
    return dist.new_group(backend="gloo") if dist.is_initialized() else None


def destroy_process_group() -> None:
    """Leave the group together: a rank that tore its gloo connections down while a peer was still
    finishing made that peer abort at exit ("terminate called without an active exception",
    SIGABRT) in about 1 run in 3 on a loaded machine; with the barrier, none in 18."""
    if dist.is_initialized():
        try:
            dist.barrier()
        except RuntimeError:  # a peer is gone (leaving after an error): nobody left to wait for
            pass
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End a rank's process once its work is written and its process group destroyed, skipping
    the interpreter's teardown: there, process-group threads destroyed in arbitrary order still
    made a rank abort now and then after a clean run (SIGABRT, "terminate called without an active
    exception"; ~1 run in 30 in CI even after the barrier above), turning a finished job into a
    failed one."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# What gloo and NCCL say when a peer is gone or a collective waited too long.
_COLLECTIVE_FAILURE = re.compile(r"[Tt]imed out|Connection (closed|reset)|[Bb]roken pipe|NCCL|gloo")


@contextlib.contextmanager
def collective_failures_named(info: DistInfo, timeout_s: float) -> Iterator[None]:
    """Turn a failed or timed-out collective into an error that names this rank and the fix."""
    try:
        yield
    except RuntimeError as exc:
        if info.world_size == 1 or not (isinstance(exc, dist.DistError) or _COLLECTIVE_FAILURE.search(str(exc))):
            raise
        raise PretrainError(
            f"rank {info.rank} of {info.world_size}: a collective operation failed or waited longer than "
            f"parallel.timeout_s={timeout_s:g}s ({str(exc).splitlines()[0][:300]}). Another rank probably "
            "crashed or stalled: look for the first error in the other ranks' logs (logging.all_ranks=true "
            "shows every rank); if steps are legitimately that slow, raise --parallel.timeout_s"
        ) from exc
