"""Packing tokenized documents into fixed-length training sequences."""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np


def pack_sequences(
    documents: Iterable[Sequence[int]], seq_len: int, eos_id: int, pad_id: int | None = None
) -> Iterator[np.ndarray]:
    """Join documents with EOS and cut the stream into windows of `seq_len + 1` tokens.

    Consecutive windows share one token: the last token of a window (the final label) is the
    first input of the next, so every token of the stream is an input exactly once and a label
    exactly once, and none is dropped at a window boundary. With `pad_id`, the final partial
    window is padded and yielded; without it the tail waits for more data (and is dropped if
    none comes, as at the end of an infinite stream)."""
    window = seq_len + 1
    pending = np.empty(0, dtype=np.int64)
    for doc in documents:
        pending = np.concatenate([pending, np.asarray(doc, dtype=np.int64), [eos_id]])
        full = (len(pending) - 1) // seq_len
        for i in range(full):
            yield pending[i * seq_len : i * seq_len + window]
        pending = pending[full * seq_len :]
    if pad_id is not None and len(pending) > 1:
        yield np.concatenate([pending, np.full(window - len(pending), pad_id, dtype=np.int64)])
