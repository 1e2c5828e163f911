"""`pretrain export --format torch`: the checkpoint's weights as one plain state dict.

`model.pt` maps our parameter names to fp32 tensors (torch.save; load it with
`torch.load(path, weights_only=True)` into `pretrain.models.model_spec(args).build(args)`), next
to the run's `config.yaml` and `tokenizer.model`. It is whole in memory once, so it suits models
that fit in host RAM; `--format hf` streams instead."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch

from pretrain.export.output import atomic_output, check_output_dir
from pretrain.export.readers import checkpoint_config, checkpoint_tokenizer, read_manifest
from pretrain.export.weights import TORCH_FILE, iter_checkpoint_weights


def export_torch(ckpt_dir: str | Path, out_dir: str | Path, force: bool = False,
                 progress: Callable[[str], None] = lambda _: None) -> Path:
    """Write `out_dir`/model.pt, config.yaml and tokenizer.model for the checkpoint at `ckpt_dir`
    (atomically: all of them or nothing). Returns `out_dir`."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    manifest = read_manifest(ckpt_dir)
    cfg = checkpoint_config(ckpt_dir)
    sp_model = checkpoint_tokenizer(ckpt_dir, cfg)
    check_output_dir(out_dir, ckpt_dir, force)
    progress(f"exporting step {manifest['step']} ({manifest.get('engine', 'dcp')} checkpoint) to {out_dir}")
    with atomic_output(out_dir) as tmp:
        # A tied head arrives as the embedding's tensor itself, so torch.save stores it once.
        torch.save(dict(iter_checkpoint_weights(ckpt_dir)), tmp / TORCH_FILE)
        progress(f"wrote {TORCH_FILE}")
        shutil.copyfile(ckpt_dir / "config.yaml", tmp / "config.yaml")
        shutil.copyfile(sp_model, tmp / "tokenizer.model")
    return out_dir
