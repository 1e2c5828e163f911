"""The export's output directory, written whole or not at all: everything goes into a temporary
sibling, which is renamed into place only once every check passed. A failed export leaves no
directory that looks complete (and an existing one untouched)."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator

from pretrain.errors import PretrainError
from pretrain.resilience.atomic_dir import publish, temporary_sibling


def check_output_dir(out_dir: Path, ckpt_dir: Path, force: bool) -> None:
    """Refuse to overwrite a non-empty directory without `force`, and to write into or over the checkpoint."""
    out, ckpt = out_dir.resolve(), ckpt_dir.resolve()
    if out == ckpt or out in ckpt.parents or ckpt in out.parents:
        raise PretrainError(f"--out {out_dir} would replace or change the checkpoint {ckpt_dir}; choose a directory "
                            "outside it")
    if out.is_file():
        raise PretrainError(f"--out {out_dir} is a file; pass a directory path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise PretrainError(f"--out {out_dir} exists and is not empty; choose another directory, or pass --force "
                            "to replace it once the export has succeeded")


@contextlib.contextmanager
def atomic_output(out_dir: Path) -> Iterator[Path]:
    """Yield an empty temporary directory next to `out_dir`; publish it as `out_dir` if the block
    succeeds, delete it if the block raises."""
    tmp = temporary_sibling(out_dir)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, out_dir)


def follow_umask(path: Path) -> None:
    """Give a file the mode a plain open() would (0o666 less the umask, so 0644 under umask 022):
    safetensors writes through a private temporary file and leaves its output 0600."""
    umask = os.umask(0)  # reading the umask means setting it; put back at once
    os.umask(umask)
    path.chmod(0o666 & ~umask)
