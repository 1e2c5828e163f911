"""Directories and files written whole or not at all (checkpoints, prepared shards, configs,
law files): build the content in a temporary sibling, flush it to disk, then rename it into
place. A reader never sees half of one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def temporary_path(final: Path) -> Path:
    """`.tmp_<name>` next to `final`: readers skip it, its name is not the final one."""
    return final.with_name(".tmp_" + final.name)


def temporary_sibling(final: Path) -> Path:
    """An empty temporary_path(final) (a leftover of a crashed write is cleared first)."""
    tmp = temporary_path(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, final: Path) -> None:
    """Flush `tmp` to disk and rename it to `final`. An existing `final` is moved aside first and
    deleted only once the new one is in place, so a crash leaves one whole copy."""
    fsync_tree(tmp)
    old = final.with_name(".old_" + final.name)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def write_file(path: str | Path, data: str | bytes, check: Callable[[Path], object] | None = None) -> Path:
    """Write one file whole or not at all: into temporary_path(path), flushed, then renamed.
    `check`, if given, is called on the temporary file first; if it raises, nothing is published
    and an existing `path` is kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    try:
        if check is not None:
            check(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


def fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
