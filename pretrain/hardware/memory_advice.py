"""Advice on memory: the estimate per rank of a config on its device, the knobs that lower it
(micro-batch, activation checkpointing, sharding, offloading), which of them make it fit, how many
ranks would when none does, and what to say on torch.OutOfMemoryError. The paper estimate itself
is scaling.memory.training_memory; this module maps a Config onto it and searches the knobs."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch

from pretrain.config.schema import Config
from pretrain.hardware.devices import resolve_precision
from pretrain.parallel.dims import dp_degrees
from pretrain.parallel.launch_env import launch_env
from pretrain.scaling.memory import GIB, StateBytes, TrainingMemory, training_memory


def memory_estimate(cfg: Config, world_size: int, device: torch.device) -> TrainingMemory:
    """Peak bytes per rank of training `cfg` on `world_size` ranks (scaling.memory.training_memory),
    less the model states that offloading keeps in host memory when `device` is a GPU."""
    p = cfg.parallel
    bf16 = resolve_precision(cfg.train.precision, device) == "bf16"
    ranks = dp_degrees(p, world_size)[1] if p.backend == "fsdp" else world_size  # HSDP replicas do not divide
    estimate = training_memory(cfg.model, cfg.data.seq_len, cfg.train.micro_batch_size, ranks, p.backend,
                               p.zero_stage, p.activation_checkpointing, bf16, p.ac_every)
    if device.type != "cuda":
        return estimate  # offloaded or not, it is the same memory
    s = estimate.states
    if p.backend == "fsdp" and p.cpu_offload:
        s = StateBytes(0.0, 0.0, 0.0)
    elif p.backend == "deepspeed":
        s = StateBytes(0.0 if p.offload_params else s.params, s.grads, 0.0 if p.offload_optimizer else s.optimizer)
    return dataclasses.replace(estimate, states=s)


def device_memory_bytes(device: torch.device, world_size: int = 1) -> float | None:
    """What one rank may use: the GPU's total memory, or on a CPU the machine's MemAvailable shared
    by the ranks on this machine (torchrun's LOCAL_WORLD_SIZE); None where it cannot be read."""
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    return kib * 1024 / (launch_env().local_world_size or world_size)


def memory_text(m: TrainingMemory, available: float | None) -> str:
    """The estimate per rank (of `available` bytes when known) and its three parts."""
    of = f" of {available / GIB:.2f} GiB" if available else ""
    return (f"{m.total / GIB:.2f} GiB per rank{of} (model states {m.states.total / GIB:.2f} + activations "
            f"{m.activations / GIB:.2f} + bf16 weight copies {m.compute_copies / GIB:.2f})")


def oom_message(cfg: Config, world_size: int, device: torch.device) -> str:
    """What to say on torch.OutOfMemoryError: the estimate per rank against the device's memory,
    and the knobs that lower it."""
    m, available = memory_estimate(cfg, world_size, device), device_memory_bytes(device, world_size)
    lines = [f"out of memory on {device}: this config needs about {memory_text(m, available)}"]
    if available and m.total < available:
        lines.append("the estimate fits: look for other processes on the device (nvidia-smi) or fragmentation "
                     "(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)")
    return "\n".join(lines + memory_fixes(cfg, world_size, device))


# A knob's setting: config keys set together, e.g. (("parallel.replicate", 1), ("parallel.shard", None)).
Setting = tuple[tuple[str, object], ...]
# Where each knob is listed; a setting is named by its first key.
KNOB_ORDER = ("train.micro_batch_size", "parallel.activation_checkpointing", "parallel.backend", "parallel.replicate",
              "parallel.zero_stage", "parallel.cpu_offload", "parallel.offload_optimizer")
UNCHANGED_BATCH = ("train.global_batch_tokens stays the same: gradient accumulation absorbs a smaller "
                   "micro-batch")


@dataclass(frozen=True)
class MemoryChange:
    """Knob settings changed together, and the estimate per rank they give."""

    settings: tuple[Setting, ...]
    total: float

    @property
    def flags(self) -> str:
        return " ".join(f"--{key}={_flag_value(value)}" for setting in self.settings for key, value in setting)


def _change_line(change: MemoryChange) -> str:
    return f"  {change.flags:<40} -> {change.total / GIB:.2f} GiB per rank"


def _flag_value(value: object) -> str:
    return "null" if value is None else str(value).lower()


def _value(cfg: Config, key: str) -> object:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def _with_settings(cfg: Config, *settings: Setting) -> Config:
    """cfg with the settings' keys changed (past validate(): the estimate needs no derived value)."""
    for key, value in (pair for setting in settings for pair in setting):
        section, name = key.split(".")
        cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})
    return cfg


