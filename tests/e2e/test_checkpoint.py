"""Checkpoints: layout, atomicity, and bit-exact resume (N steps == N/2 + resume + N/2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint.manager import FORMAT_VERSION, complete_checkpoints
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


def steps_on_disk(root: Path) -> list[int]:
    return [int(p.name.removeprefix("step_")) for p in complete_checkpoints(root)]


def test_keep_last_and_keep_every_prune_but_never_the_newest(tiny_config):
    cfg = tiny_config(train__max_steps=7, checkpoint__every=1, checkpoint__keep_last=2, checkpoint__keep_every=3)
    train(cfg)
    root = Path(cfg.out_dir) / "checkpoints"
    assert steps_on_disk(root) == [3, 6, 7]
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000006", "step_00000007"]
    train(tiny_config(train__max_steps=8, checkpoint__every=1, checkpoint__keep_last=1))
    assert steps_on_disk(root) == [8]


def test_damaged_newest_checkpoint_is_skipped_for_the_previous(tiny_config, caplog):
    cfg = tiny_config(train__max_steps=6, checkpoint__every=2)
    train(cfg)
    root = Path(cfg.out_dir) / "checkpoints"
    shard = next((root / "step_00000006").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated: its size no longer matches the manifest
    metadata = root / "step_00000004" / ".metadata"
    metadata.write_bytes(bytes(len(metadata.read_bytes())))  # same size, unreadable content
    with caplog.at_level("WARNING"):
        resumed = Trainer(tiny_config(train__max_steps=8, checkpoint__every=2))
    assert resumed.step == 2
    assert "step_00000006 is not a complete checkpoint" in caplog.text and "truncated" in caplog.text
    assert "step_00000004/.metadata: unreadable or unsafe checkpoint metadata" in caplog.text
    resumed.close()


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(tiny_config):
    cfg = tiny_config(train__max_steps=2, checkpoint__every=2)
    train(cfg)
    (Path(cfg.out_dir) / "checkpoints" / "step_00000002" / "trainer_state.pt").write_bytes(b"x" * 10)
    with pytest.raises(PretrainError, match="(?s)no checkpoint in .* could be loaded.*trainer_state.pt has 10 bytes"):
        Trainer(tiny_config(train__max_steps=4))


def test_checkpoint_for_another_shape_names_the_key_and_the_parameter(tiny_config):
    cfg = tiny_config(train__max_steps=2, checkpoint__every=2)
    train(cfg)
    with pytest.raises(PretrainError, match="model.ffn_hidden: 128 in the checkpoint, 96 now"):
        Trainer(tiny_config(train__max_steps=4, model__ffn_hidden=96))
    # a deliberate change still cannot load tensors of another shape: the parameter is named
    with pytest.raises(PretrainError, match=r"parameter layers.0.feed_forward.w1.weight has shape \(128, 64\) in the "
                                            r"checkpoint but \(96, 64\) in this model.s config"):
        Trainer(tiny_config(train__max_steps=4, model__ffn_hidden=96, checkpoint__allow_model_change=True))


def test_async_save_resumes_bit_exact_and_logs_the_blocked_time(tiny_config, tmp_path):
    straight = train(tiny_config(train__max_steps=8, out_dir=str(tmp_path / "straight")))
    run = str(tmp_path / "async")
    train(tiny_config(train__max_steps=8, train__stop_at=4, checkpoint__every=2, checkpoint__async=True, out_dir=run))
    assert steps_on_disk(Path(run) / "checkpoints") == [2, 4]
    resumed = train(tiny_config(train__max_steps=8, checkpoint__every=2, checkpoint__async=True, out_dir=run))
    assert losses(run) == losses(str(tmp_path / "straight"))
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    blocked = [r for r in read_metrics(run) if "checkpoint_blocked_s" in r]
    assert [r["step"] for r in blocked] == [2, 4, 6, 8] and all(r["checkpoint_async"] for r in blocked)


def test_random_state_is_saved_per_rank_and_restored(tiny_config):
    cfg = tiny_config(train__max_steps=2, checkpoint__every=2)
    trainer = train(cfg)
    saved = torch.load(Path(cfg.out_dir) / "checkpoints" / "step_00000002" / "rng" / "rank_00000.pt")
    torch.manual_seed(1234)
    Trainer(tiny_config(train__max_steps=4)).close()
    assert torch.equal(torch.get_rng_state(), saved["torch"])
    assert trainer.step == 2


def test_a_checkpoint_moved_aside_by_an_interrupted_replace_is_put_back(tiny_config):
    cfg = tiny_config(train__max_steps=2, checkpoint__every=2)
    train(cfg)
    root = Path(cfg.out_dir) / "checkpoints"
    (root / "step_00000002").rename(root / ".old_step_00000002")  # crash between the two renames
    shutil.copytree(root / ".old_step_00000002", root / ".tmp_step_00000004")
    assert Trainer(tiny_config(train__max_steps=4)).step == 2
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]


def test_init_from_starts_a_new_run_from_a_checkpoints_weights(tiny_config, tmp_path):
    source = train(tiny_config(train__max_steps=3, checkpoint__every=3, out_dir=str(tmp_path / "a")))
    path = tmp_path / "a" / "checkpoints" / "step_00000003"
    fresh = Trainer(tiny_config(train__max_steps=3, checkpoint__init_from=str(path), out_dir=str(tmp_path / "b")))
    assert fresh.step == 0 and not fresh.optimizer.state  # a new run: schedule and optimizer start over
    for (name, a), b in zip(source.model.state_dict().items(), fresh.model.state_dict().values()):
        assert torch.equal(a, b), name
    fresh.close()
    with pytest.raises(PretrainError, match="parameter tok_embeddings.weight has shape"):
        Trainer(tiny_config(checkpoint__init_from=str(path), model__d_model=32, out_dir=str(tmp_path / "c")))


def test_resuming_into_a_changed_model_is_refused_with_the_differences(tiny_config):
    """n_heads 4 -> 2 with n_kv_heads 2 -> 1 keeps every tensor's shape: only the saved config
    shows that the model would change. A refused attempt leaves out_dir/config.yaml as it was."""
    cfg = tiny_config(train__max_steps=2, checkpoint__every=2)
    train(cfg)
    saved_config = (Path(cfg.out_dir) / "config.yaml").read_bytes()
    with pytest.raises(PretrainError) as refused:
        Trainer(tiny_config(train__max_steps=4, model__n_heads=2, model__n_kv_heads=1))
    assert "model.n_heads: 4 in the checkpoint, 2 now" in str(refused.value)
    assert "model.n_kv_heads: 2 in the checkpoint, 1 now" in str(refused.value)
    assert "--checkpoint.allow_model_change=true" in str(refused.value)
    with pytest.raises(PretrainError, match="model.tie_embeddings: False in the checkpoint, True now") as refused:
        Trainer(tiny_config(train__max_steps=4, model__tie_embeddings=True))
    assert "could not be loaded" not in str(refused.value)  # not blamed on the checkpoints
    assert (Path(cfg.out_dir) / "config.yaml").read_bytes() == saved_config
    # a longer context (max_seq_len) is no change to the model's definition
    Trainer(tiny_config(train__max_steps=4, model__max_seq_len=64)).close()
    # the explicit escape resumes
    deliberate = Trainer(tiny_config(train__max_steps=4, model__n_heads=2, model__n_kv_heads=1,
                                     checkpoint__allow_model_change=True))
    assert deliberate.step == 2
    deliberate.close()
    assert "n_heads: 2" in (Path(cfg.out_dir) / "config.yaml").read_text()
