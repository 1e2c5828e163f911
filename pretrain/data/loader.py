"""This rank's training batches: its slice of every global batch of the global stream, produced
by background workers, with a small resumable state."""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from pretrain.config.schema import DataConfig, TrainConfig
from pretrain.data.fingerprint import ALLOW_OVERRIDE, lanes_reusable, stream_differences, stream_fingerprint
from pretrain.data.packing import document_ids
from pretrain.data.prepared import PreparedSource, raw_source
from pretrain.data.producer import StepPieces
from pretrain.data.sources import FileSource, RecordErrors, TextSource
from pretrain.data.stream import IndexedSource, Mixture, StreamPlan, default_lanes
from pretrain.errors import PretrainError
from pretrain.parallel.distributed import sum_over_ranks
from pretrain.resilience.preemption import ignore_interrupts
from tokenizer import Tokenizer

log = logging.getLogger(__name__)

STATE_VERSION = 1

MicroBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # inputs, labels, document ids
AnySource = TextSource | PreparedSource


def open_sources(data: DataConfig) -> list[AnySource]:
    """Every configured source, raw (with its chunk table) or prepared; fails on a missing,
    unreadable or (for every file of a source) empty file before any compute is spent."""
    sources: list[AnySource] = []
    for cfg in data.sources:
        prepared = data.prepared_source_dir(cfg.name)
        if prepared:
            source = PreparedSource(prepared, cfg, data)
            source.check_raw_files(cfg, data)
            sources.append(source)
        else:
            sources.append(raw_source(cfg, data))
            if isinstance(sources[-1], FileSource):
                sources[-1].check_empty_files(warn=False)  # TrainData names empty files beside others
    return sources


def _worker_started(worker_id: int) -> None:
    ignore_interrupts()  # a Ctrl-C reaches the workers too; the trainer still needs them to save


def _identity(item):
    return item


