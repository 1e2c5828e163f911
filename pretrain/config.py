"""The job config: typed sections loaded from YAML, overridden with `--section.key=value`,
validated once before any compute. Read-only at runtime (every section is frozen)."""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from pretrain.config_parse import (
    apply_override,
    build,
    load_yaml_text,
    option,
    parse_overrides,
    reference,
    to_dict,
)
from pretrain.errors import ConfigError
from pretrain.models.args import ModelArgs

BUILTIN_SOURCES = ("python-docs",)
FILE_KINDS = {"txt": (".txt",), "jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}  # parquet compresses inside the file
SUPPORTED_FILES = ".txt, .jsonl or .json (each also as .gz or .zst) or .parquet"
PREPARED_MANIFEST = "manifest.json"


def data_file_kind(path: str) -> tuple[str, str | None] | None:
    """("txt" | "jsonl" | "parquet", "gzip" | "zstd" | None) of a data file from its name, or
    None for a file type we cannot read."""
    compression = next((c for suffix, c in COMPRESSIONS.items() if path.endswith(suffix)), None)
    base = path.rsplit(".", 1)[0] if compression else path
    for kind, suffixes in FILE_KINDS.items():
        if base.endswith(suffixes) and not (kind == "parquet" and compression):
            return kind, compression
    return None


@dataclass(frozen=True)
class SourceConfig:
    """One data source of the training mixture."""

    name: str = option("", "label used in logs, metrics and prepared shards")
    path: str = option("", "file, glob or URL (s3://... with s3fs) of .txt/.jsonl/.json[.gz|.zst]/.parquet "
                           "files, or 'python-docs' (built in)")
    weight: float = option(1.0, "relative sampling weight in the mixture (share of training tokens)")
    text_field: str = option("text", "field holding the document text in .jsonl/.parquet files")
    max_epochs: int | None = option(None, "stop with an error instead of starting epoch max_epochs + 1 of this "
                                          "source (null = repeat as needed; every new epoch is logged)")


@dataclass(frozen=True)
class DataConfig:
    sources: list[SourceConfig] = option(
        [SourceConfig(name="python-docs", path="python-docs")], "mixture of sources {name, path, weight}"
    )
    seq_len: int = option(1024, "tokens per training sequence (documents are packed, joined by EOS)")
    val_fraction: float = option(0.01, "share of documents held out for validation (chosen by content hash)")
    num_workers: int | None = option(None, "background processes that read, tokenize and pack (0 = in the training "
                                           "process; default: 2 when training on a GPU, 0 on a CPU)")
    prefetch: int = option(2, "global batches each worker prepares ahead of the trainer")
    lanes: int | None = option(None, "parallel readers of streamed sources; a multiple of the global batch in "
                                     "sequences, so a document's consecutive windows land lanes / batch steps "
                                     "apart (default: the smallest such multiple >= 256)")
    chunk_bytes: int = option(1 << 20, "streamed sources are split into chunks of about this size, the unit a lane "
                                       "reads and a resume re-reads")
    in_memory_max_bytes: int = option(64 << 20, "raw sources up to this size are tokenized whole when training "
                                                "starts and read like prepared shards (shuffled across the source); "
                                                "larger ones are streamed chunk by chunk (0 = stream every source)")
    document_masking: bool = option(False, "attention stays within each packed document (never across an EOS)")
    on_bad_record: Literal["error", "skip"] = option(
        "error", "a record that cannot be read (bad JSON, no text field, not UTF-8): stop, or skip and count it")
    prepared_dir: str | None = option(None, "read the token shards that `pretrain data prepare` wrote here "
                                            "instead of tokenizing on the fly")
    allow_changed_data: bool = option(False, "resume although sources, weights, seed or batch shape differ from "
                                             "the checkpoint's (unchanged sources keep their position)")

    def prepared_source_dir(self, name: str) -> str | None:
        """Where the prepared shards of source `name` live (None when not using prepared shards)."""
        return os.path.join(self.prepared_dir, name) if self.prepared_dir else None


@dataclass(frozen=True)
class TokenizerConfig:
    path: str | None = option(None, "sentencepiece .model file; trained there if missing (default: out_dir/tokenizer.model)")
    vocab_size: int = option(32000, "vocabulary size when training a tokenizer")
    train_chars: int = option(200_000_000, "at most this many characters of training text are read to train it")


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = option(1000, "optimizer steps of the full run (the LR schedule spans them)")
    global_batch_tokens: int | None = option(
        None, "tokens per optimizer step over all ranks (default: one micro-batch per rank, no accumulation)"
    )
    global_batch_sequences: int | None = option(None, "the global batch in sequences instead of tokens")
    micro_batch_size: int = option(4, "sequences per rank per forward/backward pass")
    stop_at: int | None = option(None, "end the run after this step, as a preemption would")
    seed: int = option(0, "seed for init, data order and sampling")
    precision: Literal["auto", "fp32", "bf16"] = option(
        "auto", "bf16 autocast with fp32 master weights, or fp32; auto = bf16 where the hardware has it"
    )
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto = cuda when available")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = option(3e-4, "peak learning rate")
    min_lr_ratio: float = option(0.1, "final learning rate as a fraction of lr")
    schedule: Literal["cosine", "wsd", "constant"] = option("cosine", "decay after warmup: cosine, warmup-stable-decay, or none")
    warmup_steps: int = option(100, "linear warmup from 0 to lr")
    decay_fraction: float = option(0.2, "wsd: share of max_steps spent decaying at the end")
    weight_decay: float = option(0.1, "AdamW decoupled weight decay (not applied to norm gains)")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    eps: float = option(1e-8, "AdamW epsilon")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = no clipping)")


