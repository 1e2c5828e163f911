"""GPT-2 (Radford et al. 2019) as a plain `nn.Module`, computing what Hugging Face's
GPT2LMHeadModel computes (without dropout): the classic baseline. Parallelism is applied from
outside, as for the Llama Transformer, whose forward signature and fused loss it shares."""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from pretrain.models.causal_attention import causal_attention
from pretrain.models.gpt2.args import GPT2Args
from pretrain.models.layers import init_normal
from pretrain.models.transformer import OutputHead, document_mask


class GPT2Attention(nn.Module):
    """Causal multi-head attention with one fused q/k/v projection (GPT-2's c_attn) and biases."""

    def __init__(self, args: GPT2Args):
        super().__init__()
        self.n_heads, self.head_dim = args.n_heads, args.head_dim
        self.wqkv = nn.Linear(args.d_model, 3 * args.d_model)
        self.wo = nn.Linear(args.d_model, args.d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.wqkv(x).view(batch, seq, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = causal_attention(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))


class GeluMLP(nn.Module):
    """w2(gelu(w1 x)) with biases; GELU's tanh approximation, as GPT-2's `gelu_new`."""

    def __init__(self, args: GPT2Args):
        super().__init__()
        self.w1 = nn.Linear(args.d_model, args.ffn_hidden)
        self.w2 = nn.Linear(args.ffn_hidden, args.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class GPT2Block(nn.Module):
    """Pre-norm residual block: x + attention(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, args: GPT2Args):
        super().__init__()
        self.attention_norm = nn.LayerNorm(args.d_model, eps=args.norm_eps)
        self.attention = GPT2Attention(args)
        self.ffn_norm = nn.LayerNorm(args.d_model, eps=args.norm_eps)
        self.feed_forward = GeluMLP(args)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), mask)
        return x + self.feed_forward(self.ffn_norm(x))

    def init_weights(self, args: GPT2Args) -> None:
        out_std = args.init_std / math.sqrt(2 * args.n_layers) if args.init_scaled_residual else args.init_std
        for norm in (self.attention_norm, self.ffn_norm):
            norm.reset_parameters()
        for linear, std in ((self.attention.wqkv, args.init_std), (self.attention.wo, out_std),
                            (self.feed_forward.w1, args.init_std), (self.feed_forward.w2, out_std)):
            init_normal(linear.weight, std)
            nn.init.zeros_(linear.bias)


class GPT2(nn.Module):
    """Token and position embeddings, pre-norm blocks, final LayerNorm, head tied to the token
    embedding. Build it on `meta`, then `to_empty(device=...)` and `init_weights()`."""

    def __init__(self, args: GPT2Args):
        super().__init__()
        if args.max_seq_len is None:
            raise ValueError("GPT2Args.max_seq_len must be set to build GPT2")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.d_model)
        self.pos_embeddings = nn.Embedding(args.max_seq_len, args.d_model)
        self.layers = nn.ModuleList(GPT2Block(args) for _ in range(args.n_layers))
        self.norm = nn.LayerNorm(args.d_model, eps=args.norm_eps)
        self.output = OutputHead(args.d_model, args.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight

    def init_buffers(self) -> None:
        """Nothing to fill: every tensor of GPT-2 is a parameter in the state dict."""

    def init_weights(self) -> None:
        """Initialise all parameters from the global RNG (seed it first)."""
        args = self.args
        with torch.no_grad():
            init_normal(self.tok_embeddings.weight, args.init_std)
            init_normal(self.pos_embeddings.weight, args.init_std)
            for layer in cast("list[GPT2Block]", self.layers):  # ModuleList's items are typed Module
                layer.init_weights(args)
            self.norm.reset_parameters()

    def forward(self, tokens: torch.Tensor, document_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """As Transformer.forward: logits (batch, seq, vocab), or given `labels` the mean
        cross-entropy; with `document_ids` a token attends only within its own document.
        Positions count from the start of the row, documents packed in it included."""
        mask = None if document_ids is None else document_mask(document_ids)
        x = self.tok_embeddings(tokens) + self.pos_embeddings.weight[:tokens.shape[1]]
        for layer in self.layers:
            x = layer(x, mask)
        return self.output(self.norm(x), labels)
