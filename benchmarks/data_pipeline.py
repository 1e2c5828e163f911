"""Data pipeline throughput (read, tokenize, pack, batch): each pretrain pipeline against the
Hugging Face `datasets` pipeline that does the same work, back to back in one process. Every
pipeline yields the same batches (32 rows of seq_len inputs and their labels, torch tensors, cut
from the documents joined with EOS, windows overlapping by one token), the same number of them
(one pass over the corpus), from the same sentencepiece tokenizer. Nothing is fetched from the
network: datasets runs offline on the local corpus file.

The last line holds per-core ratios, pretrain over datasets (above 1: pretrain is faster):

  streaming_vs_baseline      tokenizing on the fly: pretrain's TrainData reading the source chunk
                             by chunk in lanes run by data.num_workers background workers (how a
                             source above data.in_memory_max_bytes is read) vs
                             load_dataset("text", streaming=True).map(tokenize, batched=True),
                             iterated in process and packed.
  shards_vs_baseline         reading what was prepared: pretrain's TrainData over the token shards
                             of `pretrain data prepare` (windows in a seeded random order across
                             the whole source) vs iterating the tokenized, cached dataset in order
                             (Arrow batches, flattened, packed). Tokenizing is in neither.
  prepare_vs_map             the one-off step before that: `pretrain data prepare` (2 processes)
                             vs load_dataset("text") + .map(tokenize, batched=True, num_proc=2)
                             into datasets' cache.
  shards_vs_shuffled         as shards_vs_baseline, but the cached dataset is read after
                             .shuffle(seed) (documents in random order, read through an index).
  in_memory_vs_from_scratch  no cache: pretrain tokenizing the whole source at start (the default
                             for a source up to 64 MiB) vs datasets' load + map and in-order read
                             added up.

Throughput is tokens per CPU-second (this process and its children), i.e. per core, so a
pipeline that spreads over more cores gains nothing here; wall-clock tokens/s is shown too. The
demo model's training speed is measured last, for the "data is never the bottleneck" ratio.

    python benchmarks/data_pipeline.py                 # ../shared/data corpus repeated to 50 MB
    python benchmarks/data_pipeline.py --mb 10 --corpus my.txt

The last line is `streaming_vs_baseline=... shards_vs_baseline=... prepare_vs_map=...
shards_vs_shuffled=... in_memory_vs_from_scratch=...`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

# datasets reads these once, when it is first imported (inside the functions below)
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
BATCH = 32  # rows per batch, for every pipeline
HF_BATCH = 1000  # documents per datasets map/iter batch (map's default)


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have exited (DataLoader workers are
    joined when the loader closes, pool processes when the pool does)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Measure:
    def __enter__(self) -> "Measure":
        self.wall, self.cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, cpu_seconds() - self.cpu


def timed(run: Callable[[], int]) -> tuple[int, float, float]:
    """(what `run` returns, a token count; its wall seconds; its CPU seconds)."""
    with Measure() as m:
        tokens = run()
    return tokens, m.wall, m.cpu


def make_corpus(source: Path, megabytes: float, out: Path) -> Path:
    text = source.read_text(encoding="utf-8").strip() + "\n\n"
    repeats = max(1, int(megabytes * 1e6 / len(text.encode()) + 0.999))
    path = out / "corpus.txt"
    path.write_text(text * repeats, encoding="utf-8")
    return path


def packed_tokens(pieces: Iterable[np.ndarray], seq_len: int, n_batches: int) -> int:
    """Join token pieces into one stream and cut it into batches of BATCH windows of seq_len + 1
    tokens overlapping by one (as pretrain cuts them), as torch (inputs, labels); return the
    number of input tokens of the first `n_batches` batches."""
    return sum(inputs.numel() for inputs, _ in itertools.islice(packed(pieces, seq_len), n_batches))


def packed(pieces: Iterable[np.ndarray], seq_len: int) -> Iterator[tuple]:
    import torch

    step, need = BATCH * seq_len, BATCH * seq_len + 1
    buffer = np.empty(0, dtype=np.int64)
    for piece in pieces:
        buffer = np.concatenate([buffer, piece])
        while len(buffer) >= need:
            windows = np.lib.stride_tricks.sliding_window_view(buffer[:need], seq_len + 1)[::seq_len]
            yield torch.from_numpy(windows[:, :-1].copy()), torch.from_numpy(windows[:, 1:].copy())
            buffer = buffer[step:]


def hf_tokenize(tokenizer_path: str):
    """The batched map function a datasets user writes: sentencepiece ids of each text, then EOS."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    eos = sp.eos_id()

    def tokenize(batch: dict) -> dict:
        return {"input_ids": [ids + [eos] for ids in sp.encode(batch["text"])]}

    return tokenize


