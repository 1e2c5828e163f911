"""torch.compile per transformer block: every block has the same code, so one compiled graph
serves all of them, and FSDP can still gather parameters block by block."""

from __future__ import annotations

import logging

from torch import nn

log = logging.getLogger(__name__)


def apply_compile(layers: nn.ModuleList) -> None:
    for layer in layers:
        layer.compile()  # in place: the module and its parameter names stay the same
    log.info("torch.compile applied to %d transformer blocks", len(layers))
