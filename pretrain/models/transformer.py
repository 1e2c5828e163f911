"""The decoder-only transformer. A plain `nn.Module`: parallelism is applied from outside."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from pretrain.models.args import ModelArgs
from pretrain.models.fused_loss import ChunkKernel, linear_cross_entropy, softmax_cross_entropy_grad
from pretrain.models.layers import TransformerBlock, init_normal, rope_tables

IGNORE_INDEX = -100  # labels with this value add nothing to the loss (F.cross_entropy's default)


class Transformer(nn.Module):
    """Llama-style language model: embedding, pre-norm blocks, final RMSNorm, output head.

    Build it under `torch.device("meta")` for large models, then `to_empty(device=...)` and
    `init_weights()`: every tensor, the rotary tables included, is (re)filled there."""

    rope_cos: torch.Tensor  # buffers, declared for the type checker (nn.Module's attributes are untyped)
    rope_sin: torch.Tensor
    layers: nn.ModuleList

    def __init__(self, args: ModelArgs):
        super().__init__()
        if args.max_seq_len is None:
            raise ValueError("ModelArgs.max_seq_len must be set to build a Transformer")
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.d_model)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = nn.RMSNorm(args.d_model, eps=args.norm_eps)
        self.output = OutputHead(args.d_model, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Derived from the shape, so not saved in checkpoints.
        self.register_buffer("rope_cos", torch.empty(args.max_seq_len, args.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(args.max_seq_len, args.head_dim), persistent=False)

    def init_buffers(self) -> None:
        """Fill the rotary tables, the only tensors that a state dict does not hold."""
        args = self.args
        assert args.max_seq_len is not None  # validate() derives it from data.seq_len
        with torch.no_grad():
            cos, sin = rope_tables(args.head_dim, args.max_seq_len, args.rope_theta)
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def init_weights(self) -> None:
        """Initialise all parameters from the global RNG (seed it first) and the rotary tables."""
        args = self.args
        self.init_buffers()
        with torch.no_grad():
            init_normal(self.tok_embeddings.weight, args.init_std)
            for layer in cast("list[TransformerBlock]", self.layers):  # ModuleList's items are typed Module
                layer.init_weights(args)
            self.norm.reset_parameters()
            if not args.tie_embeddings:
                init_normal(self.output.weight, args.init_std)

    def forward(self, tokens: torch.Tensor, document_ids: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of shape (batch, seq, vocab) for `tokens` of shape (batch, seq); given `labels`
        (batch, seq), the mean cross-entropy over the labels that are not IGNORE_INDEX instead,
        computed without materialising the logits (fused_loss.py).

        With `document_ids` (batch, seq), the index of each token's document within its row, a
        token attends only to earlier tokens of its own document (packed documents stay apart)."""
        seq = tokens.shape[1]
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        mask = None if document_ids is None else document_mask(document_ids)
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.output(self.norm(x), labels)


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """(batch, 1, seq, seq) attention mask, True where a token may attend: causal, and within
    the token's own document (`document_ids` (batch, seq) numbers the documents of each row)."""
    seq = document_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    return (causal & (document_ids[:, :, None] == document_ids[:, None, :]))[:, None]


class OutputHead(nn.Linear):
    """The vocabulary projection. The loss is computed inside its forward, so that every backend
    that gathers a module's parameters around its forward (FSDP, ZeRO-3) has the weight there.
    `loss_kernel` is the loss's per-chunk elementwise work; apply_compile compiles it."""

    loss_kernel: ChunkKernel = staticmethod(softmax_cross_entropy_grad)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            return super().forward(x)
        return linear_cross_entropy(x, self.weight, labels, IGNORE_INDEX, chunk_kernel=self.loss_kernel)
