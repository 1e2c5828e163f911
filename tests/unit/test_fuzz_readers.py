"""Fuzzing the data readers (issue 8, "Bad input, everywhere"): whatever a data file holds
(truncated or corrupt gzip/zstd, binary garbage under any name, invalid UTF-8, JSON of the wrong
shape, damaged parquet), reading it yields documents, counts skips under data.on_bad_record=skip,
or raises PretrainError naming the file and the fix; never a library's exception, never a hang."""

from __future__ import annotations

import gzip
import io
import json
import re
import string
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pretrain.config import DataConfig, SourceConfig
from pretrain.data.prepared import FORMAT, VERSION, PreparedSource
from pretrain.data.sources import FileSource, RecordErrors
from pretrain.errors import PretrainError
from tests.conftest import time_limit

FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
READ_SECONDS = 20  # a small file reads in milliseconds; this only turns a hang into a failure
WHOLE, SMALL = 1 << 30, 4096  # chunk sizes: the file in one chunk, and the smallest data.chunk_bytes
# Chunks far smaller than data.chunk_bytes allows, so that small files have many chunk boundaries.
TINY_CHUNKS = st.sampled_from([61, 256, 1000, SMALL])
FIX = re.compile(r"\b(fix|set|replace|convert|remove|use|re-run)\b")



def read(path: Path, policy: str = "error", chunk_bytes: int = WHOLE, seconds: float = READ_SECONDS
         ) -> tuple[list[str], int] | PretrainError:
    """(every document, records skipped) of the file, or the PretrainError that reading raised,
    which must name the file and a fix. Any other exception fails the test."""
    with time_limit(seconds, "reading"):
        try:
            source = FileSource(SourceConfig(name="s", path=str(path)), 0.0, policy, chunk_bytes)
            errors = RecordErrors("s", policy)
            docs = [doc for chunk in range(source.n_chunks) for doc in source.documents(chunk, errors)]
        except PretrainError as exc:
            assert path.name in str(exc) and FIX.search(str(exc)), str(exc)
            return exc
    assert all(isinstance(d, str) and d.strip() for d in docs)
    for doc in docs:
        doc.encode("utf-8")  # what the tokenizer gets is Unicode text (no lone surrogates)
    return docs, errors.skipped


# ---- file contents ----

good_text = st.text(st.characters(blacklist_categories=["Cs", "Cc"]), min_size=1, max_size=40).filter(str.strip)
long_text = st.integers(1, 3000).map(lambda n: "word " * n)  # crosses 4096-byte chunk boundaries
some_text = st.one_of(good_text, good_text, good_text, long_text)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)
jsonl_lines = st.one_of(
    st.builds(lambda t: json.dumps({"text": t, "id": 1}), some_text),  # good records, often
    st.builds(lambda t: json.dumps({"text": t, "id": 1}), some_text),
    st.builds(lambda t: json.dumps({"text": t}, ensure_ascii=False), good_text),
    json_values.map(lambda v: json.dumps({"text": v})),  # the text field of any type
    json_values.map(json.dumps),  # a top-level array, number, string, null, or an object without 'text'
    st.sampled_from(['{"text": "\\ud800 lone"}', '{"text": NaN}', "[" * 3000, '{"text": "a"', "", "   ",
                     '{"text": "a"}{"text": "b"}', '{"body": "wrong field"}', "not json",
                     '{"text": 1' + "0" * 5000 + "}"]),
    st.text(max_size=30),  # not JSON
)
txt_lines = st.one_of(some_text, st.sampled_from(["", "", " ", "\t", "\r"]), st.text(max_size=30))


@st.composite
def jsonl_bytes(draw) -> bytes:
    lines = [line.encode("utf-8", "surrogatepass") for line in draw(st.lists(jsonl_lines, max_size=40))]
    for _ in range(draw(st.integers(0, 2))):  # lines that are not UTF-8
        lines.insert(draw(st.integers(0, len(lines))), draw(st.binary(min_size=1, max_size=20)).replace(b"\n", b""))
    end = draw(st.sampled_from([b"\n", b"\r\n"]))
    return end.join(lines) + draw(st.sampled_from([end, b""]))


@st.composite
def txt_bytes(draw) -> bytes:
    lines = [line.encode("utf-8", "surrogatepass") for line in draw(st.lists(txt_lines, max_size=60))]
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.binary(max_size=30)))
    return b"\n".join(lines) + draw(st.sampled_from([b"\n", b""]))


