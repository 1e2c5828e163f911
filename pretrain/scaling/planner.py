"""The compute planner: a budget (FLOPs, or GPUs x days) or a fixed model size or token count
in; a model shape, token count, batch size, learning rate, parallel layout and schedule out.

The order of decisions: model size from the scaling law (compute-optimal, or inference-aware);
the family's shape nearest that size (scaling/shapes.py), or its largest, with a warning that the
plan is capped, when the law asks for more; tokens from the budget and that shape's
exact FLOPs per token; batch size and learning rate from DeepSeek LLM's fits at that compute;
the first parallel layout that fits the GPU's memory (scaling/memory.py); days from the assumed
MFU; the predicted loss from the law with repeated data discounted (Muennighoff et al.)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from pretrain.errors import PretrainError
from pretrain.models import ModelArgs, count_params, flops_per_token
from pretrain.scaling.gpus import DEFAULT_GPU, GpuSpec, alias_note, gpu_spec
from pretrain.scaling.laws import (
    DEFAULT_LAW,
    SAFE_EPOCHS,
    ScalingLaw,
    deepseek_batch_tokens,
    deepseek_lr,
    effective_tokens,
    inference_aware,
    load_law,
)
from pretrain.scaling.memory import GIB, TrainingMemory, training_memory
from pretrain.scaling.shapes import largest_shape, nearby_shapes, shape_for_params, shapes_around

# Layouts in order of preference when several fit: least communication first.
LAYOUTS = (("ddp", 0), ("fsdp", 0), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3))
CHECKPOINTING = ("none", "selective", "full")  # cheapest recomputation first
MAX_MICRO_BATCH = 16
# Beyond the estimate: CUDA context, NCCL buffers and allocator fragmentation.
RUNTIME_RESERVE_GIB, FRAGMENTATION = 2.0, 0.10
DEFAULT_MFU = 0.40
MAX_WARMUP_STEPS = 2000  # DeepSeek LLM's warmup, for which its learning-rate fit holds
# A fixed size or token count is flagged when the compute-optimal plan for the same compute
# predicts a loss lower by at least this (nats): a chosen threshold that lets sizes within about
# 2x of the optimum pass quietly (at 7.32e21 FLOPs, optimum 7.24B: 5.24B and 14.2B pass, 3.63B
# and 16.4B are flagged; tests/unit/test_planner.py).
MIN_LOSS_GAIN = 0.01


def count(value: float) -> str:
    """1.23B, 45.6M, 7.0T: a count at a glance."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


def duration(days: float) -> str:
    """21.1 s, 5.96 min, 1.89 h, 26.8 days: a wall-clock time at a glance."""
    seconds = days * 86400
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size or unit == "s":
            value = seconds / size
            return f"{value:#.3g}".rstrip(".") + f" {unit}" if value < 1000 else f"{value:,.0f} {unit}"
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class PlanRequest:
    """What the user knows. The budget is `flops`, or `gpus` x `gpu` x `days` at `mfu`; either
    may be replaced or complemented by a fixed `params` or `tokens`."""

    flops: float | None = None
    gpus: int | None = None
    gpu: str | None = None
    days: float | None = None
    mfu: float = DEFAULT_MFU
    params: float | None = None
    tokens: float | None = None
    law: str = DEFAULT_LAW
    inference_tokens: float = 0.0
    seq_len: int | None = None
    vocab_size: int = 32000
    source_tokens: dict[str, float] = field(default_factory=dict)  # unique tokens available per source
    source_weights: dict[str, float] = field(default_factory=dict)  # mixture weights (default: equal)
    price_per_gpu_hour: float | None = None


@dataclass(frozen=True)
class LayoutFit:
    """The cheapest settings with which one backend fits (or its smallest footprint if none does)."""

    backend: str
    zero_stage: int
    checkpointing: str
    micro_batch: int
    memory: TrainingMemory
    fits: bool

    @property
    def label(self) -> str:
        return f"zero{self.zero_stage}" if self.backend == "deepspeed" else self.backend


