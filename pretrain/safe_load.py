"""Reading checkpoints without running code from them.

A pickle can call any function while it loads, so a checkpoint from outside (a shared drive, a
download) must never be unpickled freely. Tensors are read with `torch.load(weights_only=True)`;
DCP's `.metadata` file, which torch reads with plain pickle, goes through an unpickler that admits
only DCP's own metadata classes; DeepSpeed's loaders, which ask for `weights_only=False`, run
under `weights_only_loads()`, which overrides that."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from pretrain.errors import CorruptCheckpoint

_METADATA_MODULES = ("torch.distributed.checkpoint.", "torch.distributed._shard.")
_BUILTINS = {"set", "frozenset", "slice", "tuple", "list", "dict", "int", "float", "bool", "str", "bytes", "complex"}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP's metadata dataclasses, torch dtypes/sizes/memory formats and plain containers."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(_METADATA_MODULES):
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                                             torch.memory_format))):
            return getattr(torch, name)
        if module == "torch.serialization" and name == "_get_layout":  # rebuilds torch.strided from its name
            return super().find_class(module, name)
        if module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
            return super().find_class(module, name)  # the checkpoint's own path, recorded by DCP
        if module == "collections" and name == "OrderedDict":
            return super().find_class(module, name)
        if module == "builtins" and name in _BUILTINS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


class SafeFileSystemReader(FileSystemReader):
    """torch.distributed.checkpoint's file reader with a restricted metadata unpickler (tensor
    data is already read with weights_only=True by torch)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError) as exc:
            raise CorruptCheckpoint(f"{path}: unreadable or unsafe checkpoint metadata ({exc}); the checkpoint is "
                                "damaged or was not written by pretrain") from exc
        if not isinstance(metadata, Metadata):
            raise CorruptCheckpoint(f"{path} holds a {type(metadata).__name__}, not checkpoint metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# What DeepSpeed's checkpoint files hold besides tensors and plain containers.
def _deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load inside loads weights only, whatever its caller asked for (DeepSpeed's
    checkpoint readers ask for full unpickling)."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        if previous is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous
