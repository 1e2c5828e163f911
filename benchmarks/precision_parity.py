"""Does bf16 learn as well as fp32? Trains the embedded demo (configs/demo.yaml, python-docs) for
50 steps in each precision over several seeds (each seed: the same initialisation and data in
both precisions) and compares the validation loss at step 50. The gap is the mean of the
per-seed differences; it is "within noise" when it is within two standard errors of that mean
(the seed-to-seed scatter of the differences).

    python benchmarks/precision_parity.py               # 5 seeds x 2 precisions, about 4 min on 2 cores
    python benchmarks/precision_parity.py --steps 100 --seeds 0 1 2 3

Last line: `bf16_minus_fp32=... noise=... within_noise=yes|no`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from pretrain.config import load_config
from pretrain.hardware.devices import cpu_has_bf16
from pretrain.observability.log_setup import setup_logging
from pretrain.observability.report import load_metrics
from pretrain.trainer import Trainer

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


def val_loss_after(steps: int, precision: str, seed: int, tokenizer_dir: Path) -> float:
    with tempfile.TemporaryDirectory() as out_dir:
        overrides = [f"--out_dir={out_dir}", f"--train.precision={precision}", f"--train.seed={seed}",
                     f"--train.stop_at={steps}", "--train.device=cpu", "--train.compile=false", f"--eval.every={steps}",
                     "--eval.sample_tokens=0", "--checkpoint.every=0", "--logging.progress=false",
                     f"--tokenizer.path={tokenizer_dir / 'tokenizer.model'}",
                     "--model.n_layers=6"]  # the shape of the README's figures (the demo has 4 layers since 2026-12)
        Trainer(load_config(str(DEMO), overrides)).train()
        return next(r["val_loss"] for r in load_metrics(out_dir).validation if r["step"] == steps)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    setup_logging()
    if not cpu_has_bf16():
        print("note: this CPU has no native bf16 (avx512_bf16/AMX): bf16 is emulated, slower, same numerics")
    losses: dict[str, list[float]] = {"fp32": [], "bf16": []}
    with tempfile.TemporaryDirectory() as tokenizer_dir:  # trained by the first run, shared by the rest
        for seed in args.seeds:
            for precision in losses:
                losses[precision].append(val_loss_after(args.steps, precision, seed, Path(tokenizer_dir)))
    print(f"\nvalidation loss after {args.steps} steps of configs/demo.yaml, seeds {args.seeds}")
    print("| precision | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean |")
    print("|---|" + "---|" * (len(args.seeds) + 1))
    for precision, values in losses.items():
        print(f"| {precision} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {statistics.mean(values):.4f} |")
    differences = [b - f for b, f in zip(losses["bf16"], losses["fp32"])]
    gap = statistics.mean(differences)
    noise = 2 * statistics.stdev(differences) / len(differences) ** 0.5 if len(differences) > 1 else float("nan")
    print(f"bf16_minus_fp32={gap:+.4f} noise={noise:.4f} within_noise={'yes' if abs(gap) <= noise else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
