"""Run a function in several processes joined by a gloo process group, as torchrun would."""

from __future__ import annotations

import datetime
import os
import socket
from typing import Callable

import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.parallel import destroy_process_group, exit_process


def run_ranks(fn: Callable, world_size: int, *args: object, process_group: bool = True) -> None:
    """Call fn(rank, world_size, *args) in `world_size` fresh processes (spawned: forking a parent
    that has run torch ops can deadlock the children's thread pools); a failure in any of them
    fails the caller with that process's traceback. `fn` must be importable (module level).
    With process_group=False, fn joins the group itself (torchrun's environment is set)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_entry, args=(fn, world_size, port, process_group, args), nprocs=world_size, join=True,
                       start_method="spawn")


def _entry(rank: int, fn: Callable, world_size: int, port: int, process_group: bool, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    if process_group:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, world_size, *args)
    finally:
        destroy_process_group()  # ours: the ranks leave together (see its docstring)
    exit_process(0)  # as `pretrain train` does: no interpreter teardown (see its docstring)
