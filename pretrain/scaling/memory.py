"""Paper estimates of memory per GPU: model states (parameters, gradients, optimizer) under each
parallel backend, and activations of one micro-batch.

Model states follow the ZeRO paper's accounting (Rajbhandari et al. 2020, section 3 and fig. 1),
applied to how each of our backends stores them:
- none / ddp: fp32 master weights, fp32 gradients, AdamW's two fp32 moments, all replicated
  (bf16 is autocast: no second copy of the weights is kept);
- fsdp (FSDP2 with bf16 compute): the same fp32 weights, gradients and moments, all sharded 1/N
  (the bf16 copy of one or two blocks being gathered is transient and left out);
- deepspeed bf16: bf16 weights (2 B) and gradients (2 B) plus fp32 master weights and two moments
  (12 B, the paper's K); stage 1 shards the 12 B, stage 2 also the gradients, stage 3 everything.
In fp32 DeepSpeed keeps a separate fp32 master copy as well (4 + 4 + 12 bytes)."""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.models.args import ModelArgs, count_params

GIB = 2**30

# Shapes for the estimate table: our 7B preset (Llama-3 8B's shape with a 32k vocabulary), and
# Llama 2 13B and 70B (Touvron et al. 2023, table 1; 70B with grouped-query attention).
REFERENCE_SHAPES = {
    "7b": ModelArgs(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=14336,
                    max_seq_len=4096),
    "13b": ModelArgs(vocab_size=32000, d_model=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_hidden=13824,
                     max_seq_len=4096),
    "70b": ModelArgs(vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_hidden=28672,
                     max_seq_len=4096),
}


@dataclass(frozen=True)
class StateBytes:
    """Bytes per GPU of each kind of model state."""

    params: float
    grads: float
    optimizer: float  # AdamW moments, plus the fp32 master copy where one is kept apart

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer


def model_state_bytes(n_params: int, n_gpus: int, backend: str, zero_stage: int = 0, bf16: bool = True) -> StateBytes:
    """Model-state bytes per GPU for `n_params` parameters spread over `n_gpus` data-parallel ranks.

    `backend` is none | ddp | fsdp | deepspeed (`zero_stage` 1-3). With HSDP pass the shard group
    size as `n_gpus` (replicas do not divide the memory)."""
    p, n = float(n_params), max(1, n_gpus)
    if backend in ("none", "ddp"):
        return StateBytes(4 * p, 4 * p, 8 * p)
    if backend == "fsdp":
        return StateBytes(4 * p / n, 4 * p / n, 8 * p / n)
    if backend != "deepspeed" or zero_stage not in (1, 2, 3):
        raise ValueError(f"unknown backend {backend!r} / ZeRO stage {zero_stage}")
    weight = grad = 2 * p if bf16 else 4 * p
    master = 12 * p  # fp32 master copy + 2 moments, kept apart from the weights in either precision
    return StateBytes(
        params=weight / n if zero_stage == 3 else weight,
        grads=grad / n if zero_stage >= 2 else grad,
        optimizer=master / n,
    )


def activation_bytes(args: ModelArgs, seq_len: int, micro_batch: int, checkpointing: str = "none",
                     bf16: bool = True) -> float:
    """Activations one rank keeps for backward for one micro-batch, from counting what our block
    saves per token (attention through SDPA/flash: no seq x seq score matrix is stored):
    - per block without checkpointing: the residual input and two norm outputs (3 d), q, attention
      output and its projection input (3 d), k and v before and after rotation (4 kv_dim), and the
      SwiGLU w1 and w3 outputs, their silu and product (4 ffn_hidden);
    - with full checkpointing: only each block's input (d), plus one block's full set while it is
      recomputed;
    - plus the fp32 logits and their gradient (2 x 4 bytes x vocab), which dominate small models.
    This is a floor: allocator fragmentation and temporary buffers come on top."""
    element = 2 if bf16 else 4
    tokens = seq_len * micro_batch
    kv_dim = args.n_kv_heads * args.head_dim
    per_block = (6 * args.d_model + 4 * kv_dim + 4 * args.ffn_hidden) * element
    if checkpointing == "full":
        blocks = args.n_layers * args.d_model * element + per_block
    else:
        blocks = args.n_layers * per_block
    logits = 2 * 4 * args.vocab_size
    return tokens * (blocks + logits)


def estimate_table(n_gpus_options: tuple[int, ...] = (8, 64, 512), seq_len: int = 4096) -> list[str]:
    """Rows of GiB per GPU for each reference shape and GPU count, bf16, micro-batch 1."""
    backends = [("ddp", 0), ("deepspeed", 1), ("deepspeed", 2), ("fsdp", 0), ("deepspeed", 3)]
    header = (f"{'model':>5} {'params':>7} {'GPUs':>5} | " + " ".join(
        f"{(b if not s else f'zero{s}'):>7}" for b, s in backends) + f" | {'act/AC':>7} {'act':>7}")
    rows = [header, "-" * len(header)]
    for name, args in REFERENCE_SHAPES.items():
        n_params = count_params(args)
        act_full = activation_bytes(args, seq_len, 1, "full") / GIB
        act_none = activation_bytes(args, seq_len, 1, "none") / GIB
        for n_gpus in n_gpus_options:
            states = [model_state_bytes(n_params, n_gpus, b, s).total / GIB for b, s in backends]
            rows.append(f"{name:>5} {n_params / 1e9:6.1f}B {n_gpus:>5} | " + " ".join(f"{v:7.1f}" for v in states)
                        + f" | {act_full:7.1f} {act_none:7.1f}")
    return rows
