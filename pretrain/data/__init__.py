"""The data pipeline: sources -> chunks -> lanes (tokenize, pack) -> the global stream -> each rank's micro-batches."""

from pretrain.data.loader import IGNORE_INDEX, TrainData, load_or_train_tokenizer, open_sources, validation_batches

__all__ = ["IGNORE_INDEX", "TrainData", "load_or_train_tokenizer", "open_sources", "validation_batches"]
