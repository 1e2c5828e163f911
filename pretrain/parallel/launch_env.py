"""What torchrun tells each process through its environment, read in this one place: the rank,
the world size, the ranks on this host, which restart of the job this is, and where the
rendezvous store is. A process started without torchrun is rank 0 of 1."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from pretrain.errors import PretrainError


@dataclass(frozen=True)
class LaunchEnv:
    """torchrun's environment variables, parsed (defaults: one process, no torchrun)."""

    rank: int = 0  # RANK
    local_rank: int = 0  # LOCAL_RANK: this rank's index on its host (its GPU)
    world_size: int = 1  # WORLD_SIZE
    local_world_size: int | None = None  # LOCAL_WORLD_SIZE: ranks on this host; None: unknown
    restart_count: int = 0  # TORCHELASTIC_RESTART_COUNT: 0 on the first attempt, n after n restarts
    master_addr: str | None = None  # MASTER_ADDR / MASTER_PORT: the rendezvous store
    master_port: int | None = None
    agent_store: bool = False  # TORCHELASTIC_USE_AGENT_STORE: the store is torchrun's agent's


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """This process's LaunchEnv from `environ` (default: os.environ); a PretrainError naming the
    variable when one holds something other than a whole number."""
    environ = os.environ if environ is None else environ

    def number(name: str, default: int = 0) -> int:
        text = environ.get(name, str(default))
        if not text.isdigit():
            raise PretrainError(f"the environment variable {name}={text!r} is not a whole number; launch with "
                                "torchrun, which sets it, or unset it")
        return int(text)

    return LaunchEnv(
        rank=number("RANK"),
        local_rank=number("LOCAL_RANK"),
        world_size=number("WORLD_SIZE", 1),
        local_world_size=number("LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else None,
        restart_count=number("TORCHELASTIC_RESTART_COUNT"),
        master_addr=environ.get("MASTER_ADDR"),
        master_port=number("MASTER_PORT") if "MASTER_PORT" in environ else None,
        agent_store=environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
    )
