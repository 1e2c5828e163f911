"""Checkpoints: layout, atomicity, and bit-exact resume (N steps == N/2 + resume + N/2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import FORMAT_VERSION, complete_checkpoints
from pretrain.config import load_config
from pretrain.errors import PretrainError
from pretrain.trainer import Trainer
from tests.conftest import read_metrics

pytestmark = pytest.mark.slow


def train(cfg) -> Trainer:
    trainer = Trainer(cfg)
    trainer.train()
    return trainer


def losses(out_dir: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r}


def test_layout_and_manifest(tiny_config):
    cfg = tiny_config(train__max_steps=5, checkpoint__every=2)
    train(cfg)
    root = Path(cfg.out_dir) / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002", "step_00000004", "step_00000005"]
    manifest = json.loads((root / "step_00000004" / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["step"] == 4
    assert manifest["tokens_seen"] == 4 * cfg.train.global_batch_tokens
    for name, size in manifest["files"].items():
        assert (root / "step_00000004" / name).stat().st_size == size
    assert load_config(str(root / "step_00000004" / "config.yaml"), [], world_size=1) == cfg


@pytest.mark.parametrize("accumulate", [False, True])
def test_resume_is_bit_exact(tiny_config, tmp_path, accumulate):
    batch = {"train__global_batch_sequences": 8, "train__global_batch_tokens": None} if accumulate else {}
    straight = train(tiny_config(train__max_steps=8, out_dir=str(tmp_path / "straight"), **batch))
    stopped_cfg = tiny_config(train__max_steps=8, train__stop_at=4, checkpoint__every=100,
                              out_dir=str(tmp_path / "resumed"), **batch)
    train(stopped_cfg)
    resumed = train(tiny_config(train__max_steps=8, checkpoint__every=100, out_dir=str(tmp_path / "resumed"), **batch))
    assert losses(str(tmp_path / "resumed")) == losses(str(tmp_path / "straight"))  # exact, step by step
    assert list(losses(str(tmp_path / "resumed"))) == list(range(1, 9))
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(straight.optimizer.state_dict()["state"].values(), resumed.optimizer.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_incomplete_checkpoints_are_ignored(tiny_config):
    cfg = tiny_config(train__max_steps=3, checkpoint__every=3)
    train(cfg)
    root = Path(cfg.out_dir) / "checkpoints"
    # a crash while writing step 6 leaves a temporary directory, or a directory without manifest
    shutil.copytree(root / "step_00000003", root / ".tmp_step_00000006")
    shutil.copytree(root / "step_00000003", root / "step_00000009")
    (root / "step_00000009" / "manifest.json").unlink()
    shutil.copytree(root / "step_00000003", root / "step_00000012")
    (root / "step_00000012" / "manifest.json").write_text("{}")  # truncated or foreign manifest
    assert [p.name for p in complete_checkpoints(root)] == ["step_00000003"]
    resumed = Trainer(tiny_config(train__max_steps=6, checkpoint__every=3))
    assert resumed.step == 3


def test_resume_false_starts_over_and_resume_from_picks_a_checkpoint(tiny_config):
    cfg = tiny_config(train__max_steps=4, checkpoint__every=2)
    train(cfg)
    assert Trainer(tiny_config(train__max_steps=4, checkpoint__resume=False)).step == 0
    path = Path(cfg.out_dir) / "checkpoints" / "step_00000002"
    assert Trainer(tiny_config(train__max_steps=4, checkpoint__resume_from=str(path))).step == 2
    (path / "manifest.json").unlink()
    with pytest.raises(PretrainError, match="is not a complete checkpoint"):
        Trainer(tiny_config(train__max_steps=4, checkpoint__resume_from=str(path)))
