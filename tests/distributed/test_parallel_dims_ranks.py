"""ParallelDims on a real 2-process gloo group: each backend's mesh has its named dims, and the
data-parallel rank, size and group every component asks for come from it."""

from __future__ import annotations

import json

import pytest
import torch

from pretrain.config import ParallelConfig
from pretrain.parallel import ParallelDims, sum_over_ranks
from tests.distributed.ranks import run_ranks

pytestmark = pytest.mark.slow

CASES = {  # backend settings -> the root mesh's dims and the mesh FSDP would shard over
    "fsdp": ({"backend": "fsdp"}, {"dp_shard": 2}, ["dp_shard"]),
    "hsdp-2x1": ({"backend": "fsdp", "replicate": 2, "shard": 1}, {"dp_replicate": 2, "dp_shard": 1},
                 ["dp_replicate", "dp_shard"]),
    "ddp": ({"backend": "ddp"}, {"dp_replicate": 2, "dp_shard": 1}, ["dp_replicate", "dp_shard"]),
    "deepspeed": ({"backend": "deepspeed"}, {"dp_shard": 2}, ["dp_shard"]),
}


def describe_mesh(rank: int, world_size: int, out_dir) -> None:
    results = {}
    for name, (settings, _, _) in CASES.items():
        dims = ParallelDims.from_config(ParallelConfig(**settings), world_size).with_mesh("cpu")
        world = dims.mesh("world")
        results[name] = {
            "world": dict(zip(world.mesh_dim_names, world.shape)),
            "fsdp": list(dims.fsdp_mesh.mesh_dim_names),
            "dp": [dims.dp_rank, dims.dp_size, dims.mesh("dp").size(), dims.dp_group is None],
            # each data-parallel rank's share, summed over them: 1 + 2
            "sum": sum_over_ranks(torch.tensor(float(dims.dp_rank + 1)), dims.dp_group).item(),
        }
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))


def test_each_backends_mesh_names_its_dims_and_gives_each_rank_its_data_parallel_rank(tmp_path):
    run_ranks(describe_mesh, 2, tmp_path)
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name, (_, world, fsdp) in CASES.items():
            got = results[name]
            assert got["world"] == world, name
            assert got["fsdp"] == fsdp, name
            # consecutive ranks: the data-parallel rank is the rank while tp, cp and pp are 1
            assert got["dp"] == [rank, 2, 2, True], name
            assert got["sum"] == 3.0, name
