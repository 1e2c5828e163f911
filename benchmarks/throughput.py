"""Training throughput of pretrain's real step against a plain PyTorch loop, back to back.

Both run the same model (our Transformer) with the same micro-batch, precision and AdamW; the
plain loop feeds fixed random tokens, pretrain's Trainer runs its whole step (data pipeline on
python-docs, autocast, clipping, schedule). The ratio is what the framework costs or saves;
absolute tokens/s on a shared machine drift between runs, ratios taken back to back do not.

    python benchmarks/throughput.py                      # the peer comparison shape (see ../shared/peers)
    python benchmarks/throughput.py --shape demo --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain.config import load_config
from pretrain.hardware import keep_freed_memory
from pretrain.log_setup import setup_logging
from pretrain.models import Transformer, flops_per_token
from pretrain.trainer import Trainer

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

SHAPES = {
    # vocab 32000, d_model 512, 8 layers, 8 heads, SwiGLU 1408, untied, seq 512, micro-batch 4
    "peer": ["--model.vocab_size=32000", "--model.d_model=512", "--model.n_layers=8", "--model.n_heads=8",
             "--model.n_kv_heads=8", "--model.ffn_hidden=1408", "--model.tie_embeddings=false",
             "--data.seq_len=512", "--train.micro_batch_size=4", "--tokenizer.vocab_size=8192"],
    "demo": [],
}


def median_seconds(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def plain_loop_step(cfg, precision: str):
    """The textbook loop: forward, cross-entropy, backward, AdamW, zero_grad."""
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.data.seq_len + 1))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="peer")
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    setup_logging()

    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for precision in args.precision:
            overrides = [*SHAPES[args.shape], f"--out_dir={out_dir}", f"--train.precision={precision}",
                         "--train.device=cpu", "--train.global_batch_tokens=null", "--eval.every=0",
                         "--eval.sample_tokens=0", "--logging.every=0", "--checkpoint.every=0",
                         f"--train.max_steps={args.warmup + args.steps}", "--optim.warmup_steps=1",
                         "--logging.peak_flops=1e12"]
            cfg = load_config(str(DEMO_CONFIG), overrides, world_size=1)
            tokens_per_step = cfg.train.micro_batch_size * cfg.data.seq_len
            plain = median_seconds(plain_loop_step(cfg, precision), args.warmup, args.steps)
            trainer = Trainer(cfg)
            ours = median_seconds(trainer.train_step, args.warmup, args.steps)
            flops = flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step
            rows.append((precision, tokens_per_step / plain, tokens_per_step / ours, flops / ours / 1e9))

    print(f"\nshape={args.shape}, {args.threads} threads, median of {args.steps} steps after {args.warmup} warm-up")
    print("| precision | plain PyTorch loop tok/s | pretrain Trainer tok/s | pretrain / plain | pretrain GFLOP/s |")
    print("|---|---|---|---|---|")
    for precision, plain, ours, gflops in rows:
        print(f"| {precision} | {plain:,.0f} | {ours:,.0f} | {ours / plain:.2f} | {gflops:.0f} |")
    for precision, plain, ours, _ in rows:
        print(f"SUMMARY throughput {args.shape} {precision} ratio_vs_plain={ours / plain:.3f} tokens_per_s={ours:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
