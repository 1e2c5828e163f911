"""`pretrain preflight`: cheap checks before a job spends its allocation. Every rank reaches the
others and all-reduces at some bandwidth, the device computes at some matmul FLOP/s, the config's
estimated memory fits the device, and out_dir has room for the checkpoints. A second or two on a
CPU, so it also runs at the start of every training run (with measure=False)."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import socket
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


def free_disk(out_dir: str) -> tuple[Path, int]:
    """(out_dir or its nearest existing parent, free bytes on that filesystem)."""
    path = Path(out_dir).absolute()
    while not path.exists():
        path = path.parent
    return path, shutil.disk_usage(path).free


def check_free_disk(out_dir: str, needed_bytes: int, what: str = "two checkpoints") -> int:
    """Free bytes at out_dir; a PretrainError with the numbers and the fixes when fewer than
    `needed_bytes` (`what` they are for, for the message)."""
    path, free = free_disk(out_dir)
    if free < needed_bytes:
        raise PretrainError(
            f"out_dir {out_dir} ({path}) has {free / GIB:.2f} GiB free but {what} of this model need "
            f"{needed_bytes / GIB:.2f} GiB; free space there, choose another --out_dir on a larger disk, or "
            "keep fewer checkpoints with --checkpoint.keep_last=1")
    return free


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


def memory_fixes(cfg: Config, world_size: int, device: torch.device) -> list[str]:
    """Each knob not yet turned that lowers the estimate per rank (offloading does not on a CPU),
    with the estimate it gives."""
    p, mb = cfg.parallel, cfg.train.micro_batch_size
    knobs = [("train", "micro_batch_size", mb // 2)] if mb > 1 else []
    if p.activation_checkpointing != "full":
        knobs.append(("parallel", "activation_checkpointing", "full"))
    if p.backend in ("none", "ddp"):
        knobs.append(("parallel", "backend", "fsdp"))
    if p.backend == "deepspeed" and p.zero_stage < 3:
        knobs.append(("parallel", "zero_stage", 3))
    if p.backend == "fsdp" and not p.cpu_offload:
        knobs.append(("parallel", "cpu_offload", True))
    if p.backend == "deepspeed" and not p.offload_optimizer:
        knobs.append(("parallel", "offload_optimizer", True))
    lines = [("to use less memory, change one of these (train.global_batch_tokens stays the same: gradient "
              "accumulation absorbs a smaller micro-batch):")]
    now = memory_estimate(cfg, world_size, device).total
    for section, key, value in knobs:
        changed = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{key: value})})
        total = memory_estimate(changed, world_size, device).total
        if total < now:
            flag = f"--{section}.{key}={str(value).lower()}"
            lines.append(f"  {flag:<40} -> {total / GIB:.2f} GiB per rank")
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
    disk_path: str
    disk_free: int
    warnings: list[str]
    failures: list[str]  # from every rank, the same list on each

    def raise_on_failure(self) -> None:
        if self.failures:
            raise PretrainError("preflight failed:\n" + "\n".join(f"  - {f}" for f in self.failures))


def run_preflight(cfg: Config, info: DistInfo, measure: bool = True) -> PreflightReport:
    """Run every check on every rank (call it on all of them); `measure` times the all-reduce and
    a matmul, the only checks that take noticeable time."""
    precision = resolve_precision(cfg.train.precision, info.device)
    ranks = check_ranks(info, cfg.parallel.timeout_s, iters=5 if measure else 0)
    measured, peak, peak_source = matmul_flops(cfg, info.device, precision) if measure else (None, None, "")
    memory = memory_estimate(cfg, info.world_size, info.device)
    available = device_memory_bytes(info.device, info.world_size)
    warnings, failures = [], []
    if available and memory.total > available:
        warnings.append("\n".join([f"the estimate exceeds the device's memory: {_memory_text(memory, available)}"]
                                   + memory_fixes(cfg, info.world_size, info.device)))
    size = checkpoint_bytes(cfg)
    # The newest checkpoint stays until the next one is complete, so a run saving every N steps
    # needs room for two; with checkpoint.every=0 a preemption signal still writes one.
    copies = 2 if cfg.checkpoint.every else 1
    disk_path, free = free_disk(cfg.out_dir)
    try:
        check_free_disk(cfg.out_dir, copies * size, "two checkpoints" if copies == 2 else "one checkpoint")
    except PretrainError as exc:
        failures.append(str(exc))
    saves = math.ceil((cfg.train.stop_at or cfg.train.max_steps) / cfg.checkpoint.every) if cfg.checkpoint.every else 0
    if cfg.checkpoint.keep_last == 0 and saves * size > free >= copies * size:
        warnings.append(f"checkpoint.keep_last=0 keeps all {saves} checkpoints of this run ({saves * size / GIB:.2f} "
                        f"GiB) but {free / GIB:.2f} GiB are free at {disk_path}; set --checkpoint.keep_last")
    return PreflightReport(ranks, info.world_size, str(info.device), precision, measured, peak, peak_source, memory,
                           available, size, copies, str(disk_path), free, warnings, _from_every_rank(failures))


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
    disk = f"{report.disk_free / GIB:.2f} GiB free at {report.disk_path}"
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
    try:
        report = run_preflight(cfg, info)
    finally:
        if owns_group:
            destroy_process_group()
    if info.is_main:
        print("\n".join(format_report(report)))
    return 1 if report.failures else 0
