"""The data path: sources, validation split, mixing, shuffling, packing, per-rank batches."""

from __future__ import annotations

import collections
import json

import numpy as np
import pytest

from pretrain.config import SourceConfig
from pretrain.data import IGNORE_INDEX, TrainBatches, validation_batches
from pretrain.data.builtin import python_docs_documents
from pretrain.data.loader import mixed_documents, shuffled, split_documents, to_batch
from pretrain.data.packing import pack_sequences
from pretrain.data.sources import is_validation, iter_documents
from pretrain.errors import PretrainError

EOS, PAD = 2, 3


def stream_of(docs):
    return [t for doc in docs for t in (*doc, EOS)]


@pytest.mark.parametrize("lengths", [[5, 3, 40, 1, 7], [8] * 10, [100], [1] * 50, [31, 32, 33]])
@pytest.mark.parametrize("seq_len", [1, 4, 8])
def test_packing_keeps_every_token_once(lengths, seq_len):
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(10, 100, n)) for n in lengths]
    stream = stream_of(docs)
    windows = list(pack_sequences(docs, seq_len, EOS))
    assert all(len(w) == seq_len + 1 for w in windows)
    inputs = [t for w in windows for t in w[:-1]]
    labels = [t for w in windows for t in w[1:]]
    # inputs are the stream in order, labels the stream shifted by one: nothing dropped or repeated
    assert inputs == stream[: len(inputs)]
    assert labels == stream[1 : len(inputs) + 1]
    assert len(stream) - len(inputs) <= seq_len  # only the final partial window waits for more data

    padded = list(pack_sequences(docs, seq_len, EOS, pad_id=PAD))
    padded_inputs = [t for w in padded for t in w[:-1]]
    real = [t for t in padded_inputs if t != PAD]
    assert real == stream[: len(real)] and len(real) >= len(stream) - 1
    assert padded_inputs[len(real):] == [PAD] * (len(padded_inputs) - len(real))


def test_batch_masks_padding_labels():
    windows = list(pack_sequences([[10, 11, 12]], 6, EOS, pad_id=PAD))
    inputs, labels = to_batch(windows, pad_id=PAD)
    assert inputs.tolist() == [[10, 11, 12, EOS, PAD, PAD]]
    assert labels.tolist() == [[11, 12, EOS, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]


def test_txt_jsonl_parquet_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline two\n\nsecond doc\n\n\n\nthird\n")
    rows = [{"body": "json one", "id": 1}, {"body": "json two", "id": 2}, {"body": "", "id": 3}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["parquet one", "parquet two"]}), tmp_path / "c.parquet")
    txt = list(iter_documents(SourceConfig(name="t", path=str(tmp_path / "*.txt"))))
    assert [d.strip() for d in txt] == ["first doc\nline two", "second doc", "third"]
    assert list(iter_documents(SourceConfig(name="j", path=str(tmp_path / "b.jsonl"), text_field="body"))) == [
        "json one", "json two"]
    assert list(iter_documents(SourceConfig(name="p", path=str(tmp_path / "c.parquet"), text_field="content"))) == [
        "parquet one", "parquet two"]