@dataclass(frozen=True)
class Plan:
    law: ScalingLaw
    shape: ModelArgs
    params: int
    tokens: int
    flops: float
    seq_len: int
    global_batch_tokens: int
    steps: int
    lr: float
    warmup_steps: int
    predicted_loss: float
    effective_tokens: float
    gpus: int
    gpu: GpuSpec
    mfu: float
    days: float
    cost: float | None
    layouts: list[LayoutFit]
    chosen: LayoutFit | None
    budget_note: str
    warnings: list[str]
    target_params: float | None = None  # the size the law (or --params) asked for, before the shape rule
    capped: bool = False  # the law asked for more than the family's largest shape
    requested_params: float | None = None  # --params as given
    rounding: str | None = None  # why the planned size differs from --params (the shape rule's steps)
    gpu_note: str | None = None  # what a GPU alias (--gpu a100) was read as
    better: Plan | None = None  # the compute-optimal plan for the same compute, if it predicts a lower loss

    @property
    def cap_ratio(self) -> float:
        """How many times fewer parameters than asked for the plan has (1.0 when not capped)."""
        return self.target_params / self.params if self.capped and self.target_params else 1.0

    @property
    def micro_batch(self) -> int:
        return self.chosen.micro_batch if self.chosen else 1


def make_plan(request: PlanRequest) -> Plan:
    r = request
    law = load_law(r.law)
    gpu = gpu_spec(r.gpu or DEFAULT_GPU)
    hardware_budget = r.days is not None  # --gpus/--gpu alone only describe the cluster
    if hardware_budget and r.gpus is None:
        raise PretrainError("a hardware budget needs --gpus and --days (and --gpu, default h100), e.g. "
                            "--gpus 64 --gpu h100 --days 21")
    if r.gpus is not None and r.gpus < 1 or r.days is not None and r.days <= 0:
        raise PretrainError(f"--gpus {r.gpus} and --days {r.days} must be positive")
    if r.flops is not None and hardware_budget:
        raise PretrainError("give the budget once: --flops, or --gpus/--gpu/--days")
    if not 0 < r.mfu <= 1:
        raise PretrainError(f"--mfu {r.mfu} must be in (0, 1]; 0.35-0.5 is typical for dense bf16 training")
    budget = r.flops
    if hardware_budget:
        assert r.gpus is not None and r.days is not None  # checked above
        budget = r.gpus * gpu.bf16_flops * r.mfu * r.days * 86400
    if budget is None and r.params is None and r.tokens is None:
        raise PretrainError("nothing to plan from: give a budget (--flops, or --gpus/--gpu/--days), "
                            "or a model size (--params) or a token count (--tokens)")
    if r.params is not None and r.tokens is not None and budget is not None:
        raise PretrainError("--params and --tokens fix the compute already; drop the budget or one of them")

    n_target, note, asked = _target_size(r, law, budget)
    seq_len = r.seq_len or (2048 if n_target < 1e9 else 4096)
    shape = shape_for_params(n_target, r.vocab_size, seq_len)
    if budget is not None and r.params is None and r.tokens is None and r.inference_tokens <= 0:
        # The law's optimum assumes C = 6 N D; with the exact FLOPs per token (attention, head)
        # the best shape of the family can be a neighbour: take the one of least loss.
        shape = min(nearby_shapes(shape), key=lambda s: law.loss(count_params(s), budget / flops_per_token(s, seq_len)))
    n_params = count_params(shape)
    capped = n_target > count_params(largest_shape(r.vocab_size, seq_len))
    if capped:  # no longer what its method (e.g. compute-optimal) asked for: the label says so first
        note = (f"capped at the family's largest shape, {n_target / n_params:.1f}x below the {asked} "
                f"{count(n_target)}" + ("" if asked == "compute-optimal" else f" ({note})"))
    per_token = flops_per_token(shape, seq_len)
    if r.tokens is not None:
        tokens = r.tokens
    elif budget is not None:
        tokens = budget / per_token  # the budget spent on this exact shape, attention included
    else:
        tokens = law.optimal_tokens(n_params)

    # DeepSeek LLM's compute excludes the embedding and the output head (its M).
    core_flops = (per_token - 6 * shape.vocab_size * shape.d_model) * tokens
    gpus = r.gpus or 8
    # A power of two per GPU (at least one sequence), so that any GPU count divides the batch.
    per_gpu = 2 ** max(0, round(math.log2(max(1.0, deepseek_batch_tokens(core_flops) / seq_len / gpus))))
    sequences = per_gpu * gpus
    batch_tokens = sequences * seq_len
    steps = max(1, math.ceil(tokens / batch_tokens))
    tokens = steps * batch_tokens
    flops = float(per_token * tokens)
    warmup = min(MAX_WARMUP_STEPS, max(1, round(0.1 * steps)))

    token_budget = budget if r.tokens is None else None  # the budget the tokens were set from, if any
    warnings = [_cap_warning(n_params, n_target, asked, tokens, token_budget)] if capped else []
    d_eff = _effective_data(tokens, r, warnings)
    layouts = [fit_layout(shape, seq_len, per_gpu, gpus, gpu, b, s) for b, s in LAYOUTS]
    fitting = [f for f in layouts if f.fits]
    chosen = min(fitting, key=lambda f: CHECKPOINTING.index(f.checkpointing)) if fitting else None
    if chosen is None:
        warnings.append(f"the model does not fit on {gpus} x {gpu.name} with any backend, even with full "
                        "activation checkpointing at micro-batch 1: use more GPUs, a GPU with more memory, "
                        "or parallel.offload_optimizer/offload_params (DeepSpeed)")
    days = flops / (gpus * gpu.bf16_flops * r.mfu) / 86400
    cost = gpus * days * 24 * r.price_per_gpu_hour if r.price_per_gpu_hour is not None else None
    if not hardware_budget:
        note += f"; days for {gpus} x {gpu.name} at {r.mfu:.0%} MFU"
    loss = law.loss(n_params, d_eff)
    better = _better_plan(r, budget, flops, seq_len, loss)
    if better is not None:
        warnings.append(_better_warning(r, n_params, tokens, loss, better, budget))
    rounding = None
    if r.params is not None and not capped and n_params != round(r.params):
        rounding = rounding_reason(r.params, n_params, shape.vocab_size)
    return Plan(law=law, shape=shape, params=n_params, tokens=tokens, flops=flops, seq_len=seq_len,
                global_batch_tokens=batch_tokens, steps=steps, lr=deepseek_lr(core_flops), warmup_steps=warmup,
                predicted_loss=loss, effective_tokens=d_eff, gpus=gpus, gpu=gpu, mfu=r.mfu,
                days=days, cost=cost, layouts=layouts, chosen=chosen, budget_note=note, warnings=warnings,
                target_params=n_target, capped=capped, requested_params=r.params, rounding=rounding,
                gpu_note=alias_note(r.gpu), better=better)


