"""Reading a training checkpoint outside training: its manifest, its config, and its weights a
few tensors at a time, from either checkpoint format (DCP or DeepSpeed).

Nothing here joins a process group or unpickles code: DCP's files are read by safe_load's
read_dcp_metadata and load_dcp, DeepSpeed's files under weights_only_loads()."""

from __future__ import annotations

import contextlib
import pickle
import sys
import warnings
from pathlib import Path
from typing import Protocol

import torch
import yaml

from pretrain.checkpoint.layout import (
    CONFIG,
    DCP_MODEL_PREFIX,
    DEEPSPEED_DIR,
    MANIFEST,
    TOKENIZER,
    dcp_model_shapes,
    require_manifest,
)
from pretrain.checkpoint.safe_load import load_dcp, read_dcp_metadata, refusal, weights_only_loads
from pretrain.config.checks import with_max_seq_len
from pretrain.config.parse import build, load_yaml_text
from pretrain.config.schema import Config
from pretrain.errors import ConfigError, CorruptCheckpoint, PretrainError
from pretrain.export.names import strip_wrappers


def read_manifest(ckpt_dir: Path) -> dict:
    """The checkpoint's manifest.json; a directory without a readable one is not a complete checkpoint."""
    return require_manifest(ckpt_dir, format_fix="export it with the version that wrote it")


def checkpoint_config(ckpt_dir: Path) -> Config:
    """The resolved run config saved with the checkpoint (the model's shape comes from it).

    Parsed and type-checked but not validated as a run: validation checks the run's environment
    (its data files exist, its world size), and a checkpoint is often exported elsewhere."""
    path = ckpt_dir / CONFIG
    try:
        data = load_yaml_text(path.read_text()) or {}
    except OSError:
        raise PretrainError(f"{path} is missing: the checkpoint does not say what model it holds") from None
    except yaml.YAMLError as exc:
        raise PretrainError(f"{path} is not valid YAML ({exc}); the checkpoint is damaged") from None
    problems: list[str] = []
    cfg = build(Config, data, "", problems)
    if problems:
        raise ConfigError(problems, str(path))
    return with_max_seq_len(cfg)  # resolved in configs saved by training; kept for hand-written ones


def checkpoint_tokenizer(ckpt_dir: Path, cfg: Config) -> Path:
    """The sentencepiece model the run trained with: the checkpoint's copy, else the run's tokenizer.path."""
    for path in (ckpt_dir / TOKENIZER, Path(cfg.tokenizer_path)):
        if path.is_file():
            return path
    raise PretrainError(f"no tokenizer for {ckpt_dir}: neither {ckpt_dir / TOKENIZER} nor the run's "
                        f"tokenizer.path {cfg.tokenizer_path} exists; copy the tokenizer the run used to "
                        f"{ckpt_dir / TOKENIZER}")


class WeightReader(Protocol):
    shapes: dict[str, torch.Size]  # canonical parameter name -> shape, as stored

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, fp32 on the CPU."""
        ...


def open_reader(ckpt_dir: Path, manifest: dict) -> WeightReader:
    engine = manifest.get("engine", "dcp")
    if engine == "dcp":
        return DcpReader(ckpt_dir)
    if engine == "deepspeed":
        return DeepSpeedReader(ckpt_dir)
    raise PretrainError(f"{ckpt_dir / MANIFEST} names engine {engine!r}; this version of pretrain reads 'dcp' and "
                        "'deepspeed' checkpoints")


class DcpReader:
    """A torch.distributed.checkpoint directory, read in this process only: each read() loads just
    the requested tensors, whatever world size wrote them and however they were sharded."""

    def __init__(self, ckpt_dir: Path):
        self.path = ckpt_dir
        stored = dcp_model_shapes(read_dcp_metadata(ckpt_dir))
        if not stored:
            raise PretrainError(f"{ckpt_dir} holds no model weights (no '{DCP_MODEL_PREFIX}*' tensors in its "
                                ".metadata); the checkpoint is damaged or was not written by pretrain")
        self._keys = {strip_wrappers(name): DCP_MODEL_PREFIX + name for name in stored}  # ours -> key on disk
        self.shapes = {strip_wrappers(name): shape for name, shape in stored.items()}

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        state = {self._keys[n]: torch.empty(self.shapes[n], dtype=torch.float32) for n in names}
        with warnings.catch_warnings():  # DCP warns that no process group exists: intended here
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            # no_dist: only this process reads, even inside a distributed job (init_from on rank 0)
            load_dcp(state, self.path, no_dist=True)
        return {n: state[self._keys[n]] for n in names}


class DeepSpeedReader:
    """A DeepSpeed ZeRO checkpoint (any stage, the world size that wrote it) through DeepSpeed's
    own zero_to_fp32, in lazy mode: ZeRO-3 partitions are memory-mapped and a parameter is
    assembled only when read (stages 1-2 are merged in memory by DeepSpeed)."""

    def __init__(self, ckpt_dir: Path):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        if not (ckpt_dir / DEEPSPEED_DIR).is_dir():
            raise PretrainError(f"{ckpt_dir} is a DeepSpeed checkpoint without its {DEEPSPEED_DIR}/ directory; "
                                "the checkpoint is damaged, use an earlier one")
        # zero_to_fp32 prints progress to stdout, which belongs to the command's own output.
        with weights_only_loads(), contextlib.redirect_stdout(sys.stderr):
            try:
                lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=DEEPSPEED_DIR, lazy_mode=True)
            except pickle.UnpicklingError as exc:
                raise CorruptCheckpoint(f"{ckpt_dir / DEEPSPEED_DIR}: a file holds more than weights "
                                        f"({refusal(exc)}); the checkpoint is damaged or was not "
                                        "written by pretrain, and nothing in it was run") from exc
            except (ValueError, FileNotFoundError, RuntimeError) as exc:
                raise PretrainError(f"{ckpt_dir / DEEPSPEED_DIR}: DeepSpeed cannot read this checkpoint ({exc}); "
                                    "it is damaged or incomplete, use an earlier one") from exc
        self._lazy = {strip_wrappers(k): v for k, v in lazy.items()}
        self.shapes = {name: torch.Size(v.shape) for name, v in self._lazy.items()}

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        # .contiguous() assembles a lazy ZeRO-3 parameter from every rank's partition.
        return {n: self._lazy[n].contiguous().to(torch.float32) for n in names}
