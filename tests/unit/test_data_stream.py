"""The global stream: weighted mixing, packing without loss, rank x worker sharding, exact resume
at any world size, fingerprints, epochs and the held-out batches, for both ways of reading a
source: indexed (small or prepared sources, shuffled across the source) and streamed (lanes)."""

from __future__ import annotations

import collections
import json
import logging

import numpy as np
import pytest
import torch

from pretrain.data import TrainData, open_sources
from pretrain.data.sources import RecordErrors
from pretrain.data.stream import ChunkOrder, IndexedSource, LaneSource, Mixture, Permutation
from pretrain.errors import PretrainError
from tests.conftest import MODES, STREAMED, held_out, rows_of, take, train_data


def merged_state(rank_datas: list[TrainData]) -> dict:
    """What state_dict() gathers over a process group: every lane's cursor from its owner."""
    state = rank_datas[0].state_dict()
    for data in rank_datas[1:]:
        other = data.state_dict()
        for lane in data.my_lanes:
            state["cursors"][lane] = other["cursors"][lane]
    return state


def test_mixture_shares_match_weights_in_every_batch():
    weights = [0.54, 0.36, 0.1]
    mixture = Mixture(weights, seed=0)
    sources = mixture.sources_of(np.arange(200_000))
    shares = np.bincount(sources, minlength=3) / len(sources)
    assert shares == pytest.approx(weights, abs=1e-3)
    per_batch = np.stack([np.bincount(b, minlength=3) for b in sources.reshape(-1, 64)])
    assert np.abs(per_batch - 64 * np.array(weights)).max() <= 2.5  # low discrepancy: no lopsided batch
    assert np.array_equal(Mixture(weights, seed=0).sources_of(np.arange(1000)), sources[:1000])
    assert not np.array_equal(Mixture(weights, seed=1).sources_of(np.arange(1000)), sources[:1000])


def test_a_lane_packs_its_chunks_without_dropping_or_repeating_a_token(mixed_config, tokenizer):
    cfg = mixed_config()
    source = open_sources(cfg.data)[1]
    lane, n_lanes, seq_len = 1, 3, 32
    order = ChunkOrder(source.n_chunks, n_lanes, seed=0, source_name=source.name)
    errors = RecordErrors(source.name, "error")
    reader = LaneSource(source, order, lane, n_lanes, seq_len, tokenizer, errors, max_epochs=None)
    windows = np.stack([reader.window() for _ in range(300)])
    # the lane's stream: its items lane, lane + K, ... in order, documents joined by EOS
    expected = np.concatenate([source.train_tokens(order(lane + j * n_lanes)[1], tokenizer, errors)
                               for j in range(reader.next_item)])
    inputs = windows[:, :-1].reshape(-1)
    assert np.array_equal(inputs, expected[: len(inputs)])
    assert np.array_equal(windows[:, 1:].reshape(-1), expected[1 : len(inputs) + 1])
    assert (inputs == tokenizer.eos_id).sum() > 10  # many documents packed, joined by EOS


def test_permutation_is_a_seeded_bijection():
    for n in (1, 2, 7, 1000, 4097):
        order = [Permutation(n, 0, "a")[i] for i in range(n)]
        assert sorted(order) == list(range(n))
    assert [Permutation(1000, 0)[i] for i in range(20)] != [Permutation(1000, 1)[i] for i in range(20)]


def test_an_indexed_source_tiles_its_repeated_stream_with_shuffled_windows():
    tokens = np.arange(1000, dtype=np.int32)
    source = IndexedSource("s", tokens, seq_len=32, seed=0, max_epochs=None)
    repeated = np.concatenate([tokens] * 4)
    for epoch in range(3):
        first, last = source.epoch_start(epoch), source.epoch_start(epoch + 1)
        windows = [source.window(q) for q in range(first, last)]
        # epoch e's windows cover exactly its stretch of the repeated stream, each token once as an
        # input (the window at an epoch's end runs on into the next copy)...
        inputs = np.concatenate([w[:-1] for w in windows])
        assert np.array_equal(np.sort(inputs), np.sort(repeated[first * 32 : last * 32]))
        assert all(np.array_equal(w[1:], (w[:-1] + 1) % 1000) for w in windows)  # contiguous, wrapping around
        # ...in a shuffled order
        assert [int(w[0]) for w in windows] != sorted(int(w[0]) for w in windows)
        assert source.epoch_of(first) == epoch == source.epoch_of(last - 1)


