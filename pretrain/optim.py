"""AdamW with parameter groups, and the learning-rate schedules (warmup, then cosine or WSD)."""

from __future__ import annotations

import math

import torch
from torch import nn

from pretrain.config.schema import OptimConfig


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Matrices get weight decay, vectors (norm gains) do not."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over parameter_groups(). Fused where the device has a fused kernel, which does the
    whole update in one pass over the parameters."""
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=fused)


def lr_multiplier(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Learning rate at optimizer step `step` (0-based) as a fraction of the peak `cfg.lr`.

    Linear warmup over `warmup_steps`, then
    - cosine: half-cosine from 1 to min_lr_ratio at max_steps (Loshchilov & Hutter 2017);
    - wsd: constant 1, then linear decay to min_lr_ratio over the last decay_fraction of
      the run (warmup-stable-decay, Hu et al. 2024, MiniCPM);
    - constant: 1 after warmup."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(cfg.decay_fraction * max_steps))
    decay_start = max(cfg.warmup_steps, max_steps - decay_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    return 1 - (1 - floor) * progress


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg, max_steps))
