"""What the device can do: bf16 support, peak FLOP/s for MFU, memory in use."""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Dense (no sparsity) peak FLOP/s per device from vendor datasheets: (bf16 tensor core, fp32).
# Matched in order against torch.cuda.get_device_name(), so specific names come first.
GPU_PEAK_FLOPS: list[tuple[str, float, float]] = [
    ("H100 PCIe", 756e12, 51e12),
    ("H100 NVL", 835e12, 60e12),
    ("GH200", 989e12, 67e12),
    ("H200", 989e12, 67e12),
    ("H100", 989e12, 67e12),
    ("H800", 989e12, 67e12),
    ("A100", 312e12, 19.5e12),
    ("A800", 312e12, 19.5e12),
    ("L40S", 362e12, 91.6e12),
    ("L4", 121e12, 30.3e12),
    ("A10", 125e12, 31.2e12),
    ("RTX 4090", 165e12, 82.6e12),
    ("RTX 3090", 71e12, 35.6e12),
    ("MI300X", 1307e12, 163.4e12),
    ("MI250X", 383e12, 47.9e12),
]


def cpu_has_bf16() -> bool:
    """True on x86 CPUs with AVX512-BF16 or AMX, where bf16 matmuls beat fp32 several times."""
    if sys.platform != "linux":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` becomes bf16 where the hardware computes it natively, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_bf16() else "fp32"


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """Peak FLOP/s of one device for `precision`, and where the number comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for pattern, bf16, fp32 in GPU_PEAK_FLOPS:
            if pattern in name:
                return (bf16 if precision == "bf16" else fp32), f"datasheet ({name})"
        log.warning("GPU %r is not in the peak FLOP/s table; measuring a matmul instead "
                    "(set logging.peak_flops for a datasheet value)", name)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return measure_matmul_flops(device, dtype), f"measured {precision} matmul on {device.type}"


PEAK_FILE = "peak_flops.json"


def device_name(device: torch.device) -> str:
    """The device model, to tell whether a stored measurement belongs to this machine."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        models = []
    return f"cpu {models[0] if models else sys.platform} x{os.cpu_count()}"


def mfu_reference(out_dir: Path, device: torch.device, precision: str, configured: float | None,
                  write: bool) -> tuple[float, str, float | None]:
    """(peak FLOP/s that MFU divides by, where it comes from, measured matmul FLOP/s or None).

    A measured peak varies with the load of a shared machine (1e11 to 3.8e11 FLOP/s seen on one
    2-core box), so MFU would jump at every resume: it is measured once per out_dir and kept in
    out_dir/peak_flops.json (written by the rank that `write`s) while the device and precision
    stay the same. logging.peak_flops (`configured`) wins over both."""
    if configured:
        return configured, "logging.peak_flops", None
    path = Path(out_dir) / PEAK_FILE
    key = {"device": device_name(device), "precision": precision}
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = None
    if isinstance(stored, dict) and {k: stored.get(k) for k in key} == key:
        return stored["peak_flops"], stored["source"] + f", kept in {path}", stored.get("measured_flops")
    peak, source = peak_flops(device, precision)
    measured = None
    if source.startswith("datasheet"):  # a datasheet peak is also checked against what this device reaches
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        measured = measure_matmul_flops(device, dtype, size=8192, seconds=0.2)
        source += f"; measured matmul {measured:.3g} FLOP/s, reported as mfu_measured"
    if write:
        from pretrain.resilience.atomic_dir import write_file

        write_file(path, json.dumps({**key, "peak_flops": peak, "source": source, "measured_flops": measured}))
    return peak, source, measured


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 2048, seconds: float = 0.5) -> float:
    """Best FLOP/s of square matmuls over about `seconds` (a practical peak for this device)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    for rep in range(1000):
        _synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        _synchronize(device)
        if rep > 0:  # the first one warms up
            best = min(best, time.perf_counter() - start)
        if rep >= 3 and time.perf_counter() > deadline:
            break
    return 2 * size**3 / best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_gib(device: torch.device) -> float:
    """Peak memory so far: allocated tensors on a GPU, resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return peak_kib / 2**20


GLIBC_MALLOC_TUNABLES = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Ask glibc malloc to keep freed memory instead of returning it to the OS.

    By default every large activation is mmap'd and unmapped again each step, so a CPU training
    step page-faults its whole working set (measured here: ~1.5 GB per step, 10-20% slower and
    noisy). Equivalent to MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<huge>. Returns False where
    the C library is not glibc, or where the user set glibc's own MALLOC_* tunables (their choice
    wins: e.g. MALLOC_MMAP_THRESHOLD_=65536 makes the peak RSS track live tensors, to measure memory)."""
    import ctypes
    import ctypes.util

    if sys.platform != "linux" or any(name in os.environ for name in GLIBC_MALLOC_TUNABLES):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