class TrainData:
    """This data-parallel rank's micro-batches of each global batch of the global stream (see
    stream.py).

    Prepared sources and raw sources up to data.in_memory_max_bytes are indexed: read at random,
    shuffled across the whole source. Larger raw sources are streamed through lanes: data-parallel
    rank r owns lanes r, r + R, r + 2R, ... (R = dp_size) and reads only their chunks. Either way
    rank r takes positions p with p % R == r of each global batch, and `state_dict()` (each lane's
    cursor, each indexed source's window count, the stream's fingerprint) is the same on every
    rank and valid for any number of ranks and workers with the same global batch.

    From `train` it takes the global and micro-batch sizes, the seed and the device (which sets
    the default number of workers); `dp_group` holds the data-parallel ranks (None: all ranks)."""

    def __init__(self, data: DataConfig, train: TrainConfig, tokenizer: Tokenizer, *, dp_rank: int = 0,
                 dp_size: int = 1, dp_group: dist.ProcessGroup | None = None,
                 sources: list[AnySource] | None = None):
        self.data, self.tokenizer = data, tokenizer
        self.dp_rank, self.dp_size, self.dp_group = dp_rank, dp_size, dp_group
        self.sources = sources if sources is not None else open_sources(data)
        self.names = [s.name for s in self.sources]
        assert train.global_batch_tokens is not None  # filled in by validate()
        global_batch = train.global_batch_tokens // data.seq_len
        self.plan = StreamPlan(n_lanes=data.lanes or default_lanes(global_batch), global_batch=global_batch,
                               seq_len=data.seq_len, seed=train.seed)
        self.mixture = Mixture([s.weight for s in data.sources], train.seed)
        num_workers = data.num_workers
        if num_workers is None:  # on a CPU the training step already uses every core
            num_workers = 2 if torch.cuda.is_available() and train.device != "cpu" else 0
        self.num_workers = num_workers
        self.skipped = np.zeros(len(self.sources), dtype=np.int64)
        self.indexed: dict[int, IndexedSource] = {}
        self.streamed: dict[int, TextSource] = {}
        for i, source in enumerate(self.sources):
            self._add_source(i, source, train.seed)
        modes = ["indexed" if i in self.indexed else "streamed" for i in range(len(self.sources))]
        self.fingerprint = stream_fingerprint(data, train.seed, self.sources, modes, tokenizer, self.plan.n_lanes,
                                              global_batch)
        self.micro_batch_size = train.micro_batch_size
        self.my_lanes = list(range(dp_rank, self.plan.n_lanes, dp_size))
        self.cursors = {lane: {i: (0, 0) for i in self.streamed} for lane in range(self.plan.n_lanes)}
        self.step = 0  # global batches consumed
        self.positions_by_source = np.zeros(len(self.sources), dtype=np.int64)  # since step 0, for mix shares
        # An indexed source's window q is its (positions_by_source - window_base)-th: the base moves
        # only when a changed source starts again from its beginning (data.allow_changed_data).
        self.window_base = np.zeros(len(self.sources), dtype=np.int64)
        self.epochs = [0] * len(self.sources)
        self._pieces: Iterator[dict] | None = None

    def _add_source(self, i: int, source: AnySource, seed: int) -> None:
        data, max_epochs = self.data, self.data.sources[i].max_epochs
        if isinstance(source, PreparedSource):
            source.check_tokenizer(self.tokenizer)
            tokens = source.tokens
        else:
            if isinstance(source, FileSource):
                source.check_empty_files(warn=self.dp_rank == 0)
            if source.total_bytes > data.in_memory_max_bytes:
                self.streamed[i] = source
                items = source.n_chunks * -(-self.plan.n_lanes // source.n_chunks)
                if items < 4 * self.plan.n_lanes and self.dp_rank == 0:
                    log.warning("data source %r is streamed in %d chunks by %d lanes: too few per lane to repeat it "
                                "evenly; prepare it (`pretrain data prepare`), raise data.in_memory_max_bytes above "
                                "its %d bytes, or lower data.chunk_bytes", source.name, source.n_chunks,
                                self.plan.n_lanes, source.total_bytes)
                return
            errors = RecordErrors(source.name, data.on_bad_record)
            tokens = source.all_train_tokens(self.tokenizer, errors)
            self.skipped[i] += errors.skipped
            if len(tokens) < 2 and isinstance(source, FileSource):
                raise PretrainError(
                    f"data source {source.name!r} has no training documents in {source.describe_files()}: no "
                    f"non-blank text (in field {data.sources[i].text_field!r} of .jsonl/.parquet records), or "
                    f"data.val_fraction={data.val_fraction} held every document out; check the files and the "
                    "source's text_field, or remove the source")
        self.indexed[i] = IndexedSource(source.name, tokens, data.seq_len, seed, max_epochs)

    def next_step(self) -> list[MicroBatch]:
        """This rank's micro-batches of the next global batch, in order."""
        if self._pieces is None:
            self._start()
        assert self._pieces is not None  # set by _start()
        plan, seq_len = self.plan, self.plan.seq_len
        tokens = np.empty((plan.global_batch // self.dp_size, seq_len + 1), dtype=np.int64)
        first = plan.first_lane(self.step)
        for _ in range(self._n_workers):
            piece = next(self._pieces)
            if "error" in piece:
                self.close()
                raise PretrainError(piece["error"])
            assert piece["step"] == self.step, (piece["step"], self.step)
            # position i of a global batch is row i // R of rank i % R's share
            tokens[(piece["lanes"] - first) // self.dp_size] = piece["tokens"]
            self.cursors.update(piece["cursors"])
            self.skipped += piece["skipped"]
            self._note_epochs(piece["epochs"])
        counts = np.bincount(self.mixture.sources_of(self.step * plan.global_batch + np.arange(plan.global_batch)),
                             minlength=len(self.sources))
        self.positions_by_source += counts
        windows_taken = self.positions_by_source - self.window_base
        self._note_epochs({i: s.epoch_of(max(int(windows_taken[i]) - 1, 0)) for i, s in self.indexed.items()})
        self.step += 1
        batches = []
        for start in range(0, len(tokens), self.micro_batch_size):
            window = tokens[start : start + self.micro_batch_size]
            inputs, labels = window[:, :-1], window[:, 1:]
            doc_ids = None
            if self.data.document_masking:
                doc_ids = torch.from_numpy(document_ids(inputs, self.tokenizer.eos_id))
            batches.append((torch.from_numpy(np.ascontiguousarray(inputs)), torch.from_numpy(labels.copy()), doc_ids))
        return batches

    def _start(self) -> None:
        """Start the workers from the current position, each with its share of this rank's lanes."""
        n_workers = min(self.num_workers, len(self.my_lanes))
        worker_lanes = [self.my_lanes[w::n_workers] for w in range(n_workers)] or [self.my_lanes]
        self._n_workers = len(worker_lanes)
        producer_args = (self.plan, self.mixture, self.streamed, self.indexed, self.data, self.tokenizer,
                         self.cursors, self.positions_by_source - self.window_base)
        loader = DataLoader(StepPieces(worker_lanes, self.step, producer_args), batch_size=None,
                            num_workers=n_workers, collate_fn=_identity, worker_init_fn=_worker_started,
                            prefetch_factor=self.data.prefetch if n_workers else None)
        self._pieces = iter(loader)

    def _note_epochs(self, epochs: dict[int, int]) -> None:
        for i, epoch in epochs.items():
            if epoch > self.epochs[i]:
                self.epochs[i] = epoch
                if self.dp_rank == 0:
                    log.warning("data source %r: starting epoch %d, its documents are being repeated%s", self.names[i],
                                epoch + 1, "" if self.data.sources[i].max_epochs else
                                " (set max_epochs in its data.sources entry to limit this)")

    def metrics(self) -> dict:
        """Cumulative token share per source since step 0, and skipped bad records if any
        (call on every rank: the counts are summed over the data-parallel ranks)."""
        total = max(int(self.positions_by_source.sum()), 1)
        record = {"mix_share": {name: int(n) / total for name, n in zip(self.names, self.positions_by_source)}}
        skipped = sum_over_ranks(torch.from_numpy(self.skipped), self.dp_group).numpy()
        if skipped.any():
            record["bad_records"] = {name: int(n) for name, n in zip(self.names, skipped)}
        return record

    def state_dict(self) -> dict:
        """The global position of the stream (call on every rank: it gathers the lanes' cursors)."""
        cursors = dict(self.cursors)  # other ranks' lanes are stale here until gathered
        cursors.update(_gather_cursors({lane: self.cursors[lane] for lane in self.my_lanes}, self.dp_group))
        return {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "step": self.step,
            "sources": list(self.names),
            "positions_by_source": self.positions_by_source.tolist(),
            "window_base": self.window_base.tolist(),
            # cursors[lane][source] = [item, token offset], for streamed sources (None for indexed ones)
            "cursors": [[list(cursors[lane][i]) if i in self.streamed else None for i in range(len(self.names))]
                        for lane in range(self.plan.n_lanes)],
            "skipped": sum_over_ranks(torch.from_numpy(self.skipped), self.dp_group).numpy().tolist(),
            "epochs": list(self.epochs),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position. A stream that differs from the checkpoint's is an
        error unless data.allow_changed_data is set."""
        if state.get("version") != STATE_VERSION:
            raise PretrainError("the checkpoint's data position was saved by an older version of pretrain; add "
                                f"{ALLOW_OVERRIDE} to restart the data stream from its beginning")
        saved = state["fingerprint"]
        differences = stream_differences(saved, self.fingerprint, self.data)
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
        old = {name: j for j, name in enumerate(state["sources"])}
        reusable = lanes_reusable(saved, self.fingerprint)
        for i, name in enumerate(self.names):
            j = old.get(name)
            if j is None:
                continue
            self.positions_by_source[i] = state["positions_by_source"][j]
            self.skipped[i] = state["skipped"][j]
            before, now = saved["sources"][name], self.fingerprint["sources"][name]
            if not (reusable and before["content"] == now["content"] and before["mode"] == now["mode"]):
                self.window_base[i] = self.positions_by_source[i]  # changed: it starts again from its beginning
                continue
            self.epochs[i] = state["epochs"][j]
            self.window_base[i] = state["window_base"][j]
            if i in self.streamed:
                for lane in range(self.plan.n_lanes):
                    self.cursors[lane][i] = tuple(state["cursors"][lane][j])

    def close(self) -> None:
        """Stop the worker processes (a later next_step() starts them again from here)."""
        self._pieces = None


def _gather_cursors(mine: dict[int, dict], group: dist.ProcessGroup | None) -> dict[int, dict]:
    """Every data-parallel rank's lane cursors (`group`: those ranks; None: all ranks)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return mine
    gathered: list[dict] = [None] * dist.get_world_size(group)  # type: ignore[list-item]
    dist.all_gather_object(gathered, mine, group=group)
    return {lane: cursor for part in gathered for lane, cursor in part.items()}
