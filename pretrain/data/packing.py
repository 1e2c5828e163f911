"""Cutting a stream of tokens (documents joined by EOS) into fixed-length training windows."""

from __future__ import annotations

import numpy as np


def cut_windows(tokens: np.ndarray, seq_len: int, pad_id: int) -> np.ndarray:
    """Windows of `seq_len + 1` tokens, shape (n, seq_len + 1), that overlap by one token: the
    last token of a window (its final label) is the first input of the next, so every token is
    an input once and a label once. The last window is padded with `pad_id`."""
    window = seq_len + 1
    count = max(1, -(-(len(tokens) - 1) // seq_len))
    padded = np.full(count * seq_len + 1, pad_id, dtype=np.int64)
    padded[: len(tokens)] = tokens
    return np.lib.stride_tricks.sliding_window_view(padded, window)[::seq_len].copy()


def document_ids(inputs: np.ndarray, eos_id: int) -> np.ndarray:
    """For each input position, the index of its document within the row: the number of EOS
    tokens before it (an EOS belongs to the document it ends)."""
    is_eos = inputs == eos_id
    return (np.cumsum(is_eos, axis=-1) - is_eos).astype(np.int32)
