"""Activation checkpointing: recompute a block's activations in backward instead of storing them."""

from __future__ import annotations

import logging

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

log = logging.getLogger(__name__)


def apply_activation_checkpointing(layers: nn.ModuleList, mode: str, every: int) -> None:
    """Wrap blocks in place: every block (`full`) or every `every`-th one (`selective`), which
    trades part of the memory saving for less recomputation (torchtitan's layer-interval SAC).

    State-dict keys stay the same (the wrapper removes its own prefix), so checkpoints do not depend on it."""
    if mode == "none":
        return
    interval = 1 if mode == "full" else every
    chosen = [i for i in range(len(layers)) if i % interval == 0]
    for i in chosen:
        layers[i] = checkpoint_wrapper(layers[i], preserve_rng_state=False)
    log.info("activation checkpointing (%s): %d of %d blocks recompute in backward", mode, len(chosen), len(layers))
