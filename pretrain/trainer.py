"""The Trainer: builds everything from a validated config, then runs the loop."""

from __future__ import annotations

import functools
import logging
import math
import time
from pathlib import Path

import torch

from pretrain.checkpoint.layout import checkpoint_dir
from pretrain.checkpoint.manager import CheckpointManager
from pretrain.config.load import config_to_yaml, grad_accum_steps, save_config
from pretrain.config.schema import Config, ParallelConfig
from pretrain.data import TrainData, load_or_train_tokenizer, open_sources, validation_sets
from pretrain.errors import PREEMPTED_EXIT_CODE, CorruptCheckpoint, PretrainError
from pretrain.evaluation.generate import generate
from pretrain.evaluation.hook_runner import HookRunner
from pretrain.evaluation.validation import validation_metrics
from pretrain.hardware.devices import keep_freed_memory, memory_gib, mfu_reference, resolve_precision
from pretrain.hardware.memory_advice import oom_message
from pretrain.hardware.preflight import format_report, run_preflight
from pretrain.models import count_params, flops_per_token, model_spec
from pretrain.observability.metrics import MetricLogger
from pretrain.observability.progress import TrainingProgress, progress_enabled
from pretrain.parallel import (
    DistInfo,
    ParallelDims,
    any_rank,
    build_engine,
    collective_failures_named,
    destroy_process_group,
    dist_info_from_env,
    init_process_group,
    launch_env,
    main_rank_first,
    sum_over_ranks,
)
from pretrain.resilience.faults import FaultInjector
from pretrain.resilience.preemption import INTERRUPTED_EXIT_CODE, StopNow, StopSignals
from pretrain.resilience.run_lock import lock_out_dir
from pretrain.resilience.step_guard import OK, BadBatchLedger, StepGuard, Verdict
from pretrain.resilience.watchdog import HangWatchdog

log = logging.getLogger("pretrain")


