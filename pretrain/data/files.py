"""Listing, sizing and opening data files: local paths directly, URLs (s3://, gs://, file://,
memory://, ...) through fsspec with whatever filesystems are installed. Nothing is fetched unless
the user configured a URL."""

from __future__ import annotations

import glob
import gzip
import io
import os
from typing import Any, BinaryIO

from pretrain.errors import PretrainError

# The data files a source reads: kind -> file name endings, and the compressions of txt and jsonl.
FILE_KINDS = {"txt": (".txt",), "jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}  # parquet compresses inside the file
SUPPORTED_FILES = ".txt, .jsonl or .json (each also as .gz or .zst) or .parquet"  # the two above, for messages
_GLOB_CHARS = set("*?[")


def data_file_kind(path: str) -> tuple[str, str | None] | None:
    """("txt" | "jsonl" | "parquet", "gzip" | "zstd" | None) of a data file from its name, or
    None for a file type we cannot read."""
    compression = next((c for suffix, c in COMPRESSIONS.items() if path.endswith(suffix)), None)
    base = path.rsplit(".", 1)[0] if compression else path
    for kind, suffixes in FILE_KINDS.items():
        if base.endswith(suffixes) and not (kind == "parquet" and compression):
            return kind, compression
    return None


def is_url(path: str) -> bool:
    return "://" in path


BAD_PATTERN = "cannot name a file: it holds a NUL character or a lone surrogate; fix the path"


def has_glob(pattern: str) -> bool:
    return bool(_GLOB_CHARS & set(pattern))


def matches(pattern: str) -> list[str]:
    """The files a path or glob names (none is not an error here), sorted so that every process
    sees the same order."""
    if not is_url(pattern):
        try:
            return sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
        except ValueError:  # UnicodeEncodeError included
            raise PretrainError(f"data source path {pattern!r} {BAD_PATTERN}") from None
    fs, path = _filesystem(pattern)
    try:
        found = fs.glob(path) if has_glob(path) else ([path] if fs.isfile(path) else [])
    except OSError as exc:
        raise PretrainError(f"cannot list {pattern!r}: {exc}") from None
    return sorted(fs.unstrip_protocol(m) for m in found if fs.isfile(m))


def pattern_problem(pattern: str, found: list[str]) -> str | None:
    """What is wrong with one path or glob of a source and the files it matched, as the end of a
    sentence that starts with the pattern, with the fix; None when every match is readable."""
    local = not is_url(pattern)
    if not found and local and os.path.isdir(os.path.expanduser(pattern)):
        return f"is a directory; use a glob for the files in it, e.g. '{os.path.join(pattern, '*')}'"
    if not has_glob(pattern) and data_file_kind(pattern) is None:
        return f"has an unsupported file type; use {SUPPORTED_FILES} files (or a glob such as 'dir/*.jsonl')"
    if not found:
        where = f" (relative paths start at {os.getcwd()})" if local else ""
        return f"matches no file; check the path{where}, or remove it from the source's path"
    unreadable = [f for f in found if data_file_kind(f) is None]
    if unreadable:
        names = ", ".join(os.path.basename(f) for f in unreadable[:5])
        more = f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
        return (f"matches {len(unreadable)} file(s) of an unsupported file type ({names}{more}); a source reads "
                f"{SUPPORTED_FILES} files in any mix: narrow the glob (e.g. '*.jsonl*') or list the globs "
                "to read (path: [a/*.jsonl, b/*.parquet])")
    return None


def source_files(source_name: str, patterns: list[str]) -> list[str]:
    """Every file of a source: each path or glob's matches in sorted order, the patterns in the
    order given (a file that two patterns match is listed once, where it first appears), so every
    process sees the same list. Errors name the source, the pattern and the fix."""
    files: dict[str, None] = {}  # ordered and without repeats
    for pattern in patterns:
        found = matches(pattern)
        problem = pattern_problem(pattern, found)
        if problem:
            raise PretrainError(f"data source {source_name!r}: path {pattern!r} {problem}")
        files.update(dict.fromkeys(found))
    if not files:
        raise PretrainError(f"data source {source_name!r} has an empty path list; give a file, a glob or a list "
                            "of them")
    return list(files)


def file_size(path: str) -> int:
    try:
        if not is_url(path):
            return os.path.getsize(path)
        fs, inner = _filesystem(path)
        return int(fs.size(inner))
    except OSError as exc:
        raise PretrainError(f"cannot read {path}: {exc.strerror or exc}") from None


def open_binary(path: str) -> BinaryIO:
    """A seekable binary file object; errors name the file."""
    try:
        if not is_url(path):
            return open(path, "rb")
        import fsspec

        return fsspec.open(path, "rb").open()
    except OSError as exc:
        raise PretrainError(f"cannot read {path}: {exc.strerror or exc}; check that it exists and is "
                            "readable, or remove it from data.sources") from None


def open_decompressed(path: str, compression: str) -> io.BufferedIOBase:
    """A buffered, forward-only binary stream of a .gz or .zst file's content. Damaged data
    raises OSError, EOFError (truncated), ValueError or zlib.error while it is read."""
    raw = open_binary(path)
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    return io.BufferedReader(_ZstdReader(raw), buffer_size=1 << 20)


class _ZstdReader(io.RawIOBase):
    """The content of a .zst file, frame after frame. zstandard's stream_reader ends quietly when
    the file is cut inside a frame (a partial download would lose its tail unnoticed); this one
    raises EOFError then, as gzip does, and ValueError for data that is not zstd."""

    # Compressed bytes per step: decompressobj returns all the output of its input at once, so
    # the step bounds memory (text compresses ~10x; only crafted data expands much further).
    STEP = 1 << 16

    def __init__(self, raw: BinaryIO):
        import zstandard

        self._raw, self._dctx, self._zstd_error = raw, zstandard.ZstdDecompressor(), zstandard.ZstdError
        self._frame: Any = None  # the decompressobj of the frame being read; None between frames
        self._input = b""  # compressed bytes read but not yet decompressed (the next frame's start)
        self._output = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._output:
            data, self._input = self._input or self._raw.read(self.STEP), b""
            if not data:
                if self._frame is not None:
                    raise EOFError("the file ends inside a zstd frame (it is truncated)")
                return 0
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            try:
                self._output = memoryview(self._frame.decompress(data))
            except self._zstd_error as exc:
                raise ValueError(f"not zstd data: {exc}") from exc
            if self._frame.eof:
                self._input, self._frame = self._frame.unused_data, None
        n = min(len(buffer), len(self._output))
        buffer[:n] = self._output[:n]
        self._output = self._output[n:]
        return n

    def close(self) -> None:
        self._raw.close()
        super().close()


def line_number(path: str, offset: int, compression: str | None = None) -> int:
    """1-based number of the line that starts at byte `offset` of a file's (decompressed) content.
    Only for error messages: it reads the file up to `offset`."""
    count = 1
    with open_decompressed(path, compression) if compression else open_binary(path) as f:
        remaining = offset
        while remaining > 0:
            block = f.read(min(remaining, 1 << 24))
            if not block:
                break
            count += block.count(b"\n")
            remaining -= len(block)
    return count


def _filesystem(url: str):
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise PretrainError(f"cannot open {url!r}: {exc}. Install the fsspec filesystem for this "
                            "protocol (e.g. `pip install s3fs` for s3://)") from None
