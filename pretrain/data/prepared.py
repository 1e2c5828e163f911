"""Prepared token shards: `pretrain data prepare` tokenizes every source once into a flat,
memory-mappable array of token ids, so training reads batches with almost no CPU.

Layout of prepared_dir/<source name>/ (the manifest is written last, then the directory is
renamed into place, so a prepared source is whole or absent):
  tokens.bin     training documents' tokens in the source's order, each document followed by EOS
                 (uint16 when the vocabulary fits, else uint32)
  val.bin        held-out documents' tokens, the same way
  manifest.json  format, source fingerprint, tokenizer hash, dtype, counts

A prepared source is read as an IndexedSource (stream.py): windows at random across the whole
source, shuffled per epoch; a small raw source tokenized in memory is read the same way and
gives the very same stream."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from pretrain.config.schema import PREPARED_MANIFEST, Config, DataConfig, SourceConfig
from pretrain.data.sources import BuiltinSource, FileSource, RecordErrors, TextSource
from pretrain.errors import PretrainError
from pretrain.resilience.atomic_dir import publish, temporary_sibling
from tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT = "pretrain-token-shards"
VERSION = 1
# The manifest keys that reading a prepared source relies on, and their JSON types.
MANIFEST_TYPES: dict[str, type | tuple[type, ...]] = {
    "text_field": str, "val_fraction": (int, float), "fingerprint": str, "source_bytes": int, "dtype": str,
    "train_tokens": int, "val_tokens": int, "tokenizer_sha256": str}


def raw_source(cfg: SourceConfig, data: DataConfig) -> TextSource:
    if cfg.is_builtin:
        return BuiltinSource(cfg, data.val_fraction, data.on_bad_record, data.chunk_bytes)
    return FileSource(cfg, data.val_fraction, data.on_bad_record, data.chunk_bytes)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class PreparedSource:
    """A source read from its prepared shards: its token array, memory-mapped."""

    def __init__(self, directory: str, cfg: SourceConfig, data: DataConfig):
        self.dir, self.name = Path(directory), cfg.name
        m = _read_manifest(self.dir)
        if m is None:
            raise PretrainError(f"data.prepared_dir={data.prepared_dir!r} holds no prepared source {cfg.name!r} "
                                f"(no readable {self.dir / PREPARED_MANIFEST}); run `pretrain data prepare` "
                                "with this config first")
        self.manifest = m
        if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
            raise PretrainError(f"{self.dir} is not a version-{VERSION} prepared source; re-run `pretrain data "
                                "prepare --force` with this config")
        damaged = [key for key, types in MANIFEST_TYPES.items()
                   if not isinstance(m.get(key), types) or isinstance(m.get(key), bool)]
        if damaged or m["dtype"] not in ("uint16", "uint32"):
            raise PretrainError(f"{self.dir / PREPARED_MANIFEST} is damaged (missing or wrong: "
                                f"{', '.join(damaged or ['dtype'])}); re-run `pretrain data prepare --force`")
        for key, want in (("text_field", cfg.text_field), ("val_fraction", data.val_fraction)):
            if m[key] != want:
                raise PretrainError(f"the prepared shards in {self.dir} were made with {key}={m[key]!r} but the "
                                    f"config has {want!r}; re-run `pretrain data prepare --force` or change it back")
        self.fingerprint, self.total_bytes = m["fingerprint"], m["source_bytes"]
        self.dtype = np.dtype(m["dtype"])

    @property
    def tokens(self) -> np.ndarray:
        """All training tokens, memory-mapped (opened in the process that reads them)."""
        if self.manifest["train_tokens"] == 0:
            return np.empty(0, dtype=self.dtype)
        return self._shard("tokens.bin", self.manifest["train_tokens"])

    def _shard(self, name: str, count: int) -> np.ndarray:
        path = self.dir / name
        try:
            tokens = np.memmap(path, dtype=self.dtype, mode="r")
        except (OSError, ValueError) as exc:  # missing, empty, or not a whole number of tokens
            raise PretrainError(f"cannot read the prepared shard {path} ({exc}); re-run `pretrain data prepare "
                                "--force`") from None
        if len(tokens) != count:
            raise PretrainError(f"the prepared shard {path} holds {len(tokens)} tokens but its manifest says "
                                f"{count} (a partial copy?); copy it again or re-run `pretrain data prepare --force`")
        return tokens

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        if self.manifest["tokenizer_sha256"] != tokenizer.sha256:
            raise PretrainError(
                f"the prepared shards of source {self.name!r} ({self.dir}) were tokenized with another tokenizer "
                f"(sha256 {self.manifest['tokenizer_sha256'][:12]}) than {tokenizer.path} ({tokenizer.sha256[:12]}); "
                "point tokenizer.path at the one they were made with, or re-run `pretrain data prepare --force`")

    def check_raw_files(self, cfg: SourceConfig, data: DataConfig) -> None:
        """If the raw files are reachable, check the shards were made from them as they are now."""
        try:
            current = raw_source(cfg, data).fingerprint
        except PretrainError:
            return  # raw data not present here (e.g. shards copied to the cluster): trust the manifest
        if current != self.fingerprint:
            raise PretrainError(f"the prepared shards of source {self.name!r} ({self.dir}) are stale: its files "
                                "changed since they were made; re-run `pretrain data prepare --force`")

    def validation_tokens(self, tokenizer: Tokenizer, max_tokens: int) -> np.ndarray:
        if not self.manifest["val_tokens"]:
            return np.empty(0, dtype=np.int32)
        return np.asarray(self._shard("val.bin", self.manifest["val_tokens"])[:max_tokens], dtype=np.int32)


def _read_manifest(directory: Path) -> Any:
    """The JSON in a prepared source's manifest (not yet checked), or None when there is no readable one."""
    try:
        return json.loads((directory / PREPARED_MANIFEST).read_text())
    except (OSError, ValueError, RecursionError):
        return None


