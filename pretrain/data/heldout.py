"""The held-out batches: the first documents of each source's validation split, packed."""

from __future__ import annotations

import logging

import numpy as np
import torch

from pretrain.config.schema import DataConfig
from pretrain.data.loader import open_sources
from pretrain.data.packing import cut_windows
from pretrain.errors import PretrainError
from pretrain.models.transformer import IGNORE_INDEX
from tokenizer import Tokenizer

log = logging.getLogger("pretrain")


def validation_sets(data: DataConfig, tokenizer: Tokenizer, *, micro_batch_size: int, max_batches: int,
                    dp_rank: int = 0, dp_size: int = 1,
                    sources: list | None = None) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each source's held-out batches apart (validation_batches of that source alone, up to
    `max_batches` each), so that every source gets its own loss: a domain model's finance and
    general perplexity are separate numbers. A source without held-out documents is left out
    with a warning; no held-out data at all is an error."""
    sources = sources if sources is not None else open_sources(data)
    sets, problems = {}, []
    for source in sources:
        try:
            sets[source.name] = validation_batches(data, tokenizer, micro_batch_size=micro_batch_size,
                                                   max_batches=max_batches, dp_rank=dp_rank, dp_size=dp_size,
                                                   sources=[source])
        except PretrainError as exc:
            problems.append(f"source {source.name!r}: {exc}")
    if not sets:
        raise PretrainError("no data source has held-out data:\n  - " + "\n  - ".join(problems))
    for problem in problems:
        log.warning("no validation loss for %s", problem)
    return sets


def validation_batches(data: DataConfig, tokenizer: Tokenizer, *, micro_batch_size: int, max_batches: int,
                       dp_rank: int = 0, dp_size: int = 1,
                       sources: list | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This data-parallel rank's share of the first `max_batches` micro-batches of the held-out
    split, built once (all sources in order, the last window padded; padding is ignored by the loss).

    The sequences are the same at any world size (the dp_size ranks split them), so validation
    losses stay comparable when a run moves to more or fewer processes; every rank gets as many
    batches."""
    sources = sources if sources is not None else open_sources(data)
    wanted = max_batches * micro_batch_size * data.seq_len + 1
    parts, have = [], 0
    for source in sources:
        if have >= wanted:
            break
        parts.append(source.validation_tokens(tokenizer, wanted - have))
        have += len(parts[-1])
    if have < 2:
        raise PretrainError(f"the validation split is empty: no document fell in data.val_fraction="
                            f"{data.val_fraction}; raise it or set eval.every=0")
    tokens = np.concatenate(parts)[:wanted]
    windows = cut_windows(tokens, data.seq_len, tokenizer.pad_id)[: max_batches * micro_batch_size]
    usable = len(windows) // dp_size * dp_size  # equal shares: a sharded forward needs every rank
    if usable == 0:
        raise PretrainError(f"the validation split holds {len(windows)} sequences of data.seq_len={data.seq_len}, "
                            f"fewer than the {dp_size} ranks; raise data.val_fraction or set eval.every=0")
    mine = torch.from_numpy(windows[:usable][dp_rank::dp_size])
    batches = []
    for start in range(0, len(mine), micro_batch_size):
        window = mine[start : start + micro_batch_size]
        labels = window[:, 1:].clone()
        labels[labels == tokenizer.pad_id] = IGNORE_INDEX
        batches.append((window[:, :-1].contiguous(), labels))
    return batches
