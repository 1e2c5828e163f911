"""Checkpoints: out_dir/checkpoints/step_{step:08d}/, written whole or not at all.

Model and optimizer are written by the parallel engine: through torch.distributed.checkpoint
(DCP) for none/ddp/fsdp, so every rank saves its shards in parallel and a checkpoint loads at
another world size; in DeepSpeed's own format for deepspeed. The small training state (step,
tokens, schedule, data cursor, RNG) goes into trainer_state.pt."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.atomic_dir import publish, temporary_path, temporary_sibling
from pretrain.errors import PretrainError
from pretrain.parallel import Engine

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"  # written last, inside the temporary directory, before the rename
TRAINER_STATE = "trainer_state.pt"


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first. Temporary directories and directories
    without a readable manifest (a crash mid-write) are never returned."""
    found = []
    for path in root.glob("step_*"):
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict) and isinstance(manifest.get("step"), int):
            found.append((manifest["step"], path))
    return [path for _, path in sorted(found)]


class CheckpointManager:
    """Saves and restores the model, the optimizer and a dict of small training state."""

    def __init__(self, out_dir: str, is_main: bool):
        self.root = Path(out_dir) / "checkpoints"
        self.is_main = is_main

    def latest(self) -> Path | None:
        found = complete_checkpoints(self.root)
        return found[-1] if found else None

    def save(self, step: int, engine: Engine, state: dict, config_yaml: str) -> Path:
        """Write a checkpoint for `step` into a temporary directory, flush it to disk, then
        rename it into place: a reader sees the whole checkpoint or none of it."""
        start = time.perf_counter()
        final = checkpoint_dir(self.root, step)
        tmp = temporary_sibling(final) if self.is_main else temporary_path(final)
        _barrier()
        engine.save(tmp)
        _barrier()
        if self.is_main:
            torch.save(state, tmp / TRAINER_STATE)
            (tmp / "config.yaml").write_text(config_yaml)
            files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            manifest = {"format_version": FORMAT_VERSION, "step": step, "tokens_seen": state.get("tokens_seen"),
                        "engine": engine.checkpoint_format, "world_size": _world_size(), "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            publish(tmp, final)  # a re-run of the same step replaces the old copy
        _barrier()
        log.info("saved checkpoint %s in %.1fs", final, time.perf_counter() - start)
        return final

    def load(self, path: Path, engine: Engine) -> dict:
        """Restore model and optimizer in place from `path`; return the training state dict."""
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            raise PretrainError(f"{path} is not a complete checkpoint (no readable {MANIFEST})") from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise PretrainError(f"{path} has checkpoint format {manifest.get('format_version')}, this "
                                f"version of pretrain reads format {FORMAT_VERSION}")
        written_by = manifest.get("engine", "dcp")
        if written_by != engine.checkpoint_format:
            backends = "parallel.backend=deepspeed" if written_by == "deepspeed" else "parallel.backend=none, ddp or fsdp"
            raise PretrainError(f"{path} holds a {written_by!r} checkpoint, which this run's backend cannot read "
                                f"(it reads {engine.checkpoint_format!r}); resume it with {backends}, or start "
                                "over with --checkpoint.resume=false or another out_dir")
        written_at = manifest.get("world_size", 1)
        if written_by == "deepspeed" and written_at != _world_size():
            raise PretrainError(f"{path} is a DeepSpeed checkpoint written by {written_at} processes; DeepSpeed loads "
                                f"it only at that world size (this run has {_world_size()}). Resume with "
                                f"{written_at} processes, or train with parallel.backend=fsdp, whose checkpoints "
                                "load at any world size")
        engine.load(path)
        state = torch.load(path / TRAINER_STATE, weights_only=True)
        log.info("resumed from %s (step %d)", path, manifest["step"])
        return state


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
