"""Listing, sizing and opening data files: local paths directly, URLs (s3://, gs://, file://,
memory://, ...) through fsspec with whatever filesystems are installed. Nothing is fetched unless
the user configured a URL."""

from __future__ import annotations

import gzip
import glob
import io
import os
from typing import BinaryIO

from pretrain.errors import PretrainError

_GLOB_CHARS = set("*?[")


def is_url(path: str) -> bool:
    return "://" in path


def expand(pattern: str) -> list[str]:
    """The files a path or glob names, sorted so that every process sees the same order."""
    if not is_url(pattern):
        try:
            files = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
        except ValueError:  # UnicodeEncodeError included
            raise PretrainError(f"data source path {pattern!r} cannot name a file: it holds a NUL character or a "
                                "lone surrogate; fix the path") from None
    else:
        fs, path = _filesystem(pattern)
        try:
            matches = fs.glob(path) if _GLOB_CHARS & set(path) else ([path] if fs.isfile(path) else [])
        except OSError as exc:
            raise PretrainError(f"cannot list {pattern!r}: {exc}") from None
        files = sorted(fs.unstrip_protocol(m) for m in matches if fs.isfile(m))
    if not files:
        raise PretrainError(f"data source path {pattern!r} matches no file")
    return files


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


def open_decompressed(path: str, compression: str) -> BinaryIO:
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
        self._frame = None  # the decompressobj of the frame being read; None between frames
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
