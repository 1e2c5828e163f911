"""One rule for Llama-style model shapes, from a 1M-parameter sweep model to a ~1T one.

For a width d_model:
- head_dim 32 below d_model 256, 64 below 2048, 128 from there (GPT-3 / Llama practice);
- depth from the width-to-depth ratio d_model / n_layers: 64 up to d_model 1024 (GPT-3 Small and
  Medium), rising log-linearly to 128 at 4096 (Llama 7B and 13B) and staying there up to 128
  blocks at 16384 (Llama 3 405B: d16384, 126 blocks); Kaplan et al. 2020 (fig. 5) found loss
  nearly flat for ratios between ~20 and ~200, so this only needs to be sensible, and deeper is
  slower per parameter; at least 2 blocks, an even count from 8 up;
- at most 128 blocks: wider than 16384 only the width grows, as in the largest published dense
  shapes (PaLM 540B: 118 blocks; Megatron-LM's 1T GPT, Narayanan et al. 2021 table 1: d25600,
  128 blocks), since depth is sequential time per step and pipeline stages; the family ends at
  d25600 (ratio 200, the top of Kaplan et al.'s flat range, ~1.05T parameters), beyond which the
  planner says its model is capped;
- grouped-query attention with one key/value head per 4 query heads, at most 8 (Llama 3);
- SwiGLU width 1.3 x 8/3 x d_model rounded up to a multiple of 1024 from d_model 4096 (Llama 3's
  rule: 4096 -> 14336, 8192 -> 28672), of 256 from 1024 (Llama 2's), of 64 or 32 below;
- the output head tied to the embedding up to d_model 2048 (Llama 3.2 1B and 3B, OLMo 1B), where
  the embedding is a large share of the parameters.
Widths step by 32 below 256, 64 below 512, 128 below 2048, 256 below 8192, 512 below 16384, then
1024 (an even number of heads from 512 wide; from 16384 a multiple of 8 heads, so 8 key/value
heads and 8-way tensor parallelism always divide)."""

from __future__ import annotations

import bisect
import math
from functools import lru_cache

from pretrain.models import ModelArgs, count_params

MIN_D_MODEL, MAX_D_MODEL = 32, 25600
MAX_LAYERS = 128


def shape_for_width(d_model: int, vocab_size: int = 32000, seq_len: int = 2048) -> ModelArgs:
    """The shape of the family at width `d_model` (a multiple of its head size)."""
    head_dim = 32 if d_model < 256 else 64 if d_model < 2048 else 128
    if d_model % head_dim:
        raise ValueError(f"d_model={d_model} is not a multiple of the head size {head_dim}")
    ratio = 64 * 2 ** min(1.0, max(0.0, math.log2(d_model / 1024) / 2))
    n_layers = max(2, round(d_model / ratio))
    if n_layers >= 8:
        n_layers = min(MAX_LAYERS, n_layers + n_layers % 2)  # past d16384 only the width grows
    n_heads = d_model // head_dim
    n_kv_heads = max(1, min(8, n_heads // 4))
    while n_heads % n_kv_heads:
        n_kv_heads -= 1
    multiple = 1024 if d_model >= 4096 else 256 if d_model >= 1024 else 64 if d_model >= 256 else 32
    ffn_hidden = math.ceil(1.3 * 8 * d_model / 3 / multiple) * multiple
    return ModelArgs(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                     n_kv_heads=n_kv_heads, ffn_hidden=ffn_hidden, max_seq_len=seq_len,
                     tie_embeddings=d_model <= 2048, rope_theta=500000.0 if d_model >= 2048 else 10000.0)


def widths() -> list[int]:
    """Every width of the family, smallest first."""
    out, d = [], MIN_D_MODEL
    while d <= MAX_D_MODEL:
        out.append(d)
        d += (32 if d < 256 else 64 if d < 512 else 128 if d < 2048 else 256 if d < 8192
              else 512 if d < 16384 else 1024)
    return out


@lru_cache(maxsize=16)
def _ladder(vocab_size: int) -> tuple[list[int], list[float]]:
    ds = widths()
    return ds, [math.log(count_params(shape_for_width(d, vocab_size))) for d in ds]


def shape_for_params(n_params: float, vocab_size: int = 32000, seq_len: int = 2048) -> ModelArgs:
    """The family's shape whose parameter count is nearest `n_params` (in ratio)."""
    ds, log_sizes = _ladder(vocab_size)
    target = math.log(max(n_params, 1.0))
    i = bisect.bisect_left(log_sizes, target)
    candidates = [j for j in (i - 1, i) if 0 <= j < len(ds)]
    best = min(candidates, key=lambda j: abs(log_sizes[j] - target))
    return shape_for_width(ds[best], vocab_size, seq_len)


def largest_shape(vocab_size: int = 32000, seq_len: int = 2048) -> ModelArgs:
    """The family's widest shape: the most parameters `shape_for_params` ever returns."""
    return shape_for_width(MAX_D_MODEL, vocab_size, seq_len)


def shape_summary(args: ModelArgs) -> str:
    """`d768 L12 H12/3 ffn2048` (width, blocks, query/key-value heads, MLP width)."""
    return (f"d{args.d_model} L{args.n_layers} H{args.n_heads}/{args.n_kv_heads} ffn{args.ffn_hidden}"
            + (" tied" if args.tie_embeddings else ""))


def shapes_around(n_params: float, vocab_size: int = 32000) -> tuple[ModelArgs, ModelArgs]:
    """The family's neighbouring shapes with fewer and with more parameters than `n_params` (the
    two smallest or largest at the family's ends): what a request is rounded between."""
    ds, log_sizes = _ladder(vocab_size)
    i = min(max(1, bisect.bisect_left(log_sizes, math.log(max(n_params, 1.0)))), len(ds) - 1)
    return shape_for_width(ds[i - 1], vocab_size), shape_for_width(ds[i], vocab_size)


def nearby_shapes(args: ModelArgs, k: int = 2) -> list[ModelArgs]:
    """The family's shapes up to `k` widths narrower and wider than `args` (itself included)."""
    ds = widths()
    i = ds.index(args.d_model)
    assert args.max_seq_len is not None  # the planner's shapes are built with it
    return [shape_for_width(d, args.vocab_size, args.max_seq_len) for d in ds[max(0, i - k):i + k + 1]]