def test_missing_text_field_names_file_and_fields(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(PretrainError, match=r"no field 'text' \(fields: body\); set text_field"):
        list(iter_documents(SourceConfig(name="j", path=str(tmp_path / "b.jsonl"))))


def test_python_docs_is_real_and_deterministic():
    docs = list(python_docs_documents())
    assert len(docs) > 300 and sum(map(len, docs)) > 1_000_000
    assert any("assert" in d and "AssertionError" in d for d in docs)
    assert docs == list(python_docs_documents())


def test_validation_split_is_disjoint_stable_and_sized():
    source = SourceConfig(name="docs", path="python-docs")
    train = list(split_documents(source, 0.1, "train"))
    val = list(split_documents(source, 0.1, "val"))
    everything = list(python_docs_documents())
    assert len(train) + len(val) == len(everything) and not set(train) & set(val)
    assert 0.05 < len(val) / len(everything) < 0.15
    assert all(is_validation(d, 0.1) for d in val)
    assert not any(is_validation(d, 0.0) for d in everything)


def test_mixture_follows_weights_and_seed(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.txt").write_text("\n\n".join(f"{name} doc {i}" for i in range(400)))
    sources = [SourceConfig(name="a", path=str(tmp_path / "a.txt"), weight=3.0),
               SourceConfig(name="b", path=str(tmp_path / "b.txt"), weight=1.0)]

    def take(seed, n=2000):
        stream = mixed_documents(sources, 0.0, seed, cycle=True, shuffle_docs=50)
        return [next(stream) for _ in range(n)]

    docs = take(0)
    share_a = sum(d.startswith("a") for d in docs) / len(docs)
    assert share_a == pytest.approx(0.75, abs=0.03)
    assert docs == take(0) and docs != take(1)
    # each source's documents come in a shuffled order, each once per epoch
    first_epoch_a = [d for d in docs if d.startswith("a")][:400]
    assert sorted(first_epoch_a) == sorted(f"a doc {i}" for i in range(400))
    assert first_epoch_a != [f"a doc {i}" for i in range(400)]


def test_mixture_without_cycling_ends_and_empty_source_fails(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n\nthree")
    source = SourceConfig(name="a", path=str(tmp_path / "a.txt"))
    assert sorted(mixed_documents([source], 0.0, 0, cycle=False)) == ["one", "three", "two"]
    with pytest.raises(PretrainError, match="'a' has no training documents"):
        next(mixed_documents([source], 1.0, 0, cycle=True))  # every document is held out


def test_shuffle_is_a_seeded_permutation():
    items = list(range(1000))
    out = list(shuffled(items, 64, np.random.default_rng(0)))
    assert sorted(out) == items and out != items
    assert out == list(shuffled(items, 64, np.random.default_rng(0)))
    assert list(shuffled(items, 0, np.random.default_rng(0))) == items


def test_ranks_split_the_global_stream_exactly(tiny_config, tokenizer):
    cfg = tiny_config(train__micro_batch_size=2)
    single = TrainBatches(cfg, tokenizer)
    global_rows = [row.tolist() for _ in range(12) for row in next(single)[0]]
    ranks = [TrainBatches(cfg, tokenizer, rank=r, world_size=2) for r in range(2)]
    per_rank = [[row.tolist() for _ in range(6) for row in next(b)[0]] for b in ranks]
    # sequence i of the global stream goes to rank i % 2
    assert per_rank[0] == global_rows[0::2] and per_rank[1] == global_rows[1::2]
    assert collections.Counter(map(tuple, per_rank[0] + per_rank[1])) == collections.Counter(map(tuple, global_rows))


def test_batches_resume_from_state(tiny_config, tokenizer):
    cfg = tiny_config()
    first = TrainBatches(cfg, tokenizer)
    for _ in range(7):
        next(first)
    state = first.state_dict()
    expected = [next(first) for _ in range(3)]
    resumed = TrainBatches(cfg, tokenizer)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, [next(resumed) for _ in range(3)]):
        assert x.equal(rx) and y.equal(ry)


def test_labels_are_inputs_shifted(tiny_config, tokenizer):
    inputs, labels = next(TrainBatches(tiny_config(), tokenizer))
    assert inputs.shape == labels.shape == (4, 32)
    assert inputs[:, 1:].equal(labels[:, :-1])


def test_validation_batches_are_held_out_and_bounded(tiny_config, tokenizer):
    cfg = tiny_config()
    batches = validation_batches(cfg, tokenizer, max_batches=3)
    assert 1 <= len(batches) <= 3
    val_text = tokenizer.decode([t for x, _ in batches for t in x.flatten().tolist() if t > 3])
    train_docs = set(split_documents(cfg.data.sources[0], cfg.data.val_fraction, "train"))
    assert not any(val_text[:200] in doc for doc in train_docs)
    with pytest.raises(PretrainError, match="validation split is empty"):
        validation_batches(tiny_config(data__val_fraction=0.0, eval__every=0), tokenizer, 3)
