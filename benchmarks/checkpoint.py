"""Checkpoint save and load speed of CheckpointManager for a ~100M-parameter model on CPU, one
process (parallel.backend=none, no process group), fp32, with AdamW state populated, so a
checkpoint holds weights + 2 optimizer moments (~12 bytes per parameter) in DCP files.

  sync save            `save()` with checkpoint.async=false: the caller waits for the whole write
  async save (blocked) `save()` with checkpoint.async=true: what the training loop waits for
  async save (total)   from `save()` until the write completed and `finish()` published it, while
                       training steps run in between (as the Trainer's loop does)
  load                 `load()` into a freshly built engine (checked equal to the saved weights)

Each repeat writes into a fresh temporary directory under --dir. The load reads files the save
has just written, so it mostly reads the page cache, not the disk. On CPU the blocked part of an
async save is DCP copying the state to new CPU memory: cheap when malloc hands back memory freed
earlier (hardware.keep_freed_memory, as the Trainer sets), dearer the first time, when every page
is touched for the first time (the first repeat; see the max column).

    python benchmarks/checkpoint.py
    python benchmarks/checkpoint.py --d-model 512 --n-layers 8 --repeats 5 --dir /scratch
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain.checkpoint.manager import CheckpointManager, checkpoint_dir, read_manifest
from pretrain.config import Config, load_config
from pretrain.hardware.devices import keep_freed_memory
from pretrain.models import count_params, model_spec
from pretrain.parallel import Engine, ParallelDims, build_engine, dist_info_from_env

BATCH, SEQ_LEN = 2, 64  # the training steps only need to run, not to be representative


def build_config(args: argparse.Namespace, out_dir: str) -> Config:
    heads = max(1, args.d_model // 64)
    overrides = [f"--out_dir={out_dir}", "--train.precision=fp32", "--train.device=cpu",
                 "--parallel.backend=none", f"--data.seq_len={SEQ_LEN}", "--optim.warmup_steps=1",
                 f"--model.vocab_size={args.vocab}", f"--tokenizer.vocab_size={args.vocab}", f"--model.d_model={args.d_model}",
                 f"--model.n_layers={args.n_layers}", f"--model.n_heads={heads}", f"--model.n_kv_heads={heads}",
                 f"--model.ffn_hidden={args.d_model * 8 // 3 // 64 * 64}"]
    return load_config(None, overrides, world_size=1)


def new_engine(cfg: Config) -> Engine:
    with torch.device("meta"):
        model = model_spec(cfg.model).build(cfg.model)
    return build_engine(model, cfg, dist_info_from_env("cpu"), ParallelDims.from_config(cfg.parallel, 1), "fp32")


class TrainingState:
    """What a checkpoint holds beside the engine's model and optimizer (the trainer's counters)."""

    def __init__(self, state: dict):
        self.state = state

    def state_dict(self) -> dict:
        return self.state

    def load_state_dict(self, state: dict) -> None:
        self.state = state


def train_step(engine: Engine, tokens: torch.Tensor) -> None:
    logits = engine.model(tokens[:, :-1])
    engine.backward(F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()))
    engine.step(1.0)


def checkpoint_bytes(path: Path) -> int:
    """Sum of the file sizes the checkpoint's manifest lists (every file in it but the manifest)."""
    manifest = read_manifest(path)
    assert manifest is not None, f"{path} was not published"
    return sum(manifest["files"].values())