@MODES
@pytest.mark.parametrize("world_size, workers", [(2, 0), (2, 2), (4, 1)])
def test_ranks_and_workers_take_exactly_the_single_process_stream(mixed_config, tokenizer, mode, world_size, workers):
    single = take(train_data(mixed_config(**mode), tokenizer), steps=6)
    cfg = mixed_config(data__num_workers=workers, **mode)
    per_rank = [take(train_data(cfg, tokenizer, rank, world_size), steps=6) for rank in range(world_size)]
    for step in range(6):
        for rank in range(world_size):  # position i of a global batch goes to rank i % R
            assert per_rank[rank][step] == single[step][rank::world_size]
    all_rows = collections.Counter(row for step in single for row in step)
    assert collections.Counter(row for rank in per_rank for step in rank for row in step) == all_rows


def test_each_rank_reads_only_its_own_chunks(mixed_config, tokenizer, monkeypatch):
    from pretrain.data.sources import TextSource

    read = collections.defaultdict(set)
    original = TextSource.train_tokens

    def spy(self, chunk, tokenizer, errors, num_threads=-1, part=0, parts=1):
        read[current_rank].add((self.name, chunk, part))
        return original(self, chunk, tokenizer, errors, num_threads, part, parts)

    monkeypatch.setattr(TextSource, "train_tokens", spy)
    cfg = mixed_config(**STREAMED)
    for current_rank in range(2):
        take(train_data(cfg, tokenizer, current_rank, 2), steps=20)
    assert read[0] and read[1] and not read[0] & read[1]


@MODES
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_identical_next_batches(mixed_config, tokenizer, mode, workers):
    cfg = mixed_config(data__num_workers=workers, **mode)
    first = train_data(cfg, tokenizer)
    for _ in range(5):
        first.next_step()
    state = first.state_dict()
    expected = take(first, steps=4)
    resumed = train_data(cfg, tokenizer)
    resumed.load_state_dict(state)
    assert take(resumed, steps=4) == expected
    assert json.loads(json.dumps(state)) == state  # a small, plain cursor: no pickled iterator


@MODES
def test_resume_at_another_world_size_continues_the_same_global_stream(mixed_config, tokenizer, mode):
    cfg = mixed_config(**mode)
    single = take(train_data(cfg, tokenizer), steps=9)
    # 2 ranks for 4 steps, then 1 process
    ranks = [train_data(cfg, tokenizer, r, 2) for r in range(2)]
    for data in ranks:
        take_rows = [rows_of(data.next_step()) for _ in range(4)]
        assert take_rows[0] == single[0][data.dp_rank::2]
    one = train_data(cfg, tokenizer)
    one.load_state_dict(merged_state(ranks))
    assert take(one, steps=2) == single[4:6]
    # 1 process for 6 steps, then 2 ranks
    one = train_data(cfg, tokenizer)
    take_rows = [rows_of(one.next_step()) for _ in range(6)]
    state = one.state_dict()
    for rank in range(2):
        data = train_data(cfg, tokenizer, rank, 2)
        data.load_state_dict(state)
        assert take(data, steps=3) == [step[rank::2] for step in single[6:9]]
    assert take_rows == single[:6]


def test_a_changed_stream_is_an_error_that_names_the_override(mixed_config, tokenizer, corpus_file, paragraphs_file):
    data = train_data(mixed_config(), tokenizer)
    take(data, steps=3)
    state = data.state_dict()
    reweighted = (f"[{{name: topics, path: '{corpus_file}', weight: 0.5}}, "
                  f"{{name: paragraphs, path: '{paragraphs_file}', weight: 0.5}}]")
    for extra, names in (({"data__sources": reweighted}, ["data.sources[0].weight ('topics'): 0.3"]),
                         ({"data__seq_len": 16}, ["data.seq_len: 32 in the checkpoint, 16 now"]),
                         ({"train__seed": 5}, ["train.seed"])):
        with pytest.raises(PretrainError) as info:
            train_data(mixed_config(**extra), tokenizer).load_state_dict(state)
        for name in names + ["--data.allow_changed_data=true"]:
            assert name in str(info.value)
    # with the override, unchanged sources keep their position
    changed = train_data(mixed_config(data__sources=reweighted, data__allow_changed_data=True), tokenizer)
    changed.load_state_dict(state)
    assert changed.step == 3 and changed.cursors == data.cursors
    assert len(take(changed, steps=1)[0]) == 8


