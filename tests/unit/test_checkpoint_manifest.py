"""A checkpoint names the engine that wrote it; loading it with an engine that cannot read it
fails with the fix, before anything is restored."""

from __future__ import annotations

import json

import pytest
import torch

from pretrain.checkpoint.manager import FORMAT_VERSION, MANIFEST, CheckpointManager
from pretrain.config import CheckpointConfig
from pretrain.errors import PretrainError
from pretrain.parallel import DistInfo


class RecordingEngine:
    def __init__(self, checkpoint_format: str):
        self.checkpoint_format = checkpoint_format
        self.loaded = []

    def load(self, path) -> None:
        self.loaded.append(path)


def checkpoint(tmp_path, **manifest):
    path = tmp_path / "checkpoints" / "step_00000004"
    path.mkdir(parents=True)
    (path / MANIFEST).write_text(json.dumps({"format_version": FORMAT_VERSION, "step": 4, **manifest}))
    return path


@pytest.mark.parametrize("written_by, world_size, reader, message", [
    ("deepspeed", 1, "dcp", "holds a 'deepspeed' checkpoint.*resume it with parallel.backend=deepspeed"),
    ("dcp", 1, "deepspeed", "holds a 'dcp' checkpoint.*resume it with parallel.backend=none, ddp or fsdp"),
])
def test_checkpoint_the_engine_cannot_read_is_refused_with_the_fix(tmp_path, written_by, world_size, reader, message):
    path = checkpoint(tmp_path, engine=written_by, world_size=world_size)
    engine = RecordingEngine(reader)
    with pytest.raises(PretrainError, match=message):
        manager = CheckpointManager(CheckpointConfig(), str(tmp_path), DistInfo(0, 0, 1, torch.device("cpu")))
        manager.track({"engine": engine, "train": None})  # refused before the training state is read
        manager.load(path)
    assert engine.loaded == []
