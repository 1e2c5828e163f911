"""Data pipeline throughput, end to end (read, tokenize, pack, batch), against the straightforward
baseline a user would write otherwise, back to back in one process:

  baseline   Hugging Face `datasets`: load_dataset("text", sample_by="paragraph")
             .map(tokenize, batched=True), then concatenate-and-chunk (the run_clm.py recipe)
  streaming  pretrain's TrainData tokenizing on the fly: chunk by chunk in lanes run by
             data.num_workers background workers (how sources above data.in_memory_max_bytes
             are read), and tokenized whole at start (the default for a source this size)
  shards     pretrain's TrainData reading what `pretrain data prepare` wrote

Throughput is tokens per CPU-second (this process and its children), i.e. per core, so a
pipeline that spreads over more cores gains nothing here; wall-clock tokens/s is shown too. The
demo model's training speed is measured last, for the "data is never the bottleneck" ratio.

    python benchmarks/data_pipeline.py                 # ../shared/data corpus repeated to 50 MB
    python benchmarks/data_pipeline.py --mb 10 --corpus my.txt

The last line is `streaming_vs_baseline=X shards_vs_baseline=Y` (per-core ratios).
"""

from __future__ import annotations

import argparse
import itertools
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE = "baseline: HF datasets map + concat-and-chunk"
STREAMING = "pretrain streaming: lanes in {} worker(s)"
SHARDS = "pretrain prepared shards (in process)"
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


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


def make_corpus(source: Path, megabytes: float, out: Path) -> Path:
    text = source.read_text(encoding="utf-8").strip() + "\n\n"
    repeats = max(1, int(megabytes * 1e6 / len(text.encode()) + 0.999))
    path = out / "corpus.txt"
    path.write_text(text * repeats, encoding="utf-8")
    return path


def run_baseline(corpus: Path, tokenizer_path: str, seq_len: int, cache_dir: Path) -> int:
    import datasets
    import sentencepiece as spm

    datasets.disable_progress_bars()
    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    eos = sp.eos_id()
    window = seq_len + 1

    def tokenize(batch):
        return {"input_ids": [ids + [eos] for ids in sp.encode(batch["text"])]}

    def group_texts(batch):
        joined = list(itertools.chain.from_iterable(batch["input_ids"]))
        usable = len(joined) // window * window
        return {"input_ids": [joined[i : i + window] for i in range(0, usable, window)]}

    ds = datasets.load_dataset("text", data_files=[str(corpus)], sample_by="paragraph", split="train",
                               cache_dir=str(cache_dir))
    ds = ds.map(tokenize, batched=True, remove_columns=["text"]).map(group_texts, batched=True)
    tokens = 0
    for batch in ds.with_format("numpy").iter(batch_size=32):
        tokens += batch["input_ids"][:, :-1].size
    return tokens


def run_ours(cfg, tokenizer) -> int:
    from pretrain.data import TrainData

    data = TrainData(cfg, tokenizer)
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
                 "--checkpoint.every=0", "--data.num_workers=0", f"--tokenizer.path={out_dir}/demo.model"]
    cfg = load_config(str(REPO / "configs" / "demo.yaml"), overrides, world_size=1)
    trainer = Trainer(cfg)
    trainer.train_step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
    trainer.close()
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

    import torch

    from pretrain.config import load_config
    from pretrain.data import load_or_train_tokenizer
    from pretrain.data.prepared import prepare
    from pretrain.log_setup import setup_logging

    setup_logging()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        corpus = make_corpus(args.corpus, args.mb, out)
        size_mb = corpus.stat().st_size / 1e6
        batch = 32

        def config(**extra: object):
            values = {"out_dir": str(out / "run"), "data.sources": f"[{{name: corpus, path: '{corpus}'}}]",
                      "data.seq_len": args.seq_len, "data.val_fraction": 0.0, "data.num_workers": args.workers,
                      "tokenizer.vocab_size": args.vocab, "tokenizer.train_chars": 5_000_000,
                      "tokenizer.path": str(out / "tokenizer.model"), "model.vocab_size": args.vocab,
                      "train.micro_batch_size": batch, "train.max_steps": 10**9, "eval.every": 0}
            values.update(extra)
            return load_config(None, [f"--{k}={'null' if v is None else v}" for k, v in values.items()], world_size=1)

        tokenizer = load_or_train_tokenizer(config())
        shards_cfg = config(**{"data.prepared_dir": str(out / "prepared"), "data.num_workers": 0})
        rows = {}
        with Measure() as m:
            manifest = prepare(shards_cfg, tokenizer, workers=2, progress=False)[0]
        prepare_row = (manifest["train_tokens"], m.wall, m.cpu)
        # One pass over the corpus: as many global batches as it holds.
        steps = {"train.max_steps": manifest["train_tokens"] // (batch * args.seq_len)}
        with Measure() as m:
            tokens = run_baseline(corpus, tokenizer.path, args.seq_len, out / "hf-cache")
        rows[BASELINE] = (tokens, m.wall, m.cpu)
        # A source above data.in_memory_max_bytes: read chunk by chunk by lanes in the workers.
        streamed = config(**steps, **{"data.in_memory_max_bytes": 0, "data.lanes": batch,
                                      "data.chunk_bytes": 1 << 18})
        with Measure() as m:
            tokens = run_ours(streamed, tokenizer)
        rows[STREAMING.format(args.workers)] = (tokens, m.wall, m.cpu)
        with Measure() as m:  # the default for a source up to 64 MiB: tokenized whole at start
            tokens = run_ours(config(**steps), tokenizer)
        rows["pretrain tokenized in memory at start (in process)"] = (tokens, m.wall, m.cpu)
        rows["pretrain data prepare (one-off, 2 processes)"] = prepare_row
        with Measure() as m:
            tokens = run_ours(config(**steps, **{"data.prepared_dir": str(out / "prepared"), "data.num_workers": 0}),
                              tokenizer)
        rows[SHARDS] = (tokens, m.wall, m.cpu)
        demo = demo_model_tokens_per_s(str(out))

    baseline = rows[BASELINE]
    base_rate = baseline[0] / baseline[2]
    print(f"\ncorpus {args.corpus.name} repeated to {size_mb:.0f} MB, seq_len {args.seq_len}, vocab {args.vocab}; "
          "per-core = tokens per CPU-second of the process and its workers")
    print("| pipeline | tokens | wall s | CPU s | tok/s (wall) | tok/s per core | per core vs baseline |")
    print("|---|---|---|---|---|---|---|")
    for name, (tokens, wall, cpu) in rows.items():
        print(f"| {name} | {tokens:,} | {wall:.1f} | {cpu:.1f} | {tokens / wall:,.0f} | {tokens / cpu:,.0f} | "
              f"{tokens / cpu / base_rate:.2f}x |")
    streaming = rows[STREAMING.format(args.workers)]
    shards = rows[SHARDS]
    print(f"\ndemo model trains at {demo:,.0f} tok/s here: prepared shards feed it "
          f"{shards[0] / shards[1] / demo:,.0f}x faster, streaming {streaming[0] / streaming[1] / demo:,.0f}x")
    print(f"streaming_vs_baseline={streaming[0] / streaming[2] / base_rate:.2f} "
          f"shards_vs_baseline={shards[0] / shards[2] / base_rate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
