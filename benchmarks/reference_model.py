"""The textbook PyTorch Llama that benchmarks compare pretrain against: what a user writes from
the papers in an afternoon (fused QKV and gate/up projections, F.scaled_dot_product_attention,
the full-vocabulary logits into F.cross_entropy), with none of pretrain's kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models import ModelArgs


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.attention_norm, self.ffn_norm = nn.RMSNorm(args.d_model), nn.RMSNorm(args.d_model)
        self.qkv = nn.Linear(args.d_model, (args.n_heads + 2 * args.n_kv_heads) * args.head_dim, bias=False)
        self.out = nn.Linear(args.n_heads * args.head_dim, args.d_model, bias=False)
        self.gate_up = nn.Linear(args.d_model, 2 * args.ffn_hidden, bias=False)
        self.down = nn.Linear(args.ffn_hidden, args.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).view(batch, seq, -1, self.head_dim).transpose(1, 2).split(
            [self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=1)
        attended = F.scaled_dot_product_attention(rotate(q, cos, sin), rotate(k, cos, sin), v, is_causal=True,
                                                  enable_gqa=self.n_heads != self.n_kv_heads)
        x = x + self.out(attended.transpose(1, 2).reshape(batch, seq, -1))
        gate, up = self.gate_up(self.ffn_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class ReferenceLlama(nn.Module):
    cos: torch.Tensor  # the rotary tables, registered as buffers
    sin: torch.Tensor

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embedding = nn.Embedding(args.vocab_size, args.d_model)
        self.blocks = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = nn.RMSNorm(args.d_model)
        self.head = nn.Linear(args.d_model, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.head.weight = self.embedding.weight
        for param in self.parameters():
            if param.ndim == 2:
                nn.init.normal_(param, std=0.02)
        assert args.max_seq_len is not None  # filled in by validate()
        angles = torch.outer(torch.arange(args.max_seq_len).float(),
                             args.rope_theta ** -(torch.arange(0, args.head_dim, 2).float() / args.head_dim))
        angles = torch.cat([angles, angles], dim=-1)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x, self.cos[:seq], self.sin[:seq])
        return self.head(self.norm(x))
