"""Prepared token shards: the same stream as tokenizing on the fly, checked against stale or foreign input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from pretrain.config import SourceConfig
from pretrain.data.prepared import prepare
from pretrain.errors import PretrainError
from tests.conftest import held_out, pydoc_documents, take, train_data


@pytest.fixture
def prepared_config(mixed_config, tmp_path):
    """Factory: the two-source config (plus a tiny third source, split in document-strided parts)
    reading from prepared shards in tmp_path/prepared."""
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": f"short note {i} about finance"}) + "\n" for i in range(40)))

    def make(prepared: bool, **extra):
        cfg = mixed_config(**extra)
        sources = [*cfg.data.sources, SourceConfig(name="small", path=str(small), weight=0.2)]
        directory = str(tmp_path / "prepared") if prepared else None
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, sources=sources, prepared_dir=directory))

    return make


def test_prepared_shards_give_exactly_the_batches_of_the_source_tokenized_in_memory(prepared_config, tokenizer):
    in_memory_cfg = prepared_config(prepared=False)
    cfg = prepared_config(prepared=True)
    manifests = prepare(cfg, tokenizer, workers=2, progress=False)
    assert [m["source"] for m in manifests] == ["topics", "paragraphs", "small"]
    for m in manifests:
        directory = Path(cfg.data.prepared_dir) / m["source"]
        assert m["dtype"] == "uint16" and m["tokenizer_sha256"] == tokenizer.sha256
        assert (directory / "tokens.bin").stat().st_size == 2 * m["train_tokens"] > 0
        assert (directory / "val.bin").stat().st_size == 2 * m["val_tokens"]
    in_memory = train_data(in_memory_cfg, tokenizer)
    from_shards = train_data(cfg, tokenizer)
    assert np.array_equal(from_shards.indexed[0].tokens, in_memory.indexed[0].tokens)
    assert from_shards.fingerprint == in_memory.fingerprint  # a checkpoint resumes in either mode
    assert take(from_shards, steps=30) == take(in_memory, steps=30)
    for (x, y), (a, b) in zip(held_out(cfg, tokenizer, 3), held_out(in_memory_cfg, tokenizer, 3)):
        assert x.equal(a) and y.equal(b)
    # a source streamed chunk by chunk gives another stream: resuming it from shards is refused
    streamed = train_data(prepared_config(prepared=False, data__in_memory_max_bytes=0), tokenizer)
    take(streamed, steps=2)
    with pytest.raises(PretrainError, match=r"\('topics'\): read streamed in the checkpoint, indexed now"):
        train_data(cfg, tokenizer).load_state_dict(streamed.state_dict())


def test_prepare_skips_up_to_date_sources_and_checks_what_it_reads(prepared_config, tokenizer, tmp_path,
                                                                   corpus_file):
    cfg = prepared_config(prepared=True)
    prepare(cfg, tokenizer, workers=1, progress=False)
    tokens = Path(cfg.data.prepared_dir) / "small" / "tokens.bin"
    written = tokens.stat().st_mtime_ns
    prepare(cfg, tokenizer, workers=1, progress=False)
    assert tokens.stat().st_mtime_ns == written  # up to date: not rewritten

    from tokenizer import train_tokenizer

    other = train_tokenizer(pydoc_documents(40), 400, tmp_path / "other.model")
    with pytest.raises(PretrainError, match=r"tokenized with another tokenizer .* re-run `pretrain data prepare"):
        train_data(cfg, other)
    small = tmp_path / "small.jsonl"
    small.write_text(small.read_text() + json.dumps({"text": "one more"}) + "\n")
    with pytest.raises(PretrainError, match=r"shards of source 'small' .* are stale"):
        train_data(prepared_config(prepared=True), tokenizer)


def test_a_source_that_was_not_prepared_names_the_command(prepared_config, tokenizer, tmp_path):
    cfg = prepared_config(prepared=True)
    with pytest.raises(PretrainError, match=r"holds no prepared source 'topics' .* run `pretrain data prepare`"):
        train_data(cfg, tokenizer)
    # a half-written source (the temporary directory of a crashed prepare) is not taken for one
    (tmp_path / "prepared" / ".tmp_topics").mkdir(parents=True)
    with pytest.raises(PretrainError, match="holds no prepared source 'topics'"):
        train_data(cfg, tokenizer)


def test_prepare_needs_a_directory():
    from pretrain.config import load_config

    cfg = load_config(None, [], world_size=1)
    with pytest.raises(PretrainError, match="set data.prepared_dir"):
        prepare(cfg, None)
