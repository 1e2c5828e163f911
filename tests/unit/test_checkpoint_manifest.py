"""A checkpoint names the engine that wrote it and at which world size; loading it with an
engine that cannot read it fails with the fix, before anything is restored."""

from __future__ import annotations

import json

import pytest

from pretrain.checkpoint import FORMAT_VERSION, MANIFEST, CheckpointManager
from pretrain.errors import PretrainError


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


def test_other_engine_kind_is_refused_with_the_backend_to_use(tmp_path):
    path = checkpoint(tmp_path, engine="deepspeed", world_size=1)
    engine = RecordingEngine("dcp")
    with pytest.raises(PretrainError, match="holds a 'deepspeed' checkpoint.*resume it with parallel.backend=deepspeed"):
        CheckpointManager(str(tmp_path), True).load(path, engine)
    assert engine.loaded == []


def test_deepspeed_checkpoint_at_another_world_size_is_refused(tmp_path):
    path = checkpoint(tmp_path, engine="deepspeed", world_size=2)
    engine = RecordingEngine("deepspeed")
    with pytest.raises(PretrainError, match="written by 2 processes; DeepSpeed loads it only at that world size"):
        CheckpointManager(str(tmp_path), True).load(path, engine)
    assert engine.loaded == []
