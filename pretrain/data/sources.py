"""Data sources split into chunks: the unit that one lane of the stream reads, tokenizes and packs.

A chunk is a byte range of an uncompressed .txt/.jsonl file (a record belongs to the chunk in
which it starts), a range of rows of a .parquet file, a stride of the records of a compressed
file (which cannot seek), or a range of documents of a built-in corpus. Chunk tables come from
file sizes and metadata alone, so every process builds the same table without reading any text."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import zlib
from typing import Callable, Iterator, cast

import numpy as np

from pretrain.config.schema import SourceConfig
from pretrain.data.builtin import BUILTIN_SOURCES
from pretrain.data.files import data_file_kind, file_size, line_number, open_binary, open_decompressed, source_files
from pretrain.errors import PretrainError
from tokenizer import Tokenizer

log = logging.getLogger(__name__)

# A compressed file is read once per chunk it is split into: more parts cost more decompression.
MAX_COMPRESSED_PARTS = 8
COMPRESSION_RATIO_GUESS = 4


# (source, file) pairs whose skipped records this process has logged: one warning per file and
# process, however many chunks, lanes or passes (training, validation) meet its bad records.
_LOGGED_SKIPS: set[tuple[str, str]] = set()


class RecordErrors:
    """What to do with a record that cannot be read: stop with an error (`data.on_bad_record:
    error`) or skip it and count it (`skip`). Skipped records are counted for metrics.jsonl, and
    `log_skipped()` logs one warning per file with its count and the first one's place and reason
    (`count_only`: for a pass whose records another pass also reads and logs)."""

    def __init__(self, source_name: str, policy: str, count_only: bool = False):
        self.source_name, self.policy, self.count_only = source_name, policy, count_only
        self.skipped = 0
        self._unlogged: dict[str, list] = {}  # file -> [records skipped, "at <place>: <reason>" of the first]

    def report(self, path: str, where: Callable[[], str], problem: str) -> None:
        """A bad record of file `path`. `where()` is its place in the file ("line 17", or "" when
        there is none) and is only called for an error or a file's first skip: finding a line
        number re-reads the file up to it."""
        if self.policy == "skip":
            self.skipped += 1
            if self.count_only or (self.source_name, path) in _LOGGED_SKIPS:
                return
            if path in self._unlogged:
                self._unlogged[path][0] += 1
            else:
                place = where()
                self._unlogged[path] = [1, f"{' at ' + place if place else ''}: {problem}"]
            return
        place = where()
        raise PretrainError(f"data source {self.source_name!r}: {path}{' ' + place if place else ''}: {problem}; "
                            "fix or remove the record, or set data.on_bad_record=skip to skip such records (they "
                            "are counted in metrics.jsonl as bad_records)")

    def log_skipped(self) -> None:
        """Warn once per file (and process) about the records skipped in it since the last call:
        how many and the first one; later ones in that file are only counted."""
        for path, (count, first) in self._unlogged.items():
            if (self.source_name, path) not in _LOGGED_SKIPS:
                _LOGGED_SKIPS.add((self.source_name, path))
                log.warning("data source %r: skipped %d bad record%s in %s (first%s); data.on_bad_record=skip: "
                            "further ones in this file are counted in metrics.jsonl (bad_records), not logged",
                            self.source_name, count, "" if count == 1 else "s", path, first)
        self._unlogged.clear()


def is_validation(text: str, val_fraction: float) -> bool:
    """Whether a document belongs to the held-out split, decided by a hash of its content so
    that the split is the same in every process, order and restart."""
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def even_bounds(total: int, parts: int) -> list[int]:
    return [total * i // parts for i in range(parts + 1)]


class TextSource:
    """A raw source (files or a built-in corpus): a name, a chunk table, a fingerprint of its
    content, and its documents read and tokenized on demand."""

    name: str
    n_chunks: int
    fingerprint: str
    total_bytes: int

    def __init__(self, cfg: SourceConfig, val_fraction: float, on_bad_record: str):
        self.cfg, self.name = cfg, cfg.name
        self.val_fraction, self.on_bad_record = val_fraction, on_bad_record

    def documents(self, chunk: int, errors: RecordErrors) -> Iterator[str]:
        """Every non-empty document of the chunk, training and held-out, in order."""
        raise NotImplementedError

    def split_documents(self, chunk: int, errors: RecordErrors) -> tuple[list[str], list[str]]:
        """(training documents, held-out documents) of the chunk."""
        train: list[str] = []
        val: list[str] = []
        for text in self.documents(chunk, errors):
            (val if is_validation(text, self.val_fraction) else train).append(text)
        return train, val

    def train_tokens(self, chunk: int, tokenizer: Tokenizer, errors: RecordErrors, num_threads: int = -1,
                     part: int = 0, parts: int = 1) -> np.ndarray:
        """Token ids of the chunk's training documents in order, each followed by EOS (int32);
        with `parts` > 1 only documents part, part + parts, part + 2 * parts, ..."""
        if part:  # every part reads the whole chunk; part 0 counts and logs its skipped records
            errors = RecordErrors(errors.source_name, errors.policy, count_only=True)
        train, _ = self.split_documents(chunk, errors)
        errors.log_skipped()
        return tokenizer.encode_documents(train[part::parts], num_threads=num_threads)

    def all_train_tokens(self, tokenizer: Tokenizer, errors: RecordErrors) -> np.ndarray:
        """The training tokens of every chunk in order: the whole source, as prepared shards hold it."""
        parts = [tokenizer.encode_documents(self.split_documents(chunk, errors)[0]) for chunk in range(self.n_chunks)]
        errors.log_skipped()  # after the whole source, so each file's count is complete
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int32)

    def validation_tokens(self, tokenizer: Tokenizer, max_tokens: int) -> np.ndarray:
        """Token ids of the first held-out documents (EOS after each), at least `max_tokens` if
        the split has that many."""
        parts, count = [], 0
        errors = RecordErrors(self.name, self.on_bad_record)
        for chunk in range(self.n_chunks):
            _, docs = self.split_documents(chunk, errors)
            if docs:
                parts.append(tokenizer.encode_documents(docs))
                count += len(parts[-1])
            if count >= max_tokens:
                break
        errors.log_skipped()
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int32)


class BuiltinSource(TextSource):
    """A corpus that ships with the install (`python-docs`): chunks are ranges of documents."""

    def __init__(self, cfg: SourceConfig, val_fraction: float, on_bad_record: str, chunk_bytes: int):
        super().__init__(cfg, val_fraction, on_bad_record)
        self.docs = tuple(BUILTIN_SOURCES[cfg.path]())
        lengths = [len(d) for d in self.docs]
        self.total_bytes = sum(lengths)
        bounds, size = [0], 0
        for i, n in enumerate(lengths):
            size += n
            if size >= chunk_bytes:
                bounds.append(i + 1)
                size = 0
        if bounds[-1] != len(lengths):
            bounds.append(len(lengths))
        self.bounds = bounds
        self.n_chunks = len(bounds) - 1
        digest = hashlib.sha256(cfg.path.encode())
        for doc in self.docs:
            digest.update(doc.encode("utf-8", "surrogatepass"))
        digest.update(repr(bounds).encode())
        self.fingerprint = digest.hexdigest()[:16]

    def documents(self, chunk: int, errors: RecordErrors) -> Iterator[str]:
        return iter(self.docs[self.bounds[chunk] : self.bounds[chunk + 1]])


class FileSource(TextSource):
    """Local or remote .txt / .jsonl / .json (optionally .gz / .zst) and .parquet files, in any
    mix: the files of every path and glob of the source's `path`, each read by its own type.

    A .txt file holds documents separated by blank lines; .jsonl holds one JSON object per line
    with the text in `text_field`; .parquet has the text in column `text_field`."""

    def __init__(self, cfg: SourceConfig, val_fraction: float, on_bad_record: str, chunk_bytes: int):
        super().__init__(cfg, val_fraction, on_bad_record)
        self.files = source_files(cfg.name, cfg.patterns)
        # source_files checked each file's type: none is None
        self.formats = cast("list[tuple[str, str | None]]", [data_file_kind(path) for path in self.files])
        self.sizes = [file_size(path) for path in self.files]
        self._parquet_rows: dict[int, list[int]] = {}  # file -> first row of each row group, and the total
        byte_sizes = list(self.sizes)
        for i, (kind, _) in enumerate(self.formats):
            if kind == "parquet":
                byte_sizes[i] = self._read_parquet_metadata(i)
        self.total_bytes = sum(byte_sizes)
        self.empty_files = [f for i, f in enumerate(self.files)
                            if (self._parquet_rows[i][-1] if i in self._parquet_rows else self.sizes[i]) == 0]
        rows = []
        for i, ((kind, compression), size) in enumerate(zip(self.formats, byte_sizes)):
            if compression:
                parts = max(1, min(MAX_COMPRESSED_PARTS, math.ceil(size * COMPRESSION_RATIO_GUESS / chunk_bytes)))
                rows += [(i, part, parts) for part in range(parts)]
            else:
                total = self._parquet_rows[i][-1] if kind == "parquet" else size
                parts = max(1, min(math.ceil(size / chunk_bytes), total))
                bounds = even_bounds(total, parts)
                rows += [(i, a, b) for a, b in zip(bounds[:-1], bounds[1:])]
        self.chunks = np.array(rows, dtype=np.int64).reshape(-1, 3)
        self.n_chunks = len(self.chunks)
        try:
            root = os.path.commonpath([os.path.dirname(f) for f in self.files]) if len(self.files) > 1 else \
                os.path.dirname(self.files[0])
        except ValueError:  # a list that mixes absolute and relative paths: keep the paths whole
            root = ""
        listing = [[os.path.relpath(f, root) if root else f, s] for f, s in zip(self.files, self.sizes)]
        identity = {"text_field": cfg.text_field, "target": chunk_bytes, "files": listing}
        self.fingerprint = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]

    def check_empty_files(self, warn: bool = True) -> None:
        """Before training on the source or preparing it: stop if every file is empty (0 bytes, or
        parquet without rows), naming them; with `warn`, name the empty files beside others."""
        if len(self.empty_files) == len(self.files):
            raise PretrainError(f"data source {self.name!r}: {self.describe_files()} "
                                f"{'is' if len(self.files) == 1 else 'are'} empty, so the source holds no documents; "
                                "fill it, or fix the source's path to name files that hold text")
        if warn and self.empty_files:
            log.warning("data source %r: %d of its files %s empty and add no documents: %s", self.name,
                        len(self.empty_files), "is" if len(self.empty_files) == 1 else "are",
                        ", ".join(self.empty_files[:5]) + (" ..." if len(self.empty_files) > 5 else ""))

    def describe_files(self, limit: int = 5) -> str:
        """"a.jsonl" or "its 3 files a.jsonl, b.txt, c.parquet", for messages."""
        files = self.files
        if len(files) == 1:
            return files[0]
        shown = ", ".join(files[:limit]) + (f" and {len(files) - limit} more" if len(files) > limit else "")
        return f"its {len(files)} files {shown}"

    def _read_parquet_metadata(self, i: int) -> int:
        """Record the row groups of parquet file i and check its text column; return its
        uncompressed size in bytes."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path, field = self.files[i], self.cfg.text_field
        try:
            with open_binary(path) as f:
                parquet = pq.ParquetFile(f)
                meta, schema = parquet.metadata, parquet.schema_arrow
        except (pa.ArrowException, OSError) as exc:  # pyarrow raises OSError for some damage too
            raise PretrainError(f"data source {self.name!r}: {path} is not a readable parquet file ({exc}); "
                                "replace it or remove it from the source's path") from None
        if field not in schema.names:
            raise PretrainError(f"data source {self.name!r}: {path} has no column {field!r} (columns: "
                                f"{', '.join(schema.names)}); set text_field in its data.sources entry")
        if not (pa.types.is_string(schema.field(field).type) or pa.types.is_large_string(schema.field(field).type)):
            raise PretrainError(f"data source {self.name!r}: column {field!r} of {path} holds "
                                f"{schema.field(field).type}, not text; set text_field to a text column")
        starts = [0]
        for g in range(meta.num_row_groups):
            starts.append(starts[-1] + meta.row_group(g).num_rows)
        self._parquet_rows[i] = starts
        return sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))

    def documents(self, chunk: int, errors: RecordErrors) -> Iterator[str]:
        file, a, b = (int(x) for x in self.chunks[chunk])
        path = self.files[file]
        kind, compression = self.formats[file]
        if kind == "parquet":
            yield from self._parquet_documents(file, a, b, errors)
            return
        if compression:
            records = self._compressed_records(path, kind, compression, part=a, parts=b, errors=errors)
        else:
            records = _records_in_range(path, kind, a, b)
        for offset, raw in records:
            text = self._decode(raw, kind, path, offset, compression, errors)
            if text is not None and text.strip():
                yield text

    def _compressed_records(self, path: str, kind: str, compression: str, part: int, parts: int,
                            errors: RecordErrors) -> Iterator[tuple[int, bytes]]:
        stream = open_decompressed(path, compression)
        index, offset = 0, 0
        try:
            with stream:
                reader = _txt_documents(stream, 0, math.inf, True) if kind == "txt" else _lines(stream, 0, math.inf)
                for offset, raw in reader:
                    if index % parts == part:
                        yield offset, raw
                    index += 1
        except (OSError, EOFError, ValueError, zlib.error) as exc:  # a truncated or corrupt file
            if part and errors.policy == "skip":
                return  # every part meets the damage; part 0 counts it once
            errors.report(path, lambda: "", f"corrupt or truncated {compression} data after byte {offset} of its "
                          f"content ({exc}); the rest of the file is unreadable")

    def _decode(self, raw: bytes, kind: str, path: str, offset: int, compression: str | None,
                errors: RecordErrors) -> str | None:
        def where() -> str:
            return f"line {line_number(path, offset, compression)}"

        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            errors.report(path, where, f"bytes that are not UTF-8 at position "
                          f"{exc.start} of the record; convert the file to UTF-8")
            return None
        if kind == "txt":
            return text.rstrip("\r\n")
        if not text.strip():
            return None
        try:
            record = json.loads(text)
        except ValueError as exc:
            errors.report(path, where, f"not valid JSON ({exc}); each line must be one JSON object (JSON Lines)")
            return None
        except RecursionError:
            errors.report(path, where, "JSON nested too deeply to read (hundreds of levels)")
            return None
        return self._text_field(record, path, where, errors)

    def _text_field(self, record: object, path: str, where: Callable[[], str], errors: RecordErrors) -> str | None:
        field = self.cfg.text_field
        if not isinstance(record, dict):
            errors.report(path, where, f"a JSON {type(record).__name__}, not an object with a {field!r} field")
            return None
        if field not in record:
            fields = ", ".join(list(record)[:20]) + (", ..." if len(record) > 20 else "")
            errors.report(path, where, f"no field {field!r} (fields: {fields}); set text_field in its data.sources "
                          "entry")
            return None
        text = record[field]
        if text is None:
            return None
        if not isinstance(text, str):
            errors.report(path, where, f"field {field!r} is a {type(text).__name__}, not text")
            return None
        try:  # JSON's \ud800 escapes can make lone surrogates, which no tokenizer takes
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            errors.report(path, where, f"field {field!r} holds the lone surrogate {text[exc.start]!r} (a \\u escape "
                          "that is not half of a pair), which is not Unicode text")
            return None
        return text

    def _parquet_documents(self, file: int, a: int, b: int, errors: RecordErrors) -> Iterator[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path, starts = self.files[file], self._parquet_rows[file]
        with open_binary(path) as f:
            parquet = pq.ParquetFile(f)
            for g in range(len(starts) - 1):
                lo, hi = max(a, starts[g]), min(b, starts[g + 1])
                if lo >= hi:
                    continue
                try:
                    column = parquet.read_row_group(g, columns=[self.cfg.text_field]).column(0)
                    texts = column.slice(lo - starts[g], hi - lo).to_pylist()
                except (pa.ArrowException, OSError, UnicodeDecodeError) as exc:  # damaged pages, not UTF-8
                    where = f"row group {g} (rows {starts[g]}-{starts[g + 1] - 1})"
                    errors.report(path, where.__str__, f"damaged data that cannot be read ({exc})")
                    continue
                for text in texts:
                    if text and text.strip():
                        yield text


def _records_in_range(path: str, kind: str, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """(byte offset, raw record) of the records that start in [start, end) of an uncompressed file."""
    with open_binary(path) as f:
        start = _first_line_start(f, start, end)
        if start >= end:
            return  # the range lies inside a line that started before it
        if kind == "jsonl":
            yield from _lines(f, start, end)
            return
        previous_blank = start == 0 or _line_before_is_blank(f, start)
        f.seek(start)
        yield from _txt_documents(f, start, end, previous_blank)


def _lines(f, start: int, end: float) -> Iterator[tuple[int, bytes]]:
    """Lines that start in [start, end) of `f`, positioned at `start`, the start of a line (a line
    cut by a chunk's first byte belongs to the chunk before: _first_line_start)."""
    position = start
    while position < end:
        line = f.readline()
        if not line:
            return
        yield position, line
        position += len(line)


def _txt_documents(f, start: int, end: float, previous_blank: bool) -> Iterator[tuple[int, bytes]]:
    """Paragraph documents (separated by blank lines) that start in [start, end) of `f`,
    positioned at `start`, the start of a line. A document that started before `start` is
    skipped; one that starts before `end` is read to its end."""
    position = start
    lines: list[bytes] = []
    doc_start = position
    while True:
        if not lines and position >= end:
            return  # no document of ours is open and any later one starts after the range
        line = f.readline()
        if not line:
            break
        blank = not line.strip()
        if blank:
            if lines:
                yield doc_start, b"".join(lines)
                lines = []
        elif lines:
            lines.append(line)
        elif previous_blank:  # a document starts here
            if position >= end:
                return
            doc_start, lines = position, [line]
        previous_blank = blank
        position += len(line)
    if lines:
        yield doc_start, b"".join(lines)


def _first_line_start(f, start: int, end: float = math.inf) -> int:
    """Seek to the first line that starts at or after byte `start`; return its offset. The
    search stops at `end` (returning an offset >= end): a range inside one very long line then
    costs its own bytes, not a read to the line's end (quadratic over a one-line file)."""
    if start <= 0:  # a freshly opened file is already there
        return 0
    position = start - 1
    f.seek(position)
    while position < end:
        block = f.read(int(min(1 << 16, end - position)))
        if not block:
            return position  # end of file
        newline = block.find(b"\n")
        if newline >= 0:
            position += newline + 1
            f.seek(position)
            return position
        position += len(block)
    return position


def _line_before_is_blank(f, start: int) -> bool:
    """Whether the line that ends just before `start` (the start of a line) holds only whitespace
    (then the line at `start` starts a document)."""
    position = start - 1  # the newline that ends the previous line
    step = 4096
    while position > 0:
        lo = max(0, position - step)
        f.seek(lo)
        block = f.read(position - lo).rstrip(b" \t\r\f\v")
        if block:
            return block.endswith(b"\n")
        position = lo
    return True