class Trainer:
    """Owns the model, optimizer, schedule, data and loggers of one training run.

    Data flows one way: config -> process group and mesh -> tokenizer -> model on meta ->
    parallelize, materialise and init, optimizer and schedule (the engine) -> data -> loop;
    __init__ names each build step."""

    def __init__(self, cfg: Config, dist: DistInfo | None = None):
        self.cfg, self.out_dir = cfg, Path(cfg.out_dir)
        self._join_job(dist or dist_info_from_env(cfg.train.device))
        self._check_before_compute()
        sources = open_sources(cfg.data)  # lists every file: a missing one fails before any compute
        with main_rank_first(self.dist):  # one rank trains a missing tokenizer, the others load it
            self.tokenizer = load_or_train_tokenizer(cfg, sources)
        self._build_checkpointing()
        resume_candidates = self.checkpoints.resume_candidates()
        self._build_model_and_engine(fresh_start=not resume_candidates)
        self._build_data(sources)
        self._build_logging()
        self.step = 0  # optimizer steps done; the data's position and the checkpoints are its own facts
        self.tokens_seen = 0
        self.exit_code = 0  # PREEMPTED_EXIT_CODE or INTERRUPTED_EXIT_CODE once a signal stopped the run
        self.checkpoints.track({"engine": self.engine, "train": self})
        self.resume(resume_candidates)
        if self.dist.is_main:  # only once the run is known to start: a refused resume keeps the old one
            save_config(cfg, cfg.out_dir)
        self._log_summary()

    def _join_job(self, dist: DistInfo) -> None:
        """The process group and the mesh (how the ranks divide the work), this rank's device."""
        cfg = self.cfg
        self.dist, self.device = dist, dist.device
        self.precision = resolve_precision(cfg.train.precision, self.device)
        self.dims = ParallelDims.from_config(cfg.parallel, dist.world_size)
        self.grad_accum = grad_accum_steps(cfg, self.dims.dp_size)
        self.owns_process_group = init_process_group(dist, cfg.parallel.timeout_s,
                                                     always=cfg.parallel.backend != "none")
        if torch.distributed.is_initialized():
            self.dims = self.dims.with_mesh(self.device.type)
        if self.device.type == "cpu" and keep_freed_memory():
            log.info("malloc tuned to keep freed memory (faster CPU steps; see hardware.keep_freed_memory)")

    def _check_before_compute(self) -> None:
        """Preflight (memory, disk, ranks), then the out_dir's lock: before any compute or write."""
        preflight = run_preflight(self.cfg, self.dist, measure=False)
        if self.dist.is_main:
            log.info("preflight:\n  %s", "\n  ".join(format_report(preflight)))
        preflight.raise_on_failure()
        # One run per out_dir, decided before anything is written there; held by rank 0.
        self.run_lock = lock_out_dir(self.out_dir, self.dist.is_main, any_rank)

    def _build_checkpointing(self) -> None:
        """Fault drills, the checkpoint manager (it repairs interrupted writes), the step guard and
        its ledger of bad steps."""
        cfg, restarts = self.cfg, launch_env().restart_count
        if restarts and self.dist.is_main:
            log.warning("restart %d of this job by torchrun (after a process failed): resuming from the newest "
                        "complete checkpoint", restarts)
        self.faults = FaultInjector(self.dist.rank)  # PRETRAIN_FAULTS fire drills; nothing when unset
        self.checkpoints = CheckpointManager(cfg.checkpoint, cfg.out_dir, self.dist, self.faults)
        self.guard = StepGuard(cfg.train)
        self.ledger = BadBatchLedger(cfg.out_dir, self.dist.is_main)

    def _build_model_and_engine(self, fresh_start: bool) -> None:
        """The model on meta, parallelized, materialised and initialised (from checkpoint.init_from
        when the run starts fresh), with its optimizer and LR schedule (the engine's)."""
        cfg, initial_weights = self.cfg, None
        if cfg.checkpoint.init_from and fresh_start:
            from pretrain.export.weights import load_weights

            initial_weights = load_weights(Path(cfg.checkpoint.init_from))
            log.info("initial weights from %s (checkpoint.init_from)", cfg.checkpoint.init_from)
        with torch.device("meta"):
            model = model_spec(cfg.model).build(cfg.model)
        self.engine = build_engine(model, cfg, self.dist, self.dims, self.precision, initial_weights)
        del initial_weights
        self.model, self.optimizer, self.scheduler = self.engine.model, self.engine.optimizer, self.engine.scheduler
        # Identical init on every rank (above); from here on each rank draws its own random numbers.
        torch.manual_seed(cfg.train.seed + self.dist.rank)

    def _build_data(self, sources: list) -> None:
        """This data-parallel rank's share of the training stream and of the held-out batches."""
        cfg, dims = self.cfg, self.dims
        self.train_data = TrainData(cfg.data, cfg.train, self.tokenizer, dp_rank=dims.dp_rank, dp_size=dims.dp_size,
                                    dp_group=dims.dp_group, sources=sources)
        self.val_sets = None
        if cfg.eval.every:  # built now so an empty split fails before any compute
            self.val_sets = validation_sets(cfg.data, self.tokenizer, micro_batch_size=cfg.train.micro_batch_size,
                                            max_batches=cfg.eval.batches, dp_rank=dims.dp_rank,
                                            dp_size=dims.dp_size, sources=sources)
            self.token_bytes = torch.from_numpy(self.tokenizer.token_byte_lengths()).to(self.device)

    def _build_logging(self) -> None:
        """The metric logger, the eval hooks, and what MFU is measured against."""
        cfg = self.cfg
        self.metrics = MetricLogger.for_config(cfg, enabled=self.dist.is_main)
        self.hooks = HookRunner(cfg, self.metrics.log, enabled=self.dist.is_main)
        self.flops_per_token = flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak_flops, self.peak_source, self.measured_flops = mfu_reference(
            self.out_dir, self.device, self.precision, cfg.logging.peak_flops, write=self.dist.is_main)

    def _log_summary(self) -> None:
        cfg = self.cfg
        log.info(
            "model: %.2fM parameters (%.2fM without embeddings), %.3g FLOPs/token | %s %s | "
            "global batch %d tokens = %d micro-batches x %d x %d tokens x %d ranks (%s) | peak %.3g FLOP/s (%s)",
            count_params(cfg.model) / 1e6, count_params(cfg.model, include_embeddings=False) / 1e6,
            self.flops_per_token, self.device, self.precision, cfg.train.global_batch_tokens,
            self.grad_accum, cfg.train.micro_batch_size, cfg.data.seq_len, self.dims.dp_size,
            backend_name(cfg.parallel), self.peak_flops, self.peak_source,
        )

    def train(self) -> int:
        """Run until train.stop_at (or max_steps), with logging, evaluation and samples on
        intervals; returns the process exit code (PREEMPTED_EXIT_CODE after a scheduler's signal,
        INTERRUPTED_EXIT_CODE after Ctrl-C; both with a checkpoint). A second Ctrl-C raises StopNow."""
        try:
            with collective_failures_named(self.dist, self.cfg.parallel.timeout_s), \
                    StopSignals(announce=self.dist.is_main) as signals:
                self._train(signals)
        except torch.OutOfMemoryError as exc:
            raise PretrainError(oom_message(self.cfg, self.dist.world_size, self.device)) from exc
        except KeyboardInterrupt as exc:
            self.abandon()
            raise StopNow(str(exc) or self.checkpoints.stopped_at_once(self.step)) from None
        return self.exit_code

    def _train(self, signals: StopSignals) -> None:
        cfg = self.cfg
        last_step = cfg.train.stop_at or cfg.train.max_steps
        if self.step >= last_step:
            log.info("%s already holds a checkpoint at step %d, the last step of this run: nothing to "
                     "train (start over with --checkpoint.resume=false or another out_dir)", self.out_dir, self.step)
            self.close()
            return
        log.info("training from step %d to step %d -> %s", self.step, last_step, self.out_dir)
        if self.val_sets and self.step == 0:
            self.evaluate()  # the untrained model's loss, ~ln(vocab_size): a check on init and data
        interval_start, interval_steps = time.perf_counter(), 0
        show_progress = progress_enabled(cfg.logging.progress, self.dist.is_main)
        assert cfg.train.global_batch_tokens is not None  # filled in by validate()
        with TrainingProgress(show_progress, self.step, last_step, cfg.train.global_batch_tokens) as progress, \
                HangWatchdog(cfg.train.hang_timeout_s, self.dist.rank) as watchdog:
            while self.step < last_step:
                watchdog.beat(f"step {self.step + 1}")
                loss, grad_norm, verdict = self.train_step()
                self.step += 1
                self.tokens_seen += cfg.train.global_batch_tokens
                interval_steps += 1
                progress.advance()
                if verdict is not OK and self.handle_bad_step(verdict):
                    progress.rewind(self.step)  # rolled back to an earlier checkpoint
                    interval_start, interval_steps = time.perf_counter(), 0
                    continue
                if due(self.step, cfg.logging.every) or self.step == last_step:
                    elapsed = time.perf_counter() - interval_start
                    self.log_step(loss, grad_norm, elapsed / interval_steps, last_step)
                    interval_start, interval_steps = time.perf_counter(), 0
                watchdog.beat(f"evaluation and checkpointing after step {self.step}")
                interval_start += self.run_interval_actions(last_step)  # not training time: excluded
                if any_rank(signals.requested is not None) and self.step < last_step:
                    self.stop_for_signal(any_rank(signals.interrupted))
                    return
        self.checkpoints.finish()  # the last checkpoint is published before sampling, which may take long
        if cfg.eval.sample_tokens:
            self.write_samples()
        self.close()

    def run_interval_actions(self, last_step: int) -> float:
        """Evaluation and checkpointing when due; returns the seconds they took."""
        start = time.perf_counter()
        cfg, final = self.cfg, self.step == last_step
        if self.val_sets and (due(self.step, cfg.eval.every) or final):
            self.evaluate()
        stopped_early = final and self.step < cfg.train.max_steps  # train.stop_at saves as a preemption would
        if (cfg.checkpoint.every and (due(self.step, cfg.checkpoint.every) or final)) or stopped_early:
            self.save_checkpoint()
        self.checkpoints.poll()  # publishes a background write that has completed
        self.run_hooks()
        return time.perf_counter() - start

    def run_hooks(self) -> None:
        """Hand newly published checkpoints to the eval hooks; log results that came back."""
        for step, path in self.checkpoints.take_published():
            self.hooks.checkpoint_ready(path, step)
        self.hooks.poll()

    def stop_for_signal(self, interrupted: bool) -> None:
        """Save a checkpoint of the step just finished (unless there is one) and stop: after
        Ctrl-C (`interrupted`) for the person to rerun, else for the scheduler to requeue."""
        if self.checkpoints.saved_step != self.step:
            self.save_checkpoint()
        self.close()  # publishes the checkpoint if it is still being written
        if interrupted:
            self.exit_code = INTERRUPTED_EXIT_CODE
            if self.dist.is_main:
                log.warning("interrupted: stopped after step %d with a checkpoint (%s); run the same command again "
                            "to resume from it", self.step, checkpoint_dir(self.checkpoints.root, self.step))
            return
        self.exit_code = PREEMPTED_EXIT_CODE
        if self.dist.is_main:
            log.warning("preempted: stopped after step %d with a checkpoint; exiting with code %d so the job is "
                        "requeued (it resumes from that checkpoint)", self.step, PREEMPTED_EXIT_CODE)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, Verdict]:
        """One optimizer step over `grad_accum` micro-batches; returns this rank's mean loss, the
        gradient norm and the guard's verdict (a step judged bad has not changed the weights,
        except under DeepSpeed, which updates before it can be judged)."""
        self.model.train()
        step = self.step + 1
        self.faults.step_started(step)
        loss_sum = torch.zeros((), device=self.device)
        for inputs, labels, document_ids in self.train_data.next_step():
            inputs = inputs.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            if document_ids is not None:
                document_ids = document_ids.to(self.device, non_blocking=True)
            with self.engine.autocast():
                loss = self.model(inputs, document_ids, labels=labels)
            loss = self.faults.corrupt_loss(step, loss)
            # Every micro-batch holds the same number of tokens, so the mean of means is the mean.
            self.engine.backward(loss / self.grad_accum)
            loss_sum += loss.detach()
        loss = loss_sum / self.grad_accum
        verdict = OK

        def approve(grad_norm: torch.Tensor) -> bool:
            nonlocal verdict
            verdict = self.judge(loss, grad_norm)
            return verdict.applies_update

        grad_norm = self.engine.step(self.cfg.optim.grad_clip, approve)
        self.scheduler.step()
        return loss, grad_norm, verdict

    def judge(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> Verdict:
        """The guard's verdict on this step, from the loss averaged over ranks and the gradient
        norm (non-finite on any rank counts for all): the same on every rank."""
        nonfinite = (~torch.isfinite(grad_norm.detach())).float().to(loss.device)
        totals = sum_over_ranks(torch.stack([loss.detach().float(), nonfinite]).cpu(), self.dims.dp_group)
        mean_loss, any_nonfinite = totals[0].item() / self.dims.dp_size, totals[1].item() > 0
        return self.guard.judge(mean_loss, math.inf if any_nonfinite else grad_norm.item())

    def handle_bad_step(self, verdict: Verdict) -> bool:
        """Act on a step judged bad (all ranks together); returns whether the run rolled back."""
        entry = {"step": self.step, "action": verdict.action, "reason": verdict.reason,
                 "data_step": self.train_data.step}
        if verdict.action == "warn":
            log.warning("step %d: %s (train.on_loss_spike=warn: the update was applied)", self.step, verdict.reason)
            self.ledger.record(entry)
            return False
        if verdict.action == "stop":
            self.ledger.record(entry)
            raise PretrainError(f"step {self.step}: {verdict.reason}; stopping as the config asks (train.on_nonfinite "
                                f"/ train.on_loss_spike = stop). Recorded in {self.ledger.path}. Resume from the last "
                                "checkpoint with a lower optim.lr, or choose skip or rollback")
        if verdict.action == "skip":
            log.warning("step %d: %s; its update was skipped", self.step, verdict.reason)
            self.ledger.record(entry)
            rolled_back = False
        else:
            rolled_back = self.roll_back(entry)
        limit = self.cfg.train.max_bad_steps
        if limit and self.ledger.bad_steps() >= limit:
            raise PretrainError(f"{self.ledger.bad_steps()} steps of this run were skipped or rolled back "
                                f"(train.max_bad_steps={limit}; see {self.ledger.path}): training is unstable. "
                                "Resume from a checkpoint with a lower optim.lr or more warmup")
        return rolled_back

    def roll_back(self, entry: dict) -> bool:
        """Reload the newest checkpoint and continue with the data after the bad step, so that the
        window between them is never trained on (the ledger keeps that across restarts)."""
        data_after = self.train_data.state_dict()  # collective: every rank is here
        self.checkpoints.finish()
        candidates = self.checkpoints.newest_first()
        if not candidates:
            self.ledger.record({**entry, "action": "stop"})
            raise PretrainError(f"step {self.step}: {entry['reason']}; train.on_nonfinite/on_loss_spike=rollback, but "
                                "there is no checkpoint to roll back to yet. Set checkpoint.every (e.g. 500), or "
                                "choose skip")
        bad_step = self.step
        self.resume(candidates)
        self.ledger.record({**entry, "rollback_to": self.step, "data_state": data_after})
        self.train_data.load_state_dict(data_after)
        log.warning("step %d: %s; rolled back to the checkpoint of step %d, skipping the data of steps %d-%d",
                    bad_step, entry["reason"], self.step, self.step + 1, bad_step)
        return True

    def log_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, step_seconds: float, last_step: int) -> None:
        assert self.cfg.train.global_batch_tokens is not None  # filled in by validate()
        tokens_per_s = self.cfg.train.global_batch_tokens / step_seconds
        flops_per_s = self.flops_per_token * tokens_per_s / self.dist.world_size
        measured = {"mfu_measured": flops_per_s / self.measured_flops} if self.measured_flops else {}
        self.metrics.log({
            "step": self.step,
            "max_steps": self.cfg.train.max_steps,
            "loss": (sum_over_ranks(loss, self.dims.dp_group) / self.dims.dp_size).item(),  # each dp rank's share
            "lr": self.scheduler.get_last_lr()[0],
            "grad_norm": grad_norm.item(),
            "tokens": self.tokens_seen,
            "tokens_per_s": tokens_per_s,
            "mfu": flops_per_s / self.peak_flops,
            **measured,
            "memory_gib": memory_gib(self.device),
            "eta_s": (last_step - self.step) * step_seconds,
            **self.train_data.metrics(),
        })

    def evaluate(self) -> float:
        """Validation loss, perplexity and bits per byte, per source and mixture-weighted
        (pretrain/evaluation/validation.py); logged, the weighted loss returned."""
        assert self.val_sets is not None  # callers check that there are validation sets
        metrics = validation_metrics(self.model, self.val_sets, self.token_bytes,
                                     {s.name: s.weight for s in self.cfg.data.sources}, self.device,
                                     self.engine.autocast,  # each data-parallel rank evaluated its share
                                     functools.partial(sum_over_ranks, group=self.dims.dp_group))
        self.metrics.log({"step": self.step, "tokens": self.tokens_seen, **metrics})
        return metrics["val_loss"]

    def write_samples(self) -> list[str]:
        """Complete each of eval.sample_prompts; print them and append them to out_dir/samples.txt."""
        ev = self.cfg.eval
        assert self.cfg.model.max_seq_len is not None  # filled in by validate()
        generator = torch.Generator().manual_seed(self.cfg.train.seed)
        samples = []
        self.model.eval()
        with self.engine.autocast():
            for prompt in ev.sample_prompts:
                new = generate(self.model, self.tokenizer.encode(prompt), ev.sample_tokens,
                               self.cfg.model.max_seq_len, ev.sample_top_k, ev.sample_temperature,
                               stop_id=self.tokenizer.eos_id, generator=generator)
                samples.append(prompt + self.tokenizer.decode(new))
        self.model.train()
        if not self.dist.is_main:
            return samples  # every rank generated (sharded forward passes need all ranks); one writes
        with (self.out_dir / "samples.txt").open("a", encoding="utf-8") as f:
            for sample in samples:
                f.write(f"=== step {self.step} ===\n{sample}\n\n")
                log.info("sample at step %d:\n%s", self.step, sample)
        return samples

    def state_dict(self) -> dict:
        """Everything besides model and optimizer that a bit-exact resume needs."""
        return {"step": self.step, "tokens_seen": self.tokens_seen, "scheduler": self.scheduler.state_dict(),
                "data": self.train_data.state_dict(), "guard": self.guard.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_data.load_state_dict(state["data"])
        self.guard.load_state_dict(state.get("guard"))
        skip_to = self.ledger.skip_after_resume(self.step)
        if skip_to is not None:  # a rollback went back to this checkpoint: skip the same data again
            self.train_data.load_state_dict(skip_to)
            log.info("skipping the data window of an earlier rollback to step %d (%s)", self.step, self.ledger.path)

    def save_checkpoint(self) -> None:
        assert self.tokenizer.path is not None  # loaded from a file (load_or_train_tokenizer)
        try:
            blocked = self.checkpoints.save(self.step, config_to_yaml(self.cfg), self.tokenizer.path)
        except KeyboardInterrupt:
            raise StopNow(self.checkpoints.interrupted_save(self.step)) from None
        if self.cfg.checkpoint.async_save:
            log.info("checkpoint of step %d: training blocked %.2fs, writing it in the background", self.step, blocked)
        self.metrics.log({"step": self.step, "tokens": self.tokens_seen, "checkpoint_blocked_s": blocked,
                          "checkpoint_async": self.cfg.checkpoint.async_save})

    def resume(self, candidates: list[Path]) -> None:
        """Continue from the first candidate checkpoint that loads; a damaged one is skipped
        with a warning in favour of the next (older) one."""
        problems = []
        for path in candidates:
            try:
                self.checkpoints.load(path, self.cfg.model)  # the engine's state, then this one's
                return
            except CorruptCheckpoint as exc:
                if self.cfg.checkpoint.resume_from:
                    raise
                problems.append(str(exc))
                if self.dist.is_main:
                    log.warning("%s; trying the previous checkpoint", exc)
        if not candidates:
            self.ledger.start_afresh()  # an earlier run's rollbacks must not steer this one
            return
        raise PretrainError("no checkpoint in {} could be loaded:\n  - {}\nStart over with "
                            "--checkpoint.resume=false, or restore a checkpoint".format(
                                self.checkpoints.root, "\n  - ".join(problems)))

    def abandon(self) -> None:
        """What a stop without saving still owes: flushed metrics, a free out_dir."""
        self.metrics.close()
        self.train_data.close()
        if self.run_lock is not None and self.checkpoints.pending is None:  # else the writer still uses out_dir
            self.run_lock.release()

    def close(self) -> None:
        self.checkpoints.finish()
        self.run_hooks()
        self.hooks.close()  # waits for background hooks: their results belong to this run
        self.train_data.close()
        self.metrics.close()
        if self.run_lock is not None:
            self.run_lock.release()  # everything of this run is written
        if self.owns_process_group:
            destroy_process_group()


def backend_name(p: ParallelConfig) -> str:
    if p.backend == "deepspeed":
        return f"deepspeed ZeRO-{p.zero_stage}"
    if p.backend == "fsdp" and p.replicate > 1:
        return f"fsdp, HSDP {p.replicate} replicas"
    return p.backend


def due(step: int, every: int) -> bool:
    """Whether an interval-gated action (every N steps, 0 = never) runs at `step`."""
    return every > 0 and step % every == 0
