"""One source over many files: a glob or a list of paths and globs, any mix of file types, with
the same order, resume, held-out split and fingerprint guarantees as one file; the errors and
warnings that name the file (a pattern matching nothing, empty files, skipped bad records)."""

from __future__ import annotations

import gzip
import json
import logging
import re

import numpy as np
import pytest

from pretrain.config import SourceConfig
from pretrain.data import TrainData, open_sources
from pretrain.data.prepared import prepare
from pretrain.data.sources import FileSource, RecordErrors, is_validation
from pretrain.errors import ConfigError, PretrainError
from tests.conftest import STREAMED, take, train_data


def write_mixed(directory, n: int = 30) -> list[str]:
    """.jsonl, .jsonl.gz, .jsonl.zst, .txt and .parquet files in `directory`; their documents in
    the order a glob over the directory reads them (file names sorted)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    directory.mkdir(parents=True, exist_ok=True)
    texts = {name: [f"{name} record {i} about the quarterly report" for i in range(n)]
             for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.txt", "e.parquet")}
    lines = {name: "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts[name])).encode()
             for name in ("a.jsonl", "b.jsonl.gz", "c.jsonl.zst")}
    (directory / "a.jsonl").write_bytes(lines["a.jsonl"])
    (directory / "b.jsonl.gz").write_bytes(gzip.compress(lines["b.jsonl.gz"]))
    (directory / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines["c.jsonl.zst"]))
    (directory / "d.txt").write_text("\n\n".join(texts["d.txt"]) + "\n")
    pq.write_table(pa.table({"text": texts["e.parquet"]}), directory / "e.parquet", row_group_size=7)
    return [t for name in sorted(texts) for t in texts[name]]


def training_texts(data: TrainData, tokenizer, i: int = 0) -> list[str]:
    """The documents of indexed source i's token stream, decoded, in order."""
    tokens = np.asarray(data.indexed[i].tokens).tolist()
    docs, current = [], []
    for t in tokens:
        if t == tokenizer.eos_id:
            docs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(t)
    return docs


def sources_override(path, **extra) -> str:
    fields = ", ".join(f"{k}: {v}" for k, v in extra.items())
    return f"[{{name: fin, path: {path}, weight: 1.0{', ' + fields if fields else ''}}}]"


def test_a_glob_over_mixed_file_types_reads_every_record_of_every_file(mixed_config, tokenizer, tmp_path):
    expected = write_mixed(tmp_path / "fin")
    # the whole directory, and a glob over the three JSON Lines flavours
    cfg = mixed_config(data__sources=sources_override(f"'{tmp_path}/fin/*'"), data__val_fraction=0.0)
    data = train_data(cfg, tokenizer)
    assert [f.rsplit("/", 1)[1] for f in data.sources[0].files] == [
        "a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.txt", "e.parquet"]
    assert training_texts(data, tokenizer) == expected
    cfg = mixed_config(data__sources=sources_override(f"'{tmp_path}/fin/*.jsonl*'"), data__val_fraction=0.0)
    assert training_texts(train_data(cfg, tokenizer), tokenizer) == expected[: 3 * 30]


