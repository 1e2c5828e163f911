"""Writing a stream of tensors as Hugging Face's safetensors files: one `model.safetensors`, or
shards `model-0000i-of-0000N.safetensors` with a `model.safetensors.index.json` when the total
exceeds the shard size. Only one shard is in memory at a time."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from pretrain.errors import PretrainError
from pretrain.export.output import follow_umask

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """Bytes in "5GB", "500MB", "2GiB" or "1000000" (decimal units, as Hugging Face's max_shard_size)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", text.upper())
    if not match or float(match.group(1)) <= 0:
        raise PretrainError(f"--max-shard-size={text!r} is not a size; write it like 5GB, 500MB or 2GiB")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def plan_shards(sizes: Mapping[str, int], max_bytes: int) -> list[list[str]]:
    """Names in order, cut into consecutive shards of at most `max_bytes` (a larger tensor gets a
    shard of its own): planned up front, so each shard's file name (of N) is known when it is written."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_safetensors(tensors: Iterable[tuple[str, torch.Tensor]], sizes: Mapping[str, int], out_dir: Path,
                      max_bytes: int, progress: Callable[[str], None] = lambda _: None) -> list[str]:
    """Write `tensors` (which must arrive in the order and sizes of `sizes`) into `out_dir`;
    return the file names written."""
    from safetensors.torch import save_file

    plan = plan_shards(sizes, max_bytes)
    files = [SINGLE_FILE] if len(plan) == 1 else [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
                                                 for i in range(len(plan))]
    shard_of = {name: i for i, names in enumerate(plan) for name in names}
    pending: dict[str, torch.Tensor] = {}
    written = 0
    for name, tensor in tensors:
        if shard_of.get(name) != written:
            raise AssertionError(f"{name} arrived out of the planned order (shard {written})")
        pending[name] = tensor.contiguous()
        if len(pending) == len(plan[written]):
            save_file(pending, str(out_dir / files[written]), metadata={"format": "pt"})
            follow_umask(out_dir / files[written])
            progress(f"wrote {files[written]} ({len(pending)} tensors)")
            pending, written = {}, written + 1
    if written != len(plan):
        raise AssertionError(f"the weights stopped after {written} of {len(plan)} shards")
    if len(plan) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {name: files[shard_of[name]] for name in sizes}}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return files
