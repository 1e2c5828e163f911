"""`pretrain preflight`: cheap checks before a job spends its allocation. Every rank reaches the
others and all-reduces at some bandwidth, the device computes at some matmul FLOP/s, the config's
estimated memory fits the device, and out_dir has room for the checkpoints. A second or two on a
CPU, so it also runs at the start of every training run (with measure=False)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from pretrain.config import Config, load_config
from pretrain.errors import PretrainError
from pretrain.hardware import measure_matmul_flops, peak_flops, resolve_precision
from pretrain.models import count_params
from pretrain.parallel import (
    DistInfo,
    collective_failures_named,
    destroy_process_group,
    dist_info_from_env,
    init_process_group,
)
from pretrain.scaling.memory import GIB, StateBytes, TrainingMemory, training_memory

MIB = 2**20
# Besides the 12 B/parameter: the tokenizer copy, config, trainer and data state, per-rank RNG
# states, DCP's metadata and per-tensor headers (0.2 MB for the 0.14M-parameter test model).
CHECKPOINT_ALLOWANCE = 16 * MIB


@dataclass(frozen=True)
class RankInfo:
    rank: int
    host: str
    pid: int
    device: str


@dataclass(frozen=True)
class RankReport:
    """The ranks that answered, and how long an all-reduce of `allreduce_bytes` took over them."""

    ranks: list[RankInfo]
    allreduce_bytes: int = 0
    allreduce_s: float | None = None  # mean of the timed iterations; None alone or unmeasured

    @property
    def algbw(self) -> float | None:
        """Bytes/s: buffer size / time (nccl-tests' "algorithm bandwidth")."""
        return self.allreduce_bytes / self.allreduce_s if self.allreduce_s else None

    @property
    def busbw(self) -> float | None:
        """Bytes/s each link carries in a ring all-reduce, algbw * 2(n-1)/n (nccl-tests,
        doc/PERFORMANCE.md): comparable with the link's peak whatever the number of ranks."""
        n = len(self.ranks)
        return self.algbw * 2 * (n - 1) / n if self.algbw else None


def check_ranks(info: DistInfo, timeout_s: float, buffer_bytes: int | None = None, iters: int = 5,
                warmup: int = 2) -> RankReport:
    """Every rank says where it runs (an all-gather over the job's process group; a rank that does
    not answer within the group's timeout, `timeout_s`, becomes a PretrainError naming this rank);
    then `iters` all-reduces of `buffer_bytes` (64 MiB on a GPU, 8 MiB on a CPU) are timed after
    `warmup` ones (iters=0: not timed). Without a process group: this rank alone."""
    me = RankInfo(info.rank, socket.gethostname(), os.getpid(), str(info.device))
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return RankReport([me])
    with collective_failures_named(info, timeout_s):
        ranks: list[RankInfo] = [None] * info.world_size  # type: ignore[list-item]
        dist.all_gather_object(ranks, me)
        if iters == 0:
            return RankReport(ranks)
        nbytes = buffer_bytes or (64 * MIB if info.device.type == "cuda" else 8 * MIB)
        return RankReport(ranks, nbytes, _time_all_reduce(info.device, nbytes, warmup, iters))


def _time_all_reduce(device: torch.device, nbytes: int, warmup: int, iters: int) -> float:
    buffer = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)  # zeros: sums never overflow
    for i in range(warmup + iters):
        if i == warmup:
            _synchronize(device)  # NCCL returns before the GPU is done: time finished work only
            start = time.perf_counter()
        dist.all_reduce(buffer)
    _synchronize(device)
    return (time.perf_counter() - start) / iters


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(cfg: Config, device: torch.device, precision: str) -> tuple[float, float | None, str]:
    """(measured matmul FLOP/s, the peak it is compared with or None, where the peak comes from):
    logging.peak_flops if set, else the GPU datasheet table; a CPU has neither."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if cfg.logging.peak_flops:
        peak, source = cfg.logging.peak_flops, "logging.peak_flops"
    elif device.type == "cuda":
        peak, source = peak_flops(device, precision)
        if not source.startswith("datasheet"):  # a GPU missing from the table: peak_flops just measured it
            return peak, None, ""
    else:
        peak, source = None, ""
    # 8192 keeps a GPU busy long enough that launch overhead vanishes; 1024 takes ~40 ms on a CPU core.
    measured = measure_matmul_flops(device, dtype, size=8192 if device.type == "cuda" else 1024, seconds=0.2)
    return measured, peak, source


def memory_estimate(cfg: Config, world_size: int, device: torch.device) -> TrainingMemory:
    """Peak bytes per rank of training `cfg` on `world_size` ranks (scaling.memory.training_memory),
    less the model states that offloading keeps in host memory when `device` is a GPU."""
    p = cfg.parallel
    bf16 = resolve_precision(cfg.train.precision, device) == "bf16"
    ranks = p.mesh_shape(world_size)[1] if p.backend == "fsdp" else world_size  # HSDP replicas do not divide
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
    return kib * 1024 / int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


def checkpoint_bytes(cfg: Config) -> int:
    """Bytes of one checkpoint: fp32 weights and AdamW's two fp32 moments (12 B/parameter);
    DeepSpeed also saves the module's own weights beside its fp32 master copy (counted at 4 B,
    an upper bound for bf16); plus CHECKPOINT_ALLOWANCE."""
    per_param = 16 if cfg.parallel.backend == "deepspeed" else 12
    return per_param * count_params(cfg.model) + CHECKPOINT_ALLOWANCE


def check_out_dir(out_dir: str) -> None:
    """Create out_dir (with its parents, as training would) and write and remove a small file in
    it, and in out_dir/checkpoints if that already exists; a PretrainError naming the path and the
    cause (a read-only mount, no permission, a parent that is a file) when either fails. Writing a
    file is the test that holds for root too, whom permission bits do not stop."""
    path = Path(out_dir)
    for directory in (path, path / "checkpoints"):
        if directory != path and not os.path.lexists(directory):
            continue  # training creates it in out_dir, which was just written
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
            raise PretrainError(f"out_dir {out_dir} cannot be created: {_cause(directory, exc)}; choose another "
                                "--out_dir or fix that path") from None
        try:
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".preflight-") as probe:
                probe.write(b"preflight")
                probe.flush()
        except OSError as exc:
            raise PretrainError(f"out_dir {out_dir} cannot be written: {_cause(directory, exc)} (creating a file in "
                                f"{directory}); choose another --out_dir or make it writable (permissions, a "
                                "read-write mount)") from None


def _cause(path: Path, exc: OSError | ValueError) -> str:
    """Why creating or writing in `path` failed: the file in the way where there is one, else the
    OS error (with the directory mkdir stopped at, when that is a parent)."""
    if isinstance(exc, (NotADirectoryError, FileExistsError)):
        try:
            blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        except OSError:
            blocker = None
        if blocker == path:
            return f"{path} is a file, not a directory"
        if blocker is not None:
            return f"a parent, {blocker}, is a file"
    if not isinstance(exc, OSError) or exc.errno is None:
        return str(exc)
    parent = exc.filename if exc.filename and Path(exc.filename) in path.parents else None
    return f"[Errno {exc.errno}] {exc.strerror}" + (f" (creating {parent})" if parent else "")


def free_disk(out_dir: str) -> tuple[Path, int]:
    """(out_dir or its nearest existing parent, free bytes on that filesystem)."""
    path = Path(out_dir).absolute()
    while not path.exists():
        path = path.parent
    return path, shutil.disk_usage(path).free


def check_free_disk(out_dir: str, checkpoint_size: int, copies: int = 2) -> int:
    """Free bytes at out_dir; a PretrainError with the numbers and the fixes when `copies`
    checkpoints of `checkpoint_size` bytes do not fit. No checkpoint.keep_last helps: the newest
    checkpoint is deleted only once the next is complete (CheckpointManager.prune), so even
    keep_last=1 holds two at once while saving every N steps."""
    path, free = free_disk(out_dir)
    needed = copies * checkpoint_size
    if free >= needed:
        return free
    where = f"out_dir {out_dir} ({path}) has {free / GIB:.2f} GiB free"
    room = (f"choose another --out_dir on a disk with {needed / GIB:.2f} GiB free"
            + (" (two checkpoints while the next is written)" if copies == 2 else "")
            + f", or free {(needed - free) / GIB:.2f} GiB there")
    if free < checkpoint_size:
        raise PretrainError(f"{where} but one checkpoint of this model needs {checkpoint_size / GIB:.2f} GiB, so no "
                            f"checkpoint.keep_last helps; {room}")
    raise PretrainError(f"{where} but two checkpoints of this model need {needed / GIB:.2f} GiB: the newest stays "
                        f"until the next one is complete, so even --checkpoint.keep_last=1 needs room for two; {room}")


def oom_message(cfg: Config, world_size: int, device: torch.device) -> str:
    """What to say on torch.OutOfMemoryError: the estimate per rank against the device's memory,
    and the knobs that lower it."""
    m, available = memory_estimate(cfg, world_size, device), device_memory_bytes(device, world_size)
    lines = [f"out of memory on {device}: this config needs about {_memory_text(m, available)}"]
    if available and m.total < available:
        lines.append("the estimate fits: look for other processes on the device (nvidia-smi) or fragmentation "
                     "(PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True)")
    return "\n".join(lines + memory_fixes(cfg, world_size, device))


def _memory_text(m: TrainingMemory, available: float | None) -> str:
    of = f" of {available / GIB:.2f} GiB" if available else ""
    return (f"{m.total / GIB:.2f} GiB per rank{of} (model states {m.states.total / GIB:.2f} + activations "
            f"{m.activations / GIB:.2f} + bf16 weight copies {m.compute_copies / GIB:.2f})")


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
    micro = [(("train.micro_batch_size", m),) for m in range(micro_batch - 1, 0, -1) if per_rank % m == 0]
    checkpointing = {"none": ["selective", "full"], "selective": ["full"], "full": []}[p.activation_checkpointing]
    sharding: list[Setting] = []
    if p.backend in ("none", "ddp"):
        sharding = [(("parallel.backend", "fsdp"),)]
    elif p.backend == "fsdp" and p.mesh_shape(world_size)[0] > 1:  # HSDP: shard over every rank instead
        sharding = [(("parallel.replicate", 1), ("parallel.shard", None))]
    elif p.backend == "deepspeed":
        sharding = [(("parallel.zero_stage", stage),) for stage in range(p.zero_stage + 1, 4)]
    knobs = [micro, [(("parallel.activation_checkpointing", ac),) for ac in checkpointing], sharding]
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
            changes.append(MemoryChange(settings, memory_estimate(_with_settings(cfg, *settings), world_size,
                                                                  device).total))
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


@dataclass(frozen=True)
class PreflightReport:
    ranks: RankReport
    world_size: int
    device: str
    precision: str
    matmul_flops: float | None  # measured; None with measure=False
    peak_flops: float | None  # what it is compared with; None when there is nothing to compare
    peak_source: str
    memory: TrainingMemory
    memory_available: float | None
    checkpoint_bytes: int
    checkpoints_needed: int
    disk_path: str | None  # None when out_dir cannot be written (free space is then not checked)
    disk_free: int | None
    warnings: list[str]
    failures: list[str]  # from every rank, the same list on each

    def raise_on_failure(self) -> None:
        if self.failures:
            raise PretrainError("preflight failed:\n" + "\n".join("  - " + f.replace("\n", "\n    ")
                                                                   for f in self.failures))


def run_preflight(cfg: Config, info: DistInfo, measure: bool = True) -> PreflightReport:
    """Run every check on every rank (call it on all of them); `measure` times the all-reduce and
    a matmul, the only checks that take noticeable time. A failure on any rank fails every rank."""
    precision = resolve_precision(cfg.train.precision, info.device)
    ranks = check_ranks(info, cfg.parallel.timeout_s, iters=5 if measure else 0)
    measured, peak, peak_source = matmul_flops(cfg, info.device, precision) if measure else (None, None, "")
    memory = memory_estimate(cfg, info.world_size, info.device)
    available = device_memory_bytes(info.device, info.world_size)
    warnings, failures = [], []
    if available and memory.total > available:
        exceeds = f"the estimate exceeds the device's memory: {_memory_text(memory, available)}"
        advice = memory_advice(cfg, info.world_size, info.device, available)
        if cfg.train.ignore_memory_check:
            warnings.append("\n".join([f"{exceeds}; starting anyway (train.ignore_memory_check=true)", *advice]))
        else:
            failures.append("\n".join([exceeds, *advice, "to start anyway, at the risk of running out of memory: "
                                                         "--train.ignore_memory_check=true"]))
    size = checkpoint_bytes(cfg)
    # The newest checkpoint stays until the next one is complete, so a run saving every N steps
    # needs room for two; with checkpoint.every=0 a preemption signal still writes one.
    copies = 2 if cfg.checkpoint.every else 1
    disk_path, free = None, None
    try:
        check_out_dir(cfg.out_dir)  # first: free_disk looks at the nearest existing parent
        disk_path, free = free_disk(cfg.out_dir)
        check_free_disk(cfg.out_dir, size, copies)
    except PretrainError as exc:
        failures.append(str(exc))
    saves = math.ceil((cfg.train.stop_at or cfg.train.max_steps) / cfg.checkpoint.every) if cfg.checkpoint.every else 0
    if cfg.checkpoint.keep_last == 0 and free is not None and saves * size > free >= copies * size:
        keep = free // size - 1  # keep_last=K holds K + 1 while the next one is written
        warnings.append(f"checkpoint.keep_last=0 keeps all {saves} checkpoints of this run ({saves * size / GIB:.2f} "
                        f"GiB) but {free / GIB:.2f} GiB are free at {disk_path}; set "
                        f"--checkpoint.keep_last={keep} (the checkpoints kept and the one being written must fit)")
    return PreflightReport(ranks, info.world_size, str(info.device), precision, measured, peak, peak_source, memory,
                           available, size, copies, str(disk_path) if disk_path else None, free, warnings,
                           _from_every_rank(failures))


def _from_every_rank(failures: list[str]) -> list[str]:
    """Every rank's failures, each message once, prefixed with its ranks unless all had it: a
    rank whose node-local disk is full must stop the others too, and rank 0 prints why."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return failures
    everyone: list[list[str]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(everyone, failures)
    by_message: dict[str, list[int]] = {}
    for rank, messages in enumerate(everyone):
        for message in messages:
            by_message.setdefault(message, []).append(rank)
    return [m if len(r) == len(everyone) else f"on rank {', '.join(map(str, r))}: {m}" for m, r in by_message.items()]


def format_report(report: PreflightReport) -> list[str]:
    """Printable lines: one label column, one value column."""
    r, m = report.ranks, report.memory
    hosts = sorted({rank.host for rank in r.ranks})
    shown = ", ".join(hosts[:4]) + (" ..." if len(hosts) > 4 else "")
    rows = [("ranks", f"{len(r.ranks)} of {report.world_size} answered on {len(hosts)} host(s): {shown} "
                      + f"({report.device}, {report.precision})")]
    if r.algbw:
        rows.append(("all-reduce", f"{r.allreduce_bytes / MIB:.0f} MiB: algbw {r.algbw / 1e9:.2f} GB/s, busbw "
                                   + f"{r.busbw / 1e9:.2f} GB/s"))
    if report.matmul_flops:
        versus = (f", {report.matmul_flops / report.peak_flops:.0%} of {report.peak_flops / 1e12:.1f} TFLOP/s "
                  f"({report.peak_source})" if report.peak_flops else "")
        rows.append(("matmul", f"{report.matmul_flops / 1e12:.2f} TFLOP/s {report.precision} measured{versus}"))
    rows.append(("memory", _memory_text(m, report.memory_available)))
    needed = report.checkpoints_needed * report.checkpoint_bytes
    disk = (f"{report.disk_free / GIB:.2f} GiB free at {report.disk_path}" if report.disk_free is not None else
            "free space not checked (out_dir cannot be written)")
    rows.append(("checkpoint", f"{report.checkpoint_bytes / GIB:.2f} GiB each, {report.checkpoints_needed} at once "
                               + f"need {needed / GIB:.2f} GiB; {disk}"))
    rows += [("warning", w) for w in report.warnings] + [("error", f) for f in report.failures]
    rows.append(("result", "FAILED" if report.failures else "ok"))
    # A multi-line value (a warning with its fixes) continues under the value column.
    return [f"{label if i == 0 else '':<12} {line}"
            for label, value in rows for i, line in enumerate(value.split("\n"))]


def main(config_path: str | None, overrides: list[str]) -> int:
    """`pretrain preflight CONFIG [--section.key=value ...]` on every rank (under torchrun): joins
    the process group as training does, runs every check, prints the report on rank 0; returns 1
    when a check failed (the report says which)."""
    cfg = load_config(config_path, overrides)
    info = dist_info_from_env(cfg.train.device)
    owns_group = init_process_group(info, cfg.parallel.timeout_s, always=cfg.parallel.backend != "none")
    out_dir = Path(cfg.out_dir).absolute()
    try:
        created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    except OSError:  # e.g. a parent this user may not list: check_out_dir reports it
        created = []
    try:
        report = run_preflight(cfg, info)
    finally:
        if owns_group:
            destroy_process_group()
    for directory in created:  # every rank is past the checks: leave no empty out_dir behind
        try:
            directory.rmdir()
        except OSError:  # not empty, or another rank removed it first
            pass
    if info.is_main:
        print("\n".join(format_report(report)))
    return 1 if report.failures else 0
