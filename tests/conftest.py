"""Shared fixtures: a small real-text corpus (Python's bundled pydoc topics, always installed),
a tokenizer trained on it once per session, and tiny configs that train in seconds."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pretrain.config import Config, load_config
from tokenizer import Tokenizer, train_tokenizer

TEST_VOCAB = 512


def pydoc_documents(limit: int | None = None) -> list[str]:
    from pydoc_data.topics import topics

    docs = [topics[name].strip() for name in sorted(topics)]
    return docs[:limit] if limit else docs


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """A .txt corpus of ~80 documents separated by blank lines (inner blank lines removed so
    that each topic stays one document)."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    docs = ["\n".join(line for line in doc.splitlines() if line.strip()) for doc in pydoc_documents()]
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    train_tokenizer(pydoc_documents(), TEST_VOCAB, path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_file) -> Tokenizer:
    return Tokenizer.load(tokenizer_file)


def tiny_overrides(run_dir: Path, corpus: Path, tokenizer_path: Path, **extra: object) -> list[str]:
    """Overrides for a ~0.1M-parameter model that trains a step in milliseconds on a CPU."""
    values = {
        "out_dir": str(run_dir),
        "model.vocab_size": TEST_VOCAB, "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4,
        "model.n_kv_heads": 2, "model.ffn_hidden": 128,
        "data.sources": f"[{{name: corpus, path: '{corpus}', weight: 1.0}}]",
        "data.seq_len": 32, "data.val_fraction": 0.1,
        "tokenizer.path": str(tokenizer_path), "tokenizer.vocab_size": TEST_VOCAB,
        "train.max_steps": 20, "train.micro_batch_size": 4, "train.precision": "fp32", "train.device": "cpu",
        "optim.lr": 3e-3, "optim.warmup_steps": 2,
        "eval.every": 0, "eval.sample_tokens": 0, "logging.every": 1, "logging.peak_flops": 1e12,
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    if values.get("model.name") == "gpt2":
        del values["model.n_kv_heads"]  # a Llama key: GPT-2's keys and values have every head
    return [f"--{key}={'null' if value is None else value}" for key, value in values.items()]


def read_metrics(out_dir: str | Path) -> list[dict]:
    """The records of out_dir/metrics.jsonl, in order."""
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def consistent_losses(out_dir: str | Path) -> dict[int, float]:
    """step -> loss of out_dir/metrics.jsonl; a step logged twice (before a crash and after the
    restart that trained it again) must have the same loss both times."""
    seen: dict[int, float] = {}
    for record in read_metrics(out_dir):
        if "loss" in record:
            assert seen.setdefault(record["step"], record["loss"]) == record["loss"], record
    return seen


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    """Wait until `proc`, training into `run`, has logged `step`; fail if it exits or takes longer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        if (run / "metrics.jsonl").exists() and any(r.get("step", 0) >= step for r in read_metrics(run)):
            return
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no step {step} within {timeout_s}s")


@pytest.fixture
def tiny_config(tmp_path, corpus_file, tokenizer_file):
    """Factory: tiny_config(**overrides) -> validated Config writing into a fresh tmp dir.
    Override keys use `__` for the dot: tiny_config(train__max_steps=5)."""

    def make(**extra: object) -> Config:
        return load_config(None, tiny_overrides(tmp_path / "run", corpus_file, tokenizer_file, **extra), world_size=1)

    return make


@pytest.fixture(scope="session")
def paragraphs_file(tmp_path_factory) -> Path:
    """A second source: the pydoc topics' paragraphs as one JSON record each (~2k short documents)."""
    path = tmp_path_factory.mktemp("second") / "paragraphs.jsonl"
    rows = [p.strip() for doc in pydoc_documents() for p in doc.split("\n\n") if p.strip()]
    path.write_text("".join(json.dumps({"text": row}) + "\n" for row in rows))
    return path


@pytest.fixture
def mixed_config(tiny_config, corpus_file, paragraphs_file):
    """Factory for a two-source config: the corpus (weight 0.3) and the paragraphs (0.7), a global
    batch of 8 sequences in micro-batches of 2, read in the training process."""

    def make(**extra):
        sources = (f"[{{name: topics, path: '{corpus_file}', weight: 0.3}}, "
                   f"{{name: paragraphs, path: '{paragraphs_file}', weight: 0.7}}]")
        values = {"data__sources": sources, "data__chunk_bytes": 4096, "data__num_workers": 0,
                  "train__micro_batch_size": 2, "train__global_batch_sequences": 8, "train__global_batch_tokens": None}
        values.update(extra)
        return tiny_config(**values)

    return make


# Read every source chunk by chunk through lanes (as many as the global batch: the test sources
# are small), instead of tokenizing them whole (the default for small sources).
STREAMED = {"data__in_memory_max_bytes": 0, "data__lanes": 8}
MODES = pytest.mark.parametrize("mode", [{}, STREAMED], ids=["indexed", "streamed"])


def rows_of(batches) -> list[tuple[int, ...]]:
    """The sequences (inputs + final label) of one rank's micro-batches of a step, in order."""
    return [tuple(x.tolist()) + (y[-1].item(),) for inputs, labels, _ in batches for x, y in zip(inputs, labels)]


def train_data(cfg: Config, tokenizer: Tokenizer, dp_rank: int = 0, dp_size: int = 1):
    """The TrainData of data-parallel rank `dp_rank` of `dp_size` for a validated config."""
    from pretrain.data import TrainData

    return TrainData(cfg.data, cfg.train, tokenizer, dp_rank=dp_rank, dp_size=dp_size)


def held_out(cfg: Config, tokenizer: Tokenizer, max_batches: int, dp_rank: int = 0, dp_size: int = 1):
    """validation_batches of data-parallel rank `dp_rank` of `dp_size` for a validated config."""
    from pretrain.data import validation_batches

    return validation_batches(cfg.data, tokenizer, micro_batch_size=cfg.train.micro_batch_size,
                              max_batches=max_batches, dp_rank=dp_rank, dp_size=dp_size)


def take(data, steps: int) -> list[list[tuple[int, ...]]]:
    """The rows of the next `steps` global batches of a TrainData, which is closed afterwards."""
    try:
        return [rows_of(data.next_step()) for _ in range(steps)]
    finally:
        data.close()


@contextlib.contextmanager
def time_limit(seconds: float, what: str):
    """Fail with TimeoutError instead of hanging (SIGALRM: the main thread, on Unix)."""

    def expire(signum, frame):
        raise TimeoutError(f"{what} took more than {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# Multi-process runs that several test files check, trained once per session.
FSDP_TWO_RANKS = {"parallel__backend": "fsdp", "model__tie_embeddings": False}
# DeepSpeed's own format, parameters partitioned; a tied head and wrapped blocks
ZERO3_TIED_TWO_RANKS = {"parallel__backend": "deepspeed", "parallel__zero_stage": 3,
                        "parallel__activation_checkpointing": "selective", "model__tie_embeddings": True}


def two_rank_run(tmp_path_factory, corpus_file: Path, tokenizer_file: Path, name: str, extra: dict) -> Path:
    from tests.distributed.ranks import run_ranks
    from tests.distributed.runs import rank_train

    run = tmp_path_factory.mktemp(name)
    run_ranks(rank_train, 2, run, corpus_file, tokenizer_file, extra)
    return run


@pytest.fixture(scope="session")
def fsdp_two_ranks(tmp_path_factory, corpus_file, tokenizer_file) -> Path:
    """The shared tiny run (tests/distributed/runs.py) on 2 ranks under FSDP, uninterrupted: the
    parity tests check it against one process, the resharding tests resume other runs against it."""
    return two_rank_run(tmp_path_factory, corpus_file, tokenizer_file, "fsdp_two_ranks", FSDP_TWO_RANKS)


@pytest.fixture(scope="session")
def zero3_tied_two_ranks(tmp_path_factory, corpus_file, tokenizer_file) -> Path:
    """The shared tiny run on 2 ranks under ZeRO-3 with a tied head and activation checkpointing,
    with a checkpoint of its last step: the parity tests check its losses, the export tests read
    its checkpoint."""
    from tests.distributed.runs import STEPS

    return two_rank_run(tmp_path_factory, corpus_file, tokenizer_file, "zero3_tied_two_ranks",
                        {**ZERO3_TIED_TWO_RANKS, "checkpoint__every": STEPS})
