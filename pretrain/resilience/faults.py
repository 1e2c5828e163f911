"""Fault injection for fire drills: prove on your own cluster that a crash, a hang, a NaN or a
full disk costs at most one checkpoint interval, before a real one does.

Set PRETRAIN_FAULTS to a comma-separated list of KIND@STEP[:rank=R][:seconds=S], e.g.
`PRETRAIN_FAULTS="nan@120,kill@300:rank=3"`. Kinds:
  kill       SIGKILL this process at the start of the step (a dead node)
  term       SIGTERM this process at the start of the step (a preemption)
  sleep      sleep `seconds` (default 3600) inside the step (a hung rank)
  nan        the step's loss becomes NaN (and with it the gradients)
  spike      the step's loss is multiplied by `factor` (default 100)
  disk_full  writing this process's model/optimizer files of that step's checkpoint fails with
             ENOSPC half-way through its first write (part of a shard is on disk)
  kill_mid_save  SIGKILL this process half-way through that same write (a node lost during a
             save; with checkpoint.async, while the background write is in flight)
A fault without `rank=` fires on every rank. Each fires once per process, and only in the first
attempt of a job (torchrun's TORCHELASTIC_RESTART_COUNT=0), so the restarted job runs clean."""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Callable

import torch

from pretrain.errors import PretrainError
from pretrain.parallel.launch_env import launch_env

log = logging.getLogger(__name__)

ENV = "PRETRAIN_FAULTS"
KINDS = ("kill", "term", "sleep", "nan", "spike", "disk_full", "kill_mid_save", "slow_save")


@dataclass
class Fault:
    kind: str
    step: int
    rank: int | None = None
    seconds: float = 3600.0
    factor: float = 100.0
    fired: bool = field(default=False, compare=False)


def parse_faults(text: str) -> list[Fault]:
    """The faults of a PRETRAIN_FAULTS value; a malformed entry raises PretrainError naming it."""
    faults = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        head, *options = entry.split(":")
        kind, _, step = head.partition("@")
        try:
            if kind not in KINDS:
                raise ValueError(f"unknown kind {kind!r} (known: {', '.join(KINDS)})")
            fault = Fault(kind, int(step))
            for option in options:
                name, _, value = option.partition("=")
                if name == "rank":
                    fault.rank = int(value)
                elif name in ("seconds", "factor"):
                    setattr(fault, name, float(value))
                else:
                    raise ValueError(f"unknown option {name!r} (known: rank, seconds, factor)")
        except ValueError as exc:
            raise PretrainError(f"{ENV} entry {entry!r} cannot be read: {exc}; write KIND@STEP[:rank=R], "
                                "e.g. nan@100 or kill@250:rank=1") from None
        faults.append(fault)
    return faults


class FaultInjector:
    """The faults planned for this process; the trainer asks it at fixed points of each step."""

    def __init__(self, rank: int, spec: str | None = None):
        spec = os.environ.get(ENV, "") if spec is None else spec
        first_attempt = launch_env().restart_count == 0
        self.faults = [f for f in parse_faults(spec) if f.rank in (None, rank)] if first_attempt else []
        if self.faults:
            log.warning("fault injection (%s) on rank %d: %s", ENV, rank,
                        ", ".join(f"{f.kind}@{f.step}" for f in self.faults))

    def _take(self, kind: str, step: int) -> Fault | None:
        for fault in self.faults:
            if fault.kind == kind and fault.step == step and not fault.fired:
                fault.fired = True
                log.warning("injecting fault %s at step %d", kind, step)
                return fault
        return None

    def step_started(self, step: int) -> None:
        """Kill, signal or stall this process as planned for `step`."""
        if not self.faults:
            return
        if self._take("kill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._take("term", step):
            os.kill(os.getpid(), signal.SIGTERM)
        stall = self._take("sleep", step)
        if stall:
            time.sleep(stall.seconds)

    def corrupt_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The micro-batch loss, made NaN or scaled up when planned for `step`."""
        if not self.faults:
            return loss
        if self._take("nan", step):
            return loss * float("nan")
        spike = self._take("spike", step)
        return loss * spike.factor if spike else loss

    def checkpoint_file_fault(self, step: int) -> Callable[[BinaryIO], BinaryIO] | None:
        """A wrapper for the files this process writes into the model/optimizer part of checkpoint
        `step` that stops the first write half-way as planned (disk_full: ENOSPC; kill_mid_save:
        SIGKILL; slow_save: a sleep), or None when nothing is planned. The engine applies it where it opens its files,
        so the fault lands inside the real write (DCP's, or DeepSpeed's torch.save)."""
        if not self.faults:
            return None
        fault = self._take("disk_full", step) or self._take("kill_mid_save", step) or self._take("slow_save", step)
        if fault is None:
            return None
        fired: list[bool] = []  # one write of all the files stops half-way, once

        def wrap(stream: BinaryIO) -> BinaryIO:
            return _StopsHalfway(stream, fault, fired)  # type: ignore[return-value]

        return wrap


class _StopsHalfway:
    """A writable file whose first write puts half of its bytes on disk, then fails as a full
    disk does, kills the process or stalls; everything else goes to the file unchanged."""

    def __init__(self, stream: BinaryIO, fault: Fault, fired: list[bool]):
        self._stream, self._fault, self._fired = stream, fault, fired

    def write(self, data: bytes) -> int:
        if self._fired:
            return self._stream.write(data)
        self._fired.append(True)
        view = memoryview(data).cast("B")
        self._stream.write(view[: len(view) // 2])
        self._stream.flush()
        os.fsync(self._stream.fileno())
        if self._fault.kind == "kill_mid_save":
            os.kill(os.getpid(), signal.SIGKILL)
        if self._fault.kind == "slow_save":
            time.sleep(self._fault.seconds)
            return len(view) // 2 + self._stream.write(view[len(view) // 2:])
        raise OSError(errno.ENOSPC, "No space left on device (injected by PRETRAIN_FAULTS)")

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)
