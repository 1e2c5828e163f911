"""The global stream of packed training sequences, defined by (sources, weights, seed, global batch)
alone.

Which source fills position p of the stream (global batch p // B, B sequences per global batch)
is a pure function of p (a low-discrepancy sequence over the weights), so every global batch
holds each source's share to within a sequence. A source gives its sequences in one of two ways:

- IndexedSource (prepared shards, small sources tokenized in memory): the source's q-th window
  is found by arithmetic, in a seeded order per epoch across the whole source.
- LaneSource (large sources read chunk by chunk): position p belongs to lane p % K, where K, the
  number of lanes, is a multiple of B. A lane walks its own share of the source's chunks (items
  lane, lane + K, lane + 2K, ... of the source's chunk order, a seeded permutation per epoch),
  tokenizes them, joins the documents with EOS and cuts windows of seq_len + 1 tokens.

A rank takes the positions of the lanes it owns, so it reads only its own chunks; worker
processes split a rank's lanes further. Neither the number of ranks nor of workers changes what
the stream holds, and a lane's whole state is one (item, token offset) cursor per source."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from pretrain.data.sources import RecordErrors, TextSource
from pretrain.errors import PretrainError
from tokenizer import Tokenizer

GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # 2**64 / golden ratio: the Weyl step with the lowest discrepancy
MASK64 = (1 << 64) - 1


def stable_hash(*parts: object) -> int:
    """A 64-bit hash that is the same in every process and Python version (unlike hash())."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def used_up(name: str, epoch: int, max_epochs: int) -> PretrainError:
    return PretrainError(f"data source {name!r} is used up: the mixture needs epoch {epoch + 1} of it but its "
                         f"max_epochs={max_epochs}; raise max_epochs in its data.sources entry, lower its weight, "
                         "or add data (then resume from the last checkpoint)")


class Mixture:
    """Which source fills each position of the global stream.

    Position p gets the source whose share of [0, 1) contains frac(offset + p / golden ratio):
    a Weyl sequence, so over any n consecutive positions each source's count is within
    O(log n) of weight * n. Deterministic for the seed, and needs no state."""

    def __init__(self, weights: list[float], seed: int):
        cumulative = np.cumsum(np.asarray(weights, dtype=np.float64))
        cumulative /= cumulative[-1]
        self.thresholds = np.array([min(int(c * 2**64), MASK64) for c in cumulative[:-1]], dtype=np.uint64)
        self.offset = np.uint64(stable_hash("mixture", seed))

    def sources_of(self, positions: np.ndarray) -> np.ndarray:
        u = positions.astype(np.uint64) * np.uint64(GOLDEN_GAMMA) + self.offset  # wraps mod 2**64
        return np.searchsorted(self.thresholds, u, side="right")


class Permutation:
    """A seeded bijection of [0, n) evaluated one index at a time (a Feistel network with cycle
    walking), so an epoch of 10**9 windows is shuffled without an array of 10**9 entries."""

    def __init__(self, n: int, *seed: object):
        self.n = n
        bits = max(2, (max(n - 1, 1)).bit_length() + 1) // 2 * 2  # even, so both halves are equal
        self.half, self.mask = bits // 2, (1 << (bits // 2)) - 1
        self.keys = [stable_hash("perm", *seed, r) for r in range(4)]

    def __getitem__(self, i: int) -> int:
        while True:  # a bijection on [0, 2**bits); walk until the result lands in [0, n)
            left, right = i >> self.half, i & self.mask
            for key in self.keys:
                left, right = right, left ^ (stable_hash(key, right) & self.mask)
            i = (left << self.half) | right
            if i < self.n:
                return i


