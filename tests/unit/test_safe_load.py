"""Loading a checkpoint never runs code from it: DCP metadata and DeepSpeed files that would
call a function while unpickling are refused."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from pretrain.errors import CorruptCheckpoint
from pretrain.safe_load import SafeFileSystemReader, weights_only_loads


class RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_dcp_metadata_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / ".metadata").write_bytes(pickle.dumps(RunsCode(str(marker))))
    with pytest.raises(CorruptCheckpoint, match="posix.system is not allowed|os.system is not allowed"):
        SafeFileSystemReader(str(tmp_path)).read_metadata()
    assert not marker.exists()


def test_torch_files_are_loaded_weights_only_even_when_the_caller_asks_otherwise(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"state": RunsCode(str(marker))}, tmp_path / "states.pt")
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "states.pt", weights_only=False)  # what DeepSpeed's loaders pass
    assert not marker.exists()
    torch.save({"weight": torch.ones(2)}, tmp_path / "plain.pt")
    with weights_only_loads():
        assert torch.equal(torch.load(tmp_path / "plain.pt", weights_only=False)["weight"], torch.ones(2))
