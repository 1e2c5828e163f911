"""Accelerators the planner knows: dense bf16 peak FLOP/s and memory, from vendor datasheets."""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.errors import PretrainError


@dataclass(frozen=True)
class GpuSpec:
    name: str
    bf16_flops: float  # dense (no 2:4 sparsity) tensor-core peak
    memory_gib: float  # what the device reports (nvidia-smi / torch), not the marketing GB

    def describe(self) -> str:
        return f"{self.name} ({self.bf16_flops / 1e12:.0f} TFLOP/s bf16, {self.memory_gib:.0f} GiB)"


GPUS = {spec.name: spec for spec in (
    GpuSpec("a100-40gb", 312e12, 40),   # A100 SXM4 40GB: 40,960 MiB
    GpuSpec("a100-80gb", 312e12, 80),   # A100 SXM4 80GB: 81,920 MiB
    GpuSpec("h100", 989e12, 79.6),      # H100 SXM5 80GB: 81,559 MiB
    GpuSpec("h200", 989e12, 140.4),     # H200 SXM 141GB: 143,771 MiB
    GpuSpec("b200", 2250e12, 179.1),    # HGX B200 180GB: 183,359 MiB
    GpuSpec("mi300x", 1307e12, 192),    # MI300X 192GB HBM3
)}
DEFAULT_GPU = "h100"
# Common names that leave the memory size out: the larger card, which is what clusters mostly have.
ALIASES = {"a100": "a100-80gb"}


def gpu_spec(name: str) -> GpuSpec:
    """The GPU called `name` (a name of GPUS or an alias such as a100 -> a100-80gb)."""
    try:
        return GPUS[ALIASES.get(name.lower(), name.lower())]
    except KeyError:
        raise PretrainError(f"--gpu {name!r} is not a known GPU; choose one of {', '.join([*GPUS, *ALIASES])} "
                            "(or give the budget as --flops)") from None


def alias_note(name: str | None) -> str | None:
    """What an alias was read as, e.g. "--gpu a100 is read as a100-80gb (80 GiB); give --gpu
    a100-40gb for the 40 GB card"; None for a full name."""
    if name is None or name.lower() not in ALIASES:
        return None
    spec = gpu_spec(name)
    others = [other for other in GPUS if other.startswith(name.lower() + "-") and other != spec.name]
    return (f"--gpu {name} is read as {spec.name} ({spec.memory_gib:.0f} GiB)"
            + "".join(f"; give --gpu {other} for the {GPUS[other].memory_gib:.0f} GB card" for other in others))
