"""Reliability report: N randomized faults injected into real 2-process jobs launched with
launch/torchrun.sh (FSDP, tiny model, CPU), each compared with a fault-free run of the same job.

  kill       a rank dies (SIGKILL) at a random step          torchrun restarts the job
  term       a rank gets SIGTERM at a random step            it checkpoints and exits 75; restart
  nan        a rank's loss turns NaN at a random step        rollback to the last checkpoint
  disk_full  one rank's disk fills half-way through its      every rank stops, previous checkpoint
             checkpoint shard (ENOSPC)                       kept; restart
  kill_mid_save  a rank dies (SIGKILL) half-way through       torchrun restarts the job from the
             writing its checkpoint shard                    previous checkpoint
  corrupt    the newest checkpoint is truncated, then a      the restart falls back to the one before
             rank is killed

Every job is launched once: "recovered" means it finished by itself. "divergent" compares its
final weights with the fault-free run's (for nan, with a fault-free run resumed from the
checkpoint it rolled back to and told by the ledger to skip the same data: the rollback must be
exactly reproducible). "lost checkpoints" counts checkpoints of the schedule that are missing or
incomplete at the end. "steps lost" counts steps trained more than once.

    python benchmarks/chaos.py --faults 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.checkpoint.layout import checkpoint_dir, damage
from pretrain.export.weights import load_weights
from pretrain.resilience.step_guard import LEDGER

REPO = Path(__file__).resolve().parents[1]
KINDS = ("kill", "term", "nan", "disk_full", "kill_mid_save", "corrupt")
WHILE_SAVING = ("disk_full", "kill_mid_save")  # faults of a checkpoint step's write
STEPS, EVERY = 16, 4
JOB = {"model.vocab_size": 512, "model.d_model": 64, "model.n_layers": 2, "model.n_heads": 4, "model.n_kv_heads": 2,
       "model.ffn_hidden": 128, "data.sources": "[{name: docs, path: python-docs}]", "data.seq_len": 32,
       "tokenizer.vocab_size": 512, "train.max_steps": STEPS, "train.micro_batch_size": 2,
       "train.global_batch_sequences": 8, "train.precision": "fp32", "train.device": "cpu", "optim.lr": 3e-3,
       "optim.warmup_steps": 2, "eval.every": 0, "eval.sample_tokens": 0, "logging.every": 1,
       "logging.peak_flops": 1e12, "parallel.backend": "fsdp", "checkpoint.every": EVERY}


@dataclass
class Outcome:
    kind: str
    where: str
    recovered: bool
    steps_lost: int
    divergent: bool
    lost_checkpoints: int
    seconds: float


def launch(out_dir: Path, tokenizer: Path, faults: str = "") -> subprocess.Popen:
    args = [f"--{k}={v}" for k, v in {**JOB, "out_dir": out_dir, "tokenizer.path": tokenizer}.items()]
    config = out_dir.parent / f"{out_dir.name}.yaml"
    config.write_text(f"out_dir: {out_dir}\n")
    env = {**os.environ, "NPROC": "2", "MAX_RESTARTS": "3", "PYTHON": sys.executable, "PRETRAIN_FAULTS": faults}
    return subprocess.Popen(["bash", "launch/torchrun.sh", str(config), *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def wait(proc: subprocess.Popen, log: Path, timeout_s: float = 600) -> int:
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    log.write_text(output)
    return proc.returncode


def records(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def final_weights(out_dir: Path) -> dict[str, torch.Tensor] | None:
    try:
        return load_weights(checkpoint_dir(out_dir / "checkpoints", STEPS))
    except Exception:  # any failure to read the final checkpoint counts against the run
        return None


def same(a: dict | None, b: dict | None) -> bool:
    return a is not None and b is not None and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def corrupt_then_kill(proc: subprocess.Popen, out_dir: Path, at: int, victim: int) -> None:
    """Once checkpoint `at` is published and a step after it trained, truncate its largest file
    and SIGKILL one rank, so the restart finds a damaged newest checkpoint."""
    newest = checkpoint_dir(out_dir / "checkpoints", at)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if (newest / "manifest.json").exists() and any(r.get("step", 0) > at for r in records(out_dir)):
            largest = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
            largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
            workers = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            os.kill(int(sorted(workers, key=int)[victim]), signal.SIGKILL)
            return
        time.sleep(0.02)


def rollback_reference(out_dir: Path, clean: Path, tokenizer: Path, work: Path) -> dict | None:
    """The fault-free run resumed from the checkpoint the nan run rolled back to, with its ledger."""
    entries = [json.loads(line) for line in (out_dir / LEDGER).read_text().splitlines()] if (out_dir / LEDGER).exists() else []
    rollbacks = [e for e in entries if e.get("action") == "rollback"]
    if not rollbacks:
        return None
    reference = work / f"{out_dir.name}_reference"
    start = checkpoint_dir(clean / "checkpoints", rollbacks[-1]["rollback_to"])
    shutil.copytree(start, checkpoint_dir(reference / "checkpoints", rollbacks[-1]["rollback_to"]))
    shutil.copyfile(out_dir / LEDGER, reference / LEDGER)
    wait(launch(reference, tokenizer), work / f"{reference.name}.log")
    return final_weights(reference)


def inject(kind: str, run: int, rng: random.Random, clean: Path, tokenizer: Path, work: Path) -> Outcome:
    out_dir = work / f"run{run:02d}_{kind}"
    victim = rng.randint(0, 1)
    step = rng.randint(EVERY + 1, STEPS - 1)
    start = time.perf_counter()
    if kind == "corrupt":
        at = rng.choice(range(2 * EVERY, STEPS, EVERY))
        proc = launch(out_dir, tokenizer)
        corrupt_then_kill(proc, out_dir, at, victim)
        where = f"checkpoint {at}, rank {victim}"
    else:
        if kind in WHILE_SAVING:
            step = rng.choice(range(2 * EVERY, STEPS, EVERY))
        spec = f"{kind}@{step}:rank={victim}"
        proc = launch(out_dir, tokenizer, spec)
        where = spec
    code = wait(proc, work / f"{out_dir.name}.log")
    trained = [r["step"] for r in records(out_dir) if "loss" in r]
    expected = rollback_reference(out_dir, clean, tokenizer, work) if kind == "nan" else final_weights(clean)
    schedule = [checkpoint_dir(out_dir / "checkpoints", s) for s in range(EVERY, STEPS + 1, EVERY)]
    return Outcome(kind, where, recovered=code == 0 and max(trained, default=0) == STEPS,
                   steps_lost=len(trained) - len(set(trained)), divergent=not same(final_weights(out_dir), expected),
                   lost_checkpoints=sum(1 for path in schedule if not path.is_dir() or damage(path)),
                   seconds=time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", type=int, default=20, help="fault injections (kinds in turn, random steps and ranks)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the steps and ranks of the faults")
    parser.add_argument("--keep", metavar="DIR", help="keep the runs and their logs in DIR (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="pretrain_chaos_"))
    work.mkdir(parents=True, exist_ok=True)
    from pretrain.data.builtin import python_docs_documents
    from tokenizer import train_tokenizer

    tokenizer = work / "tokenizer.model"
    train_tokenizer(python_docs_documents(), 512, tokenizer)
    clean = work / "fault_free"
    print(f"fault-free run ({STEPS} steps, checkpoint every {EVERY}, 2 ranks) ...", flush=True)
    if wait(launch(clean, tokenizer), work / "fault_free.log") != 0 or final_weights(clean) is None:
        print(f"the fault-free run failed; see {work / 'fault_free.log'}")
        return 1
    rng = random.Random(args.seed)
    outcomes = []
    print(f"{'#':>3} {'fault':<13} {'where':<28} {'recovered':>9} {'steps lost':>10} {'divergent':>9} "
          f"{'lost ckpts':>10} {'seconds':>8}", flush=True)
    for run in range(args.faults):
        o = inject(KINDS[run % len(KINDS)], run, rng, clean, tokenizer, work)
        outcomes.append(o)
        print(f"{run:>3} {o.kind:<13} {o.where:<28} {'yes' if o.recovered else 'NO':>9} {o.steps_lost:>10} "
              f"{'YES' if o.divergent else 'no':>9} {o.lost_checkpoints:>10} {o.seconds:>8.1f}", flush=True)
    recovered = sum(o.recovered for o in outcomes)
    divergent = sum(o.divergent for o in outcomes)
    lost = sum(o.lost_checkpoints for o in outcomes)
    steps_lost = sum(o.steps_lost for o in outcomes)
    print(f"runs and logs: {work}")
    print(f"faults={len(outcomes)} recovered={recovered} steps_lost={steps_lost} divergent={divergent} "
          f"lost_checkpoints={lost}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if recovered == len(outcomes) and divergent == 0 and lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
