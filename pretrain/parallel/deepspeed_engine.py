"""DeepSpeed ZeRO behind the trainer's four verbs (backward, step, save, load).

We generate the DeepSpeed config from ours (batch sizes, accumulation, clipping, precision, ZeRO
stage and offload), merge the user's extra keys over it, and hand DeepSpeed our AdamW with its
parameter groups, so the update rule, clipping and LR schedule match the other backends."""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from pretrain.checkpoint.layout import DEEPSPEED_DIR, check_shapes, read_manifest
from pretrain.checkpoint.safe_load import weights_only_loads
from pretrain.config.load import grad_accum_steps
from pretrain.config.schema import Config
from pretrain.errors import PretrainError
from pretrain.observability.log_setup import output_captured
from pretrain.optim import build_optimizer, parameter_groups
from pretrain.parallel.distributed import barrier
from pretrain.parallel.engine import WrapFile
from pretrain.resilience.atomic_dir import publish, temporary_sibling

log = logging.getLogger(__name__)

LATEST = "latest"  # DeepSpeed's file naming the newest tag in a checkpoint directory


def deepspeed_config(cfg: Config, dp_size: int, bf16: bool, on_gpu: bool) -> dict[str, Any]:
    """The DeepSpeed config for this job on `dp_size` data-parallel ranks (ParallelDims.dp_size):
    ours, with `parallel.deepspeed` merged over it
    (validate() has rejected extra keys that would contradict ours). On GPUs, gradient reductions
    overlap backward at every stage (overlap_comm, DeepSpeed's default only for stage 3); CPUs keep
    DeepSpeed's defaults, and pinned memory is a GPU notion."""
    p, width = cfg.parallel, cfg.model.d_model
    # Buffers sized to the model as Hugging Face's DeepSpeed integration does ("auto"): DeepSpeed's
    # fixed defaults (5e8 elements) allocate a 2 GB fp32 reduce buffer even for a small model.
    zero: dict[str, Any] = {"stage": p.zero_stage, "reduce_bucket_size": width * width}
    if on_gpu:
        zero["overlap_comm"] = True
    if p.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=int(0.9 * width * width),
                    stage3_param_persistence_threshold=10 * width)
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    assert cfg.train.global_batch_tokens is not None  # filled in by validate()
    generated = {
        "train_batch_size": cfg.train.global_batch_tokens // cfg.data.seq_len,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps(cfg, dp_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,  # the trainer logs
        "wall_clock_breakdown": False,
    }
    return merge(generated, p.deepspeed)


