"""Sources: formats, chunking (every record in exactly one chunk), the held-out split, bad input."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest

from pretrain.config import SourceConfig
from pretrain.data.builtin import python_docs_documents
from pretrain.data.sources import BuiltinSource, FileSource, RecordErrors, is_validation
from pretrain.errors import PretrainError


def open_source(path, chunk_bytes=1 << 20, on_bad_record="error", text_field="text", val_fraction=0.0) -> FileSource:
    cfg = SourceConfig(name="s", path=str(path), text_field=text_field)
    return FileSource(cfg, val_fraction, on_bad_record, chunk_bytes)


def all_documents(source, policy="error") -> list[str]:
    errors = RecordErrors(source.name, policy)
    return [d for c in range(source.n_chunks) for d in source.documents(c, errors)]


def random_paragraph_text(rng: random.Random, n_docs: int) -> tuple[str, list[str]]:
    """Documents of 1-4 lines, separated by 1-3 blank (sometimes whitespace-only) lines."""
    docs, parts = [], []
    for i in range(n_docs):
        lines = [f"doc {i} line {j} " + "x" * rng.randrange(0, 300) for j in range(rng.randrange(1, 5))]
        docs.append("\n".join(lines))
        parts.append(docs[-1] + "\n" + "".join(rng.choice(["\n", "  \n", "\t\n"]) for _ in range(rng.randrange(1, 4))))
    return "".join(parts), docs


@pytest.mark.parametrize("seed", range(4))
def test_txt_chunks_hold_every_document_once(tmp_path, seed):
    rng = random.Random(seed)
    text, docs = random_paragraph_text(rng, 300)
    path = tmp_path / "a.txt"
    path.write_text(text)
    whole = all_documents(open_source(path, chunk_bytes=1 << 30))
    assert whole == docs
    for chunk_bytes in (4096, 5000, 9973):  # chunk boundaries fall anywhere, mid-line included
        source = open_source(path, chunk_bytes=chunk_bytes)
        assert source.n_chunks > 5
        assert all_documents(source) == docs


def test_jsonl_chunks_hold_every_record_once(tmp_path):
    rows = [{"text": f"record {i} " + "y" * (i % 97), "id": i} for i in range(2000)]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for chunk_bytes in (4096, 7777, 1 << 30):
        assert all_documents(open_source(path, chunk_bytes=chunk_bytes)) == [r["text"] for r in rows]


def test_txt_jsonl_parquet_and_compressed_formats(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    (tmp_path / "a.txt").write_text("first doc\nline two\n\nsecond doc\n\n\n\nthird\n")
    rows = [{"body": "json one", "id": 1}, {"body": "json two", "id": 2}, {"body": "", "id": 3}, {"body": None}]
    jsonl = "".join(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "b.jsonl").write_text(jsonl)
    (tmp_path / "c.jsonl.gz").write_bytes(gzip.compress(jsonl.encode()))
    (tmp_path / "d.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl.encode()))
    table = pa.table({"content": [f"parquet {i}" for i in range(100)]})
    pq.write_table(table, tmp_path / "e.parquet", row_group_size=30)

    assert all_documents(open_source(tmp_path / "a.txt")) == ["first doc\nline two", "second doc", "third"]
    for name in ("b.jsonl", "c.jsonl.gz", "d.jsonl.zst"):
        assert all_documents(open_source(tmp_path / name, text_field="body")) == ["json one", "json two"], name
    for chunk_bytes in (1 << 20, 4096):
        parquet = open_source(tmp_path / "e.parquet", chunk_bytes=chunk_bytes, text_field="content")
        assert all_documents(parquet) == [f"parquet {i}" for i in range(100)]
    # an fsspec URL goes through the same readers
    assert all_documents(open_source(f"file://{tmp_path}/b.jsonl", text_field="body")) == ["json one", "json two"]


def test_compressed_file_is_split_into_strided_parts(tmp_path):
    rows = "".join(json.dumps({"text": f"row {i} " + "z" * 200}) + "\n" for i in range(3000))
    (tmp_path / "big.jsonl.gz").write_bytes(gzip.compress(rows.encode()))
    source = open_source(tmp_path / "big.jsonl.gz", chunk_bytes=4096)
    assert source.n_chunks > 1  # it cannot seek, so parts take every n-th record
    docs = all_documents(source)
    assert sorted(docs) == sorted(json.loads(r)["text"] for r in rows.splitlines())


def test_glob_lists_files_in_sorted_order_and_fingerprint_tracks_them(tmp_path):
    for name in ("b", "a", "c"):
        (tmp_path / f"{name}.txt").write_text(f"doc {name}\n")
    source = open_source(tmp_path / "*.txt")
    assert [f.rsplit("/", 1)[1] for f in source.files] == ["a.txt", "b.txt", "c.txt"]
    assert all_documents(source) == ["doc a", "doc b", "doc c"]
    before = source.fingerprint
    assert open_source(tmp_path / "*.txt").fingerprint == before
    (tmp_path / "b.txt").write_text("doc b, longer now\n")
    assert open_source(tmp_path / "*.txt").fingerprint != before


def test_python_docs_is_real_deterministic_and_chunked():
    docs = list(python_docs_documents())
    assert len(docs) > 300 and sum(map(len, docs)) > 1_000_000
    assert any("assert" in d and "AssertionError" in d for d in docs)
    assert docs == list(python_docs_documents())
    source = BuiltinSource(SourceConfig(name="docs", path="python-docs"), 0.0, "error", 16384)
    assert source.n_chunks >= 50
    assert all_documents(source) == docs


def test_validation_split_is_disjoint_stable_and_sized():
    source = BuiltinSource(SourceConfig(name="docs", path="python-docs"), 0.1, "error", 1 << 20)
    errors = RecordErrors("docs", "error")
    train, val = [], []
    for chunk in range(source.n_chunks):
        t, v = source.split_documents(chunk, errors)
        train += t
        val += v
    everything = list(python_docs_documents())
    assert len(train) + len(val) == len(everything) and not set(train) & set(val)
    assert 0.05 < len(val) / len(everything) < 0.15
    assert all(is_validation(d, 0.1) for d in val)
    assert not any(is_validation(d, 0.0) for d in everything)


# ---- bad input: a clear error naming file, line and option, or a counted skip ----

BAD_JSONL = '{"text": "good one"}\n{"text": "broken\n{"body": "no text field"}\n{"text": 7}\n[1, 2]\n{"text": "good two"}\n'


def test_bad_json_line_names_file_line_and_option(tmp_path):
    (tmp_path / "b.jsonl").write_text(BAD_JSONL)
    with pytest.raises(PretrainError, match=r"b\.jsonl line 2: not valid JSON") as info:
        all_documents(open_source(tmp_path / "b.jsonl"))
    assert "data.on_bad_record=skip" in str(info.value) and "data source 's'" in str(info.value)


def test_each_kind_of_bad_record_is_reported(tmp_path):
    lines = BAD_JSONL.splitlines(keepends=True)
    expected = {1: "not valid JSON", 2: r"no field 'text' \(fields: body\); set text_field",
                3: "field 'text' is a int, not text", 4: "a JSON list, not an object"}
    for index, message in expected.items():
        (tmp_path / "one.jsonl").write_text(lines[0] + lines[index])
        with pytest.raises(PretrainError, match=rf"one\.jsonl line 2: {message}"):
            all_documents(open_source(tmp_path / "one.jsonl"))


def test_skip_policy_counts_bad_records_and_keeps_good_ones(tmp_path):
    (tmp_path / "b.jsonl").write_bytes(BAD_JSONL.encode() + b'{"text": "caf\xe9"}\n')  # Latin-1, not UTF-8
    source = open_source(tmp_path / "b.jsonl", on_bad_record="skip")
    errors = RecordErrors("s", "skip")
    docs = [d for c in range(source.n_chunks) for d in source.documents(c, errors)]
    assert docs == ["good one", "good two"]
    assert errors.skipped == 5


def test_non_utf8_text_names_the_line(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"fine\n\nstill fine\nmore\n\nbad \xff\xfe bytes\n")
    with pytest.raises(PretrainError, match=r"a\.txt line 6: bytes that are not UTF-8.*convert the file to UTF-8"):
        all_documents(open_source(tmp_path / "a.txt"))


def test_truncated_gzip_is_an_error_or_a_counted_skip(tmp_path):
    rows = "".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(5000)).encode()
    data = gzip.compress(rows)
    (tmp_path / "t.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(PretrainError, match=r"t\.jsonl\.gz: corrupt or truncated gzip data"):
        all_documents(open_source(tmp_path / "t.jsonl.gz"))
    source = open_source(tmp_path / "t.jsonl.gz", on_bad_record="skip")
    errors = RecordErrors("s", "skip")
    docs = [d for c in range(source.n_chunks) for d in source.documents(c, errors)]
    assert 0 < len(docs) < 5000  # the records before the damage, each once
    assert sorted(docs, key=lambda d: int(d.split()[1])) == [f"row {i}" for i in range(len(docs))]
    assert errors.skipped == 1


def test_corrupt_parquet_and_missing_column_fail_when_the_source_opens(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(PretrainError, match=r"junk\.parquet is not a readable parquet file"):
        open_source(tmp_path / "junk.parquet")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(PretrainError, match=r"has no column 'text' \(columns: body\); set text_field"):
        open_source(tmp_path / "p.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    with pytest.raises(PretrainError, match="holds int64, not text"):
        open_source(tmp_path / "n.parquet")


def test_missing_file_and_unsupported_type_are_errors(tmp_path):
    with pytest.raises(PretrainError, match=r"data source 's': path '.*nothing-\*\.jsonl' matches no file; check"):
        open_source(tmp_path / "nothing-*.jsonl")
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(PretrainError, match=r"data source 's': path .* unsupported file type \(notes\.md\); a source"):
        open_source(tmp_path / "*.md")
    with pytest.raises(PretrainError, match="matches no file"):
        open_source(f"file://{tmp_path}/absent.jsonl")


def test_chunk_table_is_built_from_sizes_alone(tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": "t" * 100}) + "\n" for _ in range(1000)))
    source = open_source(tmp_path / "a.jsonl", chunk_bytes=8192)
    starts, ends = source.chunks[:, 1], source.chunks[:, 2]
    assert starts[0] == 0 and ends[-1] == source.sizes[0]
    assert np.array_equal(starts[1:], ends[:-1])  # contiguous byte ranges, no gap or overlap