def timed_async_save(manager: CheckpointManager, step: int, engine: Engine, tokens: torch.Tensor,
                     save_args: tuple) -> tuple[float, float, int]:
    """(seconds blocked in save(), seconds until the checkpoint is published, training steps run
    while the write was in flight); `manager` tracks `engine`."""
    start = time.perf_counter()
    blocked = manager.save(step, *save_args)
    assert manager.pending is not None  # checkpoint.async: save() left the write pending
    written: list[float] = []
    # The write may end mid-step; the callback records when, so `total` is not rounded up to a step.
    manager.pending.future.add_done_callback(lambda _: written.append(time.perf_counter()))
    steps = 0
    while not manager.pending.future.done():
        train_step(engine, tokens)
        steps += 1
    publish_start = time.perf_counter()
    manager.finish()
    total = written[0] - start + time.perf_counter() - publish_start
    return blocked, total, steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=768, help="width; heads of 64, SwiGLU hidden 8/3 x width")
    parser.add_argument("--n-layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3, help="measurements per row; the table shows the median")
    parser.add_argument("--dir", type=Path, default=None, help="where the temporary checkpoints go (default: $TMPDIR)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the Trainer does on CPU: the staging copy and the load reuse freed memory

    cfg = build_config(args, "unused")
    n_params = count_params(cfg.model)
    engine = new_engine(cfg)
    tokens = torch.randint(0, args.vocab, (BATCH, SEQ_LEN + 1))
    start = time.perf_counter()
    train_step(engine, tokens)  # AdamW's exp_avg / exp_avg_sq exist from the first step on
    step_s = time.perf_counter() - start
    start = time.perf_counter()
    train_step(engine, tokens)
    step_s = min(step_s, time.perf_counter() - start)
    print(f"model: {n_params:,} parameters, fp32, CPU, {args.threads} threads; one training step "
          f"({BATCH}x{SEQ_LEN} tokens) takes {step_s:.2f}s\n", flush=True)

    rows: dict[str, list[float]] = {name: [] for name in
                                    ("sync save", "async save (blocked)", "async save (total)", "load")}
    in_flight, sizes = [], []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory(dir=args.dir, prefix="ckpt-bench-") as tmp:
            cfg = build_config(args, tmp)
            # The manager only copies the tokenizer into the checkpoint; any small file serves.
            tokenizer = Path(tmp) / "tokenizer.model"
            tokenizer.write_bytes(b"\0" * 250_000)
            state = TrainingState({"step": repeat, "tokens_seen": 0})
            save_args = ("benchmark: true\n", str(tokenizer))
            dist_info = dist_info_from_env("cpu")

            # Async first: in the first repeat its staging copy lands in memory never touched
            # before, as a run's first save does; later repeats reuse what earlier ones freed.
            async_cfg = dataclasses.replace(cfg.checkpoint, async_save=True)
            manager = CheckpointManager(async_cfg, tmp, dist_info)
            manager.track({"engine": engine, "train": state})
            blocked, total, steps = timed_async_save(manager, 2 * repeat, engine, tokens, save_args)
            rows["async save (blocked)"].append(blocked)
            rows["async save (total)"].append(total)
            in_flight.append(steps)
            sizes.append(checkpoint_bytes(checkpoint_dir(manager.root, 2 * repeat)))

            sync = CheckpointManager(cfg.checkpoint, tmp, dist_info)
            sync.track({"engine": engine, "train": state})
            rows["sync save"].append(sync.save(2 * repeat + 1, *save_args))
            path = checkpoint_dir(sync.root, 2 * repeat + 1)
            sizes.append(checkpoint_bytes(path))

            fresh = new_engine(cfg)  # the engine is unchanged since the sync save: compare with it
            start = time.perf_counter()
            sync.track({"engine": fresh, "train": state})
            sync.load(path)
            rows["load"].append(time.perf_counter() - start)
            saved, loaded = engine.model.state_dict(), fresh.model.state_dict()
            assert all(torch.equal(saved[k], loaded[k]) for k in saved), "loaded weights differ from the saved ones"
            del fresh, saved, loaded
        print(f"repeat {repeat + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in rows.items())
              + f", {steps} training steps during the async write", flush=True)

    megabytes = statistics.median(sizes) / 1e6
    median = {name: statistics.median(times) for name, times in rows.items()}
    print(f"\ncheckpoint: {megabytes:,.1f} MB ({megabytes * 1e6 / n_params:.1f} bytes/parameter), "
          f"median of {args.repeats}")
    print("| operation | median s | min s | max s | MB/s (median) |")
    print("|---|---|---|---|---|")
    for name, times in rows.items():
        # MB/s of the blocked part would be meaningless: nothing is written while the caller waits.
        rate = "" if name == "async save (blocked)" else f"{megabytes / median[name]:,.0f}"
        print(f"| {name} | {median[name]:.2f} | {min(times):.2f} | {max(times):.2f} | {rate} |")
    print(f"\ntraining steps run while the async write was in flight: {in_flight} "
          f"(one step alone: {step_s:.2f}s)")
    print(f"save_mb_s={megabytes / median['sync save']:.1f} load_mb_s={megabytes / median['load']:.1f} "
          f"async_blocked_fraction={median['async save (blocked)'] / median['sync save']:.3f} "
          f"checkpoint_mb={megabytes:.1f} params={n_params}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