def merge(base: dict, extra: dict) -> dict:
    """`extra` over `base`, recursing into mappings both have."""
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class DeepSpeedEngine:
    """A DeepSpeed engine with the trainer's verbs. The trainer's loss arrives already divided by
    the accumulation steps, as for the other backends."""

    checkpoint_format = "deepspeed"
    can_veto_update = False

    def __init__(self, model: nn.Module, cfg: Config, dp_size: int, device: torch.device, bf16: bool,
                 schedule: Callable[[torch.optim.Optimizer], LRScheduler]):
        import deepspeed

        # DeepSpeed calls these torch collectives by their old names on every step.
        warnings.filterwarnings("ignore", category=FutureWarning,
                                message=r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated")
        ds_config = deepspeed_config(cfg, dp_size, bf16, on_gpu=device.type == "cuda")
        with building_ops(cfg.parallel.offload_optimizer):
            # What deepspeed.initialize does first (here, so that its compiler probes and the
            # shared-memory op it builds on CPUs print into the capture, not the log).
            from deepspeed.accelerator import get_accelerator

            deepspeed.init_distributed(get_accelerator().communication_backend_name(), dist_init_required=False)
            if cfg.parallel.offload_optimizer:
                from deepspeed.ops.adam import DeepSpeedCPUAdam

                o = cfg.optim
                optimizer = DeepSpeedCPUAdam(parameter_groups(model, o), lr=o.lr, betas=(o.beta1, o.beta2),
                                             eps=o.eps, adamw_mode=True)
            else:
                optimizer = build_optimizer(model, cfg.optim, device)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                                    dist_init_required=False)
        self.writes = _RecordedWrites(self.engine)
        self.model = self.engine
        self.optimizer = optimizer  # ZeRO steps this optimizer on its flat shards; the LR schedule drives it
        self.scheduler = schedule(optimizer)  # once DeepSpeed has taken the optimizer over
        log.info("DeepSpeed ZeRO stage %d%s%s, bf16=%s", cfg.parallel.zero_stage,
                 ", optimizer offloaded to CPU" if cfg.parallel.offload_optimizer else "",
                 ", parameters offloaded to CPU" if cfg.parallel.offload_params else "", bf16)

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # with bf16 enabled DeepSpeed holds bf16 parameters itself

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        if not self.engine.is_gradient_accumulation_boundary():
            self.engine.step()  # only advances DeepSpeed's micro-batch counter

    def step(self, max_norm: float, approve: Callable[[torch.Tensor], bool] | None = None) -> torch.Tensor:
        """Reduce, clip (to optim.grad_clip, through the DeepSpeed config) and update; `approve`
        is told the norm afterwards (DeepSpeed gives no point to veto the update)."""
        assert self.engine.is_gradient_accumulation_boundary(), "step() after fewer backward() calls than accumulation steps"
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is None:  # zero_optimization.compute_grad_norm=false: only the loss is judged
            norm = 0.0
        # DeepSpeed reports a non-finite norm as inf or -1 (and skips that update itself).
        norm = torch.as_tensor(float("nan") if norm < 0 else norm, dtype=torch.float32)
        if approve is not None:
            approve(norm)
        return norm

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on rank 0's CPU; other ranks get {} (gathers ZeRO-3's shards)."""
        import deepspeed

        module = self.engine.module
        # Evaluation or sampling can leave ZeRO-3 prefetches in flight; settle them before gathering.
        self.engine.empty_partition_cache()
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            if self.engine.global_rank != 0:
                return {}
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

    def save(self, path: Path, wrap_file: WrapFile | None = None) -> None:
        """Every rank writes its partition into path/deepspeed/. A rank whose write fails goes on
        through DeepSpeed's barriers with the others (the failure is recorded, not raised inside
        DeepSpeed, where the other ranks would wait for it until the collective timeout) and
        raises it afterwards; the caller then stops every rank together. path/latest names the
        tag, as DeepSpeed's own tools (zero_to_fp32.py, load_checkpoint without a tag) expect."""
        # The universal-checkpoint marker lets DeepSpeed's converter read ZeRO-1/2 checkpoints too.
        state = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        with self.writes.recording(wrap_file):
            self.engine.save_checkpoint(str(path), tag=DEEPSPEED_DIR, client_state=state, save_latest=False)
            if self.engine.global_rank == 0:
                self.writes.run(lambda: (path / LATEST).write_text(DEEPSPEED_DIR))

    def _parameter_shapes(self) -> dict[str, torch.Size]:
        """Full shapes (ZeRO-3 keeps each parameter's in `ds_shape`; its tensor is a shard)."""
        return {name: getattr(p, "ds_shape", p.shape) for name, p in self.engine.module.named_parameters()}

    def load(self, path: Path) -> None:
        """Restore from `path`; a checkpoint written at another world size is converted once to
        DeepSpeed's universal format (next to it, in .universal_step_N/), which loads at any."""
        manifest = read_manifest(path) or {}
        written_at = manifest.get("world_size", self.engine.world_size)
        with weights_only_loads():
            files = sorted((path / DEEPSPEED_DIR).glob("*model_states.pt"))
            if files:  # every rank's file records the full shapes of all parameters
                saved = torch.load(files[0], map_location="cpu", weights_only=True).get("param_shapes") or []
                check_shapes(self._parameter_shapes(), {k: v for group in saved for k, v in group.items()}, str(path))
            if written_at == self.engine.world_size:
                loaded, _ = self.engine.load_checkpoint(str(path), tag=DEEPSPEED_DIR, load_lr_scheduler_states=False)
            else:
                universal = universal_copy(path, is_main=self.engine.global_rank == 0)
                # ZeRO-3's universal load gives every parameter group the first group's hyper-
                # parameters (norm gains would be decayed) and drops AdamW's step count.
                hyper = [{key: group[key] for key in ("weight_decay", "betas", "eps")}
                         for group in self.optimizer.param_groups]
                self.engine._config.load_universal_checkpoint = True  # read at load time only
                try:
                    loaded, _ = self.engine.load_checkpoint(str(universal.parent), tag=universal.name,
                                                            load_lr_scheduler_states=False)
                finally:
                    self.engine._config.load_universal_checkpoint = False
                for group, kept in zip(self.optimizer.param_groups, hyper):
                    group.update(kept)
                for state in self.optimizer.state.values():
                    state["step"] = torch.full_like(state["step"], manifest["step"]) \
                        if isinstance(state.get("step"), torch.Tensor) else manifest["step"]
        if loaded is None:
            raise PretrainError(f"{path / DEEPSPEED_DIR} holds no DeepSpeed state; the checkpoint is damaged, "
                                "resume from an earlier one with --checkpoint.resume_from")


# DeepSpeed's C++ ops we use, built by torch's JIT loader the first time on a machine.
OP_NAMES = {"cpu_adam": "CPU Adam", "deepspeed_shm_comm": "shared-memory communication"}


