"""This rank's training batches, taken from the global stream by background workers; the
held-out batches; and the tokenizer the data is encoded with."""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.config import Config, DataConfig
from pretrain.data.fingerprint import ALLOW_OVERRIDE, lanes_reusable, stream_differences, stream_fingerprint
from pretrain.data.packing import cut_windows, document_ids
from pretrain.data.prepared import PreparedSource, raw_source
from pretrain.data.sources import RecordErrors, Source, TextSource, is_validation
from pretrain.data.stream import ChunkOrder, LaneSource, Mixture, StreamPlan
from pretrain.errors import ConfigError, PretrainError
from tokenizer import Tokenizer, train_tokenizer

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # labels with this value add nothing to the loss (F.cross_entropy default)
STATE_VERSION = 1

MicroBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # inputs, labels, document ids


def open_sources(data: DataConfig) -> list[Source]:
    """Every configured source with its chunk table; fails on a missing or unreadable file
    before any compute is spent."""
    sources: list[Source] = []
    for cfg in data.sources:
        prepared = data.prepared_source_dir(cfg.name)
        if prepared:
            source = PreparedSource(prepared, cfg, data)
            source.check_raw_files(cfg, data)
            sources.append(source)
        else:
            sources.append(raw_source(cfg, data))
    return sources


class LaneGroup:
    """The lanes one worker produces: for every global batch, each lane's windows."""

    def __init__(self, lanes: list[int], plan: StreamPlan, mixture: Mixture, sources: list[Source],
                 data: DataConfig, tokenizer: Tokenizer, cursors: dict[int, list[tuple[int, int]]],
                 num_threads: int):
        self.lanes, self.plan, self.mixture = lanes, plan, mixture
        orders = [ChunkOrder(s.n_chunks, plan.n_lanes, plan.seed, s.name) for s in sources]
        self.errors = [RecordErrors(s.name, data.on_bad_record) for s in sources]
        self.readers = {
            lane: [LaneSource(src, order, lane, plan.n_lanes, plan.seq_len, tokenizer, errors, cfg.max_epochs,
                              tuple(cursors[lane][i]), num_threads)
                   for i, (src, order, errors, cfg) in enumerate(zip(sources, orders, self.errors, data.sources))]
            for lane in lanes
        }

    def produce(self, step: int) -> dict:
        plan = self.plan
        tokens = np.empty((len(self.lanes), plan.per_lane, plan.seq_len + 1), dtype=np.int32)
        for a, lane in enumerate(self.lanes):
            for m, source in enumerate(self.mixture.sources_of(plan.positions(step, lane))):
                tokens[a, m] = self.readers[lane][source].window()
        skipped = [e.skipped for e in self.errors]
        for e in self.errors:
            e.skipped = 0
        return {
            "step": step,
            "tokens": tokens,
            "cursors": {lane: [r.cursor for r in readers] for lane, readers in self.readers.items()},
            "epochs": [max(self.readers[lane][i].epoch for lane in self.lanes) for i in range(len(self.errors))],
            "skipped": skipped,
        }


class _Pieces(IterableDataset):
    """Each DataLoader worker produces its lanes' share of every global batch, from `start_step`
    on. A data error travels as an item, so the trainer reports it without a worker traceback."""

    def __init__(self, worker_lanes: list[list[int]], start_step: int, group_args: tuple):
        self.worker_lanes, self.start_step, self.group_args = worker_lanes, start_step, group_args

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info else 0
        # One tokenizer thread per worker process; the training process may use every core.
        group = LaneGroup(self.worker_lanes[worker], *self.group_args, num_threads=1 if info else -1)
        step = self.start_step
        while True:
            try:
                piece = group.produce(step)
            except PretrainError as exc:
                yield {"error": str(exc)}
                return
            yield piece
            step += 1


def _identity(item):
    return item