def compress(data: bytes, compression: str, frames: int = 1) -> bytes:
    if compression == "gz":
        return gzip.compress(data)
    if compression == "zst":
        step = -(-len(data) // frames) or 1  # several frames, as pzstd and concatenated files have
        return b"".join(zstandard.ZstdCompressor().compress(data[i:i + step]) for i in range(0, len(data) or 1, step))
    return data


@st.composite
def damage(draw, data: bytes) -> bytes:
    """The bytes cut short, flipped at a few places, or left as they are."""
    kind = draw(st.sampled_from(["none", "none", "truncate", "flip", "append"]))
    if kind == "truncate" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "flip" and data:
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 4))):
            out[draw(st.integers(0, len(out) - 1))] ^= draw(st.integers(1, 255))
        return bytes(out)
    if kind == "append":
        return data + draw(st.binary(min_size=1, max_size=20))
    return data


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz_readers")


# ---- properties ----

@FUZZ
@given(data=st.data(), kind=st.sampled_from(["jsonl", "json", "txt"]), compression=st.sampled_from(["", "gz", "zst"]),
       chunk_bytes=TINY_CHUNKS)
def test_text_files_read_skip_or_name_the_file(workdir, data, kind, compression, chunk_bytes):
    """Uncompressed, gzip and zstd .jsonl/.json/.txt files, with bad records and damaged streams:
    with `skip` reading never fails and counts what it drops; with `error` it fails exactly when
    `skip` counted something, and otherwise yields the same documents; chunking changes nothing."""
    content = data.draw(txt_bytes() if kind == "txt" else jsonl_bytes())
    raw = data.draw(damage(compress(content, compression, data.draw(st.integers(1, 3)))))
    path = workdir / (f"f.{kind}" + (f".{compression}" if compression else ""))
    path.write_bytes(raw)

    skipped = read(path, "skip")
    assert not isinstance(skipped, PretrainError), f"skip must not fail: {skipped}"
    docs, n_skipped = skipped
    strict = read(path, "error")
    if n_skipped:
        assert isinstance(strict, PretrainError)
        assert "data.on_bad_record=skip" in str(strict)
        if not compression:  # the line of the first bad record (compressed damage names the byte)
            assert re.search(rf"{re.escape(path.name)} line \d+: ", str(strict)), str(strict)
    else:
        assert strict == (docs, 0)
    chunked_docs, chunked_skipped = read(path, "skip", chunk_bytes=chunk_bytes)
    if compression:  # a compressed file cannot seek: its parts take every n-th record
        assert sorted(chunked_docs) == sorted(docs)
    else:
        assert chunked_docs == docs
    assert chunked_skipped == n_skipped


paragraph = st.lists(st.text(string.ascii_letters + " ", min_size=1, max_size=50).filter(str.strip), min_size=1,
                     max_size=4).map("\n".join)


@FUZZ
@given(kind=st.sampled_from(["txt", "jsonl"]), docs=st.lists(paragraph, max_size=40), chunk_bytes=TINY_CHUNKS,
       separators=st.lists(st.sampled_from(["\n", "\n\n", "\n \n", "\n\t\n\n"]), min_size=40, max_size=40))
def test_chunks_anywhere_hold_every_document_once(workdir, kind, docs, chunk_bytes, separators):
    """Well-formed files cut into chunks at every kind of place (mid-line, at a line start, in a
    run of blank lines) give exactly their documents, in order."""
    if kind == "txt":  # documents are paragraphs: the separator after each holds a blank line
        text = "".join(doc + ("\n\n" if sep == "\n" else sep) for doc, sep in zip(docs, separators))
    else:
        text = "".join(json.dumps({"text": doc}) + "\n" for doc in docs)
    path = workdir / f"good.{kind}"
    path.write_text(text)
    assert read(path, chunk_bytes=chunk_bytes) == (docs, 0)


@FUZZ
@given(raw=st.one_of(st.binary(max_size=300), st.binary(max_size=40).map(lambda b: b"\x1f\x8b" + b),
                     st.binary(max_size=40).map(lambda b: b"\x28\xb5\x2f\xfd" + b),
                     st.binary(max_size=40).map(lambda b: b"PAR1" + b + b"PAR1")),
       name=st.sampled_from(["g.txt", "g.jsonl", "g.json", "g.parquet", "g.txt.gz", "g.jsonl.gz", "g.json.zst",
                             "g.txt.zst", "g.jsonl.zstd"]),
       policy=st.sampled_from(["error", "skip"]))
def test_binary_garbage_under_any_name_reads_skips_or_names_the_file(workdir, raw, name, policy):
    path = workdir / name
    path.write_bytes(raw)
    result = read(path, policy)
    if isinstance(result, PretrainError) and policy == "skip":
        assert name.endswith(".parquet")  # only a file that cannot be opened at all fails under skip


