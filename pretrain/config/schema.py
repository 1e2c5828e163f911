"""The job config's sections: typed, frozen dataclasses whose fields carry defaults and help texts."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from pretrain.config.parse import option
from pretrain.data.builtin import BUILTIN_SOURCES
from pretrain.models.registry import AnyModelArgs, ModelArgs

PREPARED_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class SourceConfig:
    """One data source of the training mixture."""

    name: str = option("", "label used in logs, metrics and prepared shards")
    # A string or a list of strings (the parser takes one type per field; config_checks checks it).
    path: Any = option("", "file, glob or URL (s3://... with s3fs), or a list of them, of .txt/.jsonl/.json"
                           "[.gz|.zst]/.parquet files in any mix, or "
                           f"{' or '.join(map(repr, BUILTIN_SOURCES))} (built in)")
    weight: float = option(1.0, "relative sampling weight in the mixture (share of training tokens)")
    text_field: str = option("text", "field holding the document text in .jsonl/.parquet files")
    max_epochs: int | None = option(None, "stop with an error instead of starting epoch max_epochs + 1 of this "
                                          "source (null = repeat as needed; every new epoch is logged)")

    @property
    def patterns(self) -> list[str]:
        """The paths and globs of `path`, in the order given (a string is a list of one)."""
        return [self.path] if isinstance(self.path, str) else list(self.path)

    @property
    def is_builtin(self) -> bool:
        """Whether `path` names a corpus that ships with the install rather than files."""
        return isinstance(self.path, str) and self.path in BUILTIN_SOURCES


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
    compile: Literal["auto", True, False] = option(
        "auto", "torch.compile each transformer block; auto = on GPUs (with triton), and on CPUs (with a C++ "
                "compiler) for runs expected to compute for 10 minutes or more, which earn back the compile time")
    on_nonfinite: Literal["skip", "stop", "rollback"] = option(
        "rollback", "a step whose loss or gradient norm is NaN/inf (checked on every step, decided by all ranks "
                    "together): skip its update; stop with an error; or reload the newest checkpoint and skip the data "
                    "read since it (stops instead if there is no checkpoint yet). Logged in out_dir/bad_batches.jsonl")
    on_loss_spike: Literal["warn", "skip", "stop", "rollback"] = option(
        "warn", "a step whose loss is spike_zscore standard deviations above the mean of the last spike_window "
                "steps: only log it, or act as on_nonfinite's choices do")
    spike_zscore: float = option(6.0, "loss-spike threshold in standard deviations of the recent losses")
    spike_window: int = option(100, "recent steps whose losses define a spike (detection starts once 20 are in)")
    max_bad_steps: int = option(20, "stop once this many steps were skipped or rolled back in the whole run "
                                    "(counted in out_dir/bad_batches.jsonl, across restarts; 0 = no limit)")
    hang_timeout_s: float = option(1800.0, "a training step (with its evaluation and checkpoint) that takes longer "
                                           "than this dumps every thread's Python stack and exits with code 124, "
                                           "instead of hanging until the allocation ends (0 = off)")
    ignore_memory_check: bool = option(False, "start although preflight's memory estimate per rank exceeds the "
                                              "device's memory (CPU RAM on a CPU), which otherwise stops the run")


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
    compile: bool = option(False, "true = train.compile: true (the key's older place, kept for existing configs)")
    timeout_s: float = option(600.0, "a collective that waits longer than this fails the job with an error "
                                     "naming the rank (instead of hanging)")


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
    allow_model_change: bool = option(False, "resume although the checkpoint's model section differs from this "
                                             "config's (a deliberate change, e.g. rope_theta; tensor shapes must "
                                             "still fit). Without it such a resume is refused with the differences")


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
    model: AnyModelArgs = option(ModelArgs(), "model shape")
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
