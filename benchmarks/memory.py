"""Memory per rank of parameters + gradients + optimizer state, for each parallel backend at
world size 1 and 2 (CPU, gloo, fp32), next to the paper estimate; then the estimate per GPU for
the reference shapes (7B, 13B, 70B) on 8, 64 and 512 GPUs in bf16.

What is measured: at the second optimizer step, just before the update (weights, gradients and
optimizer moments all alive; activations already freed), the bytes of every distinct tensor
storage alive in rank 0's process. The ratio world size 2 / world size 1 is the sharding factor:
~1 for ddp, ~1/2 for the sharded part under ZeRO-1/2 and all of it under FSDP and ZeRO-3.

    python benchmarks/memory.py
    python benchmarks/memory.py --d-model 512 --layers 8
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.distributed.ranks: the 2-process helper

from pretrain.config import load_config  # noqa: E402
from pretrain.data import load_or_train_tokenizer  # noqa: E402
from pretrain.models import count_params  # noqa: E402
from pretrain.parallel import dist_info_from_env  # noqa: E402
from pretrain.scaling.memory import estimate_table, model_state_bytes  # noqa: E402
from pretrain.trainer import Trainer  # noqa: E402
from tests.distributed.ranks import run_ranks  # noqa: E402

MIB = 2**20
BACKENDS = {
    "none": ["--parallel.backend=none"],
    "ddp": ["--parallel.backend=ddp"],
    "zero1": ["--parallel.backend=deepspeed", "--parallel.zero_stage=1"],
    "zero2": ["--parallel.backend=deepspeed", "--parallel.zero_stage=2"],
    "fsdp": ["--parallel.backend=fsdp"],
    "zero3": ["--parallel.backend=deepspeed", "--parallel.zero_stage=3"],
}


def live_tensor_bytes() -> int:
    """Bytes of all distinct CPU tensor storages reachable by the garbage collector, plus the
    parameters' gradients (a DTensor wraps a local tensor, which is counted itself)."""
    seen: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance() on some library objects warns about deprecations
        warnings.simplefilter("ignore")
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    # A gradient has no Python object until .grad is read, so the collector does not see it.
    grads = [p.grad for p in objects if isinstance(p, torch.nn.Parameter) and p.grad is not None]
    objects += grads + [t._local_tensor for t in grads if hasattr(t, "_local_tensor")]
    for obj in objects:
        if obj.device.type != "cpu":
            continue
        try:
            storage = obj.untyped_storage()
            if storage.nbytes():
                seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError, TypeError):
            continue  # wrapper subclasses (DTensor) and fake tensors own no storage
    return sum(seen.values())


def _measure(rank: int, world_size: int, overrides: list[str], result: Path) -> None:
    cfg = load_config(None, overrides, world_size=world_size)
    trainer = Trainer(cfg, dist_info_from_env("cpu"))
    step, measured = trainer.engine.step, []

    def measuring_step(max_norm: float, approve: Callable[[torch.Tensor], bool] | None = None) -> torch.Tensor:
        gc.collect()
        measured.append(live_tensor_bytes())
        return step(max_norm, approve)

    trainer.engine.step = measuring_step  # type: ignore[method-assign]  # measured where the optimizer steps
    trainer.train()
    if rank == 0:
        result.write_text(json.dumps(measured[-1]))


def measure(backend: str, world_size: int, base: list[str], work: Path) -> float:
    result = work / f"{backend}-{world_size}.json"
    overrides = [*base, f"--out_dir={work / f'{backend}-{world_size}'}", *BACKENDS[backend]]
    run_ranks(_measure, world_size, overrides, result, process_group=False)
    return json.loads(result.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = ["--data.seq_len=64", "--train.micro_batch_size=2", "--train.global_batch_sequences=4",
                "--train.max_steps=2", "--train.precision=fp32", "--train.device=cpu", "--logging.every=0",
                "--eval.every=0", "--eval.sample_tokens=0", "--optim.warmup_steps=1",
                f"--model.d_model={args.d_model}", f"--model.n_layers={args.layers}", "--model.n_heads=6",
                "--model.n_kv_heads=2", f"--model.ffn_hidden={args.d_model * 8 // 3 // 64 * 64}",
                f"--model.vocab_size={args.vocab}", f"--tokenizer.vocab_size={args.vocab}",
                f"--tokenizer.path={work / 'tokenizer.model'}"]
        cfg = load_config(None, base, world_size=1)
        load_or_train_tokenizer(cfg)  # once, before the ranks start
        n_params = count_params(cfg.model)
        print(f"model: {n_params / 1e6:.1f}M parameters, fp32, CPU; MiB per rank at the optimizer step "
              f"(rank 0; all live tensors: states + data and buffers)\n")
        header = (f"{'backend':>8} | {'1 rank':>8} {'2 ranks':>8} {'ratio':>6} | {'estimate 1':>10} "
                  f"{'estimate 2':>10} {'ratio':>6}")
        print(header + "\n" + "-" * len(header))
        summary = {}
        for backend in BACKENDS:
            sizes = [1] if backend == "none" else [1, 2]
            got = [measure(backend, n, base, work) / MIB for n in sizes]
            stage = int(backend[-1]) if backend.startswith("zero") else 0
            kind = "deepspeed" if stage else backend
            est = [model_state_bytes(n_params, n, kind, stage, bf16=False).total / MIB for n in sizes]
            if len(got) == 1:
                print(f"{backend:>8} | {got[0]:8.1f} {'':>8} {'':>6} | {est[0]:10.1f}")
                continue
            summary[backend] = got[1] / got[0]
            print(f"{backend:>8} | {got[0]:8.1f} {got[1]:8.1f} {got[1] / got[0]:6.2f} | {est[0]:10.1f} "
                  f"{est[1]:10.1f} {est[1] / est[0]:6.2f}", flush=True)
    print("\npaper estimate, GiB per GPU of model states (bf16, AdamW) and activations of one micro-batch of "
          "4096 tokens with full activation checkpointing / without:\n")
    print("\n".join(estimate_table()))
    print("\nSUMMARY " + " ".join(f"{name}_2rank_over_1rank={ratio:.3f}" for name, ratio in summary.items()))


if __name__ == "__main__":
    main()