def test_a_list_of_paths_and_globs_is_one_source_in_the_order_given(mixed_config, tokenizer, tmp_path):
    expected = write_mixed(tmp_path / "fin")
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "z.jsonl").write_text(json.dumps({"text": "the last record, from another directory"}) + "\n")
    patterns = [f"{tmp_path}/more/*.jsonl", f"{tmp_path}/fin/*.jsonl.*", f"{tmp_path}/fin/e.parquet",
                f"{tmp_path}/fin/b.jsonl.gz"]
    paths = "[" + ", ".join(f"'{p}'" for p in patterns) + "]"
    cfg = mixed_config(data__sources=sources_override(paths), data__val_fraction=0.0)
    assert cfg.data.sources[0].path == patterns
    data = train_data(cfg, tokenizer)
    # each pattern's matches sorted, the patterns in order; b.jsonl.gz, matched twice, is read once
    assert [f.rsplit("/", 1)[1] for f in data.sources[0].files] == ["z.jsonl", "b.jsonl.gz", "c.jsonl.zst",
                                                                    "e.parquet"]
    texts = training_texts(data, tokenizer)
    assert texts == ["the last record, from another directory"] + expected[30:90] + expected[120:]
    # a string and a list of that one string are the same source (same stream, same checkpoints)
    one = FileSource(SourceConfig(name="fin", path=f"{tmp_path}/fin/*"), 0.0, "error", 4096)
    listed = FileSource(SourceConfig(name="fin", path=[f"{tmp_path}/fin/*"]), 0.0, "error", 4096)
    assert one.fingerprint == listed.fingerprint and one.files == listed.files
    swapped = FileSource(SourceConfig(name="fin", path=[f"{tmp_path}/fin/e.parquet", f"{tmp_path}/fin/a.jsonl"]),
                         0.0, "error", 4096)
    in_order = FileSource(SourceConfig(name="fin", path=[f"{tmp_path}/fin/a.jsonl", f"{tmp_path}/fin/e.parquet"]),
                          0.0, "error", 4096)
    assert swapped.fingerprint != in_order.fingerprint  # another file order is another stream


def test_a_mixed_source_splits_held_out_documents_and_resumes_exactly(mixed_config, tokenizer, tmp_path):
    expected = write_mixed(tmp_path / "fin", n=200)
    sources = sources_override(f"['{tmp_path}/fin/*.jsonl*', '{tmp_path}/fin/[de].*']")
    cfg = mixed_config(data__sources=sources, data__val_fraction=0.2, data__chunk_bytes=4096)
    (source,) = open_sources(cfg.data)
    assert source.n_chunks > 5  # several chunks per file: byte ranges, strided parts, row ranges
    errors = RecordErrors(source.name, "error")
    train, val = [], []
    for chunk in range(source.n_chunks):
        t, v = source.split_documents(chunk, errors)
        train += t
        val += v
    assert sorted(train + val) == sorted(expected) and not set(train) & set(val)
    assert 0.1 < len(val) / len(expected) < 0.3
    # streamed through lanes: a resume in the middle continues with the very same batches
    streamed = mixed_config(data__sources=sources, data__val_fraction=0.2, data__chunk_bytes=4096, **STREAMED)
    whole = take(train_data(streamed, tokenizer), steps=12)
    first = train_data(streamed, tokenizer)
    assert take(first, steps=5) == whole[:5]
    state = first.state_dict()
    resumed = train_data(streamed, tokenizer)
    resumed.load_state_dict(state)
    assert take(resumed, steps=7) == whole[5:]


def test_pretrain_data_prepare_takes_a_mixed_list_source(mixed_config, tokenizer, tmp_path):
    expected = write_mixed(tmp_path / "fin")
    sources = sources_override(f"['{tmp_path}/fin/a.jsonl', '{tmp_path}/fin/[b-e]*']")
    in_memory = mixed_config(data__sources=sources)
    prepared = mixed_config(data__sources=sources, data__prepared_dir=str(tmp_path / "prepared"))
    (manifest,) = prepare(prepared, tokenizer, workers=1, progress=False)
    assert manifest["train_documents"] == sum(not is_validation(t, 0.1) for t in expected) > 100
    from_shards, from_files = train_data(prepared, tokenizer), train_data(in_memory, tokenizer)
    assert np.array_equal(from_shards.indexed[0].tokens, from_files.indexed[0].tokens)
    assert from_shards.fingerprint == from_files.fingerprint


# ---- what the config check and the source say about paths ----

def config_problems(mixed_config, sources: str) -> str:
    with pytest.raises(ConfigError) as info:
        mixed_config(data__sources=sources)
    return str(info.value)


