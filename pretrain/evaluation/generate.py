"""Text from a model: greedy or top-k sampling, for end-of-training samples and eval hooks."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: list[int],
    max_new_tokens: int,
    max_seq_len: int,
    top_k: int = 1,
    temperature: float = 1.0,
    stop_id: int | None = None,
    generator: torch.Generator | None = None,
) -> list[int]:
    """New token ids continuing `prompt` (a full forward per token: simple, and fast enough for
    short samples). `top_k=1` is greedy decoding."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], dtype=torch.long, device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(ids[:, -max_seq_len:])[0, -1].float()
        if top_k == 1:
            token = int(logits.argmax())
        else:
            values, indices = torch.topk(logits / max(temperature, 1e-6), min(top_k, logits.numel()))
            choice = torch.multinomial(torch.softmax(values, dim=-1).cpu(), 1, generator=generator)
            token = int(indices[int(choice)])
        if token == stop_id:
            break
        new.append(token)
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
    return new