def up_to_date_manifest(directory: Path, source: TextSource, tokenizer: Tokenizer, data: DataConfig) -> dict | None:
    """The manifest of the prepared source in `directory` when it was made from `source` as it is
    now, with `tokenizer` and the same held-out split; None when it must be (re)built."""
    m = _read_manifest(directory)
    if (isinstance(m, dict) and m.get("version") == VERSION and m.get("fingerprint") == source.fingerprint
            and m.get("tokenizer_sha256") == tokenizer.sha256 and m.get("val_fraction") == data.val_fraction):
        return m
    return None


_worker: tuple[TextSource, Tokenizer] | None = None


def _tokenize_chunk(chunk: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    assert _worker is not None, "prepare_source sets _worker before its pool forks"
    source, tokenizer = _worker
    errors = RecordErrors(source.name, source.on_bad_record)
    train, val = source.split_documents(chunk, errors)
    errors.log_skipped()  # from this worker process, once per file
    return (tokenizer.encode_documents(train, num_threads=1), tokenizer.encode_documents(val, num_threads=1),
            len(train), errors.skipped)


def prepare_source(source: TextSource, cfg: SourceConfig, data: DataConfig, tokenizer: Tokenizer, directory: Path,
                   workers: int, progress: bool = True) -> dict:
    """Tokenize one source into `directory` (atomically); return its manifest."""
    global _worker
    from tqdm import tqdm

    dtype = token_dtype(tokenizer.vocab_size)
    tmp = temporary_sibling(directory)
    counts = {"train_tokens": 0, "val_tokens": 0, "train_documents": 0, "skipped": 0}
    _worker = (source, tokenizer)
    start = time.perf_counter()
    context = multiprocessing.get_context("fork")
    with open(tmp / "tokens.bin", "wb") as train_file, open(tmp / "val.bin", "wb") as val_file, \
            context.Pool(workers) as pool, \
            tqdm(total=source.n_chunks, unit="chunk", desc=f"prepare {source.name}", disable=not progress) as bar:
        for chunk, (train, val, documents, skipped) in enumerate(
                pool.imap(_tokenize_chunk, range(source.n_chunks), chunksize=4)):
            train_file.write(train.astype(dtype).tobytes())
            val_file.write(val.astype(dtype).tobytes())
            counts["train_tokens"] += len(train)
            counts["val_tokens"] += len(val)
            counts["train_documents"] += documents
            counts["skipped"] += skipped
            elapsed = time.perf_counter() - start
            bar.update(1)
            bar.set_postfix_str(f"{counts['train_tokens'] / elapsed:,.0f} tok/s")
            if not progress and (chunk + 1) % max(1, source.n_chunks // 10) == 0:  # plain lines for logs
                eta = elapsed / (chunk + 1) * (source.n_chunks - chunk - 1)
                tokens = counts["train_tokens"]
                log.info("prepare %s: %d/%d chunks, %s tokens, %s tok/s, ETA %.0fs", source.name, chunk + 1,
                         source.n_chunks, f"{tokens:,}", f"{tokens / elapsed:,.0f}", eta)
    _worker = None
    manifest = {
        "format": FORMAT, "version": VERSION, "source": source.name, "fingerprint": source.fingerprint,
        "source_bytes": source.total_bytes, "text_field": cfg.text_field, "val_fraction": data.val_fraction,
        "tokenizer_sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size, "dtype": dtype.name,
        "chunks": source.n_chunks, **counts,
    }
    (tmp / PREPARED_MANIFEST).write_text(json.dumps(manifest, indent=1))
    publish(tmp, directory)
    return manifest


def prepare(cfg: Config, tokenizer: Tokenizer, force: bool = False, workers: int | None = None,
            progress: bool = True) -> list[dict]:
    """Prepare every source of cfg.data into cfg.data.prepared_dir; sources whose shards are up to
    date (same files, tokenizer and split) are kept unless `force`."""
    data = cfg.data
    if not data.prepared_dir:
        raise PretrainError("set data.prepared_dir to the directory the shards go to, e.g. "
                            "--data.prepared_dir=/data/prepared")
    workers = workers or os.cpu_count() or 1
    manifests = []
    for source_cfg in data.sources:
        source = raw_source(source_cfg, data)
        if isinstance(source, FileSource):
            source.check_empty_files()
        source_dir = data.prepared_source_dir(source_cfg.name)
        assert source_dir is not None  # data.prepared_dir is set: checked above
        directory = Path(source_dir)
        current = None if force else up_to_date_manifest(directory, source, tokenizer, data)
        if current is not None:
            log.info("%s is up to date (same files and tokenizer); --force rebuilds it", directory)
            manifests.append(current)
            continue
        manifest = prepare_source(source, source_cfg, data, tokenizer, directory, workers, progress)
        log.info("prepared %s: %d training tokens, %d held-out tokens in %d chunks%s -> %s", source.name,
                 manifest["train_tokens"], manifest["val_tokens"], manifest["chunks"],
                 f", {manifest['skipped']} bad records skipped" if manifest["skipped"] else "", directory)
        manifests.append(manifest)
    return manifests
