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
        files = sorted(p for p in glob.glob(os.path.expanduser(pattern)) if os.path.isfile(p))
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
    """A buffered, forward-only binary stream of a .gz or .zst file's content."""
    raw = open_binary(path)
    if compression == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb")
    import zstandard

    reader = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
    return io.BufferedReader(reader, buffer_size=1 << 20)


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