class IndexedSource:
    """A source whose whole token stream is known (prepared shards, or a small source tokenized in
    memory): window q of its stream is found by arithmetic, so it is read at random, shuffled
    across the whole source.

    The source's token stream repeated epoch after epoch is cut into windows of seq_len + 1
    tokens overlapping by one; epoch e holds the windows that start in its copy, in a seeded
    order. Every token is an input once per epoch: none dropped, none repeated."""

    def __init__(self, name: str, tokens: np.ndarray, seq_len: int, seed: int, max_epochs: int | None):
        if len(tokens) < 2:
            raise PretrainError(f"data source {name!r} has no training documents: check its files and "
                                "data.val_fraction")
        self.name, self.tokens, self.seq_len, self.seed, self.max_epochs = name, tokens, seq_len, seed, max_epochs
        self._order: tuple[int, Permutation] | None = None  # the current epoch's window order

    def epoch_start(self, epoch: int) -> int:
        """Index of the first window of `epoch`: windows start every seq_len tokens of the repeated stream."""
        return -(-epoch * len(self.tokens) // self.seq_len)

    def epoch_of(self, q: int) -> int:
        return q * self.seq_len // len(self.tokens)

    def window(self, q: int) -> np.ndarray:
        """Window q of the source's shuffled stream."""
        epoch = self.epoch_of(q)
        if self.max_epochs is not None and epoch >= self.max_epochs:
            raise used_up(self.name, epoch, self.max_epochs)
        first, n = self.epoch_start(epoch), self.epoch_start(epoch + 1) - self.epoch_start(epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = epoch, Permutation(n, self.seed, self.name, epoch)
        start = (first + self._order[1][q - first]) * self.seq_len % len(self.tokens)
        end = start + self.seq_len + 1
        if end <= len(self.tokens):
            return np.asarray(self.tokens[start:end], dtype=np.int32)
        return np.asarray(self.tokens[np.arange(start, end) % len(self.tokens)], dtype=np.int32)


class ChunkOrder:
    """Item i of a source's chunk stream: epoch i // items_per_epoch, in a seeded permutation per
    epoch. A source with fewer chunks than lanes has each chunk dealt out in `parts` strided parts
    (documents part, part + parts, ...), so that every lane reads different documents."""

    def __init__(self, n_chunks: int, n_lanes: int, seed: int, source_name: str):
        self.n_chunks = n_chunks
        self.parts = -(-n_lanes // n_chunks)
        self.items_per_epoch = n_chunks * self.parts
        self.key = stable_hash("chunks", seed, source_name)
        self._cache: dict[int, np.ndarray] = {}

    def __call__(self, item: int) -> tuple[int, int, int]:
        """(epoch, chunk, part) of item `item`."""
        epoch, index = divmod(item, self.items_per_epoch)
        if epoch not in self._cache:
            if len(self._cache) >= 4:  # lanes move through epochs together; keep the latest few
                del self._cache[min(self._cache)]
            self._cache[epoch] = np.random.default_rng([self.key, epoch]).permutation(self.items_per_epoch)
        chunk, part = divmod(int(self._cache[epoch][index]), self.parts)
        return epoch, chunk, part


@dataclasses.dataclass(frozen=True)
class StreamPlan:
    """The shape of the global stream: K lanes, a multiple of the global batch B, so global batch
    k is filled by the block of lanes (k * B) % K ... + B - 1, and a lane serves every (K / B)-th
    batch: consecutive windows of a document land K / B steps apart."""

    n_lanes: int
    global_batch: int
    seq_len: int
    seed: int

    def first_lane(self, step: int) -> int:
        return step * self.global_batch % self.n_lanes

    def active(self, lanes: np.ndarray, step: int) -> np.ndarray:
        """Which of `lanes` fill a position of global batch `step` (position = lane - first_lane)."""
        first = self.first_lane(step)
        return (lanes >= first) & (lanes < first + self.global_batch)


def default_lanes(global_batch: int, at_least: int = 256) -> int:
    """The smallest multiple of the global batch that is at least `at_least`."""
    return global_batch * -(-at_least // global_batch)


class LaneSource:
    """One source's token stream as one lane reads it, cut into windows of seq_len + 1 tokens
    that overlap by one token (the last label of a window is the first input of the next), so
    every token is an input once and a label once: none dropped, none repeated."""

    def __init__(self, source: TextSource, order: ChunkOrder, lane: int, n_lanes: int, seq_len: int,
                 tokenizer: Tokenizer, errors: RecordErrors, max_epochs: int | None,
                 cursor: tuple[int, int] = (0, 0), num_threads: int = -1):
        self.source, self.order, self.lane, self.n_lanes = source, order, lane, n_lanes
        self.seq_len, self.tokenizer, self.errors = seq_len, tokenizer, errors
        self.max_epochs, self.num_threads = max_epochs, num_threads
        self.next_item, self.head = cursor  # the item at the buffer's head, and the offset into it
        self.segments: list[tuple[int, np.ndarray]] = []  # (item, tokens) loaded and not consumed
        self.epoch = 0  # of the latest item loaded

    @property
    def cursor(self) -> tuple[int, int]:
        item = self.segments[0][0] if self.segments else self.next_item
        return item, self.head

    def window(self) -> np.ndarray:
        need = self.seq_len + 1
        while sum(len(t) for _, t in self.segments) - self.head < need:
            self._load_next()
        pieces, start, missing = [], self.head, need  # copy only the tokens of this window
        for _, tokens in self.segments:
            pieces.append(tokens[start : start + missing])
            missing -= len(pieces[-1])
            start = 0
            if not missing:
                break
        window = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
        self.head += self.seq_len
        while self.segments and self.head >= len(self.segments[0][1]):
            self.head -= len(self.segments[0][1])
            self.segments.pop(0)
        return window

    def _load_next(self) -> None:
        empty = 0
        while True:
            item = self.next_item
            epoch, chunk, part = self.order(self.lane + item * self.n_lanes)
            if self.max_epochs is not None and epoch >= self.max_epochs:
                raise used_up(self.source.name, epoch, self.max_epochs)
            self.epoch = max(self.epoch, epoch)
            tokens = self.source.train_tokens(chunk, self.tokenizer, self.errors, self.num_threads,
                                              part, self.order.parts)
            self.next_item += 1
            if len(tokens):
                self.segments.append((item, tokens))
                return
            empty += 1
            if empty > 2 * self.order.items_per_epoch:
                raise PretrainError(f"data source {self.source.name!r} has no training documents in "
                                    f"{empty} chunks in a row: check its files and data.val_fraction")
