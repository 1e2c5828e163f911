"""The data pipeline: sources -> lanes or indexed windows -> one global stream -> each rank's micro-batches."""

from pretrain.data.heldout import IGNORE_INDEX, validation_batches, validation_sets
from pretrain.data.loader import TrainData, open_sources
from pretrain.data.tokenizer_setup import load_or_train_tokenizer

__all__ = ["IGNORE_INDEX", "TrainData", "load_or_train_tokenizer", "open_sources", "validation_batches",
           "validation_sets"]
