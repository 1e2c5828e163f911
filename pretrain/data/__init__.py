"""The data pipeline: sources -> lanes or indexed windows -> one global stream -> each rank's micro-batches.

The names below are imported on first use: the config imports this package's leaf modules
(builtin.py: the built-in corpora, files.py: the readable file kinds), and the pipeline's
modules import the config (a circle if this imported them)."""

from typing import TYPE_CHECKING, Any

__all__ = ["IGNORE_INDEX", "TrainData", "load_or_train_tokenizer", "open_sources", "validation_batches",
           "validation_sets"]

if TYPE_CHECKING:
    from pretrain.data.heldout import IGNORE_INDEX, validation_batches, validation_sets
    from pretrain.data.loader import TrainData, open_sources
    from pretrain.data.tokenizer_setup import load_or_train_tokenizer

_MODULE_OF = {"IGNORE_INDEX": "heldout", "validation_batches": "heldout", "validation_sets": "heldout",
              "TrainData": "loader", "open_sources": "loader", "load_or_train_tokenizer": "tokenizer_setup"}


def __getattr__(name: str) -> Any:
    if name in _MODULE_OF:
        import importlib

        return getattr(importlib.import_module(f"pretrain.data.{_MODULE_OF[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