def test_a_pattern_that_matches_nothing_names_the_source_the_pattern_and_the_fix(mixed_config, tmp_path):
    write_mixed(tmp_path / "fin")
    text = config_problems(mixed_config, sources_override(f"['{tmp_path}/fin/*.jsonl', '{tmp_path}/nope/*.parquet']"))
    assert f"data.sources[0].path[1]='{tmp_path}/nope/*.parquet' (source 'fin') matches no file; check the path" in text
    assert "path[0]" not in text
    with pytest.raises(PretrainError, match=r"data source 'fin': path '.*/nope/\*\.parquet' matches no file; check"):
        FileSource(SourceConfig(name="fin", path=[f"{tmp_path}/fin/*", f"{tmp_path}/nope/*.parquet"]), 0.0, "error",
                   4096)
    text = config_problems(mixed_config, sources_override(f"'{tmp_path}/fin'"))
    assert f"(source 'fin') is a directory; use a glob for the files in it, e.g. '{tmp_path}/fin/*'" in text


def test_files_a_source_cannot_read_and_wrong_path_values_are_config_errors(mixed_config, tmp_path):
    write_mixed(tmp_path / "fin")
    (tmp_path / "fin" / "README.md").write_text("about this data")
    (tmp_path / "fin" / "_SUCCESS").write_text("")
    text = config_problems(mixed_config, sources_override(f"'{tmp_path}/fin/*'"))
    assert "matches 2 file(s) of an unsupported file type (README.md, _SUCCESS)" in text
    assert "narrow the glob (e.g. '*.jsonl*') or list the globs to read" in text
    with pytest.raises(PretrainError, match=r"data source 'fin': path .* unsupported file type \(README\.md"):
        FileSource(SourceConfig(name="fin", path=f"{tmp_path}/fin/*"), 0.0, "error", 4096)
    for path, expected in [("[]", "data.sources[0].path=[] must be a file, glob or URL, or a list of them"),
                           ("7", "data.sources[0].path=7 must be a file, glob or URL, or a list of them"),
                           (f"['{tmp_path}/fin/a.jsonl', 3]", "data.sources[0].path[1]=3 must be a file, a glob or"),
                           (f"['{tmp_path}/fin/a.jsonl', '']", "data.sources[0].path[1] is empty"),
                           (f"['{tmp_path}/fin/a.jsonl', python-docs]",
                            "path[1]='python-docs' is a built-in corpus, not a file: give it a data.sources entry")]:
        assert expected in config_problems(mixed_config, sources_override(path)), path


# ---- empty files ----

