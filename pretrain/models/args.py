"""The shape of a model: everything the `nn.Module` needs to know, and nothing about training.

`ModelArgs` is also the `model:` section of the job config, so its fields carry help texts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal


def option(default: Any, help: str) -> Any:
    """A field with the help text that `pretrain train --help` shows (the config parser reads the
    `help` metadata; model code does not import the parser)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ModelArgs:
    """Hyper-parameters of a Llama-style decoder-only transformer."""

    # Implied, so not written out (config.parse.to_dict): a model section without a name is llama, so
    # config.yaml stays as it was before there were families, and older versions still read it.
    name: Literal["llama"] = field(default="llama", metadata={"implied": True, "help": (
        "model family: llama (RMSNorm, SwiGLU, rotary positions) or gpt2 (LayerNorm, GELU, learned positions, "
        "tied head); each has its own keys")})
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


def block_activation_bytes(args: ModelArgs, element: int) -> float:
    """Bytes one block saves for backward per token (scaling/memory.py's activation_bytes): the
    two RMSNorm inputs (the residual stream, fp32 even under autocast); in the compute dtype
    (`element` bytes) the norm outputs as the projections' inputs, q, k and v after rotation, the
    attention output and the wo input (5 d + 2 kv_dim), and the SwiGLU w1 and w3 outputs, the silu
    and the product (4 ffn_hidden). SDPA saves no seq x seq score matrix."""
    kv_dim = args.n_kv_heads * args.head_dim
    return 2 * 4 * args.d_model + element * (5 * args.d_model + 2 * kv_dim + 4 * args.ffn_hidden)


def check_args(m: ModelArgs) -> list[str]:
    """The model section's problems, each with the key, the value and a fix."""
    problems = check_positive(m, ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden"))
    if problems:
        return problems
    problems = check_heads_divide(m)
    if not problems and m.head_dim % 2:
        problems.append(f"model.d_model / model.n_heads = {m.head_dim} is odd, but rotary embeddings need an "
                        "even head dimension; change d_model or n_heads")
    if m.n_heads % m.n_kv_heads:
        problems.append(f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}; "
                        f"choose n_kv_heads in {divisors(m.n_heads)}")
    return problems + check_common(m)


def check_positive(m: Any, names: tuple[str, ...]) -> list[str]:
    """The shape keys `names` of a model section that are not positive (check them first: the
    other rules divide by them)."""
    return [f"model.{name}={getattr(m, name)} must be a positive integer" for name in names if getattr(m, name) <= 0]


def check_heads_divide(m: Any) -> list[str]:
    """Every family splits d_model into n_heads heads of equal width."""
    if m.d_model % m.n_heads:
        return [f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; choose "
                f"n_heads in {divisors(m.d_model)} or a d_model that is a multiple of {m.n_heads}"]
    return []


def check_common(m: Any) -> list[str]:
    """Problems of the keys every family has besides the shape."""
    problems = []
    if m.max_seq_len is not None and m.max_seq_len <= 0:
        problems.append(f"model.max_seq_len={m.max_seq_len} must be positive (or null for data.seq_len)")
    if m.init_std <= 0:
        problems.append(f"model.init_std={m.init_std} must be positive, e.g. 0.02")
    return problems


def divisors(n: int) -> str:
    """`{1, 2, 4}`: the divisors of n, for messages that suggest a value."""
    if n > 10**12:  # a trial division up to sqrt(n) would take minutes
        return f"{{the divisors of {n}}}"
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return "{" + ", ".join(str(d) for d in sorted({*small, *(n // d for d in small)})) + "}"
