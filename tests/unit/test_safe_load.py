"""Loading a checkpoint never runs code from it: DCP metadata, DCP's non-tensor values and
DeepSpeed files that would call a function while unpickling are refused, on every path that
reads a checkpoint (resume, `pretrain export`, `pretrain eval`)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import format_utils

from pretrain.checkpoint.layout import MANIFEST
from pretrain.checkpoint.safe_load import SafeFileSystemReader, read_dcp_metadata, weights_only_loads
from pretrain.cli import main
from pretrain.config import load_config
from pretrain.errors import CorruptCheckpoint, PretrainError
from pretrain.trainer import Trainer
from tests.conftest import tiny_overrides

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_v1"


class RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class CallsTorchLoad:
    """Unpickles into a call of a torch.distributed.checkpoint function that itself runs
    torch.load(weights_only=False) on a file shipped inside the checkpoint."""

    def __init__(self, payload: Path, scratch: Path):
        self.payload, self.scratch = payload, scratch

    def __reduce__(self):
        return format_utils.torch_save_to_dcp, (str(self.payload), str(self.scratch))


def test_dcp_metadata_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(RunsCode(str(marker))))
    with pytest.raises(CorruptCheckpoint, match="posix.system is not allowed|os.system is not allowed"):
        SafeFileSystemReader(str(tmp_path)).read_metadata()
    assert not marker.exists()


def test_a_dcp_function_in_metadata_is_refused_by_name(tmp_path):
    """DCP's own module holds functions that unpickle freely: admitting the module admitted them."""
    marker = tmp_path / "pwned"
    torch.save(RunsCode(str(marker)), tmp_path / "payload.pt")
    (tmp_path / ".metadata").write_bytes(pickle.dumps(CallsTorchLoad(tmp_path / "payload.pt", tmp_path / "x")))
    with pytest.raises(CorruptCheckpoint, match="torch.distributed.checkpoint.format_utils.torch_save_to_dcp is "
                                                "not allowed"):
        read_dcp_metadata(tmp_path)
    assert not marker.exists()


def test_the_metadata_our_checkpoints_hold_is_admitted():
    metadata = read_dcp_metadata(GOLDEN)
    assert "model.tok_embeddings.weight" in metadata.state_dict_metadata


def test_metadata_pointing_outside_the_checkpoint_is_refused(tmp_path):
    shutil.copytree(GOLDEN, tmp_path / "ckpt")
    metadata = read_dcp_metadata(tmp_path / "ckpt")
    info = next(iter(metadata.storage_data.values()))
    info.relative_path = "../../elsewhere/__0_0.distcp"
    (tmp_path / "ckpt" / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CorruptCheckpoint, match="outside the checkpoint directory"):
        read_dcp_metadata(tmp_path / "ckpt")


def test_torch_files_are_loaded_weights_only_even_when_the_caller_asks_otherwise(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state": RunsCode(str(marker))}, tmp_path / "states.pt")
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "states.pt", weights_only=False)  # what DeepSpeed's loaders pass
    assert not marker.exists()
    torch.save({"weight": torch.ones(2)}, tmp_path / "plain.pt")
    with weights_only_loads():
        assert torch.equal(torch.load(tmp_path / "plain.pt", weights_only=False)["weight"], torch.ones(2))


# -- every path that reads a checkpoint, on a real one that was tampered with --------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus_file, tokenizer_file) -> Path:
    """A 2-step run with its checkpoint (run/checkpoints/step_00000002) and a saved trainer."""
    run = tmp_path_factory.mktemp("clean") / "run"
    cfg = load_config(None, tiny_overrides(run, corpus_file, tokenizer_file, train__max_steps=2, checkpoint__every=2),
                      world_size=1)
    Trainer(cfg).train()
    return run


def run_config(run: Path, *overrides: str):
    """The config a copied run was trained with, writing into the copy."""
    return load_config(str(run / "config.yaml"), [f"--out_dir={run}", *overrides], world_size=1)


def tampered_copy(trained_run: Path, tmp_path: Path, how: str) -> tuple[Path, Path]:
    """(a copy of the run whose checkpoint would run code if unpickled freely, the file that code
    creates). The manifest is rewritten to match, as an attacker would."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    checkpoint = run / "checkpoints" / "step_00000002"
    marker = tmp_path / "pwned"
    if how == "metadata":
        torch.save(RunsCode(str(marker)), checkpoint / "payload.pt")
        exploit = CallsTorchLoad(checkpoint / "payload.pt", tmp_path / "scratch")
        (checkpoint / ".metadata").write_bytes(pickle.dumps([exploit, read_dcp_metadata(checkpoint)]))
    else:  # an optimizer hyperparameter, which DCP stores as a pickled value, not a tensor
        trainer = Trainer(run_config(run))  # resumes the clean checkpoint
        state = trainer.engine._state()
        state["optimizer"]["param_groups"][0]["lr"] = RunsCode(str(marker))
        for stale in checkpoint.glob("*.distcp"):
            stale.unlink()
        dcp.save(state, checkpoint_id=str(checkpoint))
        trainer.close()
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"] = {str(p.relative_to(checkpoint)): p.stat().st_size for p in sorted(checkpoint.rglob("*"))
                         if p.is_file() and p.name != MANIFEST}
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))
    assert not marker.exists()
    return run, marker


REFUSED = {"metadata": "torch.distributed.checkpoint.format_utils.torch_save_to_dcp is not allowed",
           "value": "optimizer.param_groups.0.lr' is not plain data"}


@pytest.mark.parametrize("how", list(REFUSED))
def test_resume_runs_no_code_from_a_checkpoint(trained_run, tmp_path, how):
    run, marker = tampered_copy(trained_run, tmp_path, how)
    with pytest.raises(PretrainError, match="no checkpoint in .* could be loaded") as raised:
        Trainer(run_config(run, "--train.max_steps=3"))
    assert REFUSED[how] in str(raised.value)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["export", "eval"])
def test_export_and_eval_run_no_code_from_a_checkpoint(trained_run, tmp_path, capsys, command):
    run, marker = tampered_copy(trained_run, tmp_path, "metadata")
    checkpoint = str(run / "checkpoints" / "step_00000002")
    argv = ["export", checkpoint, "--format", "torch", "--out", str(tmp_path / "out")] if command == "export" \
        else ["eval", checkpoint]
    assert main(argv) == 1
    assert REFUSED["metadata"] in capsys.readouterr().err
    assert not marker.exists()
