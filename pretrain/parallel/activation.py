"""Activation checkpointing: recompute a block's activations in backward instead of storing them."""

from __future__ import annotations

import functools
import logging

from torch import nn
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)


def apply_activation_checkpointing(layers: nn.ModuleList, mode: str, every: int) -> None:
    """Checkpoint every block (`full`) or every `every`-th one (`selective`), which trades part of
    the memory saving for less recomputation (torchtitan's layer-interval SAC).

    The block's forward is replaced in place rather than the block wrapped in another module, so
    parameter names stay the model's own in every state dict and checkpoint format (DeepSpeed's
    included, which would otherwise keep a wrapper's prefix)."""
    if mode == "none":
        return
    interval = 1 if mode == "full" else every
    chosen = [i for i in range(len(layers)) if i % interval == 0]
    for i in chosen:
        layers[i].forward = functools.partial(checkpoint, layers[i].forward, use_reentrant=False,
                                              preserve_rng_state=False)
    log.info("activation checkpointing (%s): %d of %d blocks recompute in backward", mode, len(chosen), len(layers))
