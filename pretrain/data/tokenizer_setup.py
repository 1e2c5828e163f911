"""The tokenizer the data is encoded with: reused from its path, or trained on a sample of the mixture."""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np

from pretrain.config.schema import Config
from pretrain.data.loader import open_sources
from pretrain.data.sources import RecordErrors, TextSource, is_validation
from pretrain.data.stream import ChunkOrder
from pretrain.errors import ConfigError, PretrainError
from tokenizer import Tokenizer, train_tokenizer

log = logging.getLogger(__name__)


def tokenizer_training_documents(sources: list, weights: list[float], seed: int) -> Iterator[str]:
    """Training documents of all raw sources, interleaved at random by weight, each source's
    chunks in a seeded order: a sample of the mixture to train a tokenizer on."""
    rng = np.random.default_rng(seed)
    streams = {i: _source_documents(s, seed) for i, s in enumerate(sources) if isinstance(s, TextSource)}
    while streams:
        ids = list(streams)
        p = np.array([weights[i] for i in ids])
        choice = ids[rng.choice(len(ids), p=p / p.sum())]
        try:
            yield next(streams[choice])
        except StopIteration:
            del streams[choice]


def _source_documents(source: TextSource, seed: int) -> Iterator[str]:
    order = ChunkOrder(source.n_chunks, 1, seed, source.name)
    errors = RecordErrors(source.name, source.on_bad_record)
    for item in range(source.n_chunks):
        for text in source.documents(order(item)[1], errors):
            if not is_validation(text, source.val_fraction):
                yield text
        errors.log_skipped()


def load_or_train_tokenizer(cfg: Config, sources: list | None = None) -> Tokenizer:
    """The tokenizer at cfg.tokenizer_path, trained on the training mixture first if missing."""
    path = cfg.tokenizer_path
    try:
        tokenizer = Tokenizer.load(path)
        log.info("reusing tokenizer %s (%d pieces)", path, tokenizer.vocab_size)
    except FileNotFoundError:
        if cfg.data.prepared_dir:
            raise PretrainError(f"the tokenizer {path} does not exist, but the prepared shards in data.prepared_dir="
                                f"{cfg.data.prepared_dir} were made with one; set tokenizer.path to it") from None
        sources = sources if sources is not None else open_sources(cfg.data)
        documents = tokenizer_training_documents(sources, [s.weight for s in cfg.data.sources], cfg.train.seed)
        tokenizer = train_tokenizer(documents, cfg.tokenizer.vocab_size, path, max_chars=cfg.tokenizer.train_chars)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError([f"tokenizer {path} has {tokenizer.vocab_size} pieces but model.vocab_size="
                           f"{cfg.model.vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}"])
    return tokenizer