@dataclass(frozen=True)
class ParallelConfig:
    backend: Literal["none", "ddp", "fsdp", "deepspeed"] = option(
        "none", "none = one process; ddp = replicated model; fsdp = PyTorch FSDP2 (sharded); "
                "deepspeed = DeepSpeed ZeRO (see zero_stage)")
    replicate: int = option(1, "fsdp: replica groups (HSDP: shard within a group of `shard` ranks, e.g. a node, "
                               "replicate across groups)")
    shard: int | None = option(None, "fsdp: ranks each model copy is sharded over (default: world size / replicate)")
    reshard_after_forward: bool = option(True, "fsdp: free gathered parameters after each block's forward "
                                               "(false: keep them until backward, more memory, less communication)")
    cpu_offload: bool = option(False, "fsdp: keep sharded parameters, gradients and optimizer state in CPU memory")
    zero_stage: Literal[1, 2, 3] = option(2, "deepspeed: ZeRO stage (1 = optimizer state, 2 = + gradients, "
                                             "3 = + parameters sharded)")
    offload_optimizer: bool = option(False, "deepspeed: optimizer state and step in CPU memory (DeepSpeedCPUAdam)")
    offload_params: bool = option(False, "deepspeed: parameters in CPU memory (ZeRO stage 3 only)")
    deepspeed: dict[str, Any] = option({}, "deepspeed: extra DeepSpeed config keys merged over the generated config, "
                                 "e.g. {zero_optimization: {reduce_bucket_size: 5.0e+7}}")
    activation_checkpointing: Literal["none", "full", "selective"] = option(
        "none", "recompute block activations in backward: full = every block, selective = every ac_every-th")
    ac_every: int = option(2, "selective activation checkpointing: checkpoint every N-th transformer block")
    compile: bool = option(False, "torch.compile each transformer block")
    timeout_s: float = option(600.0, "a collective that waits longer than this fails the job with an error "
                                     "naming the rank (instead of hanging)")

    def mesh_shape(self, world_size: int) -> tuple[int, int]:
        """(replicate, shard) of the FSDP mesh; shard defaults to world size / replicate."""
        return self.replicate, self.shard or world_size // self.replicate


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = option(0, "save every N steps and at the end into out_dir/checkpoints/step_NNNNNNNN/ (0 = off)")
    resume: bool = option(True, "continue from the newest complete checkpoint in out_dir if there is one")
    resume_from: str | None = option(None, "continue from this checkpoint directory instead")
    keep_last: int = option(0, "keep only the newest K complete checkpoints (0 = keep all)")
    keep_every: int = option(0, "also keep every checkpoint whose step is a multiple of N forever (0 = none)")
    async_save: bool = option(False, "write checkpoints in the background while training goes on (not with "
                                     "parallel.backend=deepspeed)", key="async")
    init_from: str | None = option(None, "start a new run from these weights (a checkpoint directory, or a `pretrain "
                                         "export` directory of format torch or hf); the optimizer starts fresh. "
                                         "Ignored when the run resumes from a checkpoint of its own")


@dataclass(frozen=True)
class EvalConfig:
    every: int = option(0, "validation loss every N steps and at the end (0 = off)")
    batches: int = option(20, "validation micro-batches per evaluation over all ranks, the same sequences at any "
                              "world size (fewer if the split is smaller)")
    sample_prompts: list[str] = option(["The "], "prompts completed by the model at the end of training")
    sample_tokens: int = option(64, "tokens generated per prompt (0 = no samples)")
    sample_top_k: int = option(1, "sample among the k likeliest tokens (1 = greedy)")
    sample_temperature: float = option(1.0, "softmax temperature for sampling")
    hooks: list[str] = option([], "functions called with each new checkpoint, as 'package.module:function' "
                                  "(e.g. pretrain.hooks:perplexity); what they return is logged")
    hooks_async: bool = option(False, "run the hooks in a separate process so training does not wait for them")
    hook_options: dict[str, dict[str, Any]] = option({}, "keyword arguments per hook, keyed by its 'package.module:function'")