def arrow_pieces(batches: Iterable) -> Iterator[np.ndarray]:
    """Each Arrow batch's token lists flattened into one array (no Python lists in between)."""
    import pyarrow.compute as pc

    for table in batches:
        yield pc.list_flatten(table["input_ids"]).to_numpy()


def hf_map(corpus: Path, tokenizer_path: str, cache_dir: Path):
    """The one-off step: the text loaded into datasets' Arrow cache and tokenized into it."""
    import datasets

    ds = datasets.load_dataset("text", data_files=[str(corpus)], sample_by="paragraph", split="train",
                               cache_dir=str(cache_dir))
    return ds.map(hf_tokenize(tokenizer_path), batched=True, batch_size=HF_BATCH, remove_columns=["text"],
                  num_proc=2)


def hf_cached(ds, seq_len: int, n_batches: int) -> int:
    """Iterate a tokenized dataset through Arrow (8x faster than Python lists here), packed."""
    return packed_tokens(arrow_pieces(ds.with_format("arrow").iter(batch_size=HF_BATCH)), seq_len, n_batches)


def hf_streaming(corpus: Path, tokenizer_path: str, seq_len: int, n_batches: int) -> int:
    import datasets

    ds = datasets.load_dataset("text", data_files=[str(corpus)], sample_by="paragraph", split="train",
                               streaming=True)
    ds = ds.map(hf_tokenize(tokenizer_path), batched=True, batch_size=HF_BATCH, remove_columns=["text"])
    # Python lists, not with_format("arrow"): on a streamed dataset that path was 10x slower here.
    pieces = (np.fromiter(itertools.chain.from_iterable(batch["input_ids"]), dtype=np.int64)
              for batch in ds.iter(batch_size=HF_BATCH))
    return packed_tokens(pieces, seq_len, n_batches)


def run_ours(cfg, tokenizer) -> int:
    from pretrain.data import TrainData

    data = TrainData(cfg.data, cfg.train, tokenizer)
    tokens, steps = 0, cfg.train.max_steps
    try:
        for _ in range(steps):
            for inputs, _, _ in data.next_step():
                tokens += inputs.numel()
    finally:
        data.close()
    return tokens


