"""ParallelDims: the degrees each backend asks for, their check against the world size, the
data-parallel rank and size every component asks for, and the named mesh (one gloo process here;
2 processes in tests/distributed/test_parallel_dims_ranks.py)."""

from __future__ import annotations

import dataclasses
import datetime

import pytest
import torch
import torch.distributed as dist

from pretrain.config import ParallelConfig
from pretrain.config.checks import validate
from pretrain.config.load import grad_accum_steps
from pretrain.errors import ConfigError, PretrainError
from pretrain.parallel import LaunchEnv, ParallelDims, launch_env, sum_over_ranks


@pytest.mark.parametrize("backend, extra, world_size, degrees", [
    ("none", {}, 1, (1, 1)),
    ("ddp", {}, 4, (4, 1)),  # DDP: every rank a full replica
    ("deepspeed", {}, 4, (1, 4)),  # ZeRO shards over every rank
    ("fsdp", {}, 4, (1, 4)),
    ("fsdp", {"replicate": 2}, 8, (2, 4)),  # HSDP: shard within groups of 4, replicate across 2
    ("fsdp", {"replicate": 2, "shard": 1}, 2, (2, 1)),
])
def test_each_backend_asks_for_its_degrees_and_every_rank_is_a_data_parallel_rank(backend, extra, world_size,
                                                                                   degrees):
    dims = ParallelDims.from_config(ParallelConfig(backend=backend, **extra), world_size)
    assert (dims.dp_replicate, dims.dp_shard) == degrees
    assert (dims.tp, dims.cp, dims.pp) == (1, 1, 1) and dims.non_data_parallel_size == 1
    assert dims.dp_size == world_size and dims.dp_enabled == (world_size > 1)
    assert dims.fsdp_enabled == (degrees[1] > 1) and dims.dp_replicate_enabled == (degrees[0] > 1)
    assert dims.dp_group is None  # the default group: every rank is a data-parallel rank
    if world_size == 1:
        assert dims.dp_rank == 0  # one process needs no mesh


def test_degrees_that_do_not_multiply_to_the_world_size_are_refused_with_the_keys_and_the_fix():
    with pytest.raises(ConfigError, match=r"dp_replicate=2 x dp_shard=3 x cp=1 x tp=1 = 6 must equal the world "
                                          r"size 8; change parallel.replicate / parallel.shard, or launch 6"):
        ParallelDims(dp_replicate=2, dp_shard=3, world_size=8)
    with pytest.raises(ConfigError, match=r"every parallel degree must be >= 1, but dp_shard=0"):
        ParallelDims(dp_replicate=1, dp_shard=0, world_size=1)
    with pytest.raises(ConfigError, match="= 1 must equal the world size 2"):  # `none` is one process
        ParallelDims.from_config(ParallelConfig(backend="none"), 2)


def test_the_config_check_keeps_its_own_messages_for_replicate_and_shard(tiny_config):
    def validated(world_size: int, **parallel: object):
        cfg = tiny_config(train__global_batch_sequences=16, train__global_batch_tokens=None)
        return validate(dataclasses.replace(cfg, parallel=ParallelConfig(backend="fsdp", **parallel)), world_size)

    with pytest.raises(ConfigError, match=r"parallel.replicate=3 x parallel.shard=1 must equal the world size 4; "
                                          r"choose replicate in \{1, 2, 4\} and leave shard unset"):
        validated(4, replicate=3)
    with pytest.raises(ConfigError, match=r"parallel.replicate=0 and parallel.shard=None must be >= 1"):
        validated(4, replicate=0)
    assert validated(4, replicate=2).parallel.replicate == 2


def test_gradient_accumulation_divides_the_global_batch_over_the_data_parallel_ranks(tiny_config):
    cfg = tiny_config(train__micro_batch_size=2, train__global_batch_sequences=8, train__global_batch_tokens=None)
    assert [grad_accum_steps(cfg, dp_size) for dp_size in (1, 2, 4)] == [4, 2, 1]


def test_torchruns_environment_is_read_in_one_place():
    env = launch_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                      "TORCHELASTIC_RESTART_COUNT": "2", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500",
                      "TORCHELASTIC_USE_AGENT_STORE": "True"})
    assert env == LaunchEnv(rank=3, local_rank=1, world_size=4, local_world_size=2, restart_count=2,
                            master_addr="10.0.0.1", master_port=29500, agent_store=True)
    assert launch_env({}) == LaunchEnv()  # without torchrun: rank 0 of 1
    with pytest.raises(PretrainError, match=r"the environment variable WORLD_SIZE='two' is not a whole number; "
                                            "launch with torchrun, which sets it, or unset it"):
        launch_env({"WORLD_SIZE": "two"})


@pytest.fixture
def one_process_group():
    """A gloo group of this process alone, as `pretrain train` makes for a sharding backend."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["fsdp", "ddp", "deepspeed"])
def test_the_mesh_has_named_dims_and_gives_the_data_parallel_rank(one_process_group, backend):
    dims = ParallelDims.from_config(ParallelConfig(backend=backend), 1).with_mesh("cpu")
    assert dims.mesh("dp_shard").mesh_dim_names == ("dp_shard",)  # always there: FSDP needs a mesh even alone
    assert dims.mesh("dp").mesh_dim_names == ("dp",) and dims.mesh("dp").size() == 1
    assert dims.fsdp_mesh.mesh_dim_names == ("dp_shard",)
    assert dims.dp_rank == 0 and dims.dp_size == 1 and dims.dp_group is None
    assert dims == ParallelDims.from_config(ParallelConfig(backend=backend), 1)  # the mesh is not a degree


def test_sum_over_ranks_takes_a_group(one_process_group):
    value = torch.tensor([1.5, 2.0])
    assert sum_over_ranks(value, dist.new_group([0])).tolist() == [1.5, 2.0] == sum_over_ranks(value).tolist()
