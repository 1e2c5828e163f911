"""Building blocks of the Llama-style transformer: rotary embeddings, attention, SwiGLU MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models.args import ModelArgs
from pretrain.models.causal_attention import causal_attention


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_seq_len, head_dim) in the "rotate half" layout used by
    Hugging Face's Llama, so exported weights need no permutation."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x` of shape (batch, heads, seq, head_dim) by position."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class Attention(nn.Module):
    """Causal grouped-query attention: n_kv_heads key/value heads shared by n_heads query heads."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.d_model, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.d_model, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.d_model, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` (batch, 1, seq, seq), True where attention is allowed, replaces the causal mask."""
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = causal_attention(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))

    def init_weights(self, std: float, out_std: float) -> None:
        for linear in (self.wq, self.wk, self.wv):
            init_normal(linear.weight, std)
        init_normal(self.wo.weight, out_std)


class FeedForward(nn.Module):
    """SwiGLU MLP (Shazeer 2020): w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.d_model, args.ffn_hidden, bias=False)
        self.w2 = nn.Linear(args.ffn_hidden, args.d_model, bias=False)
        self.w3 = nn.Linear(args.d_model, args.ffn_hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, std: float, out_std: float) -> None:
        init_normal(self.w1.weight, std)
        init_normal(self.w3.weight, std)
        init_normal(self.w2.weight, out_std)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then + mlp(norm(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = nn.RMSNorm(args.d_model, eps=args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = nn.RMSNorm(args.d_model, eps=args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask)
        return x + self.feed_forward(self.ffn_norm(x))

    def init_weights(self, args: ModelArgs) -> None:
        out_std = args.init_std
        if args.init_scaled_residual:
            out_std /= math.sqrt(2 * args.n_layers)
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.attention.init_weights(args.init_std, out_std)
        self.feed_forward.init_weights(args.init_std, out_std)


def init_normal(weight: torch.Tensor, std: float) -> None:
    """Normal(0, std) truncated at 3 std, so no weight starts as an outlier.

    Drawn at the weight's full shape and copied in: a weight that a parallel backend has split
    into shards receives its slice of the same draw, so the initial model does not depend on
    how it is distributed."""
    full = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    nn.init.trunc_normal_(full, mean=0.0, std=std, a=-3 * std, b=3 * std)
    weight.copy_(full)
