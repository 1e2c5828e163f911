"""Validation metrics of a model on the held-out batches of each source, in the training loop or
from a checkpoint on disk (`pretrain eval`, also `--watch OUT_DIR` beside a training job)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from pretrain.data import IGNORE_INDEX

log = logging.getLogger("pretrain")

EVAL_DIR = "eval"
VALIDATION_FILE = "validation.jsonl"


@torch.no_grad()
def validation_metrics(model: torch.nn.Module, val_sets: dict[str, list], token_bytes: torch.Tensor,
                       weights: dict[str, float], device: torch.device,
                       autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                       reduce: Callable[[torch.Tensor], torch.Tensor] = lambda sums: sums) -> dict:
    """Loss per token of each source's held-out batches, their `weights`-weighted mean (the
    training mixture), perplexity and bits per byte (nats over the UTF-8 bytes the scored tokens
    stand for: comparable across tokenizers). `reduce` sums the per-rank sums when ranks split
    the batches."""
    was_training = model.training
    model.eval()
    names = list(val_sets)
    sums = torch.zeros(len(names), 3, device=device, dtype=torch.float64)  # nats, tokens, bytes
    for i, name in enumerate(names):
        for inputs, labels in val_sets[name]:
            inputs, labels = inputs.to(device), labels.to(device)
            with autocast():
                logits = model(inputs)
            sums[i, 0] += F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                                          reduction="sum")
            scored = labels[labels != IGNORE_INDEX]
            sums[i, 1] += scored.numel()
            sums[i, 2] += token_bytes[scored].sum()
    model.train(was_training)
    totals = reduce(sums).tolist()
    total_weight = sum(weights[name] for name in names)
    loss = {name: nats / tokens for name, (nats, tokens, _) in zip(names, totals)}
    bpb = {name: nats / (max(size, 1.0) * math.log(2)) for name, (nats, _, size) in zip(names, totals)}
    val_loss = sum(weights[name] * loss[name] for name in names) / total_weight
    record = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)),
              "val_bpb": sum(weights[name] * bpb[name] for name in names) / total_weight}
    if len(names) > 1:
        record.update(val_loss_by_source=loss, val_bpb_by_source=bpb,
                      val_ppl_by_source={name: math.exp(min(v, 50.0)) for name, v in loss.items()})
    return record


def evaluate_checkpoint(checkpoint: str | Path, overrides: Sequence[str] = ()) -> dict:
    """The validation record of a checkpoint of any backend and world size, on one process: the
    same held-out sequences as the training run's in-loop evaluation, so the same numbers."""
    from pretrain.config.load import load_config
    from pretrain.data import validation_sets
    from pretrain.export.parity import build_model
    from pretrain.export.readers import read_manifest
    from pretrain.export.weights import load_weights
    from pretrain.hardware.devices import resolve_precision
    from tokenizer import Tokenizer

    checkpoint = Path(checkpoint)
    manifest = read_manifest(checkpoint)
    # the run's own resolved config (overrides may point data.sources elsewhere); validated for
    # one process, which sees the same held-out sequences as any number of ranks
    cfg = load_config(str(checkpoint / "config.yaml"), list(overrides), world_size=1)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    precision = resolve_precision(cfg.train.precision, device)
    tokenizer = Tokenizer.load(checkpoint / "tokenizer.model")
    model = build_model(cfg.model, load_weights(checkpoint)).to(device)
    val_sets = validation_sets(cfg.data, tokenizer, micro_batch_size=cfg.train.micro_batch_size,
                               max_batches=cfg.eval.batches)
    token_bytes = torch.from_numpy(tokenizer.token_byte_lengths()).to(device)

    def autocast() -> contextlib.AbstractContextManager:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    metrics = validation_metrics(model, val_sets, token_bytes, {s.name: s.weight for s in cfg.data.sources},
                                 device, autocast)
    return {"step": manifest["step"], "tokens": manifest.get("tokens_seen"), "checkpoint": str(checkpoint), **metrics}


def describe_record(record: dict) -> str:
    """`evaluated CHECKPOINT (step 400): val_loss 3.1234 (ppl 22.73, 1.234 bits/byte) | fin ppl 18.20`:
    one readable line for a record of evaluate_checkpoint."""
    line = (f"evaluated {record['checkpoint']} (step {record['step']}): val_loss {record['val_loss']:.4f} "
            f"(ppl {record['val_ppl']:.2f}, {record['val_bpb']:.3f} bits/byte)")
    return " | ".join([line, *(f"{name} ppl {ppl:.2f}" for name, ppl in record.get("val_ppl_by_source", {}).items())])


def evaluated_steps(out_dir: Path) -> set[int]:
    """Steps whose checkpoints already have a validation record in out_dir/eval/."""
    path = out_dir / EVAL_DIR / VALIDATION_FILE
    steps = set()
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                steps.add(int(json.loads(line)["step"]))
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash: that step is evaluated again
    return steps


def append_record(out_dir: Path, record: dict, name: str = VALIDATION_FILE) -> None:
    path = out_dir / EVAL_DIR / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def watch(out_dir: str | Path, overrides: Sequence[str] = (), interval_s: float = 60.0, once: bool = False,
          on_record: Callable[[dict], None] | None = None, stop_after_step: int | None = None) -> list[dict]:
    """Evaluate every complete checkpoint of a training run's out_dir that has no record yet,
    oldest first, then wait for new ones (until the run's last step has been evaluated, or at
    once with `once`). Restartable: what is in out_dir/eval/validation.jsonl is not done again."""
    from pretrain.checkpoint.layout import complete_checkpoints

    out_dir = Path(out_dir)
    done, records = evaluated_steps(out_dir), []
    while True:
        for checkpoint in complete_checkpoints(out_dir / "checkpoints"):
            step = int(checkpoint.name.rsplit("_", 1)[1])
            if step in done:
                continue
            record = evaluate_checkpoint(checkpoint, overrides)
            append_record(out_dir, record)
            done.add(record["step"])
            records.append(record)
            log.info("%s", describe_record(record))
            if on_record:
                on_record(record)
        if once or (stop_after_step is not None and stop_after_step in done):
            return records
        time.sleep(interval_s)
