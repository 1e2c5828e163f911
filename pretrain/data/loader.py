"""From sources to micro-batches: weighted document mixing, tokenization on the fly, packing,
and each rank's share of the packed stream."""

from __future__ import annotations

import logging
from typing import Iterable, Iterator, TypeVar

import numpy as np
import torch

from pretrain.config import Config, SourceConfig
from pretrain.data.packing import pack_sequences
from pretrain.data.sources import is_validation, iter_documents
from pretrain.errors import ConfigError, PretrainError
from tokenizer import Tokenizer, train_tokenizer

log = logging.getLogger(__name__)

T = TypeVar("T")

IGNORE_INDEX = -100  # labels with this value add nothing to the loss (F.cross_entropy default)


def split_documents(source: SourceConfig, val_fraction: float, split: str) -> Iterator[str]:
    """The documents of one source that fall in `split` ("train" or "val")."""
    want_val = split == "val"
    for text in iter_documents(source):
        if is_validation(text, val_fraction) == want_val:
            yield text


def shuffled(items: Iterable[T], buffer_size: int, rng: np.random.Generator) -> Iterator[T]:
    """Items in a locally random order: each output is drawn uniformly from a buffer of the next
    `buffer_size` items (0 or 1 = unchanged order). Deterministic for the generator's seed."""
    if buffer_size <= 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = int(rng.integers(buffer_size))
        yield buffer[i]
        buffer[i] = item
    order = rng.permutation(len(buffer))
    yield from (buffer[i] for i in order)


def mixed_documents(
    sources: list[SourceConfig], val_fraction: float, seed: int, cycle: bool, shuffle_docs: int = 0
) -> Iterator[str]:
    """Training documents drawn from the sources at random in proportion to their weights,
    deterministic for `seed`. With `cycle`, a source that runs out starts its next epoch;
    without, it leaves the mixture and the stream ends when all have run out."""
    rng = np.random.default_rng(seed)

    def epoch_stream(i: int, epoch: int) -> Iterator[str]:
        order_rng = np.random.default_rng([seed, i, epoch])
        return shuffled(split_documents(sources[i], val_fraction, "train"), shuffle_docs, order_rng)

    streams = {i: epoch_stream(i, 1) for i in range(len(sources))}
    epochs = {i: 1 for i in streams}
    yielded = {i: False for i in streams}
    while streams:
        ids = list(streams)
        weights = np.array([sources[i].weight for i in ids])
        choice = ids[rng.choice(len(ids), p=weights / weights.sum())]
        try:
            text = next(streams[choice])
            yielded[choice] = True
            yield text
        except StopIteration:
            name = sources[choice].name
            if not yielded[choice]:
                raise PretrainError(f"data source {name!r} has no training documents "
                                    f"(path {sources[choice].path!r}, val_fraction {val_fraction})") from None
            if not cycle:
                del streams[choice]
                continue
            epochs[choice] += 1
            log.warning("data source %r is exhausted; starting epoch %d", name, epochs[choice])
            streams[choice] = epoch_stream(choice, epochs[choice])


def tokenize_documents(documents: Iterable[str], tokenizer: Tokenizer, batch_docs: int) -> Iterator[list[int]]:
    """Token ids of each document, encoding `batch_docs` documents at a time in parallel."""
    batch: list[str] = []
    for text in documents:
        batch.append(text)
        if len(batch) == batch_docs:
            yield from tokenizer.encode_batch(batch)
            batch = []
    if batch:
        yield from tokenizer.encode_batch(batch)


def to_batch(sequences: list[np.ndarray], pad_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack windows of seq_len + 1 tokens into (inputs, labels), labels shifted by one."""
    tokens = torch.from_numpy(np.stack(sequences))
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].clone()
    if pad_id is not None:
        labels[labels == pad_id] = IGNORE_INDEX
    return inputs, labels


class TrainBatches:
    """Endless (inputs, labels) micro-batches for one rank.

    Packed sequence i of the global stream goes to rank i % world_size, so every optimizer step
    consumes the same global batch whatever the world size. The state is the number of packed
    sequences consumed by all ranks; restoring it fast-forwards a fresh stream to that point."""

    def __init__(self, cfg: Config, tokenizer: Tokenizer, rank: int = 0, world_size: int = 1):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.rank, self.world_size = rank, world_size
        self.micro_batch_size = cfg.train.micro_batch_size
        self.sequences_consumed = 0
        self._stream = self._global_sequences()

    def _global_sequences(self) -> Iterator[np.ndarray]:
        data = self.cfg.data
        seed = self.cfg.train.seed
        documents = mixed_documents(data.sources, data.val_fraction, seed, cycle=True, shuffle_docs=data.shuffle_docs)
        tokens = tokenize_documents(documents, self.tokenizer, data.encode_batch_docs)
        sequences = pack_sequences(tokens, data.seq_len, self.tokenizer.eos_id)
        return shuffled(sequences, data.shuffle_sequences, np.random.default_rng([seed, 1 << 20]))

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        mine = []
        for _ in range(self.micro_batch_size * self.world_size):
            sequence = next(self._stream)
            if self.sequences_consumed % self.world_size == self.rank:
                mine.append(sequence)
            self.sequences_consumed += 1
        return to_batch(mine)

    def state_dict(self) -> dict:
        return {"sequences_consumed": self.sequences_consumed}

    def load_state_dict(self, state: dict) -> None:
        self._stream = self._global_sequences()
        for _ in range(state["sequences_consumed"]):
            next(self._stream)
        self.sequences_consumed = state["sequences_consumed"]


def validation_batches(
    cfg: Config, tokenizer: Tokenizer, max_batches: int, rank: int = 0, world_size: int = 1
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the first `max_batches` micro-batches of the held-out split, built
    once (all sources in order, the last window padded; padding is ignored by the loss)."""
    data, batch_size = cfg.data, cfg.train.micro_batch_size
    documents = (text for source in data.sources for text in split_documents(source, data.val_fraction, "val"))
    tokens = tokenize_documents(documents, tokenizer, data.encode_batch_docs)
    sequences = pack_sequences(tokens, data.seq_len, tokenizer.eos_id, pad_id=tokenizer.pad_id)
    mine = [seq for i, seq in zip(range(max_batches * batch_size * world_size), sequences) if i % world_size == rank]
    batches = [to_batch(mine[i : i + batch_size], tokenizer.pad_id) for i in range(0, len(mine), batch_size)]
    if not batches:
        raise PretrainError(f"the validation split is empty: no document fell in data.val_fraction="
                            f"{data.val_fraction}; raise it or set eval.every=0")
    return batches


def load_or_train_tokenizer(cfg: Config) -> Tokenizer:
    """The tokenizer at cfg.tokenizer_path, trained on the training mixture first if missing."""
    path = cfg.tokenizer_path
    try:
        tokenizer = Tokenizer.load(path)
        log.info("reusing tokenizer %s (%d pieces)", path, tokenizer.vocab_size)
    except FileNotFoundError:
        data = cfg.data
        documents = mixed_documents(data.sources, data.val_fraction, cfg.train.seed, cycle=False,
                                    shuffle_docs=data.shuffle_docs)
        tokenizer = train_tokenizer(documents, cfg.tokenizer.vocab_size, path, max_chars=cfg.tokenizer.train_chars)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError([f"tokenizer {path} has {tokenizer.vocab_size} pieces but model.vocab_size="
                           f"{cfg.model.vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}"])
    return tokenizer