def rounding_reason(requested: float, n_params: int, vocab_size: int) -> str:
    """Why --params `requested` became `n_params`: the family's shapes on either side of it, and
    what sets the step between them."""
    below, above = shapes_around(requested, vocab_size)
    sizes = ", ".join(f"d{s.d_model} L{s.n_layers} is {count(count_params(s))}" for s in (below, above))
    return (f"{count(requested)}, rounded {n_params / requested - 1:+.1%} to the family's nearest shape ({sizes}; "
            f"widths step by {above.d_model - below.d_model} here, a multiple of the {above.head_dim}-wide heads, "
            "and depth, heads and MLP width follow from the width: scaling/shapes.py)")


def _better_plan(r: PlanRequest, budget: float | None, flops: float, seq_len: int, loss: float) -> Plan | None:
    """The compute-optimal plan for the same compute (the budget, else the plan's own FLOPs) when
    --params or --tokens fixed the plan and that one predicts a loss lower by MIN_LOSS_GAIN."""
    if r.params is None and r.tokens is None:
        return None
    same_compute = replace(r, params=None, tokens=None, inference_tokens=0.0, seq_len=seq_len,
                           flops=r.flops if budget is not None else flops)
    better = make_plan(same_compute)
    return better if better.predicted_loss <= loss - MIN_LOSS_GAIN else None


def _better_warning(r: PlanRequest, n_params: int, tokens: float, loss: float, better: Plan,
                    budget: float | None) -> str:
    fixed = " and ".join(f"--{name} {count(value)}" for name, value in (("params", r.params), ("tokens", r.tokens))
                         if value is not None)
    how = (f"drop {fixed} to plan it" if budget is not None
           else f"`pretrain plan --flops {better.flops:.3g} --seq-len {better.seq_len}` plans it")
    text = (f"with {fixed} the plan trains {count(n_params)} parameters on {tokens / n_params:.1f} tokens per "
            f"parameter; the compute-optimal plan for the same compute, {count(better.params)} parameters on "
            f"{count(better.tokens)} tokens ({better.tokens / better.params:.1f} per parameter), predicts a loss of "
            f"{better.predicted_loss:.3f} instead of {loss:.3f}: {how}")
    if n_params < better.params:
        text += " (a smaller model can still be right if it will serve many tokens: see --inference-tokens)"
    return text


