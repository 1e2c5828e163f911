"""Reading checkpoints without running code from them.

A pickle can call any function while it loads, so a checkpoint from outside (a shared drive, a
download) must never be unpickled freely. Three kinds of pickle live in a checkpoint:
- DCP's `.metadata`, which torch reads with plain pickle: read here by an unpickler that admits an
  exact list of classes (DCP's metadata dataclasses, torch sizes and dtypes, plain containers),
  never a function, and never a whole module's worth of names;
- DCP's non-tensor values (the optimizer's hyperparameters), which torch's default load planner
  reads with `torch.load(weights_only=False)`: read weights-only here;
- DeepSpeed's files, whose loaders ask for `weights_only=False`: they run under
  `weights_only_loads()`, which overrides that.
Tensors themselves are read by torch with `weights_only=True`. Load DCP checkpoints with
`load_dcp`, which pairs the safe reader with the safe planner."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from pretrain.errors import CorruptCheckpoint

# Every class a DCP `.metadata` file of ours needs (checked against the committed golden
# checkpoint and the files the backends write). Classes only: unpickling may call them
# with arguments from the file, and each of these just stores its arguments.
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),  # the checkpoint's own path, recorded by DCP
    ("collections", "OrderedDict"),
} | {("builtins", name) for name in ("set", "frozenset", "tuple", "list", "dict", "int", "float", "bool", "str",
                                     "bytes", "complex", "slice")}
_LAYOUTS = {str(value): value for value in vars(torch).values() if isinstance(value, torch.layout)}


def _layout_named(name: str) -> torch.layout:
    """Stands in for torch.serialization._get_layout, which is how torch pickles a layout
    (`torch.strided` by its name): the same lookup, admitting nothing but a layout's name."""
    if name not in _LAYOUTS:
        raise pickle.UnpicklingError(f"unknown tensor layout {name!r} in checkpoint metadata")
    return _LAYOUTS[name]


class _MetadataUnpickler(pickle.Unpickler):
    """Admits _METADATA_CLASSES, torch dtypes and layouts; refuses every other global by name."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)  # a dtype object, e.g. torch.float32
        if (module, name) == ("torch.serialization", "_get_layout"):
            return _layout_named
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def read_dcp_metadata(directory: str | os.PathLike[str]) -> Metadata:
    """The Metadata of the DCP checkpoint in `directory`, read with the restricted unpickler; a
    damaged or unsafe file raises CorruptCheckpoint naming the file and the refused global."""
    path = Path(directory) / ".metadata"
    try:
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, ValueError, TypeError,
            KeyError, RecursionError) as exc:
        raise CorruptCheckpoint(f"{path}: unreadable or unsafe checkpoint metadata ({exc}); the checkpoint is "
                                "damaged or was not written by pretrain, and nothing in it was run") from exc
    if not isinstance(metadata, Metadata):
        raise CorruptCheckpoint(f"{path} holds a {type(metadata).__name__}, not checkpoint metadata")
    for info in (metadata.storage_data or {}).values():
        relative = PurePosixPath(str(getattr(info, "relative_path", "")))
        if relative.is_absolute() or len(relative.parts) != 1 or relative.name in ("", ".", ".."):
            raise CorruptCheckpoint(f"{path} points at {str(relative)!r}, outside the checkpoint directory; the "
                                    "checkpoint is damaged or was not written by pretrain")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """torch.distributed.checkpoint's file reader with the restricted metadata unpickler. It hands
    non-tensor values to the load planner to unpickle: use it through load_dcp."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_dcp_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        assert metadata.storage_meta is not None  # set just above
        metadata.storage_meta.load_id = self.load_id
        return metadata


def refusal(exc: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only refusal that names what was refused (its first lines are
    general advice, including to load with weights_only=False, which must not be followed here)."""
    lines = [line.strip() for line in str(exc).splitlines()
             if line.strip() and not line.startswith(("Weights only load failed", "Check the documentation"))]
    named = [line for line in lines if "GLOBAL" in line]
    return (named or lines or ["refused by torch's weights-only loader"])[0][:300]


class _SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, except that non-tensor values (the optimizer's param_groups,
    say) are unpickled weights-only: torch's own planner loads them with weights_only=False."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CorruptCheckpoint(f"checkpoint value {fqn!r} is not plain data ({refusal(exc)}); the "
                                    "checkpoint is damaged or was not written by pretrain, and nothing in it was "
                                    "run") from exc
        # What DefaultLoadPlanner.load_bytes does with the value it unpickled.
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], loaded)
        else:
            self.state_dict[fqn] = loaded


def load_dcp(state: dict, directory: str | Path, no_dist: bool = False) -> None:
    """Fill `state` in place from the DCP checkpoint in `directory` (dcp.load), nothing in it
    unpickled freely: the metadata through the restricted unpickler, non-tensor values
    weights-only. no_dist: only this process reads, even inside a distributed job."""
    dcp.load(state, storage_reader=SafeFileSystemReader(str(directory)), planner=_SafeLoadPlanner(), no_dist=no_dist)


# What DeepSpeed's checkpoint files hold besides tensors and plain containers: classes whose
# construction only stores its arguments (an enum, a loss-scale record, a (start, numel) pair).
def _deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every torch.load inside loads weights only, whatever its caller asked for (DeepSpeed's
    checkpoint readers and converters ask for full unpickling)."""
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
