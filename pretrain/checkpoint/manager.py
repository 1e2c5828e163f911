"""Saving, pruning and restoring checkpoints (their layout: pretrain.checkpoint.layout).

Model and optimizer are written by the parallel engine (DCP, each rank its shards; or DeepSpeed's
format); this module writes the rest, makes the write atomic and picks what to resume from."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import pickle
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict, cast

import torch
import yaml
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from pretrain.checkpoint.layout import (
    CONFIG,
    FORMAT_VERSION,
    MANIFEST,
    RNG_DIR,
    STEP_GLOB,
    TOKENIZER,
    TRAINER_STATE,
    check_format,
    checkpoint_dir,
    complete_checkpoints,
    damage,
    read_manifest,
)
from pretrain.checkpoint.safe_load import refusal
from pretrain.config.schema import CheckpointConfig
from pretrain.errors import CorruptCheckpoint, PretrainError
from pretrain.models import DEFAULT_MODEL, AnyModelArgs, model_spec
from pretrain.parallel import DistInfo, Engine, barrier, first_failure, side_group
from pretrain.resilience.atomic_dir import publish, temporary_path, temporary_sibling
from pretrain.resilience.faults import FaultInjector

log = logging.getLogger(__name__)


class CheckpointStates(TypedDict):
    """What a checkpoint holds, by part."""

    engine: Engine  # model and optimizer, written and read by the engine in its own format
    train: Stateful  # everything else a bit-exact resume needs (the trainer), in trainer_state.pt


@dataclass
class _PendingSave:
    future: Future
    step: int
    manifest: dict
    started: float


class CheckpointManager:
    """Saves (synchronously, or in the background with checkpoint.async), prunes and restores
    checkpoints of the parts given to `track()`. Saving and loading are called on every rank.

    Made before the parts exist: whether there is a checkpoint to resume from decides the
    model's initial weights (checkpoint.init_from only applies to a fresh run)."""

    def __init__(self, cfg: CheckpointConfig, out_dir: str, dist_info: DistInfo, faults: FaultInjector | None = None):
        self.cfg, self.dist = cfg, dist_info
        self.faults = faults or FaultInjector(dist_info.rank, spec="")
        self.root = Path(out_dir) / "checkpoints"
        self.states: CheckpointStates | None = None
        self.pending: _PendingSave | None = None
        self.saved_step: int | None = None  # the newest checkpoint this run saved or resumed from
        self._published: list[tuple[int, Path]] = []  # (step, directory) of completed saves, for eval hooks
        self.group = side_group() if cfg.async_save else None
        if dist_info.is_main:
            recover_interrupted_writes(self.root)

    def track(self, states: CheckpointStates) -> None:
        """The parts every checkpoint saves and every resume restores."""
        self.states = states

    def _tracked(self) -> CheckpointStates:
        assert self.states is not None, "track() the engine and the training state before saving or loading"
        return self.states

    # -- choosing ------------------------------------------------------------------------------
    def newest_first(self) -> list[Path]:
        """This run's complete checkpoints, newest first."""
        return list(reversed(complete_checkpoints(self.root)))

    def latest(self) -> Path | None:
        """This run's newest complete checkpoint, if any."""
        return next(iter(self.newest_first()), None)

    def resume_candidates(self) -> list[Path]:
        """Where to resume from, best first: checkpoint.resume_from alone, else (with
        checkpoint.resume) every checkpoint newest first (load() refuses a damaged one)."""
        if self.cfg.resume_from:
            return [Path(self.cfg.resume_from)]
        return self.newest_first() if self.cfg.resume else []

    def take_published(self) -> list[tuple[int, Path]]:
        """(step, directory) of each checkpoint published since the last call, oldest first."""
        published, self._published = self._published, []
        return published

    # -- saving --------------------------------------------------------------------------------
    def save(self, step: int, config_yaml: str, tokenizer_path: str) -> float:
        """Write a checkpoint of the tracked parts for `step`, with the run's config and tokenizer
        beside them; returns the seconds the caller was blocked. With checkpoint.async the model
        and optimizer are copied to memory and written by a background thread: the checkpoint
        appears once `poll()` or `finish()` sees the write complete."""
        engine, state = self._tracked()["engine"], self._tracked()["train"].state_dict()  # a collective
        start = time.perf_counter()
        self.finish()  # one write at a time
        final = checkpoint_dir(self.root, step)
        tmp = temporary_path(final)
        manifest = {"format_version": FORMAT_VERSION, "step": step, "tokens_seen": state.get("tokens_seen"),
                    "engine": engine.checkpoint_format, "world_size": self.dist.world_size,
                    "config_sha256": hashlib.sha256(config_yaml.encode()).hexdigest()}
        failure: OSError | CheckpointException | None = None
        try:
            if self.dist.is_main:
                temporary_sibling(final)
            barrier()
            (tmp / RNG_DIR).mkdir(exist_ok=True)
            torch.save(rng_state(), tmp / RNG_DIR / f"rank_{self.dist.rank:05d}.pt")
            if self.dist.is_main:
                torch.save(state, tmp / TRAINER_STATE)
                (tmp / CONFIG).write_text(config_yaml)
                shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
        except OSError as exc:
            failure = exc
        self._stop_if_any_rank_failed(final, failure)  # all together, before the engine's collectives
        wrap_file = self.faults.checkpoint_file_fault(step)
        if self.cfg.async_save:
            self.pending = _PendingSave(engine.save_async(tmp, self.group, wrap_file), step, manifest, start)
            self.saved_step = step
            return time.perf_counter() - start
        try:
            engine.save(tmp, wrap_file)
        except (OSError, CheckpointException) as exc:
            raise_interruption(exc)  # DCP wraps a Ctrl-C during the write like any failure
            failure = exc
        self._stop_if_any_rank_failed(final, failure)
        self.saved_step = step
        barrier()
        if self.dist.is_main:
            self._publish(step, manifest, start)
        barrier()
        return time.perf_counter() - start

    def _stop_if_any_rank_failed(self, final: Path, failure: BaseException | None) -> None:
        """Call on every rank: if writing `final` failed on any of them, remove it and raise on
        all, naming the first failing rank and its reason."""
        reason = first_failure(failure_reason(failure, self.dist) if failure is not None else None)
        if reason is None:
            return
        if self.dist.is_main:
            shutil.rmtree(temporary_path(final), ignore_errors=True)
        previous = self.latest()
        kept = f"the newest complete checkpoint, {previous}, is intact" if previous else "no earlier checkpoint exists"
        raise PretrainError(f"writing checkpoint {final} failed ({reason}); {kept}. "
                            f"Free disk space or fix the permissions of {self.root} (checkpoint.keep_last limits how "
                            "many are kept), then restart: training resumes from the newest complete checkpoint")

    def what_is_kept(self) -> str:
        """What a stop without saving leaves to resume from, and what the same command then does."""
        previous = self.latest()
        if not previous:
            return "no checkpoint exists yet: the same command starts over"
        return f"the newest complete checkpoint, {previous}, is intact: the same command resumes from it"

    def interrupted_save(self, step: int) -> str:
        """What happened when a second Ctrl-C stopped the write of `step`'s checkpoint."""
        return f"during the write of the checkpoint of step {step}: that checkpoint was not kept; {self.what_is_kept()}"

    def stopped_at_once(self, step: int) -> str:
        """What a second Ctrl-C between saves cost."""
        return f"stopped at once after step {step} without saving (the steps since the last checkpoint are lost); {self.what_is_kept()}"

    def poll(self) -> None:
        """Publish a background write that has completed. Cheap: call it every step."""
        if self.pending is not None and self.pending.future.done():
            self.finish()

    def finish(self) -> None:
        """Wait for a background write and publish it (before exiting or saving again)."""
        if self.pending is None:
            return
        pending, self.pending = self.pending, None
        try:
            pending.future.result()
        except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
            if self.dist.is_main:
                shutil.rmtree(temporary_path(checkpoint_dir(self.root, pending.step)), ignore_errors=True)
            raise PretrainError(f"writing checkpoint {checkpoint_dir(self.root, pending.step)} failed "
                                f"({failure_reason(exc, self.dist)}); the previous checkpoints are intact. Free disk "
                                f"space or fix the permissions of {self.root}, then restart: training resumes from "
                                "the newest complete checkpoint") from exc
        if self.dist.is_main:  # DCP completes the future once every rank's shards are written
            self._publish(pending.step, pending.manifest, pending.started)

    def _publish(self, step: int, manifest: dict, started: float) -> None:
        final = checkpoint_dir(self.root, step)
        tmp = temporary_path(final)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {**manifest, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        publish(tmp, final)  # a re-run of the same step replaces the old copy
        self._published.append((step, final))
        megabytes = sum(files.values()) / 1e6
        log.info("saved checkpoint %s (%.1f MB in %.1fs)", final, megabytes, time.perf_counter() - started)
        self.prune(keep=final)

    def prune(self, keep: Path | None = None) -> None:
        """Delete checkpoints beyond checkpoint.keep_last, except multiples of checkpoint.keep_every,
        the newest and `keep`. The manifest goes first, so a crash mid-delete leaves no directory
        that looks complete."""
        if not self.cfg.keep_last:
            return
        complete = complete_checkpoints(self.root)
        kept = set(complete[-self.cfg.keep_last:]) | {keep}
        every = self.cfg.keep_every
        for path in complete:
            if path in kept or (every and cast(dict, read_manifest(path))["step"] % every == 0):  # complete: has one
                continue
            (path / MANIFEST).unlink(missing_ok=True)
            shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(path.with_name(".universal_" + path.name), ignore_errors=True)  # DeepSpeed's conversion
            log.info("removed checkpoint %s (checkpoint.keep_last=%d)", path, self.cfg.keep_last)

    # -- restoring -----------------------------------------------------------------------------
    def load(self, path: Path, model: AnyModelArgs | None = None) -> None:
        """Restore the tracked parts in place from `path` (model and optimizer, then the training
        state) and this rank's random state. A checkpoint that does not fit this run (its engine,
        or a model section other than `model`) raises PretrainError before anything is restored;
        a damaged one raises CorruptCheckpoint."""
        engine, train = self._tracked()["engine"], self._tracked()["train"]
        manifest = read_manifest(path)
        problem = damage(path)
        if manifest is None or problem:
            raise CorruptCheckpoint(f"{path} is not a complete checkpoint ({problem})")
        check_compatible(path, manifest, engine)
        if model is not None and not self.cfg.allow_model_change:
            check_same_model(path, model)
        try:
            engine.load(path)
            state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
            rng_file = path / RNG_DIR / f"rank_{self.dist.rank:05d}.pt"
            same_ranks = manifest.get("world_size") == self.dist.world_size and rng_file.is_file()
            rng = torch.load(rng_file, weights_only=True) if same_ranks else None
        except (CheckpointException, RuntimeError, OSError, EOFError, ValueError, KeyError,
                pickle.UnpicklingError) as exc:
            raise CorruptCheckpoint(f"{path} could not be read: {failure_reason(exc, self.dist)}") from exc
        if rng is not None:
            set_rng_state(rng)
        elif self.dist.is_main:
            log.info("the checkpoint was written by %s ranks, this run has %d: random states start afresh "
                     "(the data order and the model do not depend on them)", manifest.get("world_size"),
                     self.dist.world_size)
        self.saved_step = manifest["step"]
        log.info("resumed from %s (step %d)", path, manifest["step"])
        train.load_state_dict(state)


def check_compatible(path: Path, manifest: dict, engine: Engine) -> None:
    """Refuse, with the fix, a checkpoint this engine cannot read."""
    check_format(path, manifest)
    written_by = manifest.get("engine", "dcp")
    if written_by != engine.checkpoint_format:
        backends = "parallel.backend=deepspeed" if written_by == "deepspeed" else "parallel.backend=none, ddp or fsdp"
        raise PretrainError(f"{path} holds a {written_by!r} checkpoint, which this run's backend cannot read "
                            f"(it reads {engine.checkpoint_format!r}); resume it with {backends}, or start "
                            "over with --checkpoint.resume=false or another out_dir")


def model_changes(saved: dict, model: AnyModelArgs) -> list[str]:
    """`model.KEY: saved -> now` for every key of the model's definition that differs between a
    checkpoint's config and `model`; a key the checkpoint's config lacks had its default then.
    Keys the family lets a resume change (ModelSpec.free_on_resume) are left out; another family
    is the one change named."""
    spec = model_spec(model)
    family = saved.get("name", DEFAULT_MODEL)
    if family != spec.name:
        return [f"model.name: {family!r} in the checkpoint, {spec.name!r} now (another model family)"]
    defaults = dataclasses.asdict(spec.args_class())
    changes = []
    for key, now in dataclasses.asdict(model).items():
        before = saved.get(key, defaults[key])
        if key not in spec.free_on_resume and before != now:
            changes.append(f"model.{key}: {before!r} in the checkpoint, {now!r} now")
    return changes


def check_same_model(path: Path, model: AnyModelArgs) -> None:
    """Refuse to resume into a model other than the one the checkpoint trained. Tensor shapes
    alone do not show it: n_heads 8 -> 4 keeps every shape and silently changes the model."""
    try:
        saved = yaml.safe_load((path / CONFIG).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise CorruptCheckpoint(f"{path / CONFIG} cannot be read ({exc})") from exc
    changes = model_changes(saved.get("model") or {}, model)
    if changes:
        raise PretrainError(
            f"this config's model differs from the one checkpoint {path} trained:\n  - " + "\n  - ".join(changes)
            + "\nResume with the checkpoint's values (see its config.yaml), start a new run with another out_dir "
            "(or --checkpoint.resume=false), or, for a deliberate change, --checkpoint.allow_model_change=true")


def failure_reason(exc: BaseException, dist_info: DistInfo) -> str:
    """One line saying why a checkpoint read or write failed, and on which rank when there are
    several. DCP wraps each rank's error in a CheckpointException whose text starts with a list
    of ranks; the first failing rank's own error is what the user needs (a refused pickle
    global, a full disk)."""
    rank = dist_info.rank
    if isinstance(exc, CheckpointException) and exc.failures:
        rank, (exc, _) = min(exc.failures.items(), key=lambda item: item[0])
    prefix = f"on rank {rank}: " if dist_info.world_size > 1 else ""
    if isinstance(exc, pickle.UnpicklingError):
        return prefix + refusal(exc)
    return prefix + (str(exc).splitlines() or [type(exc).__name__])[0][:300]


def raise_interruption(exc: BaseException) -> None:
    """Re-raise a Ctrl-C (KeyboardInterrupt) that DCP caught and wrapped in a CheckpointException,
    so it is reported as an interruption, not as a failed write."""
    if isinstance(exc, CheckpointException):
        for wrapped, _ in exc.failures.values():
            if isinstance(wrapped, KeyboardInterrupt):
                raise wrapped
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, KeyboardInterrupt):
        raise cause


def recover_interrupted_writes(root: Path) -> None:
    """Clear what a crash mid-write left behind: temporary directories are dropped; a checkpoint
    moved aside to be replaced (`.old_step_N`) is put back if its replacement never arrived."""
    for leftover in [*root.glob(".tmp_" + STEP_GLOB), *root.glob(".tmp_.universal_" + STEP_GLOB)]:
        shutil.rmtree(leftover, ignore_errors=True)
    for old in root.glob(".old_" + STEP_GLOB):
        final = old.with_name(old.name.removeprefix(".old_"))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(final)


def rng_state() -> dict:
    state: dict[str, torch.Tensor | list[torch.Tensor]] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