def _target_size(r: PlanRequest, law: ScalingLaw, budget: float | None) -> tuple[float, str, str]:
    """(the model size asked for, how it was decided, a word for it: "compute-optimal", ...)."""
    if r.params is not None:
        return r.params, "model size given", "requested"
    if r.tokens is not None and budget is not None:
        return budget / (6 * r.tokens), "token count given, size from the budget", "budget's"
    if r.tokens is not None:
        return law.optimal_params(r.tokens), "compute-optimal size for the token count", "compute-optimal"
    assert budget is not None  # make_plan refuses a request with neither budget, size nor tokens
    if r.inference_tokens > 0:
        n_target, _ = inference_aware(law, budget, r.inference_tokens)
        note = f"inference-aware for {r.inference_tokens:.3g} inference tokens (Sardana & Frankle 2023)"
        return n_target, note, "inference-aware"
    return law.compute_optimal(budget)[0], "compute-optimal (Chinchilla allocation)", "compute-optimal"


def _cap_warning(n_params: int, n_target: float, asked: str, tokens: float, budget: float | None) -> str:
    """Why a plan whose model is the family's largest shape, smaller than asked, is not what was
    asked: by how much, and (when the budget sets the tokens) where the rest of the budget goes."""
    text = (f"the model is capped at the family's largest shape, {count(n_params)} parameters, "
            f"{n_target / n_params:.1f}x below the {asked} {count(n_target)}")
    if budget is not None:
        # at the size asked for, C = 6 N D gives D / N = C / (6 N^2) tokens per parameter
        text += (f"; the remaining budget goes to tokens ({tokens / n_params:.0f} tokens per parameter instead "
                 f"of ~{budget / (6 * n_target**2):.0f})")
    return text + "; the shape rule (scaling/shapes.py) ends at d25600 L128, Megatron-LM's 1T GPT shape"


def fits_in(memory: TrainingMemory, gpu: GpuSpec) -> bool:
    return memory.total * (1 + FRAGMENTATION) + RUNTIME_RESERVE_GIB * GIB <= gpu.memory_gib * GIB


def fit_layout(shape: ModelArgs, seq_len: int, sequences_per_gpu: int, gpus: int, gpu: GpuSpec,
               backend: str, zero_stage: int) -> LayoutFit:
    """The cheapest activation checkpointing, then the largest micro-batch (a power of two that
    divides this GPU's share of the batch), with which `backend` fits in `gpu`'s memory."""
    largest = max(1, min(MAX_MICRO_BATCH, sequences_per_gpu))
    micro_batches = [m for m in (2**i for i in range(largest.bit_length() - 1, -1, -1)) if sequences_per_gpu % m == 0]
    for checkpointing in CHECKPOINTING:
        for micro_batch in micro_batches or [1]:
            memory = training_memory(shape, seq_len, micro_batch, gpus, backend, zero_stage, checkpointing)
            if fits_in(memory, gpu):
                return LayoutFit(backend, zero_stage, checkpointing, micro_batch, memory, True)
    smallest = training_memory(shape, seq_len, 1, gpus, backend, zero_stage, "full")
    return LayoutFit(backend, zero_stage, "full", 1, smallest, False)


def _effective_data(tokens: float, r: PlanRequest, warnings: list[str]) -> float:
    """Tokens of unique data the run is worth, summed over sources, with a warning for each
    source repeated beyond ~4 epochs (Muennighoff et al. 2023)."""
    if not r.source_tokens:
        return tokens
    weights = {name: r.source_weights.get(name, 1.0) for name in {**r.source_weights, **r.source_tokens}}
    total_weight = sum(weights.values())
    worth = 0.0
    for name, weight in weights.items():
        used = tokens * weight / total_weight
        unique = r.source_tokens.get(name)
        if unique is None:  # availability not given: counted as all new data
            worth += used
            continue
        epochs = used / unique
        worth += effective_tokens(unique, used)
        if epochs > SAFE_EPOCHS:
            warnings.append(f"source {name!r} would be repeated {epochs:.1f} times ({used:.3g} of {unique:.3g} unique "
                            f"tokens): beyond ~{SAFE_EPOCHS:.0f} epochs repeated tokens are worth much less than new "
                            f"ones (Muennighoff et al. 2023; these {used:.3g} are worth "
                            f"{effective_tokens(unique, used):.3g}); lower its weight, find more data, or train a "
                            "larger model on fewer tokens")
    return worth