@dataclass(frozen=True)
class WandbConfig:
    mode: Literal["disabled", "offline", "online"] = option(
        "disabled", "Weights & Biases: disabled, offline (kept in out_dir/wandb until `wandb sync`) or online")
    project: str = option("pretrain", "wandb project")
    entity: str | None = option(None, "wandb team or user (default: your wandb default)")
    name: str | None = option(None, "wandb run name (default: out_dir's name)")


@dataclass(frozen=True)
class LoggingConfig:
    every: int = option(10, "one console line and one metrics.jsonl record every N steps (0 = off)")
    peak_flops: float | None = option(None, "peak FLOP/s per device for MFU (default: known GPU table or measured on CPU)")
    all_ranks: bool = option(False, "log from every rank, not only rank 0")
    wandb: WandbConfig = option(WandbConfig(), "Weights & Biases tracking (off by default: nothing leaves the machine)")
    tensorboard: bool = option(False, "also write TensorBoard scalars to out_dir/tensorboard (needs tensorboard)")
    progress: bool | None = option(None, "live progress bar on rank 0 (null = when stderr is a terminal; "
                                         "cluster logs get plain lines)")


@dataclass(frozen=True)
class Config:
    out_dir: str = option("runs/default", "where config.yaml, metrics.jsonl, samples and checkpoints go")
    model: ModelArgs = option(ModelArgs(), "model shape")
    data: DataConfig = option(DataConfig(), "training data")
    tokenizer: TokenizerConfig = option(TokenizerConfig(), "tokenizer")
    train: TrainConfig = option(TrainConfig(), "training loop")
    optim: OptimConfig = option(OptimConfig(), "optimizer and LR schedule")
    parallel: ParallelConfig = option(ParallelConfig(), "distribution")
    checkpoint: CheckpointConfig = option(CheckpointConfig(), "checkpoints")
    eval: EvalConfig = option(EvalConfig(), "evaluation")
    logging: LoggingConfig = option(LoggingConfig(), "logging")

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer.path or os.path.join(self.out_dir, "tokenizer.model")


def load_config(path: str | None, overrides: list[str] = (), world_size: int | None = None) -> Config:
    """Read a YAML file, apply `--section.key=value` overrides, type-check and validate.

    Raises ConfigError listing every problem found."""
    source = path or "the command line"
    data = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError([f"cannot read config file {path!r}: {exc.strerror}"]) from None
        try:
            data = load_yaml_text(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError([f"{path} is not valid YAML: {exc}"]) from None
    pairs, problems = parse_overrides(list(overrides))
    if isinstance(data, dict):
        for key, value in pairs:
            problem = apply_override(data, key, value)
            if problem:
                problems.append(problem)
    config = build(Config, data, "", problems)
    if problems:
        raise ConfigError(problems, source)
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return validate(config, world_size, source)


def validate(cfg: Config, world_size: int = 1, source: str | None = None) -> Config:
    """Check every cross-field rule, report all problems at once, and fill derived values."""
    problems: list[str] = []
    problems += _check_model(cfg.model)
    problems += _check_data(cfg.data)
    problems += _check_batch(cfg, world_size)
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
    problems += _check_parallel(cfg.parallel, world_size)
    if problems:
        raise ConfigError(problems, source)
    model = cfg.model
    if model.max_seq_len is None:
        model = dataclasses.replace(model, max_seq_len=cfg.data.seq_len)
    train = cfg.train
    if train.global_batch_tokens is None:
        sequences = train.global_batch_sequences or train.micro_batch_size * world_size
        train = dataclasses.replace(train, global_batch_tokens=sequences * cfg.data.seq_len,
                                    global_batch_sequences=None)
    sequences = train.global_batch_tokens // cfg.data.seq_len
    if cfg.data.lanes is not None and (cfg.data.lanes <= 0 or cfg.data.lanes % sequences):
        raise ConfigError([f"data.lanes={cfg.data.lanes} must be a positive multiple of the global batch of "
                           f"{sequences} sequences, e.g. {sequences * max(1, -(-256 // sequences))}"], source)
    return dataclasses.replace(cfg, model=model, train=train)


def grad_accum_steps(cfg: Config, world_size: int) -> int:
    """Micro-batches per rank per optimizer step (exact: validate() checked divisibility)."""
    per_micro_step = cfg.train.micro_batch_size * cfg.data.seq_len * world_size
    return cfg.train.global_batch_tokens // per_micro_step


def _divisors(n: int) -> str:
    return "{" + ", ".join(str(d) for d in range(1, n + 1) if n % d == 0) + "}"


def _check_model(m: ModelArgs) -> list[str]:
    problems = []
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden"):
        if getattr(m, name) <= 0:
            problems.append(f"model.{name}={getattr(m, name)} must be a positive integer")
    if problems:
        return problems
    if m.d_model % m.n_heads:
        problems.append(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; choose "
                        f"n_heads in {_divisors(m.d_model)} or a d_model that is a multiple of {m.n_heads}")
    elif m.head_dim % 2:
        problems.append(f"model.d_model / model.n_heads = {m.head_dim} is odd, but rotary embeddings need an "
                        "even head dimension; change d_model or n_heads")
    if m.n_heads % m.n_kv_heads:
        problems.append(f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}; "
                        f"choose n_kv_heads in {_divisors(m.n_heads)}")
    if m.max_seq_len is not None and m.max_seq_len <= 0:
        problems.append(f"model.max_seq_len={m.max_seq_len} must be positive (or null for data.seq_len)")
    if m.init_std <= 0:
        problems.append(f"model.init_std={m.init_std} must be positive, e.g. 0.02")
    return problems


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
        if prepared and os.path.isfile(os.path.join(prepared, PREPARED_MANIFEST)):
            continue  # reads the prepared shards; the raw files may live elsewhere
        problems += _check_source_path(src.path, f"{key}.path")
    return problems


