"""A thin wrapper around a sentencepiece model: batch encode/decode and the special token ids."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import sentencepiece as spm

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

# sentencepiece splits text into words before BPE: a word starts at a run of spaces (with
# allow_whitespace_only_pieces the run stays one word) and no merge crosses a word boundary, so a
# text's ids are the concatenation of its words' ids. Caching frequent words skips most BPE work.
# A literal U+2581 is the symbol spaces become, so it splits words too.
_WORD = re.compile("[ \u2581]*[^ \u2581]+|[ \u2581]+")
_CACHE_MAX_WORDS = 1 << 20
_CACHE_MAX_WORD_CHARS = 64


class Tokenizer:
    """Encode text to token ids and back. Load with `Tokenizer.load(path)`."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: str | None = None):
        self._sp = processor
        self.path = path
        self.sha256 = hashlib.sha256(processor.serialized_model_proto()).hexdigest()
        self._word_ids: dict[str, bytes] = {}

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
        stream's format). Exactly `encode` of each text, but words already seen are not encoded
        again (the cache of frequent words is what makes this several times faster)."""
        words: list[str] = []
        for text in texts:
            words += _WORD.findall(text)
            words.append("")  # the regex never yields "": it stands for the EOS after each text
        cache = self._word_ids  # word -> its ids as int32 bytes, so a text is one bytes join
        if len(cache) > _CACHE_MAX_WORDS:  # bounded memory; refilled from the next texts
            cache.clear()
        cache[""] = np.array([self.eos_id], dtype=np.int32).tobytes()
        missing = list(set(words).difference(cache))
        if missing:
            encoded = self._sp.encode(missing, num_threads=num_threads)
            cache.update((w, np.array(ids, dtype=np.int32).tobytes()) for w, ids in zip(missing, encoded))
        ids = np.frombuffer(b"".join(map(cache.__getitem__, words)), dtype=np.int32).copy()
        for word in missing:  # long words (URLs, hashes, base64) rarely come back: do not keep them
            if len(word) > _CACHE_MAX_WORD_CHARS:
                del cache[word]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def decode_batch(self, batch: Sequence[Sequence[int]], num_threads: int = -1) -> list[str]:
        return self._sp.decode([list(ids) for ids in batch], num_threads=num_threads)

    def token_byte_lengths(self) -> np.ndarray:
        """UTF-8 bytes of text that each id stands for: a piece's characters with its word-start
        symbol as one space, one byte for a <0xNN> byte-fallback piece, none for control and
        unknown pieces. Summed over a text's ids this is (up to a leading space) its length in
        bytes: the denominator of bits per byte."""
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if self._sp.is_control(i) or self._sp.is_unknown(i):
                continue
            lengths[i] = 1 if self._sp.is_byte(i) else len(self._sp.id_to_piece(i).replace("\u2581", " ").encode())
        return lengths

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(token_id)
