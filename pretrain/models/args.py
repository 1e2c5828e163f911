"""The shape of a model: everything the `nn.Module` needs to know, and nothing about training.

`ModelArgs` is also the `model:` section of the job config, so its fields carry help texts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def option(default: Any, help: str) -> Any:
    """A field with the help text that `pretrain train --help` shows (the config parser reads the
    `help` metadata; model code does not import the parser)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ModelArgs:
    """Hyper-parameters of a Llama-style decoder-only transformer."""

    vocab_size: int = option(32000, "rows of the embedding table; at least the tokenizer's vocabulary")
    d_model: int = option(512, "width of the residual stream")
    n_layers: int = option(8, "number of transformer blocks")
    n_heads: int = option(8, "query heads per attention layer; must divide d_model")
    n_kv_heads: int = option(8, "key/value heads (grouped-query attention); must divide n_heads")
    ffn_hidden: int = option(1408, "hidden width of the SwiGLU MLP")
    max_seq_len: int | None = option(None, "longest sequence the rotary tables cover (default: data.seq_len)")
    rope_theta: float = option(10000.0, "rotary embedding base")
    norm_eps: float = option(1e-5, "RMSNorm epsilon")
    tie_embeddings: bool = option(False, "share the input embedding with the output head")
    init_std: float = option(0.02, "std of the truncated-normal weight init")
    # GPT-2 / Megatron-LM: the residual stream's variance would otherwise grow with depth.
    init_scaled_residual: bool = option(True, "divide output-projection init std by sqrt(2 * n_layers)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


def matmul_params(args: ModelArgs) -> int:
    """Weights that take part in a matmul for every token: attention and MLP projections of
    every layer plus the output head (the head counts even when tied to the embedding, because
    the logits matmul happens either way). Excludes the embedding lookup and the norm gains."""
    d, hd = args.d_model, args.head_dim
    attention = d * args.n_heads * hd + 2 * d * args.n_kv_heads * hd + args.n_heads * hd * d
    mlp = 3 * d * args.ffn_hidden
    return args.n_layers * (attention + mlp) + args.vocab_size * d


def count_params(args: ModelArgs, include_embeddings: bool = True) -> int:
    """Number of distinct parameters of `Transformer(args)`, computed from the shape.

    `include_embeddings=False` leaves out the input embedding table (Kaplan et al. 2020's
    "non-embedding" count): with an untied head the output projection still counts; with a tied
    head the single shared table is left out."""
    d = args.d_model
    norms = args.n_layers * 2 * d + d
    untied_head = 0 if args.tie_embeddings else args.vocab_size * d
    layers = matmul_params(args) - args.vocab_size * d
    embedding = args.vocab_size * d if include_embeddings else 0
    return layers + norms + untied_head + embedding


def flops_per_token(args: ModelArgs, seq_len: int) -> int:
    """Training FLOPs (forward + backward) for one token at sequence length `seq_len`.

    6 FLOPs per matmul weight (2 forward, 4 backward: Kaplan et al. 2020, eq. 2.1) plus the
    attention score and value matmuls, 2 * 2 * seq_len * (n_heads * head_dim) per layer forward
    and twice that backward, i.e. 12 * n_layers * n_heads * head_dim * seq_len (PaLM, Chowdhery
    et al. 2022, appendix B). As in PaLM and Megatron-LM's MFU, the causal mask's skipped half is
    not discounted, so MFU stays comparable with theirs."""
    attention = 12 * args.n_layers * args.n_heads * args.head_dim * seq_len
    return 6 * matmul_params(args) + attention
