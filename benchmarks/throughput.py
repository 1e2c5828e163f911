"""Training throughput of pretrain's real step against a plain PyTorch reference loop on the same
model, in the same process, back to back.

"pretrain" is the Trainer's whole step for the chosen backend: the data pipeline on python-docs,
autocast, the step guard, clipping, the schedule (logging off, as between logging steps). The
reference is the textbook Llama of reference_model.py in the textbook loop, with fixed random
tokens: forward, cross-entropy over the full logits, backward, fused AdamW, zero_grad (the
"plain PyTorch loop" of the peer table). pretrain runs first, so that its peak memory is not
raised by what the reference left behind. MFU is against the matmul peak measured here for
the precision in use; peak memory is each run's own peak resident set (the counter is reset and
freed memory handed back to the OS in between). Absolute tokens/s drift 10-30% between runs on a
shared machine; the ratio, taken back to back, does not.

    python benchmarks/throughput.py                         # peer shape (../shared/peers), auto precision
    python benchmarks/throughput.py --precision fp32 --shape demo
    python benchmarks/throughput.py --shape 125m --steps 3 --warmup 1
    torchrun --nproc_per_node 2 benchmarks/throughput.py --backend fsdp --threads 1   # per-process tok/s
    torchrun --nproc_per_node 2 benchmarks/throughput.py --backend deepspeed --parallel.zero_stage=3 --threads 1

Other arguments of the form --section.key=value are config overrides for pretrain's run.

Under torchrun every rank runs both loops (the reference in each process on its own), so the
ratio is a sharded step against a single-process step with the same cores and memory traffic.

The last line is `tokens_per_s=... ratio_vs_reference=... mfu=... peak_rss_mb=...` for pretrain.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from reference_model import ReferenceLlama

from pretrain.config import load_config
from pretrain.hardware.devices import keep_freed_memory, measure_matmul_flops, resolve_precision
from pretrain.models import count_params, flops_per_token
from pretrain.observability.log_setup import setup_logging
from pretrain.parallel.compile import missing_compiler
from pretrain.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Tokenizers are trained small (python-docs is ~2 MB): the model's vocabulary stays the shape's.
SHAPES = {
    # the peers' model: vocab 32000, d_model 512, 8 layers, 8 heads, SwiGLU 1408, untied, seq 512, micro-batch 4
    "peer": ("demo.yaml", ["--model.vocab_size=32000", "--model.d_model=512", "--model.n_layers=8",
                           "--model.n_heads=8", "--model.n_kv_heads=8", "--model.ffn_hidden=1408",
                           "--model.tie_embeddings=false", "--data.seq_len=512", "--train.micro_batch_size=4",
                           "--tokenizer.vocab_size=8192"]),
    # the demo's model as the README's figures were measured (the demo itself has 4 layers since 2026-12)
    "demo": ("demo.yaml", ["--model.n_layers=6"]),
    "125m": ("presets/125m.yaml", ["--train.micro_batch_size=1", "--tokenizer.vocab_size=8192",
                                   "--parallel.backend=none"]),
}


@dataclass
class Result:
    name: str
    seconds: list[float]
    peak_rss_mb: float
    tokens_per_step: int

    def tokens_per_s(self, pick=statistics.median) -> float:
        return self.tokens_per_step / pick(self.seconds)


@contextlib.contextmanager
def shared_temporary_dir(world_size: int, rank: int) -> Iterator[str]:
    """A temporary out_dir; under torchrun the same one on every rank (the tokenizer is trained by
    rank 0 and read by the others), removed by rank 0 at the end."""
    path: str | Path
    if world_size == 1:
        with tempfile.TemporaryDirectory() as path:
            yield path
        return
    path = Path(tempfile.gettempdir()) / f"pretrain-throughput-{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}"
    path.mkdir(exist_ok=True)
    try:
        yield str(path)
    finally:
        if rank == 0:
            shutil.rmtree(path, ignore_errors=True)


def timed(step, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def release_memory() -> None:
    """Free what the last run held and reset the peak-RSS counter, so the next run's peak is its
    own (glibc keeps freed memory for reuse when keep_freed_memory() tuned it: trim explicitly)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
    except OSError:
        pass


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reference_step(cfg, precision: str, compile_blocks: bool):
    """The textbook loop on the textbook model."""
    torch.manual_seed(0)
    model = ReferenceLlama(cfg.model)
    if compile_blocks:
        for block in model.blocks:
            block.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len + 1))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="peer", help="model and batch shape (default: peer)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                        help="default: what train.precision=auto picks on this machine")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the transformer blocks (both loops); default: what train.compile=auto "
                             "picks for a long run, i.e. on where TorchInductor has a compiler")
    parser.add_argument("--backend", default="none", help="pretrain's parallel.backend (one process: none)")
    parser.add_argument("--activation-checkpointing", choices=["none", "selective", "full"], default="none",
                        help="pretrain's parallel.activation_checkpointing")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args, extra = parser.parse_known_args()
    if any(not arg.startswith("--") or "." not in arg.split("=")[0] for arg in extra):
        parser.error(f"unrecognized arguments: {' '.join(extra)} (config overrides look like --section.key=value)")
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    setup_logging()
    precision = args.precision or resolve_precision("auto", torch.device("cpu"))
    if args.compile is None:
        args.compile = missing_compiler(torch.device("cpu")) is None
    matmul_peak = measure_matmul_flops(torch.device("cpu"), torch.bfloat16 if precision == "bf16" else torch.float32,
                                       seconds=1.0)

    config, shape = SHAPES[args.shape]
    world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    with shared_temporary_dir(world_size, rank) as out_dir:
        overrides = [*shape, f"--out_dir={out_dir}", f"--train.precision={precision}", "--train.device=cpu",
                     "--train.global_batch_tokens=null", "--eval.every=0", "--eval.sample_tokens=0",
                     "--logging.every=0", "--checkpoint.every=0", f"--train.max_steps={args.warmup + args.steps}",
                     "--optim.warmup_steps=1", "--logging.peak_flops=1e12", f"--parallel.backend={args.backend}",
                     f"--train.compile={str(args.compile).lower()}",
                     f"--parallel.activation_checkpointing={args.activation_checkpointing}", *extra]
        cfg = load_config(str(CONFIGS / config), overrides, world_size=world_size)
        tokens_per_step = cfg.train.micro_batch_size * cfg.data.seq_len
        release_memory()
        trainer = Trainer(cfg)
        ours = Result("pretrain", timed(trainer.train_step, args.warmup, args.steps), peak_rss_mb(), tokens_per_step)
        trainer.close()
        del trainer
        release_memory()
        reference = Result("reference loop", timed(reference_step(cfg, precision, args.compile), args.warmup,
                                                   args.steps), peak_rss_mb(), tokens_per_step)

    if rank != 0:
        return 0
    flops = flops_per_token(cfg.model, cfg.data.seq_len)
    print(f"\nshape={args.shape} ({count_params(cfg.model) / 1e6:.1f}M parameters, {tokens_per_step} tokens/step), "
          f"{precision}, compile={args.compile}, backend={args.backend} x {world_size} process(es), activation checkpointing "
          f"{args.activation_checkpointing}, {args.threads} threads; median/min/max of "
          f"{args.steps} steps after {args.warmup} warm-up; measured {precision} matmul peak "
          f"{matmul_peak / 1e9:.0f} GFLOP/s")
    print("| loop | tok/s median | min | max | MFU | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for r in (reference, ours):
        print(f"| {r.name} | {r.tokens_per_s():,.0f} | {r.tokens_per_s(max):,.0f} | {r.tokens_per_s(min):,.0f} | "
              f"{flops * r.tokens_per_s() / matmul_peak:.1%} | {r.peak_rss_mb:,.0f} |")
    ratio = ours.tokens_per_s() / reference.tokens_per_s()
    print(f"SUMMARY throughput {args.shape} {precision} ratio_vs_plain={ratio:.3f} "  # the earlier summary line
          f"tokens_per_s={ours.tokens_per_s():.0f}")
    print(f"tokens_per_s={ours.tokens_per_s():.0f} ratio_vs_reference={ratio:.3f} "
          f"mfu={flops * ours.tokens_per_s() / matmul_peak:.3f} peak_rss_mb={ours.peak_rss_mb:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