def ops_to_build(offload_optimizer: bool) -> dict[str, Path]:
    """name -> build directory of each op this job needs that is neither installed prebuilt nor
    built already: DeepSpeedCPUAdam's with optimizer offload, and the shared-memory collectives
    deepspeed.comm builds when its accelerator is the CPU."""
    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory  # torch's rule for where load() builds

    missing = {}
    for builder in _op_builders(offload_optimizer):
        directory = Path(_get_build_directory(builder.NAME, verbose=False))
        if not installed_ops.get(builder.NAME) and not (directory / f"{builder.NAME}.so").is_file():
            missing[builder.NAME] = directory
    return missing


def _op_builders(offload_optimizer: bool) -> list[Any]:
    """DeepSpeed's builders of the ops a job uses on this machine's accelerator."""
    from deepspeed.accelerator import get_accelerator

    wanted = (["CPUAdamBuilder"] if offload_optimizer else []) + ["ShareMemCommBuilder"]
    return [b for b in map(get_accelerator().create_op_builder, wanted) if b is not None]


def build_ops(offload_optimizer: bool = True) -> list[str]:
    """Build now the ops that DeepSpeed would otherwise build inside the first job that needs them
    (CI runs this once per machine, before the tests; torch caches the result); returns the names
    of the ops built."""
    missing = ops_to_build(offload_optimizer)
    with building_ops(offload_optimizer):
        for builder in _op_builders(offload_optimizer):
            if builder.NAME in missing:
                builder.load()
    return list(missing)


@contextlib.contextmanager
def building_ops(offload_optimizer: bool) -> Iterator[None]:
    """Say in one line which of DeepSpeed's C++ ops are being built (once per machine, a minute
    each) and keep the compiler's output out of the log; shown only if the block fails."""
    missing = ops_to_build(offload_optimizer)
    if missing:
        ops = " and ".join(OP_NAMES.get(name, name) for name in missing)
        where = ", ".join(str(d) for d in missing.values())
        log.info("building DeepSpeed's %s op%s once (about a minute%s; cached in %s)", ops,
                 "s" if len(missing) > 1 else "", " each" if len(missing) > 1 else "", where)
    with output_captured(f"building DeepSpeed's ops ({', '.join(missing)})" if missing else "setting up DeepSpeed"):
        yield


class _RecordedWrites:
    """Stands in for a DeepSpeed engine's checkpoint engine (and its copy of the recovery
    scripts, rank 0's only other write) while a checkpoint is saved: each file goes through
    `wrap_file` when one is given, and the first OSError is kept instead of raised, so that this
    rank still reaches the barriers the other ranks wait at. recording() raises it at the end."""

    def __init__(self, engine: Any):
        self.engine, self.inner = engine, engine.checkpoint_engine
        self.failure: OSError | None = None
        self.wrap_file: WrapFile | None = None

    @contextlib.contextmanager
    def recording(self, wrap_file: WrapFile | None) -> Iterator[None]:
        self.failure, self.wrap_file = None, wrap_file
        copy_scripts = self.engine._copy_recovery_script  # DeepSpeed's private helper (rank 0)
        self.engine.checkpoint_engine = self
        self.engine._copy_recovery_script = lambda save_path: self.run(lambda: copy_scripts(save_path))
        try:
            yield
        finally:
            self.engine.checkpoint_engine = self.inner
            del self.engine._copy_recovery_script  # back to the class's method
        if self.failure is not None:
            raise self.failure

    def run(self, write: Callable[[], object]) -> None:
        if self.failure is not None:
            return  # this checkpoint is lost already: write nothing more of it
        try:
            write()
        except OSError as exc:
            self.failure = exc

    def save(self, state_dict: dict, path: str) -> None:
        if self.wrap_file is None:
            self.run(lambda: self.inner.save(state_dict, path))
            return

        def wrapped() -> None:
            assert self.wrap_file is not None  # checked above
            with open(path, "wb") as file:
                self.inner.save(state_dict, self.wrap_file(file))  # torch.save takes a file object too

        self.run(wrapped)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # makedirs, create, commit, is_decoupled, ...


def universal_copy(path: Path, is_main: bool) -> Path:
    """`path`'s DeepSpeed checkpoint in DeepSpeed's universal format (converted by the main rank
    the first time, written whole or not at all); call on every rank."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    universal = path.parent / f".universal_{path.name}" / "universal"
    if is_main and not universal.is_dir():
        log.info("converting %s (written at another world size) to DeepSpeed's universal format", path)
        tmp = temporary_sibling(universal.parent)
        ds_to_universal(argparse.Namespace(input_folder=str(path / DEEPSPEED_DIR), output_folder=str(tmp / "universal"),
                                           num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                           strict=True, inject_missing_state=False))
        publish(tmp, universal.parent)
    barrier()
    return universal