def _memory_knobs(cfg: Config, world_size: int) -> list[list[Setting]]:
    """Each knob not yet turned, its settings mildest first: a smaller micro-batch that keeps the
    global batch, activation checkpointing, sharding the model states over the ranks."""
    p, micro_batch = cfg.parallel, cfg.train.micro_batch_size
    tokens = cfg.train.global_batch_tokens
    per_rank = tokens // cfg.data.seq_len // world_size if tokens else micro_batch
    micro: list[Setting] = [(("train.micro_batch_size", m),) for m in range(micro_batch - 1, 0, -1)
                            if per_rank % m == 0]
    checkpointing = {"none": ["selective", "full"], "selective": ["full"], "full": []}[p.activation_checkpointing]
    sharding: list[Setting] = []
    if p.backend in ("none", "ddp"):
        sharding = [(("parallel.backend", "fsdp"),)]
    elif p.backend == "fsdp" and p.replicate > 1:  # HSDP: shard over every rank instead
        sharding = [(("parallel.replicate", 1), ("parallel.shard", None))]
    elif p.backend == "deepspeed":
        sharding = [(("parallel.zero_stage", stage),) for stage in range(p.zero_stage + 1, 4)]
    knobs: list[list[Setting]] = [micro, [(("parallel.activation_checkpointing", ac),) for ac in checkpointing],
                                  sharding]
    return [settings for settings in knobs if settings]


def _offload_settings(cfg: Config) -> list[Setting]:
    """Offloading not yet turned on for cfg's backend (it lowers the estimate on a GPU only)."""
    p = cfg.parallel
    if p.backend == "fsdp":
        return [] if p.cpu_offload else [(("parallel.cpu_offload", True),)]
    if p.backend != "deepspeed":
        return []
    optimizer: Setting = () if p.offload_optimizer else (("parallel.offload_optimizer", True),)
    settings = [optimizer] if optimizer else []
    if p.zero_stage == 3 and not p.offload_params:
        settings.append(optimizer + (("parallel.offload_params", True),))
    return settings


def memory_changes(cfg: Config, world_size: int, device: torch.device) -> list[MemoryChange]:
    """Every combination of the knobs (at most one setting of each), unchanged cfg included,
    with its estimate per rank; offloading only on a GPU."""
    changes = []
    for picks in itertools.product(*[[None, *settings] for settings in _memory_knobs(cfg, world_size)]):
        chosen = tuple(setting for setting in picks if setting)
        changed = _with_settings(cfg, *chosen)
        for offload in [None, *(_offload_settings(changed) if device.type == "cuda" else [])]:
            settings = (*chosen, offload) if offload else chosen
            estimated = _with_settings(changed, offload) if offload else changed
            changes.append(MemoryChange(settings, memory_estimate(estimated, world_size, device).total))
    return changes


def memory_fixes(cfg: Config, world_size: int, device: torch.device) -> list[str]:
    """Each knob not yet turned that lowers the estimate per rank, at its strongest setting, with
    the estimate it gives (offloading only on a GPU: on a CPU it is the same memory)."""
    now = memory_estimate(cfg, world_size, device).total
    strongest: dict[str, MemoryChange] = {}
    for change in memory_changes(cfg, world_size, device):
        if len(change.settings) != 1 or change.total >= now:
            continue
        knob = change.settings[0][0][0]
        if knob not in strongest or change.total < strongest[knob].total:
            strongest[knob] = change
    return ([f"to use less memory, change one of these ({UNCHANGED_BATCH}):"]
            + [_change_line(strongest[knob]) for knob in KNOB_ORDER if knob in strongest])