@pytest.mark.parametrize("name", ["empty.jsonl", "empty.txt", "empty.jsonl.gz"])
def test_an_empty_file_is_an_error_that_names_it(mixed_config, tokenizer, tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(PretrainError) as info:
        train_data(mixed_config(data__sources=sources_override(f"'{tmp_path}/{name}'")), tokenizer)
    assert f"data source 'fin': {tmp_path}/{name} is empty, so the source holds no documents; fill it" \
        in str(info.value)
    (tmp_path / "blank.txt").write_text("\n  \n\n")  # not empty, but no document either
    with pytest.raises(PretrainError, match=rf"'fin' has no training documents in {re.escape(str(tmp_path))}/blank"):
        train_data(mixed_config(data__sources=sources_override(f"'{tmp_path}/blank.txt'")), tokenizer)


def test_empty_files_beside_others_are_named_in_a_warning(mixed_config, tokenizer, tmp_path, caplog):
    expected = write_mixed(tmp_path / "fin")
    (tmp_path / "fin" / "f.jsonl").write_bytes(b"")
    (tmp_path / "fin" / "g.txt").write_bytes(b"")
    cfg = mixed_config(data__sources=sources_override(f"'{tmp_path}/fin/*'"), data__val_fraction=0.0)
    with caplog.at_level(logging.WARNING):
        data = train_data(cfg, tokenizer)
    assert f"data source 'fin': 2 of its files are empty and add no documents: {tmp_path}/fin/f.jsonl, " \
           f"{tmp_path}/fin/g.txt" in caplog.text
    assert training_texts(data, tokenizer) == expected
    both_empty = sources_override(f"['{tmp_path}/fin/f.jsonl', '{tmp_path}/fin/g.txt']")
    with pytest.raises(PretrainError, match=r"its 2 files .*/f\.jsonl, .*/g\.txt are empty"):
        train_data(mixed_config(data__sources=both_empty), tokenizer)


# ---- skipped bad records: one warning per file, with the count and the first one ----

def bad_file(path, good: int = 40) -> list[str]:
    """JSON Lines with 3 bad records (lines 17, 25 and 31) among `good` good ones (compressed
    for a .gz or .zst name); the good texts."""
    import zstandard

    lines = [json.dumps({"text": f"good record {i} of the ledger"}) for i in range(good)]
    lines.insert(16, '{"text": "cut off')
    lines.insert(24, json.dumps({"body": "no text field"}))
    lines.insert(30, "[1, 2, 3]")
    content = ("\n".join(lines) + "\n").encode()
    if path.name.endswith(".gz"):
        content = gzip.compress(content)
    elif path.name.endswith(".zst"):
        content = zstandard.ZstdCompressor().compress(content)
    path.write_bytes(content)
    return [f"good record {i} of the ledger" for i in range(good)]


@pytest.mark.parametrize("mode", [{}, STREAMED], ids=["indexed", "streamed"])
def test_skipped_records_are_logged_once_per_file_with_count_and_first_place(mixed_config, tokenizer, tmp_path,
                                                                           caplog, mode):
    bad_file(tmp_path / "x.jsonl")
    bad_file(tmp_path / "y.jsonl.zst")
    (tmp_path / "fine.jsonl").write_text(json.dumps({"text": "nothing wrong here"}) + "\n")
    cfg = mixed_config(data__sources=sources_override(f"'{tmp_path}/*.jsonl*'"), data__on_bad_record="skip",
                       **mode)
    with caplog.at_level(logging.WARNING):
        data = train_data(cfg, tokenizer)
        take(data, steps=30)  # streamed: every chunk is read again and again (epochs, strided parts)
    lines = [r.getMessage() for r in caplog.records if "bad record" in r.getMessage()]
    assert len(lines) == 2, lines  # one per file with bad records, however often it is read
    x, y = (next(line for line in lines if f"{tmp_path}/{name} " in line) for name in ("x.jsonl", "y.jsonl.zst"))
    assert x.startswith(f"data source 'fin': skipped 3 bad records in {tmp_path}/x.jsonl (first at line 17: "
                        "not valid JSON")
    assert "further ones in this file are counted in metrics.jsonl (bad_records), not logged" in x
    assert y.startswith(f"data source 'fin': skipped 3 bad records in {tmp_path}/y.jsonl.zst (first at line 17: ")
    assert data.metrics()["bad_records"]["fin"] >= 6


def test_a_reader_logs_when_done_and_a_second_pass_only_counts(tmp_path, caplog):
    good = bad_file(tmp_path / "z.jsonl")
    source = FileSource(SourceConfig(name="z", path=str(tmp_path / "z.jsonl")), 0.0, "skip", 4096)
    with caplog.at_level(logging.WARNING):
        errors = RecordErrors("z", "skip")
        assert list(source.documents(0, errors)) == good
        assert not caplog.records  # nothing is logged until the reader has finished its part
        errors.log_skipped()
        again = RecordErrors("z", "skip")
        assert list(source.documents(0, again)) == good
        again.log_skipped()
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith(f"data source 'z': skipped 3 bad records in {tmp_path}/z.jsonl (first at line 17: ")
    assert errors.skipped == again.skipped == 3
