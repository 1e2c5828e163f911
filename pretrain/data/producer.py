"""What a DataLoader worker runs: its lanes' windows of every global batch."""

from __future__ import annotations

from typing import Iterator, cast

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from pretrain.config.schema import DataConfig
from pretrain.data.sources import RecordErrors, TextSource
from pretrain.data.stream import ChunkOrder, IndexedSource, LaneSource, Mixture, StreamPlan
from pretrain.errors import PretrainError
from tokenizer import Tokenizer

# StepProducer's arguments between `lanes` and `num_threads`
ProducerArgs = tuple[StreamPlan, Mixture, dict[int, TextSource], dict[int, IndexedSource], DataConfig, Tokenizer,
                     dict[int, dict[int, tuple[int, int]]], np.ndarray]


class StepProducer:
    """The windows of a set of lanes, global batch after global batch.

    Position i of global batch k (stream position p = k * B + i) belongs to lane p % K. Its
    source is the mixture's choice for p; an indexed source gives its window number q (how many
    earlier positions chose it), a streamed source gives the lane's next window of it."""

    def __init__(self, lanes: list[int], plan: StreamPlan, mixture: Mixture, streamed: dict[int, TextSource],
                 indexed: dict[int, IndexedSource], data: DataConfig, tokenizer: Tokenizer,
                 cursors: dict[int, dict[int, tuple[int, int]]], windows_taken: np.ndarray, num_threads: int):
        self.lanes, self.plan, self.mixture = np.asarray(lanes, dtype=np.int64), plan, mixture
        self.indexed, self.streamed = indexed, list(streamed)
        self.windows_taken = np.array(windows_taken, dtype=np.int64)  # of each indexed source, before this step
        self.n_sources = len(data.sources)
        self.errors = [RecordErrors(cfg.name, data.on_bad_record) for cfg in data.sources]
        orders = {i: ChunkOrder(src.n_chunks, plan.n_lanes, plan.seed, src.name) for i, src in streamed.items()}
        self.readers = {
            lane: {i: LaneSource(src, orders[i], lane, plan.n_lanes, plan.seq_len, tokenizer, self.errors[i],
                                 data.sources[i].max_epochs, cast("tuple[int, int]", tuple(cursors[lane][i])),
                                 num_threads)
                   for i, src in streamed.items()}
            for lane in lanes
        }

    def produce(self, step: int) -> dict:
        """This producer's windows of global batch `step`, one per active lane, in lane order."""
        plan = self.plan
        sources = self.mixture.sources_of(step * plan.global_batch + np.arange(plan.global_batch))
        window_numbers = np.zeros(plan.global_batch, dtype=np.int64)
        for i in self.indexed:
            chosen = sources == i
            window_numbers[chosen] = self.windows_taken[i] + np.arange(chosen.sum())
        lanes = self.lanes[plan.active(self.lanes, step)]
        tokens = np.empty((len(lanes), plan.seq_len + 1), dtype=np.int32)
        for row, lane in enumerate(lanes):
            position = lane - plan.first_lane(step)
            source = int(sources[position])
            if source in self.indexed:
                tokens[row] = self.indexed[source].window(int(window_numbers[position]))
            else:
                tokens[row] = self.readers[lane][source].window()
        self.windows_taken += np.bincount(sources, minlength=self.n_sources)
        skipped = [e.skipped for e in self.errors]
        for e in self.errors:
            e.skipped = 0
        return {
            "step": step,
            "lanes": lanes,
            "tokens": tokens,
            "cursors": {int(lane): {i: r.cursor for i, r in self.readers[lane].items()} for lane in lanes},
            "epochs": {i: max(readers[i].epoch for readers in self.readers.values()) for i in self.streamed},
            "skipped": skipped,
        }


class StepPieces(IterableDataset):
    """Each DataLoader worker produces its lanes' share of every global batch from `start_step`
    on. A data error travels as an item, so the trainer reports it without a worker traceback."""

    def __init__(self, worker_lanes: list[list[int]], start_step: int, producer_args: ProducerArgs):
        self.worker_lanes, self.start_step, self.producer_args = worker_lanes, start_step, producer_args

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info else 0
        # One tokenizer thread per worker process; the training process may use every core.
        producer = StepProducer(self.worker_lanes[worker], *self.producer_args, num_threads=1 if info else -1)
        step = self.start_step
        while True:
            try:
                piece = producer.produce(step)
            except PretrainError as exc:
                yield {"error": str(exc)}
                return
            yield piece
            step += 1