def test_a_changed_source_restarts_from_its_beginning_when_allowed(mixed_config, tokenizer, tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text("".join(json.dumps({"text": f"note {i} " * 30}) + "\n" for i in range(100)))
    sources = f"[{{name: notes, path: '{path}'}}]"
    data = train_data(mixed_config(data__sources=sources), tokenizer)
    take(data, steps=5)
    state = data.state_dict()
    with path.open("a") as f:  # the source grows: its fingerprint changes
        f.write(json.dumps({"text": "one more note"}) + "\n")
    with pytest.raises(PretrainError, match=r"data.sources\[0\].path \('notes'\): its files changed"):
        train_data(mixed_config(data__sources=sources), tokenizer).load_state_dict(state)
    resumed = train_data(mixed_config(data__sources=sources, data__allow_changed_data=True), tokenizer)
    resumed.load_state_dict(state)
    fresh = train_data(mixed_config(data__sources=sources), tokenizer)
    assert resumed.step == 5 and take(resumed, steps=2) == take(fresh, steps=2)
    assert resumed.metrics()["mix_share"] == {"notes": 1.0}


def test_mix_share_is_logged_cumulatively_and_matches_weights(mixed_config, tokenizer):
    data = train_data(mixed_config(), tokenizer)
    take(data, steps=100)
    share = data.metrics()["mix_share"]
    assert share == pytest.approx({"topics": 0.3, "paragraphs": 0.7}, abs=0.01)
    assert data.positions_by_source.sum() == 100 * 8  # sequences of the 100 global batches


@MODES
def test_small_source_repeats_with_a_warning_and_max_epochs_stops_it(mixed_config, tokenizer, tmp_path, caplog, mode):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"tiny document number {i}"}) + "\n" for i in range(300)))
    sources = f"[{{name: small, path: '{small}', weight: 0.5}}, {{name: big, path: python-docs, weight: 0.5}}]"
    with caplog.at_level(logging.WARNING):
        take(train_data(mixed_config(data__sources=sources, **mode), tokenizer), steps=80)
    assert "data source 'small': starting epoch 2, its documents are being repeated" in caplog.text
    assert "'big': starting epoch" not in caplog.text
    limited = sources.replace("weight: 0.5}, {name: big", "weight: 0.5, max_epochs: 1}, {name: big")
    with pytest.raises(PretrainError, match=r"'small' is used up: .* max_epochs=1; raise max_epochs"):
        take(train_data(mixed_config(data__sources=limited, **mode), tokenizer), steps=80)


def test_a_bad_record_in_a_worker_is_a_clean_error_or_a_counted_skip(mixed_config, tokenizer, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(200)) + "{oops\n")
    sources = f"[{{name: bad, path: '{bad}', weight: 1.0}}]"
    with pytest.raises(PretrainError, match=r"bad\.jsonl line 201: not valid JSON") as info:
        take(train_data(mixed_config(data__sources=sources, data__num_workers=2, **STREAMED), tokenizer), steps=200)
    assert "Traceback" not in str(info.value)
    data = train_data(mixed_config(data__sources=sources, data__num_workers=2, data__on_bad_record="skip",
                                  **STREAMED), tokenizer)
    take(data, steps=200)
    skipped = data.metrics()["bad_records"]["bad"]
    assert 1 <= skipped <= data.epochs[0] + 1  # met at most once per epoch


def test_document_ids_follow_eos(mixed_config, tokenizer):
    data = train_data(mixed_config(data__document_masking=True), tokenizer)
    inputs, labels, doc_ids = data.next_step()[0]
    data.close()
    eos = (inputs == tokenizer.eos_id).int()
    assert doc_ids.shape == inputs.shape and (doc_ids[:, 0] == 0).all()
    assert (doc_ids[:, 1:] - doc_ids[:, :-1] == eos[:, :-1]).all()  # a new document begins after each EOS
    assert inputs[:, 1:].equal(labels[:, :-1])


def test_validation_batches_are_held_out_and_bounded(tiny_config, tokenizer):
    cfg = tiny_config()
    batches = held_out(cfg, tokenizer, max_batches=3)
    assert 1 <= len(batches) <= 3
    assert batches[0][0].shape == (4, 32)
    val_text = tokenizer.decode([t for x, _ in batches for t in x.flatten().tolist() if t > 3])
    source = open_sources(cfg.data)[0]
    errors = RecordErrors(source.name, "error")
    train_docs = [d for c in range(source.n_chunks) for d in source.split_documents(c, errors)[0]]
    assert not any(val_text[:200] in doc for doc in train_docs)
    with pytest.raises(PretrainError, match="validation split is empty"):
        held_out(tiny_config(data__val_fraction=0.0, eval__every=0), tokenizer, 3)


def test_validation_sequences_do_not_depend_on_the_world_size(tiny_config, tokenizer):
    cfg = tiny_config(train__micro_batch_size=2)
    single = torch.cat([x for x, _ in held_out(cfg, tokenizer, max_batches=4)])
    shares = [held_out(cfg, tokenizer, 4, rank, 2) for rank in range(2)]
    assert len(shares[0]) == len(shares[1]) == 2  # every rank evaluates as many batches
    assert torch.equal(torch.cat([x for x, _ in shares[0]]), single[0::2])
    assert torch.equal(torch.cat([x for x, _ in shares[1]]), single[1::2])
