"""The config's cross-field rules, checked once before any compute: every problem is reported
at once with the key, the value and a fix; derived values (max_seq_len, the global batch) are
filled in."""

from __future__ import annotations

import dataclasses
import math
import os
import re

from pretrain.config.parse import show
from pretrain.config.schema import (
    PREPARED_MANIFEST,
    Config,
    DataConfig,
    ParallelConfig,
    SourceConfig,
)
from pretrain.data.builtin import BUILTIN_SOURCES
from pretrain.data.files import BAD_PATTERN, has_glob, is_url, matches, pattern_problem
from pretrain.errors import ConfigError, PretrainError
from pretrain.models.args import divisors as _divisors
from pretrain.models.registry import AnyModelArgs, model_spec
from pretrain.parallel.dims import ParallelDims, dp_degrees


def validate(cfg: Config, world_size: int = 1, source: str | None = None) -> Config:
    """Check every cross-field rule, report all problems at once, and fill derived values."""
    if world_size < 1:  # the batch rules divide by it
        raise ConfigError([f"the world size is {world_size}; it must be >= 1 (WORLD_SIZE is set by torchrun, "
                           "or leave it unset for one process)"], source)
    problems: list[str] = []
    parallel_problems = _check_parallel(cfg.parallel, world_size)
    # The batch is split over the data-parallel ranks (all of them while tp, cp and pp are 1)
    dp_size = world_size if parallel_problems else ParallelDims.from_config(cfg.parallel, world_size).dp_size
    problems += _check_model(cfg.model)
    problems += _check_data(cfg.data)
    problems += _check_batch(cfg, dp_size)
    problems += _check_schedule(cfg)
    if cfg.tokenizer.vocab_size < 300:
        problems.append(f"tokenizer.vocab_size={cfg.tokenizer.vocab_size} is too small: the 256 byte-fallback "
                        "pieces and special tokens alone need ~260; use 1000 or more")
    if cfg.model.vocab_size < cfg.tokenizer.vocab_size:
        problems.append(f"model.vocab_size={cfg.model.vocab_size} is smaller than tokenizer.vocab_size="
                        f"{cfg.tokenizer.vocab_size}; set model.vocab_size >= {cfg.tokenizer.vocab_size}")
    for key in ("eval.every", "checkpoint.every", "logging.every", "eval.batches", "eval.sample_tokens",
                "checkpoint.keep_last", "checkpoint.keep_every"):
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) < 0:
            problems.append(f"{key}={getattr(getattr(cfg, section), name)} must be >= 0 (0 turns it off)")
    if cfg.checkpoint.resume_from and not os.path.isdir(cfg.checkpoint.resume_from):
        problems.append(f"checkpoint.resume_from={cfg.checkpoint.resume_from!r} is not a directory; "
                        "give a checkpoint such as out_dir/checkpoints/step_00001000")
    if cfg.checkpoint.init_from and not os.path.exists(cfg.checkpoint.init_from):
        problems.append(f"checkpoint.init_from={cfg.checkpoint.init_from!r} does not exist; give a checkpoint "
                        "directory or a `pretrain export` directory (format torch or hf)")
    if cfg.checkpoint.async_save and cfg.parallel.backend == "deepspeed":
        problems.append("checkpoint.async=true needs a DCP backend (none, ddp, fsdp): DeepSpeed writes its "
                        "checkpoints synchronously; set --checkpoint.async=false")
    for spec in cfg.eval.hooks:
        if not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", spec):
            problems.append(f"eval.hooks entry {spec!r} is not 'package.module:function', e.g. pretrain.hooks:perplexity")
    for spec in sorted(set(cfg.eval.hook_options) - set(cfg.eval.hooks)):
        problems.append(f"eval.hook_options has options for {spec!r}, which is not in eval.hooks {cfg.eval.hooks}")
    if cfg.eval.sample_top_k < 1:
        problems.append(f"eval.sample_top_k={cfg.eval.sample_top_k} must be >= 1 (1 = greedy)")
    if cfg.eval.every > 0 and cfg.data.val_fraction == 0:
        problems.append(f"eval.every={cfg.eval.every} needs held-out data but data.val_fraction=0; "
                        "set data.val_fraction=0.01 or eval.every=0")
    problems += parallel_problems
    if cfg.parallel.compile and cfg.train.compile is False:
        problems.append("parallel.compile=true (the key's older place) contradicts train.compile=false; drop "
                        "parallel.compile")
    if problems:
        raise ConfigError(problems, source)
    cfg = with_max_seq_len(cfg)
    train = cfg.train
    if cfg.parallel.compile:
        train = dataclasses.replace(train, compile=True)
    if train.global_batch_tokens is None:
        sequences = train.global_batch_sequences or train.micro_batch_size * dp_size
        train = dataclasses.replace(train, global_batch_tokens=sequences * cfg.data.seq_len,
                                    global_batch_sequences=None)
    assert train.global_batch_tokens is not None  # filled in just above
    sequences = train.global_batch_tokens // cfg.data.seq_len
    if cfg.data.lanes is not None and (cfg.data.lanes <= 0 or cfg.data.lanes % sequences):
        raise ConfigError([f"data.lanes={cfg.data.lanes} must be a positive multiple of the global batch of "
                           f"{sequences} sequences, e.g. {sequences * max(1, -(-256 // sequences))}"], source)
    return dataclasses.replace(cfg, train=train)