@st.composite
def parquet_bytes(draw) -> bytes:
    column = draw(st.sampled_from(["text", "text", "body"]))
    rows = draw(st.integers(0, 60))
    values = draw(st.sampled_from(["text", "text", "int", "binary"]))
    if values == "text":
        array = pa.array([draw(st.none() | good_text) for _ in range(rows)], pa.string())
    elif values == "int":
        array = pa.array(list(range(rows)), pa.int64())
    else:
        array = pa.array([b"\xff\xfe"] * rows, pa.binary())
    buffer = io.BytesIO()
    pq.write_table(pa.table({column: array}), buffer, row_group_size=draw(st.integers(1, 30)),
                   compression=draw(st.sampled_from(["none", "snappy", "zstd"])))
    return buffer.getvalue()


@FUZZ
@given(data=st.data(), policy=st.sampled_from(["error", "skip"]), chunk_bytes=TINY_CHUNKS)
def test_parquet_files_damaged_anywhere_read_skip_or_name_the_file(workdir, data, policy, chunk_bytes):
    path = workdir / "p.parquet"
    path.write_bytes(data.draw(damage(data.draw(parquet_bytes()))))
    result = read(path, policy)
    if not isinstance(result, PretrainError):  # row groups, whole or in ranges of rows, give the same documents
        chunked = read(path, policy, chunk_bytes=chunk_bytes)
        assert chunked[0] == result[0]
        assert policy == "skip" or chunked[1] == result[1] == 0


def test_empty_files_have_no_documents(workdir):
    for name in ("e.txt", "e.jsonl", "e.json", "e.txt.gz", "e.jsonl.zst"):
        (workdir / name).write_bytes(b"")
        assert read(workdir / name) == ([], 0)
    (workdir / "e.parquet").write_bytes(b"")
    assert "e.parquet is not a readable parquet file" in str(read(workdir / "e.parquet"))


# ---- damage that was a library's exception, a silent loss or a hang, and what it is now ----

ROWS = b"".join(json.dumps({"text": f"row {i} " + "x" * (i % 50)}).encode() + b"\n" for i in range(3000))
GZ = gzip.compress(ROWS)


@pytest.mark.parametrize("name, raw, expected", [
    # zstandard's stream_reader ended quietly inside a frame: the tail of a cut download was lost
    ("cut.jsonl.zst", zstandard.ZstdCompressor().compress(ROWS)[:-100],
     r"cut\.jsonl\.zst: corrupt or truncated zstd data .*the file ends inside a zstd frame \(it is truncated\)"),
    # zstandard.ZstdError went through unwrapped
    ("junk.jsonl.zst", b"not zstd at all" * 10, r"junk\.jsonl\.zst: corrupt or truncated zstd data .*not zstd data"),
    ("tail.jsonl.zst", zstandard.ZstdCompressor().compress(ROWS) + b"trailing junk",
     r"tail\.jsonl\.zst: corrupt or truncated zstd data"),
    # zlib.error went through unwrapped
    ("bits.jsonl.gz", GZ[:20] + bytes(b ^ 0x55 for b in GZ[20:60]) + GZ[60:],
     r"bits\.jsonl\.gz: corrupt or truncated gzip data .*Error -3 while decompressing"),
    # RecursionError from json
    ("deep.jsonl", b'{"text": "ok"}\n' + b"[" * 100_000 + b"\n", r"deep\.jsonl line 2: JSON nested too deeply"),
    # a lone surrogate passed as text and failed later in the tokenizer with a TypeError
    ("sur.jsonl", b'{"text": "a \\udc80 b"}\n', r"sur\.jsonl line 1: field 'text' holds the lone surrogate '\\udc80'"),
])
def test_damage_that_escaped_as_a_library_error_is_named(workdir, name, raw, expected):
    path = workdir / name
    path.write_bytes(raw)
    error = read(path)
    assert isinstance(error, PretrainError), f"read without an error: {error}"
    assert re.search(expected, str(error)), str(error)
    assert read(path, "skip")[1] == 1


def test_damaged_parquet_pages_name_the_row_group(workdir):
    """pyarrow's OSError from a damaged data page went through unwrapped."""
    table = pa.table({"text": [f"parquet row {i} " * 20 for i in range(300)]})
    pq.write_table(table, workdir / "ok.parquet", row_group_size=100, compression="snappy")
    raw = bytearray((workdir / "ok.parquet").read_bytes())
    for i in range(100, 400, 7):  # inside the first row group's data page; the footer stays intact
        raw[i] ^= 0xFF
    (workdir / "bad.parquet").write_bytes(bytes(raw))
    error = read(workdir / "bad.parquet")
    assert re.search(r"bad\.parquet row group 0 \(rows 0-99\): damaged data that cannot be read", str(error))
    docs, skipped = read(workdir / "bad.parquet", "skip")
    assert skipped == 1 and docs == [f"parquet row {i} " * 20 for i in range(100, 300)]


