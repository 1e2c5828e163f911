"""A thin wrapper around a sentencepiece model: batch encode/decode and the special token ids."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import sentencepiece as spm

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3


class Tokenizer:
    """Encode text to token ids and back. Load with `Tokenizer.load(path)`."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: str | None = None):
        self._sp = processor
        self.path = path
        self.sha256 = hashlib.sha256(processor.serialized_model_proto()).hexdigest()

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = str(path)
        if not Path(path).is_file():
            raise FileNotFoundError(f"tokenizer model {path!r} does not exist")
        return cls(spm.SentencePieceProcessor(model_file=path), path)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Encode many texts at once; sentencepiece spreads them over `num_threads` (-1 = all)."""
        return self._sp.encode(list(texts), num_threads=num_threads)

    def encode_documents(self, texts: Sequence[str], num_threads: int = -1) -> np.ndarray:
        """Token ids of all `texts` as one int32 array, each text followed by EOS (the packed
        stream's format)."""
        if not texts:
            return np.empty(0, dtype=np.int32)
        arrays = self._sp.encode(list(texts), add_eos=True, return_type="numpy", num_threads=num_threads)
        return np.concatenate(arrays).astype(np.int32, copy=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def decode_batch(self, batch: Sequence[Sequence[int]], num_threads: int = -1) -> list[str]:
        return self._sp.decode([list(ids) for ids in batch], num_threads=num_threads)

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)
