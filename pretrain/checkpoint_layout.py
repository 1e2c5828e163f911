"""The on-disk layout of a checkpoint, out_dir/checkpoints/step_{step:08d}/, and how to tell a
whole one. Light (no torch.distributed): the exporter and the trainer both read it.

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
                     DeepSpeed's engine checkpoint under deepspeed/ for deepspeed.

Everything is written into .tmp_step_N/, flushed to disk, then renamed into place
(pretrain.checkpoint.CheckpointManager)."""

from __future__ import annotations

import json
from pathlib import Path

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
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("step"), int) else None


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