def test_a_data_path_with_a_nul_character_is_an_error(workdir):
    with pytest.raises(PretrainError, match="cannot name a file: it holds a NUL character"):
        FileSource(SourceConfig(name="s", path=str(workdir / "a\0" / "*.jsonl")), 0.0, "error", WHOLE)


class CountingFile(io.FileIO):
    """A file that counts the bytes read from it (all reads of a BufferedReader come through readinto)."""

    bytes_read = 0

    def readinto(self, buffer) -> int:
        n = super().readinto(buffer)
        CountingFile.bytes_read += n or 0
        return n


@pytest.mark.parametrize("kind", ["jsonl", "txt"])
def test_one_huge_line_is_read_once_not_once_per_chunk(workdir, kind, monkeypatch):
    """A chunk inside a long line used to read on to the line's end: quadratic in the line's
    length (this 4 MB line in 4 KiB chunks read ~2 GB)."""
    text = "word " * 800_000
    line = json.dumps({"text": text}) if kind == "jsonl" else text
    path = workdir / f"long.{kind}"
    path.write_text(f"{line}\n" + (json.dumps({"text": "after"}) if kind == "jsonl" else "\nafter") + "\n")
    monkeypatch.setattr("pretrain.data.sources.open_binary", lambda p: io.BufferedReader(CountingFile(p)))
    CountingFile.bytes_read = 0
    docs, skipped = read(path, chunk_bytes=SMALL, seconds=60)
    assert [len(d) for d in docs] == [len(text), 5] and not skipped
    assert CountingFile.bytes_read < 4 * path.stat().st_size


def test_a_50mb_single_line_file(workdir):
    path = workdir / "huge.json"
    with path.open("w") as f:  # a JSON array dump, not JSON Lines: one record that is a list
        f.write("[" + ", ".join([json.dumps({"text": "x" * 100})] * 500_000) + "]")
    assert path.stat().st_size > 45 << 20
    start = time.perf_counter()
    error = read(path, chunk_bytes=1 << 20, seconds=120)
    assert re.search(r"huge\.json line 1: a JSON list, not an object with a 'text' field", str(error))
    assert time.perf_counter() - start < 30


# ---- prepared shards: a damaged manifest or shard names the fix ----

def write_manifest(directory: Path, manifest: object) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "manifest.json").write_text(json.dumps(manifest))


GOOD_MANIFEST = {"format": FORMAT, "version": VERSION, "text_field": "text", "val_fraction": 0.01, "fingerprint": "f",
                 "source_bytes": 10, "dtype": "uint16", "train_tokens": 4, "val_tokens": 0, "tokenizer_sha256": "s"}


@FUZZ
@given(manifest=st.one_of(
    st.dictionaries(st.sampled_from(sorted(GOOD_MANIFEST)), json_values).map(lambda m: {**GOOD_MANIFEST, **m}),
    st.lists(st.sampled_from(sorted(GOOD_MANIFEST)), max_size=3).map(
        lambda drop: {k: v for k, v in GOOD_MANIFEST.items() if k not in drop}),
    json_values,
))
def test_a_damaged_manifest_is_an_error_naming_the_fix(workdir, manifest):
    directory = workdir / "prepared" / "s"
    write_manifest(directory, manifest)
    (directory / "tokens.bin").write_bytes(np.arange(4, dtype=np.uint16).tobytes())
    data = DataConfig(prepared_dir=str(workdir / "prepared"))
    try:
        source = PreparedSource(str(directory), SourceConfig(name="s", path="x.jsonl"), data)
        tokens = source.tokens
    except PretrainError as exc:
        assert "pretrain data prepare" in str(exc)
        return
    assert list(tokens) == list(range(len(tokens)))


def test_a_truncated_or_missing_shard_is_an_error(workdir):
    directory = workdir / "shards" / "s"
    write_manifest(directory, GOOD_MANIFEST)
    data = DataConfig(prepared_dir=str(workdir / "shards"))
    source = PreparedSource(str(directory), SourceConfig(name="s", path="x.jsonl"), data)
    for content, message in ((None, "cannot read the prepared shard"), (b"\x00" * 3, "cannot read the prepared shard"),
                             (b"\x00" * 6, "holds 3 tokens but its manifest says 4")):
        (directory / "tokens.bin").unlink(missing_ok=True)
        if content is not None:
            (directory / "tokens.bin").write_bytes(content)
        with pytest.raises(PretrainError, match=message):
            _ = source.tokens
