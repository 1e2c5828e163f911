"""The shape of a GPT-2 model (`model.name: gpt2`), and the numbers other code needs from it:
parameters, FLOPs per token, activation bytes, config problems."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pretrain.models.args import check_common, check_heads_divide, check_positive, option


@dataclass(frozen=True)
class GPT2Args:
    """Hyper-parameters of GPT-2 (Radford et al. 2019): pre-norm LayerNorm blocks with biases, a
    GELU MLP, learned absolute positions and an output head tied to the token embedding."""

    name: Literal["gpt2"] = option("gpt2", "model family: llama (RMSNorm, SwiGLU, rotary positions) or gpt2 "
                                           "(LayerNorm, GELU, learned positions, tied head); each has its own keys")
    vocab_size: int = option(32000, "rows of the embedding table; at least the tokenizer's vocabulary")
    d_model: int = option(768, "width of the residual stream")
    n_layers: int = option(12, "number of transformer blocks")
    n_heads: int = option(12, "attention heads per layer; must divide d_model")
    ffn_hidden: int = option(3072, "hidden width of the GELU MLP (GPT-2: 4 * d_model)")
    max_seq_len: int | None = option(None, "rows of the learned position table, the longest sequence the model "
                                           "reads (default: data.seq_len)")
    norm_eps: float = option(1e-5, "LayerNorm epsilon")
    init_std: float = option(0.02, "std of the truncated-normal weight init")
    # GPT-2 section 2.3: the residual stream's variance would otherwise grow with depth.
    init_scaled_residual: bool = option(True, "divide output-projection init std by sqrt(2 * n_layers)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def tie_embeddings(self) -> bool:
        """GPT-2's head is always the token embedding (read by the exporter and the weight readers)."""
        return True


def matmul_params(args: GPT2Args) -> int:
    """Weights that take part in a matmul for every token: the fused q/k/v and the output
    projection (4 d^2), the MLP (2 d ffn_hidden) of every layer, and the (tied) head."""
    d = args.d_model
    return args.n_layers * (4 * d * d + 2 * d * args.ffn_hidden) + args.vocab_size * d


def count_params(args: GPT2Args, include_embeddings: bool = True) -> int:
    """Number of distinct parameters of GPT2(args), computed from the shape.

    `include_embeddings=False` leaves out the token and position tables (Kaplan et al. 2020's
    non-embedding count; the tied head is the token table)."""
    if args.max_seq_len is None:
        raise ValueError("GPT2Args.max_seq_len must be set to count the position table")
    d = args.d_model
    biases = 3 * d + d + args.ffn_hidden + d
    layer_norms = 2 * 2 * d
    layers = matmul_params(args) - args.vocab_size * d + args.n_layers * (biases + layer_norms)
    embeddings = (args.vocab_size + args.max_seq_len) * d if include_embeddings else 0
    return layers + 2 * d + embeddings  # 2 d: the final LayerNorm


def flops_per_token(args: GPT2Args, seq_len: int) -> int:
    """Training FLOPs (forward + backward) for one token at sequence length `seq_len`: 6 per
    matmul weight and 12 * n_layers * d_model * seq_len for the attention scores and values, as
    for Llama (pretrain/models/args.py flops_per_token, which cites the sources). Biases, norms and
    the position lookup are left out, as there."""
    return 6 * matmul_params(args) + 12 * args.n_layers * args.n_heads * args.head_dim * seq_len


def block_activation_bytes(args: GPT2Args, element: int) -> float:
    """Bytes one block saves for backward per token: the two LayerNorm inputs (fp32 residual
    stream); in the compute dtype the norm outputs as projection inputs, q, k, v, the attention
    output and the projection input (5 d + 2 d: keys and values have all heads), and the MLP's
    c_fc output and GELU output (2 ffn_hidden)."""
    return 2 * 4 * args.d_model + element * (7 * args.d_model + 2 * args.ffn_hidden)


def check_args(m: GPT2Args) -> list[str]:
    """The model section's problems, each with the key, the value and a fix."""
    problems = check_positive(m, ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_hidden"))
    return problems or check_heads_divide(m) + check_common(m)