def _check_source_path(path: str, key: str) -> list[str]:
    if path in BUILTIN_SOURCES:
        return []
    if not path:
        return [f"{key} is empty; give a file, a glob or one of {', '.join(BUILTIN_SOURCES)}"]
    if data_file_kind(path) is None:
        return [f"{key}={path!r} has an unsupported file type; use {SUPPORTED_FILES} files "
                "(or a glob such as 'dir/*.jsonl')"]
    if "://" in path:
        return []
    if not any(os.path.isfile(p) for p in glob.glob(os.path.expanduser(path))):
        return [f"{key}={path!r} matches no file; check the path (relative paths start at {os.getcwd()})"]
    return []


def _check_batch(cfg: Config, world_size: int) -> list[str]:
    t, seq = cfg.train, cfg.data.seq_len
    problems = []
    if t.micro_batch_size <= 0:
        return [f"train.micro_batch_size={t.micro_batch_size} must be a positive integer"]
    if t.global_batch_tokens is not None and t.global_batch_sequences is not None:
        return ["give only one of train.global_batch_tokens and train.global_batch_sequences "
                f"(got {t.global_batch_tokens} and {t.global_batch_sequences}); set the other to null"]
    sequences = t.global_batch_sequences or t.micro_batch_size * world_size
    if t.global_batch_tokens is not None:
        if t.global_batch_tokens <= 0 or seq <= 0 or t.global_batch_tokens % seq:
            lower = max(seq, t.global_batch_tokens // max(seq, 1) * seq)
            return [f"train.global_batch_tokens={t.global_batch_tokens} is not a positive multiple of "
                    f"data.seq_len={seq}; use e.g. {lower} or {lower + seq}"]
        sequences = t.global_batch_tokens // seq
    per_step = t.micro_batch_size * world_size
    if sequences <= 0 or sequences % per_step:
        lower = max(per_step, sequences // per_step * per_step)
        unit = "sequences" if t.global_batch_tokens is None else "tokens"
        scale = 1 if t.global_batch_tokens is None else seq
        problems.append(
            f"the global batch of {sequences} sequences is not divisible by train.micro_batch_size="
            f"{t.micro_batch_size} x world size {world_size} = {per_step}; set the global batch to "
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
    elif math.prod(p.mesh_shape(world_size)) != world_size:
        problems.append(f"parallel.replicate={p.replicate} x parallel.shard={p.mesh_shape(world_size)[1]} must "
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
    problems = []
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


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)


def save_config(cfg: Config, out_dir: str) -> Path:
    """Write the resolved config to out_dir/config.yaml atomically (never half-written)."""
    from pretrain.atomic_dir import write_file

    return write_file(Path(out_dir) / "config.yaml", config_to_yaml(cfg))


def config_reference() -> str:
    """Every key with its type, default and help text, for `pretrain train --help`."""
    return reference(Config)