def with_max_seq_len(cfg: Config) -> Config:
    """`cfg` with model.max_seq_len derived: data.seq_len when it is null. validate() fills it in, and
    the exporter for configs that were not validated (hand-written ones beside a checkpoint)."""
    if cfg.model.max_seq_len is not None:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, max_seq_len=cfg.data.seq_len))


def _check_model(m: AnyModelArgs) -> list[str]:
    """The model section's rules are its family's own (ModelSpec.check)."""
    return model_spec(m).check(m)


def _check_data(d: DataConfig) -> list[str]:
    problems = []
    if d.seq_len <= 1:
        problems.append(f"data.seq_len={d.seq_len} must be at least 2")
    if not 0 <= d.val_fraction < 0.5:
        problems.append(f"data.val_fraction={d.val_fraction} must be in [0, 0.5), e.g. 0.01")
    if d.num_workers is not None and d.num_workers < 0:
        problems.append(f"data.num_workers={d.num_workers} must be >= 0 (0 = read in the training process)")
    if d.prefetch < 1:
        problems.append(f"data.prefetch={d.prefetch} must be >= 1")
    if d.chunk_bytes < 4096:
        problems.append(f"data.chunk_bytes={d.chunk_bytes} must be at least 4096, e.g. 1048576")
    if not d.sources:
        problems.append("data.sources is empty; add at least one {name, path, weight}, e.g. "
                        "--data.sources='[{name: docs, path: python-docs}]'")
    names = [s.name for s in d.sources]
    for i, src in enumerate(d.sources):
        key = f"data.sources[{i}]"
        if not src.name:
            problems.append(f"{key}.name is empty; give every source a short name, e.g. 'web'")
        elif names.count(src.name) > 1 and names.index(src.name) == i:
            problems.append(f"{key}.name={src.name!r} is used by more than one source; names must be unique")
        elif not re.fullmatch(r"[\w.-]+", src.name):
            problems.append(f"{key}.name={src.name!r} may hold only letters, digits, '_', '-' and '.' "
                            "(it names a directory of prepared shards)")
        if src.weight <= 0:
            problems.append(f"{key}.weight={src.weight} must be positive")
        if src.max_epochs is not None and src.max_epochs < 1:
            problems.append(f"{key}.max_epochs={src.max_epochs} must be >= 1 (or null for no limit)")
        prepared = d.prepared_source_dir(src.name)
        # a source read from prepared shards needs no raw files here (they may live elsewhere)
        has_shards = bool(prepared and os.path.isfile(os.path.join(prepared, PREPARED_MANIFEST)))
        problems += _check_source_path(src, f"{key}.path", check_files=not has_shards)
    return problems


def _check_source_path(src: SourceConfig, key: str, check_files: bool = True) -> list[str]:
    """`path` is a built-in corpus name, or a path, glob or URL, or a list of them, whose files
    exist and are of types the readers take (URLs are listed when the source opens)."""
    path = src.path
    if src.is_builtin or (not check_files and path == ""):
        return []
    if isinstance(path, str):
        patterns = [(key, path)]
    elif isinstance(path, list) and path:
        patterns = [(f"{key}[{j}]", p) for j, p in enumerate(path)]
    else:
        return [f"{key}={show(path)} must be a file, glob or URL, or a list of them (e.g. path: [a/*.jsonl, "
                f"b/x.parquet]), or one of {', '.join(BUILTIN_SOURCES)}"]
    problems = []
    for item_key, pattern in patterns:
        if pattern == "":
            problems.append(f"{item_key} is empty; give a file, a glob or a URL"
                            + ("" if item_key != key else f", or one of {', '.join(BUILTIN_SOURCES)}"))
        elif not isinstance(pattern, str):
            problems.append(f"{item_key}={show(pattern)} must be a file, a glob or a URL (a string; quote numbers)")
        elif pattern in BUILTIN_SOURCES:
            problems.append(f"{item_key}={pattern!r} is a built-in corpus, not a file: give it a data.sources entry "
                            f"of its own ({{name: {pattern}, path: {pattern}}})")
        elif check_files:
            if is_url(pattern):  # listed when the source opens, not here; only a single file's type is known
                found = [pattern] if not has_glob(pattern) else None
            else:
                try:
                    found = matches(pattern)
                except PretrainError:
                    problems.append(f"{item_key}={pattern!r} {BAD_PATTERN}")
                    continue
            problem = pattern_problem(pattern, found) if found is not None else None
            if problem:
                problems.append(f"{item_key}={pattern!r} (source {src.name!r}) {problem}")
    return problems


def _check_batch(cfg: Config, dp_size: int) -> list[str]:
    """The global batch splits evenly into micro-batches over the `dp_size` data-parallel ranks
    (called the world size in the message: the two are equal until tp, cp and pp exist)."""
    t, seq = cfg.train, cfg.data.seq_len
    problems = []
    if t.micro_batch_size <= 0:
        return [f"train.micro_batch_size={t.micro_batch_size} must be a positive integer"]
    if t.global_batch_tokens is not None and t.global_batch_sequences is not None:
        return ["give only one of train.global_batch_tokens and train.global_batch_sequences "
                f"(got {t.global_batch_tokens} and {t.global_batch_sequences}); set the other to null"]
    sequences = t.global_batch_sequences or t.micro_batch_size * dp_size
    if t.global_batch_tokens is not None:
        if t.global_batch_tokens <= 0 or seq <= 0 or t.global_batch_tokens % seq:
            lower = max(seq, t.global_batch_tokens // max(seq, 1) * seq)
            return [f"train.global_batch_tokens={t.global_batch_tokens} is not a positive multiple of "
                    f"data.seq_len={seq}; use e.g. {lower} or {lower + seq}"]
        sequences = t.global_batch_tokens // seq
    per_step = t.micro_batch_size * dp_size
    if sequences <= 0 or sequences % per_step:
        lower = max(per_step, sequences // per_step * per_step)
        unit = "sequences" if t.global_batch_tokens is None else "tokens"
        scale = 1 if t.global_batch_tokens is None else seq
        problems.append(
            f"the global batch of {sequences} sequences is not divisible by train.micro_batch_size="
            f"{t.micro_batch_size} x world size {dp_size} = {per_step}; set the global batch to "
            f"{lower * scale} or {(lower + per_step) * scale} {unit}, or change micro_batch_size"
        )
    return problems


# DeepSpeed keys that the generated DeepSpeed config derives from ours, and the key to set instead.
DEEPSPEED_DERIVED_KEYS = {
    "train_batch_size": "train.global_batch_tokens",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_tokens (accumulation is derived from it)",
    "gradient_clipping": "optim.grad_clip",
    "bf16": "train.precision",
    "fp16": "train.precision (bf16; fp16 with loss scaling is not supported)",
    "optimizer": "the optim section (DeepSpeed steps our AdamW)",
    "scheduler": "optim.schedule and its keys",
    "zero_optimization.stage": "parallel.zero_stage",
    "zero_optimization.offload_optimizer": "parallel.offload_optimizer",
    "zero_optimization.offload_param": "parallel.offload_params",
}


def _check_parallel(p: ParallelConfig, world_size: int) -> list[str]:
    problems = []
    if p.backend == "none" and world_size > 1:
        problems.append(f"parallel.backend='none' runs one process but WORLD_SIZE={world_size}; launch a "
                        "single process or choose --parallel.backend=fsdp (or ddp, deepspeed)")
    if p.backend != "fsdp" and (p.replicate != 1 or p.shard is not None):
        problems.append(f"parallel.replicate={p.replicate} / parallel.shard={p.shard} describe an FSDP (HSDP) "
                        f"mesh but parallel.backend={p.backend!r}; use --parallel.backend=fsdp or drop them")
    elif p.replicate < 1 or (p.shard is not None and p.shard < 1):
        problems.append(f"parallel.replicate={p.replicate} and parallel.shard={p.shard} must be >= 1")
    elif p.backend == "fsdp" and math.prod(dp_degrees(p, world_size)) != world_size:
        problems.append(f"parallel.replicate={p.replicate} x parallel.shard={dp_degrees(p, world_size)[1]} must "
                        f"equal the world size "
                        f"{world_size}; choose replicate in {_divisors(world_size)} and leave shard unset")
    if p.offload_params and not (p.backend == "deepspeed" and p.zero_stage == 3):
        problems.append(f"parallel.offload_params=true needs --parallel.backend=deepspeed --parallel.zero_stage=3 "
                        f"(got backend={p.backend!r}, zero_stage={p.zero_stage}); for fsdp use parallel.cpu_offload")
    if p.offload_optimizer and p.backend != "deepspeed":
        problems.append(f"parallel.offload_optimizer=true is a DeepSpeed option (backend={p.backend!r}); "
                        "for fsdp use parallel.cpu_offload=true")
    if p.cpu_offload and p.backend != "fsdp":
        problems.append(f"parallel.cpu_offload=true is an FSDP option (backend={p.backend!r}); for deepspeed "
                        "use parallel.offload_optimizer / parallel.offload_params")
    if p.deepspeed and p.backend != "deepspeed":
        problems.append(f"parallel.deepspeed holds DeepSpeed keys but parallel.backend={p.backend!r}; "
                        "use --parallel.backend=deepspeed or remove them")
    for dotted, instead in DEEPSPEED_DERIVED_KEYS.items():
        section, _, name = dotted.rpartition(".")
        holder = p.deepspeed.get(section) if section else p.deepspeed
        if isinstance(holder, dict) and name in holder:
            problems.append(f"parallel.deepspeed.{dotted} is set from our config; set {instead} instead")
    if p.ac_every < 1:
        problems.append(f"parallel.ac_every={p.ac_every} must be >= 1 (1 = every block, as 'full')")
    if p.timeout_s <= 0:
        problems.append(f"parallel.timeout_s={p.timeout_s} must be positive, e.g. 600")
    return problems


def _check_schedule(cfg: Config) -> list[str]:
    t, o = cfg.train, cfg.optim
    problems = _check_fault_handling(cfg)
    if t.max_steps <= 0:
        problems.append(f"train.max_steps={t.max_steps} must be a positive integer")
    if t.stop_at is not None and not 1 <= t.stop_at <= t.max_steps:
        problems.append(f"train.stop_at={t.stop_at} must be between 1 and train.max_steps={t.max_steps}")
    if o.lr <= 0:
        problems.append(f"optim.lr={o.lr} must be positive, e.g. 3e-4")
    if not 0 <= o.min_lr_ratio <= 1:
        problems.append(f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    if o.warmup_steps < 0 or (t.max_steps > 0 and o.warmup_steps > t.max_steps):
        problems.append(f"optim.warmup_steps={o.warmup_steps} must be in [0, train.max_steps={t.max_steps}]; "
                        f"for a short run lower it too, e.g. --optim.warmup_steps={t.max_steps // 10}")
    if not 0 < o.decay_fraction <= 1:
        problems.append(f"optim.decay_fraction={o.decay_fraction} must be in (0, 1]")
    if o.grad_clip < 0:
        problems.append(f"optim.grad_clip={o.grad_clip} must be >= 0 (0 = no clipping)")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(o, name) < 1:
            problems.append(f"optim.{name}={getattr(o, name)} must be in [0, 1)")
    return problems


def _check_fault_handling(cfg: Config) -> list[str]:
    t = cfg.train
    problems = []
    if cfg.parallel.backend == "deepspeed":
        for key in ("on_nonfinite", "on_loss_spike"):
            if getattr(t, key) == "skip":
                problems.append(f"train.{key}=skip cannot be honoured with parallel.backend=deepspeed (DeepSpeed "
                                f"applies the update before the step can be vetoed); use --train.{key}=rollback or stop")
    if t.spike_zscore <= 0:
        problems.append(f"train.spike_zscore={t.spike_zscore} must be positive, e.g. 6")
    if t.spike_window < 20:
        problems.append(f"train.spike_window={t.spike_window} must be at least 20 steps, e.g. 100")
    if t.max_bad_steps < 0:
        problems.append(f"train.max_bad_steps={t.max_bad_steps} must be >= 0 (0 = no limit)")
    if t.hang_timeout_s < 0:
        problems.append(f"train.hang_timeout_s={t.hang_timeout_s} must be >= 0 (0 = no watchdog), e.g. 1800")
    return problems