def memory_fits(cfg: Config, world_size: int, device: torch.device, available: float) -> list[MemoryChange]:
    """The smallest changes that bring the estimate per rank within `available` bytes: the fewest
    knobs, and for each set of knobs its mildest settings that fit (the most memory used, e.g.
    the largest micro-batch). Empty when no combination fits."""
    fitting = [c for c in memory_changes(cfg, world_size, device) if c.settings and c.total <= available]
    fewest = min((len(c.settings) for c in fitting), default=0)
    mildest: dict[tuple[str, ...], MemoryChange] = {}
    for change in fitting:
        knobs = tuple(setting[0][0] for setting in change.settings)
        if len(knobs) == fewest and (knobs not in mildest or change.total > mildest[knobs].total):
            mildest[knobs] = change
    return [mildest[k] for k in sorted(mildest, key=lambda knobs: [KNOB_ORDER.index(key) for key in knobs])]


def ranks_to_fit(cfg: Config, world_size: int, device: torch.device,
                 available: float) -> tuple[int, MemoryChange] | None:
    """The fewest ranks (dividing the global batch where a count near it does) over which
    micro-batch 1, full activation checkpointing and every model state sharded (FSDP, or ZeRO-3
    under DeepSpeed) fit in `available` bytes per rank, and that change with its estimate there.
    None when no count does: activations and weight copies alone exceed it."""
    sharded: Setting = ((("parallel.zero_stage", 3),) if cfg.parallel.backend == "deepspeed" else
                        (("parallel.backend", "fsdp"), ("parallel.replicate", 1), ("parallel.shard", None)))
    least: Setting = tuple((key, value) for key, value in (("train.micro_batch_size", 1),
                                                           ("parallel.activation_checkpointing", "full"), *sharded)
                           if _value(cfg, key) != value)  # only what changes, for the message
    changed = _with_settings(cfg, least)

    def total(ranks: int) -> float:
        return memory_estimate(changed, ranks, device).total

    fits, too_few = 2**40, world_size - 1  # the states shrink as 1/ranks: 2**40 ranks hold none of them
    if total(fits) > available:
        return None
    while fits - too_few > 1:  # bisect: total falls as ranks grow
        middle = (fits + too_few) // 2
        fits, too_few = (middle, too_few) if total(middle) <= available else (fits, middle)
    # validate() wants the global batch in sequences divisible by micro-batch (1) x ranks.
    sequences = (cfg.train.global_batch_tokens or 0) // cfg.data.seq_len
    ranks = next((n for n in range(fits, min(sequences, 10**6) + 1) if sequences % n == 0), fits)
    return ranks, MemoryChange((least,), total(ranks))


def memory_advice(cfg: Config, world_size: int, device: torch.device, available: float) -> list[str]:
    """What to say when the estimate exceeds `available` bytes per rank: the smallest changes that
    fit, each with its estimate; or that none does on this hardware, and what would."""
    fits = memory_fits(cfg, world_size, device, available)
    if fits:
        head = ("it fits with any one of these changes" if len(fits[0].settings) == 1 else
                "no single change fits; this combination does" if len(fits) == 1 else
                "no single change fits; each of these combinations does")
        if any(setting[0][0] == "train.micro_batch_size" for c in fits for setting in c.settings):
            head += f" ({UNCHANGED_BATCH})"
        return [head + ":"] + [_change_line(c) for c in fits]
    least = min(memory_changes(cfg, world_size, device), key=lambda c: (c.total, len(c.settings)))
    turned = f"with {least.flags}" if least.settings else "as configured (every knob is already turned)"
    lines = [f"nothing fits in {available / GIB:.2f} GiB per rank on this hardware: the least memory these knobs "
             f"reach is {least.total / GIB:.2f} GiB per rank, {turned}"]
    more = ranks_to_fit(cfg, world_size, device, available)
    if more is None:
        lines.append("no number of ranks makes it fit (activations and weight copies alone exceed it): train a "
                     "smaller model (model.d_model, model.n_layers) or shorter sequences (data.seq_len)")
        return lines
    ranks, change = more
    where = (f"e.g. {ranks} machines with this much free memory, one rank each" if device.type == "cpu" else
             f"{ranks} GPUs of {available / GIB:.0f} GiB")
    lines.append(f"it would fit sharded over {ranks} ranks ({where}): {change.flags} -> {change.total / GIB:.2f} "
                 "GiB per rank; or train a smaller model")
    return lines
