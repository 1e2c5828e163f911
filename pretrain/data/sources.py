"""Documents from one source: local or remote .txt/.jsonl/.parquet files streamed through
Hugging Face `datasets`, or a built-in corpus. Iterators end to end, never a whole corpus in memory."""

from __future__ import annotations

import glob
import hashlib
import os
from typing import Iterator

from pretrain.config import JSON_SUFFIXES, PARQUET_SUFFIXES, TEXT_SUFFIXES, SourceConfig
from pretrain.data.builtin import python_docs_documents
from pretrain.errors import PretrainError

BUILTIN = {"python-docs": python_docs_documents}


def source_files(path: str) -> list[str]:
    """The files a source path names, sorted so that every rank sees the same order."""
    if "://" in path:
        return [path]
    files = sorted(glob.glob(os.path.expanduser(path)))
    if not files:
        raise PretrainError(f"data source path {path!r} matches no file")
    return files


def iter_documents(source: SourceConfig) -> Iterator[str]:
    """Every non-empty document of `source`, in a fixed order.

    A .txt file is split into documents at blank lines; .jsonl and .parquet rows give one
    document each from `source.text_field`."""
    if source.path in BUILTIN:
        yield from BUILTIN[source.path]()
        return
    for path in source_files(source.path):
        yield from _file_documents(path, source)


def _file_documents(path: str, source: SourceConfig) -> Iterator[str]:
    import datasets  # slow to import; only needed for file sources

    datasets.disable_progress_bars()
    if path.endswith(TEXT_SUFFIXES):
        builder, kwargs, field = "text", {"sample_by": "paragraph"}, "text"
    elif path.endswith(JSON_SUFFIXES):
        builder, kwargs, field = "json", {}, source.text_field
    elif path.endswith(PARQUET_SUFFIXES):
        builder, kwargs, field = "parquet", {}, source.text_field
    else:
        raise PretrainError(f"data source {source.name!r}: unsupported file type {path!r}")
    stream = datasets.load_dataset(builder, data_files=[path], split="train", streaming=True, **kwargs)
    for row_number, row in enumerate(stream):
        text = row.get(field)
        if text is None and field not in row:
            raise PretrainError(
                f"data source {source.name!r}: row {row_number} of {path} has no field {field!r} "
                f"(fields: {', '.join(row)}); set text_field in its data.sources entry"
            )
        if not isinstance(text, str):
            if text is None:
                continue
            raise PretrainError(f"data source {source.name!r}: field {field!r} in row {row_number} of "
                                f"{path} is a {type(text).__name__}, not text")
        if text.strip():
            yield text


def is_validation(text: str, val_fraction: float) -> bool:
    """Whether a document belongs to the held-out split, decided by a hash of its content so
    that the split is the same in every process, order and restart."""
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction
