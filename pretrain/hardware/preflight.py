"""`pretrain preflight`: cheap checks before a job spends its allocation. Every rank reaches the
others and all-reduces at some bandwidth, the device computes at some matmul FLOP/s, the config's
estimated memory fits the device, and out_dir has room for the checkpoints. A second or two on a
CPU, so it also runs at the start of every training run (with measure=False)."""

from __future__ import annotations

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

from pretrain.checkpoint.layout import complete_checkpoints
from pretrain.config.load import load_config
from pretrain.config.schema import Config
from pretrain.errors import PretrainError
from pretrain.hardware.devices import measure_matmul_flops, peak_flops, resolve_precision
from pretrain.hardware.memory_advice import device_memory_bytes, memory_advice, memory_estimate, memory_text
from pretrain.models import count_params
from pretrain.parallel import (
    DistInfo,
    collective_failures_named,
    destroy_process_group,
    dist_info_from_env,
    init_process_group,
)
from pretrain.scaling.memory import GIB, TrainingMemory

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
    checkpoints_needed: int  # free room needed, in checkpoints: 2, or 1 (resuming, or checkpoint.every=0)
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
        exceeds = f"the estimate exceeds the device's memory: {memory_text(memory, available)}"
        advice = memory_advice(cfg, info.world_size, info.device, available)
        if cfg.train.ignore_memory_check:
            warnings.append("\n".join([f"{exceeds}; starting anyway (train.ignore_memory_check=true)", *advice]))
        else:
            failures.append("\n".join([exceeds, *advice, "to start anyway, at the risk of running out of memory: "
                                                         "--train.ignore_memory_check=true"]))
    size = checkpoint_bytes(cfg)
    # The newest checkpoint stays until the next one is complete, so a run saving every N steps
    # needs room for two; with checkpoint.every=0 a preemption signal still writes one. A run that
    # resumes already has the one that stays on the disk: it needs room for the next only.
    copies = 2 if cfg.checkpoint.every else 1
    if cfg.checkpoint.resume and complete_checkpoints(Path(cfg.out_dir) / "checkpoints"):
        copies = 1
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
        assert r.busbw is not None  # set whenever algbw is
        rows.append(("all-reduce", f"{r.allreduce_bytes / MIB:.0f} MiB: algbw {r.algbw / 1e9:.2f} GB/s, busbw "
                                   + f"{r.busbw / 1e9:.2f} GB/s"))
    if report.matmul_flops:
        versus = (f", {report.matmul_flops / report.peak_flops:.0%} of {report.peak_flops / 1e12:.1f} TFLOP/s "
                  f"({report.peak_source})" if report.peak_flops else "")
        rows.append(("matmul", f"{report.matmul_flops / 1e12:.2f} TFLOP/s {report.precision} measured{versus}"))
    rows.append(("memory", memory_text(m, report.memory_available)))
    needed = report.checkpoints_needed * report.checkpoint_bytes
    disk = (f"{report.disk_free / GIB:.2f} GiB free at {report.disk_path}" if report.disk_free is not None else
            "free space not checked (out_dir cannot be written)")
    room = "2 at once need" if report.checkpoints_needed == 2 else "the next one needs"
    rows.append(("checkpoint", f"{report.checkpoint_bytes / GIB:.2f} GiB each, {room} {needed / GIB:.2f} GiB; {disk}"))
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
