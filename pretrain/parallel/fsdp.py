"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over ranks; HSDP
when the mesh (ParallelDims.fsdp_mesh) has a replicate dimension (shard within a node, replicate
across nodes)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from pretrain.errors import PretrainError

log = logging.getLogger(__name__)


def apply_fsdp(model: nn.Module, blocks: nn.ModuleList, mesh: DeviceMesh, bf16: bool,
               reshard_after_forward: bool, cpu_offload: bool) -> None:
    """Shard each of `blocks` (the model's transformer blocks), then the root (embeddings, final
    norm, head).

    Each block is one communication unit: its parameters are all-gathered just before its
    forward/backward and freed after. With bf16 the gathered parameters and the compute are bf16
    while gradients are reduced and the optimizer steps in fp32."""
    if cpu_offload and mesh.device_type != "cpu":
        offload: OffloadPolicy = CPUOffloadPolicy()
    elif cpu_offload:
        raise PretrainError("parallel.cpu_offload=true moves FSDP state from the GPU to the CPU, but this job "
                            "already trains on the CPU; drop the option")
    else:
        offload = OffloadPolicy()
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    settings: dict[str, Any] = {"mesh": mesh, "mp_policy": mixed, "offload_policy": offload}
    layers = list(blocks)
    for i, layer in enumerate(layers):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(layer, reshard_after_forward=reshard_after_forward and i < len(layers) - 1, **settings)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **settings)
    assert mesh.mesh_dim_names is not None  # ParallelDims names every dim
    # The mesh's dims (ParallelDims.fsdp_mesh) named as the keys that set them: parallel.replicate, parallel.shard
    shape = {name.removeprefix("dp_"): size for name, size in zip(mesh.mesh_dim_names, mesh.shape)}
    log.info("FSDP2 over mesh %s: %d blocks + root, %s, reshard_after_forward=%s%s", shape, len(layers),
             "bf16 compute / fp32 reduce" if bf16 else "fp32", reshard_after_forward,
             ", CPU offload" if cpu_offload else "")
