"""What the device can do: bf16 support, peak FLOP/s for MFU, memory in use."""

from __future__ import annotations

import logging
import os
import resource
import sys
import time

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