class TrainData:
    """This rank's micro-batches of each global batch of the global stream (see stream.py).

    Rank r owns lanes r, r + R, r + 2R, ... (R ranks), so it reads only its own chunks, and
    takes positions p with p % R == r of each global batch. `state_dict()` is the position of
    every lane (a small cursor per source), the stream's fingerprint and counters: the same on
    every rank, and valid for any number of ranks and workers with the same global batch."""

    def __init__(self, cfg: Config, tokenizer: Tokenizer, rank: int = 0, world_size: int = 1,
                 sources: list[Source] | None = None):
        data = cfg.data
        self.cfg, self.data, self.tokenizer = cfg, data, tokenizer
        self.rank, self.world_size = rank, world_size
        self.sources = sources if sources is not None else open_sources(data)
        for source in self.sources:
            source.check_tokenizer(tokenizer)
        self.names = [s.name for s in self.sources]
        global_batch = cfg.train.global_batch_tokens // data.seq_len
        self.plan = StreamPlan(n_lanes=global_batch, per_lane=1, seq_len=data.seq_len, seed=cfg.train.seed)
        self.mixture = Mixture([s.weight for s in data.sources], cfg.train.seed)
        self.fingerprint = stream_fingerprint(cfg, self.sources, tokenizer, self.plan.n_lanes)
        self.micro_batch_size = cfg.train.micro_batch_size
        self.my_lanes = list(range(rank, self.plan.n_lanes, world_size))
        self.cursors = {lane: [(0, 0)] * len(self.sources) for lane in range(self.plan.n_lanes)}
        self.step = 0  # global batches consumed
        self.tokens_by_source = np.zeros(len(self.sources), dtype=np.int64)
        self.skipped = np.zeros(len(self.sources), dtype=np.int64)
        self.epochs = [0] * len(self.sources)
        self._pieces: Iterator[dict] | None = None
        self._loader: DataLoader | None = None

    def next_step(self) -> list[MicroBatch]:
        """This rank's micro-batches of the next global batch, in order."""
        if self._pieces is None:
            self._start()
        plan, seq_len = self.plan, self.plan.seq_len
        tokens = np.empty((plan.global_batch // self.world_size, seq_len + 1), dtype=np.int64)
        for rows in self._rows:
            piece = next(self._pieces)
            if "error" in piece:
                self.close()
                raise PretrainError(piece["error"])
            assert piece["step"] == self.step, (piece["step"], self.step)
            tokens[rows] = piece["tokens"].reshape(-1, seq_len + 1)
            self.cursors.update(piece["cursors"])
            self.skipped += piece["skipped"]
            self._note_epochs(piece["epochs"])
        positions = np.arange(plan.global_batch) + self.step * plan.global_batch
        counts = np.bincount(self.mixture.sources_of(positions), minlength=len(self.sources))
        self.tokens_by_source += counts * seq_len
        self.step += 1
        batches = []
        for start in range(0, len(tokens), self.micro_batch_size):
            window = tokens[start : start + self.micro_batch_size]
            inputs, labels = window[:, :-1], window[:, 1:]
            doc_ids = torch.from_numpy(document_ids(inputs, self.tokenizer.eos_id)) if self.data.document_masking else None
            batches.append((torch.from_numpy(np.ascontiguousarray(inputs)), torch.from_numpy(labels.copy()), doc_ids))
        return batches

    def _start(self) -> None:
        """Start the workers from the current position: lanes are dealt out to them, and each
        row of this rank's share of a global batch is known to come from one worker's lane."""
        n_workers = min(self.data.num_workers, len(self.my_lanes))
        worker_lanes = [self.my_lanes[w::n_workers] for w in range(n_workers)] or [self.my_lanes]
        plan = self.plan
        # Position i of a global batch comes from lane i % K and is row i // R of this rank's share.
        self._rows = [np.array([(m * plan.n_lanes + lane) // self.world_size
                                for lane in lanes for m in range(plan.per_lane)]) for lanes in worker_lanes]
        group_args = (plan, self.mixture, self.sources, self.data, self.tokenizer, self.cursors)
        self._loader = DataLoader(
            _Pieces(worker_lanes, self.step, group_args), batch_size=None, num_workers=n_workers,
            collate_fn=_identity, prefetch_factor=self.data.prefetch if n_workers else None,
            persistent_workers=False,
        )
        self._pieces = iter(self._loader)

    def _note_epochs(self, epochs: list[int]) -> None:
        for i, epoch in enumerate(epochs):
            if epoch > self.epochs[i]:
                self.epochs[i] = epoch
                if self.rank == 0:
                    log.warning("data source %r: starting epoch %d, its documents are being repeated%s", self.names[i],
                                epoch + 1, "" if self.data.sources[i].max_epochs else
                                " (set max_epochs in its data.sources entry to limit this)")

    def metrics(self) -> dict:
        """Cumulative token share per source since step 0, and skipped bad records if any."""
        total = max(int(self.tokens_by_source.sum()), 1)
        record = {"mix_share": {name: int(n) / total for name, n in zip(self.names, self.tokens_by_source)}}
        skipped = _sum_over_ranks(self.skipped)
        if skipped.any():
            record["bad_records"] = {name: int(n) for name, n in zip(self.names, skipped)}
        return record

    def state_dict(self) -> dict:
        """The global position of the stream (call on every rank: it gathers the lanes' cursors)."""
        cursors = dict(self.cursors)  # other ranks' lanes are stale here until gathered
        cursors.update(_gather_cursors({lane: self.cursors[lane] for lane in self.my_lanes}))
        return {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "step": self.step,
            "sources": list(self.names),
            "cursors": [[list(c) for c in cursors[lane]] for lane in range(self.plan.n_lanes)],
            "tokens_by_source": self.tokens_by_source.tolist(),
            "skipped": _sum_over_ranks(self.skipped).tolist(),
            "epochs": list(self.epochs),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position. A stream that differs from the checkpoint's is an
        error unless data.allow_changed_data is set."""
        if state.get("version") != STATE_VERSION:
            raise PretrainError("the checkpoint's data position was saved by an older version of pretrain; add "
                                f"{ALLOW_OVERRIDE} to restart the data stream from its beginning")
        saved = state["fingerprint"]
        differences = stream_differences(saved, self.fingerprint, self.cfg)
        if differences and not self.data.allow_changed_data:
            raise PretrainError(
                "the data stream of this config differs from the checkpoint's:\n  - " + "\n  - ".join(differences)
                + f"\nResuming would not continue the same stream. Change these back, or add {ALLOW_OVERRIDE} to "
                "continue anyway (sources whose files are unchanged keep their position, the others restart)")
        if differences:
            log.warning("data stream changed since the checkpoint (%s); continuing as data.allow_changed_data "
                        "asks", "; ".join(differences))
        self.close()
        self.step = state["step"]
        old = {name: i for i, name in enumerate(state["sources"])}
        keep_lanes = lanes_reusable(saved, self.fingerprint)
        for i, name in enumerate(self.names):
            j = old.get(name)
            if j is None:
                continue
            self.tokens_by_source[i] = state["tokens_by_source"][j]
            self.skipped[i] = state["skipped"][j]
            if keep_lanes and saved["sources"][name]["content"] == self.fingerprint["sources"][name]["content"]:
                self.epochs[i] = state["epochs"][j]
                for lane in range(self.plan.n_lanes):
                    self.cursors[lane][i] = tuple(state["cursors"][lane][j])

    def close(self) -> None:
        """Stop the worker processes (a later next_step() starts them again from here)."""
        self._pieces = None
        self._loader = None


def _gather_cursors(mine: dict[int, list]) -> dict[int, list]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return mine
    gathered: list[dict] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(gathered, mine)
    return {lane: cursor for part in gathered for lane, cursor in part.items()}


def _sum_over_ranks(counts: np.ndarray) -> np.ndarray:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return counts
    total = torch.from_numpy(counts.copy())
    dist.all_reduce(total)
    return total.numpy()


def validation_batches(cfg: Config, tokenizer: Tokenizer, max_batches: int, rank: int = 0, world_size: int = 1,
                       sources: list[Source] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of the first `max_batches` micro-batches of the held-out split, built
    once (all sources in order, the last window padded; padding is ignored by the loss)."""
    data, batch_size = cfg.data, cfg.train.micro_batch_size
    sources = sources if sources is not None else open_sources(data)
    wanted = max_batches * batch_size * world_size * data.seq_len + 1
    parts, have = [], 0
    for source in sources:
        if have >= wanted:
            break
        parts.append(source.validation_tokens(tokenizer, wanted - have))
        have += len(parts[-1])
    tokens = np.concatenate(parts)[:wanted] if have else np.empty(0, dtype=np.int64)
    if len(tokens) < 2:
        raise PretrainError(f"the validation split is empty: no document fell in data.val_fraction="
                            f"{data.val_fraction}; raise it or set eval.every=0")
    windows = cut_windows(tokens, data.seq_len, tokenizer.pad_id)[: max_batches * batch_size * world_size]
    mine = torch.from_numpy(windows[rank::world_size])
    batches = []
    for start in range(0, len(mine), batch_size):
        window = mine[start : start + batch_size]
        labels = window[:, 1:].clone()
        labels[labels == tokenizer.pad_id] = IGNORE_INDEX
        batches.append((window[:, :-1].contiguous(), labels))
    return batches


def tokenizer_training_documents(sources: list[Source], weights: list[float], seed: int) -> Iterator[str]:
    """Training documents of all text sources, interleaved at random by weight, each source's
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


def load_or_train_tokenizer(cfg: Config, sources: list[Source] | None = None) -> Tokenizer:
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
