"""The on-disk layout of a checkpoint, out_dir/checkpoints/step_{step:08d}/, how to tell a whole
one, and whether its weights fit a model. Light (no torch.distributed): the exporter and the
trainer's engines both use it.

Layout of one checkpoint (format_version 1):
  manifest.json      written last: format_version, step, tokens_seen, engine, world_size,
                     config_sha256 and every file's size. A directory without a readable manifest,
                     or whose files differ from it, is not a checkpoint.
  config.yaml        the resolved config of the run
  tokenizer.model    the run's tokenizer, so the checkpoint is self-contained (export, eval)
  trainer_state.pt   step, tokens seen, LR schedule and the data stream's position
  rng/rank_NNNNN.pt  each rank's CPU (and CUDA) random state
  model and optimizer: DCP files (.metadata, __R_N.distcp) for none/ddp/fsdp, with the model's own
                     parameter names under "model." and the optimizer's under "optimizer.";
                     DeepSpeed's engine checkpoint under deepspeed/ for deepspeed, with `latest`
                     (naming that tag) and DeepSpeed's zero_to_fp32.py beside it, as its tools expect.

Everything is written into .tmp_step_N/, flushed to disk, then renamed into place
(pretrain.checkpoint.manager.CheckpointManager)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from pretrain.errors import PretrainError
from pretrain.models.registry import AnyModelArgs

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.pt"
CONFIG = "config.yaml"
TOKENIZER = "tokenizer.model"
RNG_DIR = "rng"
DEEPSPEED_DIR = "deepspeed"  # DeepSpeed's checkpoint tag: its files go to <checkpoint>/deepspeed/
DCP_MODEL_PREFIX = "model."  # DCP keys: {"model": model state, "optimizer": optimizer state}
STEP_GLOB = "step_*"


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def read_manifest(path: Path) -> dict | None:
    """The checkpoint's manifest, or None when `path` has no readable one (not a checkpoint, or an
    incomplete one)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("step"), int) else None


def check_format(path: Path, manifest: Mapping[str, Any], fix: str | None = None) -> None:
    """Raise PretrainError when the checkpoint at `path` has another format_version than this
    version of pretrain reads; `fix` (what the caller's user can do) ends the message."""
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PretrainError(f"{path} has checkpoint format {manifest.get('format_version')}, this version of "
                            f"pretrain reads format {FORMAT_VERSION}" + (f"; {fix}" if fix else ""))


def require_manifest(path: Path, format_fix: str | None = None) -> dict:
    """The manifest of the complete checkpoint at `path`, in the format this version reads;
    PretrainError naming the fix otherwise (`format_fix`: see check_format)."""
    manifest = read_manifest(path)
    if manifest is None:
        raise PretrainError(f"{path} is not a complete checkpoint (no readable {MANIFEST}); pass a directory "
                            "like OUT_DIR/checkpoints/step_00001000 (a crash while saving leaves an incomplete one: "
                            "take the previous step)")
    check_format(path, manifest, format_fix)
    return manifest


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoints under `root` that have a readable manifest, oldest step first. Temporary
    directories (a crash mid-write) never have one at their final name."""
    found = [(manifest["step"], path) for path in root.glob(STEP_GLOB) if (manifest := read_manifest(path))]
    return [path for _, path in sorted(found)]


def damage(path: Path) -> str | None:
    """Why `path` is not a whole checkpoint (no manifest, a file missing or of another size than
    the manifest says), or None when it is."""
    manifest = read_manifest(path)
    if manifest is None:
        return f"no readable {MANIFEST}"
    for name, size in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {size} (truncated or overwritten)"
    return None


def dcp_model_shapes(metadata: Any) -> dict[str, torch.Size]:
    """Parameter name -> full shape of the model tensors listed in a DCP checkpoint's metadata."""
    return {key.removeprefix(DCP_MODEL_PREFIX): entry.size for key, entry in metadata.state_dict_metadata.items()
            if key.startswith(DCP_MODEL_PREFIX) and hasattr(entry, "size")}


def check_shapes(expected: Mapping[str, torch.Size], weights: Mapping[str, torch.Size | torch.Tensor], source: str,
                 args: AnyModelArgs | None = None) -> None:
    """Raise PretrainError for the first parameter of `expected` (this model's config) that
    `weights` lacks or holds with another shape, or for a parameter it holds beyond them. `args`
    adds the config values that determine the offending shape to the message."""
    shapes = {name: tuple(w.shape if isinstance(w, torch.Tensor) else w) for name, w in weights.items()}
    fix = ("the weights were made for a different model shape: set the model.* values they were trained "
           "with (a checkpoint's config.yaml lists them)")
    for name, shape in expected.items():
        if name not in shapes:
            raise PretrainError(f"{source}: parameter {name} of this model's config is missing from the checkpoint"
                                f"{_config_values(name, args)}; {fix}")
        if shapes[name] != tuple(shape):
            raise PretrainError(f"{source}: parameter {name} has shape {shapes[name]} in the checkpoint but "
                                f"{tuple(shape)} in this model's config{_config_values(name, args)}; {fix}")
    for name in shapes:
        if name not in expected:
            raise PretrainError(f"{source}: the checkpoint has parameter {name}, which this model's config does not "
                                f"have{_config_values(name, args)}; {fix}")


# Which config values decide a parameter's shape (or, for layers.N, whether it exists).
_SHAPE_FIELDS = (
    (r"tok_embeddings|output", ("vocab_size", "d_model")),
    (r"pos_embeddings", ("max_seq_len", "d_model")),  # GPT-2's learned positions
    (r"\.w[qo]\.", ("d_model", "n_heads")),
    (r"\.w[kv]\.", ("d_model", "n_heads", "n_kv_heads")),
    (r"feed_forward", ("d_model", "ffn_hidden")),
    (r"norm", ("d_model",)),
)


def _config_values(name: str, args: AnyModelArgs | None) -> str:
    if args is None:
        return ""
    fields = next((f for pattern, f in _SHAPE_FIELDS if re.search(pattern, name)), ())
    if name.startswith("layers."):
        fields = ("n_layers", *fields)
    return " (" + ", ".join(f"model.{f}={getattr(args, f)}" for f in fields) + ")" if fields else ""
