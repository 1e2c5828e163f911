"""Checkpoints users already have must keep loading: a tiny checkpoint of each format version,
committed under tests/fixtures/, is restored and must give the model it was saved with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint.layout import damage, read_manifest
from pretrain.checkpoint.manager import CheckpointManager
from pretrain.config import CheckpointConfig
from pretrain.export import load_weights
from pretrain.export.readers import checkpoint_config
from pretrain.models import Transformer
from pretrain.parallel import DistInfo, ParallelDims, build_engine
from tests.fixtures.make_golden_checkpoint import fixed_batch, loss_on

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
GOLDEN = sorted(FIXTURES.glob("checkpoint_v*/"))


class TrainingState:
    """Stands in for the trainer: what a checkpoint's trainer_state.pt restores lands here."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        self.loaded = state


def test_there_is_a_golden_checkpoint_of_the_current_format():
    from pretrain.checkpoint.layout import FORMAT_VERSION

    assert FIXTURES / f"checkpoint_v{FORMAT_VERSION}" in GOLDEN


@pytest.mark.parametrize("golden", GOLDEN, ids=[p.name for p in GOLDEN])
def test_golden_checkpoint_restores_the_model_it_was_saved_with(golden):
    expected = json.loads(golden.with_suffix(".json").read_text())
    assert damage(golden) is None
    manifest = read_manifest(golden)
    cfg = checkpoint_config(golden)
    single = DistInfo(0, 0, 1, torch.device("cpu"))
    with torch.device("meta"):
        model = Transformer(cfg.model)
    engine = build_engine(model, cfg, single, ParallelDims.from_config(cfg.parallel, 1), "fp32")
    manager, training = CheckpointManager(CheckpointConfig(), str(golden.parent / "unused"), single), TrainingState()
    manager.track({"engine": engine, "train": training})
    manager.load(golden)
    state = training.loaded
    assert state["step"] == manifest["step"] == expected["step"]
    assert state["tokens_seen"] == manifest["tokens_seen"]
    assert {"scheduler", "data"} <= state.keys() and state["data"]["step"] == expected["step"]
    assert engine.optimizer.state  # the AdamW moments came back too
    engine.model.eval()
    assert loss_on(engine.model, fixed_batch(cfg.model.vocab_size)) == pytest.approx(expected["loss_on_fixed_batch"],
                                                                                      abs=1e-6)
    weights = load_weights(golden)  # the exporter reads it as well, by the model's own parameter names
    assert weights.keys() == engine.model.state_dict().keys()
    for name, value in engine.model.state_dict().items():
        assert torch.equal(weights[name], value), name
