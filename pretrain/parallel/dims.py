"""How the job's ranks divide the work (torchtitan's distributed/parallel_dims.py): degrees of
data parallelism, replicated and sharded, and of tensor, context and pipeline parallelism, and
the DeviceMesh built from them once per job. Every "how many data-parallel ranks, which am I"
question asks a ParallelDims, never WORLD_SIZE."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from pretrain.config.schema import ParallelConfig
from pretrain.errors import ConfigError

# Mesh dims, outermost first (torchtitan's order). Consecutive ranks share the inner dims' groups,
# so with one torchrun per node a dp_shard group of GPUs-per-node ranks stays inside a node.
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


def dp_degrees(p: ParallelConfig, world_size: int) -> tuple[int, int]:
    """(dp_replicate, dp_shard) that parallel.backend asks for on `world_size` ranks: DDP replicates
    the model on every rank; FSDP shards it within groups of parallel.shard ranks (default: world
    size / parallel.replicate) and replicates across parallel.replicate groups (HSDP); DeepSpeed's
    ZeRO shards over every rank; `none` is one process. Not validated: see ParallelDims."""
    if p.backend == "fsdp":
        return p.replicate, p.shard or world_size // p.replicate
    if p.backend == "ddp":
        return world_size, 1
    if p.backend == "deepspeed":
        return 1, world_size
    return 1, 1


@dataclass(frozen=True)
class ParallelDims:
    """The parallelism degrees of a job; they multiply to its world size (checked on creation).
    `with_mesh()` adds this rank's DeviceMesh, from which its data-parallel rank comes."""

    dp_replicate: int  # model copies that each see other data (DDP, HSDP's replicas)
    dp_shard: int  # ranks each copy's states are sharded over (FSDP, ZeRO), each seeing other data
    world_size: int
    tp: int = 1  # tensor, context and pipeline parallelism: 1 until their config keys exist
    cp: int = 1
    pp: int = 1
    # This rank's meshes by dim name once with_mesh() has run ("world": all dims; "dp": the
    # data-parallel dims flattened). Kept here because torch deprecates slicing a flattened dim
    # from the root mesh: the flattened mesh is to be kept by whoever made it.
    meshes: Mapping[str, DeviceMesh] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    @classmethod
    def from_config(cls, p: ParallelConfig, world_size: int) -> ParallelDims:
        """The degrees cfg.parallel asks for on `world_size` ranks (ConfigError when they do not fit)."""
        return cls(*dp_degrees(p, world_size), world_size)

    @property
    def degrees(self) -> dict[str, int]:
        """Each dim's degree, outermost first."""
        return {name: getattr(self, name) for name in MESH_DIMS}

    def problems(self) -> list[str]:
        """What is wrong with these degrees, with the fix (empty when they fit the world size)."""
        low = [f"{name}={degree}" for name, degree in self.degrees.items() if degree < 1]
        if low:
            return [f"every parallel degree must be >= 1, but {', '.join(low)}; check parallel.replicate and "
                    "parallel.shard"]
        product = math.prod(self.degrees.values())
        if product != self.world_size:
            shown = " x ".join(f"{name}={degree}" for name, degree in self.degrees.items())
            return [f"the parallel degrees {shown} = {product} must equal the world size {self.world_size}; "
                    f"change parallel.replicate / parallel.shard, or launch {product} processes"]
        return []

    @property
    def dp_size(self) -> int:
        """Ranks that each read their own share of the global batch."""
        return self.dp_replicate * self.dp_shard

    @property
    def non_data_parallel_size(self) -> int:
        """Ranks that read the same data and split the work on it instead."""
        return self.tp * self.cp * self.pp

    @property
    def dp_enabled(self) -> bool:
        return self.dp_size > 1

    @property
    def dp_replicate_enabled(self) -> bool:
        return self.dp_replicate > 1

    @property
    def dp_shard_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def fsdp_enabled(self) -> bool:
        """Whether parameters are sharded across ranks (torchtitan's rule: dp_shard or cp)."""
        return self.dp_shard > 1 or self.cp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def cp_enabled(self) -> bool:
        return self.cp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    def with_mesh(self, device_type: str) -> ParallelDims:
        """These degrees with this rank's DeviceMesh: the dims of degree > 1 and dp_shard always
        (FSDP needs a mesh even alone; with dp_replicate it makes the 2-D mesh of HSDP), plus
        "dp", the data-parallel dims flattened. Creates process groups: call on every rank, once,
        right after the default process group is created."""
        names = tuple(name for name, degree in self.degrees.items() if degree > 1 or name == "dp_shard")
        world = init_device_mesh(device_type, tuple(self.degrees[name] for name in names), mesh_dim_names=names)
        meshes = {"world": world, **{name: world[name] for name in names}}
        data_parallel = tuple(name for name in ("dp_replicate", "dp_shard") if name in names)
        meshes["dp"] = world[data_parallel]._flatten("dp")
        return replace(self, meshes=MappingProxyType(meshes))

    def mesh(self, *names: str) -> DeviceMesh:
        """This rank's mesh over the named dims, e.g. mesh("dp") or mesh("dp_replicate", "dp_shard")."""
        assert self.meshes, "no mesh: with_mesh() runs once the process group exists"
        return self.meshes[names[0]] if len(names) == 1 else self.meshes["world"][names]

    @property
    def fsdp_mesh(self) -> DeviceMesh:
        """What FSDP2 shards over: 1-D (dp_shard), or 2-D (dp_replicate, dp_shard) for HSDP,
        whose replicas all-reduce the gradients that each shard group reduce-scatters."""
        return self.mesh("dp_replicate", "dp_shard") if self.dp_replicate_enabled else self.mesh("dp_shard")

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks (0 for a single process)."""
        if not self.meshes:
            assert self.dp_size == 1, "several data-parallel ranks but no mesh: call with_mesh()"
            return 0
        return self.meshes["dp"].get_local_rank()

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        """The group to sum data-parallel shares over (a loss, a count); None, the default group,
        while every rank is a data-parallel rank: the default group fails a collective after
        parallel.timeout_s, a group the mesh creates after torch's default of 30 minutes."""
        if self.dp_size == self.world_size or not self.meshes:
            return None
        return self.meshes["dp"].get_group()