def demo_model_tokens_per_s(out_dir: str, steps: int = 8) -> float:
    """Training tokens/s of the demo config's model, as `pretrain train configs/demo.yaml` runs it."""
    from pretrain.config import load_config
    from pretrain.trainer import Trainer

    overrides = [f"--out_dir={out_dir}/demo", "--eval.every=0", "--eval.sample_tokens=0", "--logging.every=0",
                 "--checkpoint.every=0", "--data.num_workers=0", f"--tokenizer.path={out_dir}/demo.model",
                 "--model.n_layers=6"]  # the shape of the README's figures (the demo has 4 layers since 2026-12)
    cfg = load_config(str(REPO / "configs" / "demo.yaml"), overrides, world_size=1)
    trainer = Trainer(cfg)
    trainer.train_step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
    trainer.close()
    assert cfg.train.global_batch_tokens is not None  # filled in by validate()
    return cfg.train.global_batch_tokens / statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="a .txt file (blank-line documents)")
    parser.add_argument("--mb", type=float, default=50.0, help="repeat the corpus to at least this many MB")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--workers", type=int, default=1, help="data.num_workers for the streaming run")
    args = parser.parse_args()
    if not args.corpus.is_file():
        parser.error(f"corpus {args.corpus} not found (it lives in ../shared/data beside the repository); "
                     "give one with --corpus")

    import datasets
    import pyarrow.compute as pc
    import torch

    from pretrain.config import load_config
    from pretrain.data import load_or_train_tokenizer
    from pretrain.data.prepared import prepare
    from pretrain.observability.log_setup import setup_logging

    setup_logging()
    datasets.disable_progress_bars()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        corpus = make_corpus(args.corpus, args.mb, out)
        size_mb = corpus.stat().st_size / 1e6

        def config(**extra: object):
            values = {"out_dir": str(out / "run"), "data.sources": f"[{{name: corpus, path: '{corpus}'}}]",
                      "data.seq_len": args.seq_len, "data.val_fraction": 0.0, "data.num_workers": args.workers,
                      "tokenizer.vocab_size": args.vocab, "tokenizer.train_chars": 5_000_000,
                      "tokenizer.path": str(out / "tokenizer.model"), "model.vocab_size": args.vocab,
                      "train.micro_batch_size": BATCH, "train.max_steps": 10**9, "eval.every": 0,
                      "optim.warmup_steps": 0}
            values.update(extra)
            return load_config(None, [f"--{k}={'null' if v is None else v}" for k, v in values.items()], world_size=1)

        tokenizer = load_or_train_tokenizer(config())
        tokenizer_path = tokenizer.path
        assert tokenizer_path is not None  # loaded from a file
        shards = {"data.prepared_dir": str(out / "prepared"), "data.num_workers": 0}
        with Measure() as m:
            manifest = prepare(config(**shards), tokenizer, workers=2, progress=False)[0]
        ours_prepare = (manifest["train_tokens"], m.wall, m.cpu)
        with Measure() as m:
            cached = hf_map(corpus, tokenizer_path, out / "hf-cache")
        hf_prepare = (int(pc.sum(pc.list_value_length(cached.data.column("input_ids"))).as_py()), m.wall, m.cpu)
        # One pass over the corpus, the same number of batches for every pipeline.
        n_batches = (min(ours_prepare[0], hf_prepare[0]) - 1) // (BATCH * args.seq_len)
        steps = {"train.max_steps": n_batches}

        hf_shards = timed(lambda: hf_cached(cached, args.seq_len, n_batches))
        hf_shuffled = timed(lambda: hf_cached(cached.shuffle(seed=0), args.seq_len, n_batches))
        ours_shards = timed(lambda: run_ours(config(**steps, **shards), tokenizer))
        hf_stream = timed(lambda: hf_streaming(corpus, tokenizer_path, args.seq_len, n_batches))
        # A source above data.in_memory_max_bytes: read chunk by chunk by lanes in the workers.
        streamed = config(**steps, **{"data.in_memory_max_bytes": 0, "data.lanes": BATCH,
                                      "data.chunk_bytes": 1 << 18})
        ours_stream = timed(lambda: run_ours(streamed, tokenizer))
        ours_in_memory = timed(lambda: run_ours(config(**steps, **{"data.num_workers": 0}), tokenizer))
        hf_from_scratch = (hf_shards[0], hf_prepare[1] + hf_shards[1], hf_prepare[2] + hf_shards[2])
        demo = demo_model_tokens_per_s(str(out))

    ratios = {key: ours[0] / ours[2] / (base[0] / base[2]) for key, ours, base in (
        ("streaming_vs_baseline", ours_stream, hf_stream), ("shards_vs_baseline", ours_shards, hf_shards),
        ("prepare_vs_map", ours_prepare, hf_prepare), ("shards_vs_shuffled", ours_shards, hf_shuffled),
        ("in_memory_vs_from_scratch", ours_in_memory, hf_from_scratch))}
    table = [  # (pipeline, measurement, per core against the datasets row(s) above it)
        ("datasets: load + map(num_proc=2) into its cache (one-off)", hf_prepare, ""),
        ("pretrain: data prepare, 2 processes (one-off)", ours_prepare, f"{ratios['prepare_vs_map']:.2f}x"),
        ("datasets: the cached dataset, in order", hf_shards, ""),
        ("datasets: the cached dataset after .shuffle(seed), documents in random order", hf_shuffled, ""),
        ("pretrain: prepared shards, windows in random order (in process)", ours_shards,
         f"{ratios['shards_vs_baseline']:.2f}x in order, {ratios['shards_vs_shuffled']:.2f}x shuffled"),
        ("datasets: streaming=True + map on the fly (in process)", hf_stream, ""),
        (f"pretrain: streaming, lanes in {args.workers} worker(s)", ours_stream,
         f"{ratios['streaming_vs_baseline']:.2f}x"),
        ("datasets: from scratch (load + map, then in order)", hf_from_scratch, ""),
        ("pretrain: tokenized in memory at start (in process)", ours_in_memory,
         f"{ratios['in_memory_vs_from_scratch']:.2f}x"),
    ]
    print(f"\ncorpus {args.corpus.name} repeated to {size_mb:.0f} MB, seq_len {args.seq_len}, vocab {args.vocab}, "
          f"{n_batches} batches of {BATCH} x {args.seq_len}; per-core = tokens per CPU-second of the process and "
          "its workers")
    print("| pipeline | tokens | wall s | CPU s | tok/s (wall) | tok/s per core | per core vs datasets |")
    print("|---|---|---|---|---|---|---|")
    for name, (tokens, wall, cpu), ratio in table:
        print(f"| {name} | {tokens:,} | {wall:.1f} | {cpu:.1f} | {tokens / wall:,.0f} | {tokens / cpu:,.0f} | "
              f"{ratio} |")
    print(f"\ndemo model trains at {demo:,.0f} tok/s here: prepared shards feed it "
          f"{ours_shards[0] / ours_shards[1] / demo:,.0f}x faster, "
          f"streaming {ours_stream[0] / ours_stream[1] / demo:,.0f}x")
    print(" ".join(f"{key}={ratio:.2f}" for key, ratio in ratios.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
