"""The data pipeline: sources -> mixture -> tokenization -> packing -> per-rank micro-batches."""

from pretrain.data.loader import IGNORE_INDEX, TrainBatches, load_or_train_tokenizer, validation_batches

__all__ = ["IGNORE_INDEX", "TrainBatches", "load_or_train_tokenizer", "validation_batches"]
