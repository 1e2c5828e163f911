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

from pretrain.models import AnyModelArgs, ModelArgs, count_params, model_spec

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


def activation_bytes(args: AnyModelArgs, seq_len: int, micro_batch: int, checkpointing: str = "none",
                     bf16: bool = True, ac_every: int = 2) -> float:
    """Peak bytes one rank holds for backward for one micro-batch, from what autograd saves per
    token in the family's block (SDPA saves no seq x seq score matrix):
    - per block: what the family's ModelSpec.block_activation_bytes counts (for Llama: the two
      RMSNorm inputs in fp32, then q, k, v, the projections' inputs and the SwiGLU's four
      ffn_hidden-wide tensors in the compute dtype: pretrain/models/args.py);
    - a checkpointed block keeps only its input, and one block's set while it is recomputed;
    - the loss: logits, fp32 log-softmax and its gradient (12 bytes x vocab) live at once while
      every block's activations are still held; with checkpointing it is the larger of that and
      one recomputed block.
    `checkpointing` is none | full | selective (every `ac_every`-th block). Measured on CPU in
    tests/e2e/test_memory_measured.py: within 20% of the real peak."""
    element = 2 if bf16 else 4
    block = model_spec(args).block_activation_bytes(args, element)
    logits = 12 * args.vocab_size
    checkpointed = {"none": 0, "full": args.n_layers, "selective": args.n_layers // max(1, ac_every)}[checkpointing]
    held = (args.n_layers - checkpointed) * block + checkpointed * 4 * args.d_model
    transient = max(logits, block) if checkpointed else logits
    return seq_len * micro_batch * (held + transient)


@dataclass(frozen=True)
class TrainingMemory:
    """Estimated peak bytes per GPU of one training layout."""

    states: StateBytes
    activations: float
    compute_copies: float  # bf16 copies of the weights that autocast or FSDP gathers keep for backward

    @property
    def total(self) -> float:
        return self.states.total + self.activations + self.compute_copies


def training_memory(args: AnyModelArgs, seq_len: int, micro_batch: int, n_gpus: int, backend: str,
                    zero_stage: int = 0, checkpointing: str = "none", bf16: bool = True,
                    ac_every: int = 2) -> TrainingMemory:
    """Model states (sharded as `backend` shards them), activations of one micro-batch, and the
    bf16 weight copies held through backward: all of them for none/ddp (autocast's cast
    weights are saved for the backward matmuls), two blocks' worth for fsdp (the gathered block and
    the prefetched one), none for DeepSpeed (its weights already are bf16)."""
    n_params = count_params(args)
    copies = 0.0
    if bf16 and backend in ("none", "ddp"):
        copies = 2.0 * n_params
    elif bf16 and backend == "fsdp":
        copies = 2.0 * 2 * (n_params - args.vocab_size * args.d_model) / max(1, args.n_layers)
    return TrainingMemory(states=model_state_bytes(n_params, n_gpus, backend, zero_stage, bf16),
                          activations=activation_bytes(args, seq_len, micro_batch, checkpointing, bf16, ac_every),
                          compute_copies=copies)


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
