"""A plan as a table for people, JSON for scripts, and a config `pretrain train` runs."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import yaml

from pretrain.config.load import load_config
from pretrain.config.schema import Config
from pretrain.errors import PretrainError
from pretrain.resilience.atomic_dir import write_file
from pretrain.scaling.memory import GIB
from pretrain.scaling.planner import Plan, count, duration
from pretrain.scaling.shapes import shape_summary

# A plan's config shrunk to a model and batch that train in seconds on a CPU: what the planner
# prints and its test runs, so users can smoke-test a planned config before they launch it.
SMOKE_OVERRIDES = ("--train.max_steps=2 --model.n_layers=2 --model.d_model=64 --model.n_heads=2 --model.n_kv_heads=1 "
                   "--model.ffn_hidden=128 --data.seq_len=64 --train.global_batch_tokens=512 "
                   "--train.micro_batch_size=4 --optim.warmup_steps=1 --model.vocab_size=1000 "
                   "--tokenizer.vocab_size=1000 --train.device=cpu")


def plan_rows(plan: Plan) -> list[tuple[str, str]]:
    shape, better = plan.shape, plan.better
    rows = [
        ("budget", plan.budget_note),
        ("law", f"{plan.law.name} ({plan.law.source})"),
        ("shape", f"{shape_summary(shape)} vocab {shape.vocab_size}, seq {plan.seq_len}"),
        ("parameters", count(plan.params) + (f" CAPPED: {plan.cap_ratio:.1f}x below the {count(plan.target_params or 0)} "
                                              "asked for (see the warning below)" if plan.capped else "")),
        *([("requested", plan.rounding)] if plan.rounding else []),
        ("tokens", f"{count(plan.tokens)} ({plan.tokens / plan.params:.1f} per parameter)"),
        ("training FLOPs", f"{plan.flops:.3g}"),
        ("global batch", f"{count(plan.global_batch_tokens)} tokens = {plan.global_batch_tokens // plan.seq_len} "
                         f"sequences (DeepSeek LLM fit)"),
        ("learning rate", f"{plan.lr:.3g} peak (DeepSeek LLM fit), cosine to 10%, {plan.warmup_steps} warmup steps"),
        ("steps", f"{plan.steps:,}"),
        ("predicted loss", f"{plan.predicted_loss:.3f} nats/token on the law's data"
                           + (f" ({count(plan.effective_tokens)} tokens' worth after repetition)"
                              if plan.effective_tokens < plan.tokens else "")),
        *([("better plan", f"{count(better.params)} parameters on {count(better.tokens)} tokens "
                           f"({better.tokens / better.params:.1f} per parameter): predicted loss "
                           f"{better.predicted_loss:.3f} for the same compute (see the warning below)")]
          if better else []),
        ("hardware", f"{plan.gpus} x {plan.gpu.describe()} at {plan.mfu:.0%} MFU"
                     + (f"; {plan.gpu_note}" if plan.gpu_note else "")),
        ("wall clock", f"{duration(plan.days)} ({gpu_hours(plan.days * 24 * plan.gpus)} GPU-hours)"),
    ]
    if plan.cost is not None:
        rows.append(("cost", f"${plan.cost:,.0f}"))
    if plan.chosen:
        c = plan.chosen
        rows.append(("layout", f"{c.label}, activation checkpointing {c.checkpointing}, micro-batch {c.micro_batch}: "
                               f"{c.memory.total / GIB:.1f} GiB per GPU"))
    return rows


def format_plan(plan: Plan) -> str:
    rows = plan_rows(plan)
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:>{width}}  {value}" for name, value in rows]
    header = (f"{'backend':>8} {'params':>8} {'grads':>8} {'optim':>8} {'activ.':>8} {'copies':>8} {'total':>8}  "
              "fits with (GiB per GPU)")
    lines += ["", header, "-" * len(header)]
    for f in plan.layouts:
        m = f.memory
        how = (f"AC {f.checkpointing}, micro-batch {f.micro_batch}" if f.fits
               else f"does not fit in {plan.gpu.memory_gib:.0f} GiB")
        lines.append(f"{f.label:>8} {m.states.params / GIB:8.1f} {m.states.grads / GIB:8.1f} "
                     f"{m.states.optimizer / GIB:8.1f} {m.activations / GIB:8.1f} {m.compute_copies / GIB:8.1f} "
                     f"{m.total / GIB:8.1f}  {how}" + ("  <- chosen" if f is plan.chosen else ""))
    lines += [f"WARNING: {w}" for w in plan.warnings]
    return "\n".join(lines)


def plan_json(plan: Plan) -> dict:
    shape, better = plan.shape, plan.better
    return {
        "params": plan.params, "tokens": plan.tokens, "flops": plan.flops,
        "global_batch_tokens": plan.global_batch_tokens, "lr": plan.lr, "steps": plan.steps, "days": plan.days,
        "memory_per_gpu_gb": plan.chosen.memory.total / GIB if plan.chosen else None,
        "warmup_steps": plan.warmup_steps, "seq_len": plan.seq_len, "micro_batch_size": plan.micro_batch,
        "predicted_loss": plan.predicted_loss, "effective_tokens": plan.effective_tokens,
        "gpus": plan.gpus, "gpu": plan.gpu.name, "mfu": plan.mfu, "cost": plan.cost,
        "law": plan.law.to_dict(), "budget": plan.budget_note,
        "model": {"vocab_size": shape.vocab_size, "d_model": shape.d_model, "n_layers": shape.n_layers,
                  "n_heads": shape.n_heads, "n_kv_heads": shape.n_kv_heads, "ffn_hidden": shape.ffn_hidden,
                  "tie_embeddings": shape.tie_embeddings, "rope_theta": shape.rope_theta},
        "layout": ({"backend": plan.chosen.backend, "zero_stage": plan.chosen.zero_stage,
                    "activation_checkpointing": plan.chosen.checkpointing} if plan.chosen else None),
        "memory_gb": {f.label: {"params": f.memory.states.params / GIB, "grads": f.memory.states.grads / GIB,
                                "optimizer": f.memory.states.optimizer / GIB,
                                "activations": f.memory.activations / GIB,
                                "compute_copies": f.memory.compute_copies / GIB, "total": f.memory.total / GIB,
                                "fits": f.fits, "activation_checkpointing": f.checkpointing,
                                "micro_batch_size": f.micro_batch} for f in plan.layouts},
        "warnings": plan.warnings,
        "target_params": plan.target_params, "capped": plan.capped,
        "requested_params": plan.requested_params, "shape_rounding": plan.rounding, "gpu_note": plan.gpu_note,
        "better_plan": ({"params": better.params, "tokens": better.tokens,
                         "tokens_per_param": better.tokens / better.params, "predicted_loss": better.predicted_loss,
                         "loss_gain": plan.predicted_loss - better.predicted_loss, "flops": better.flops,
                         "shape": shape_summary(better.shape)} if better else None),
    }


def plan_out_dir(plan: Plan, write_path: str | Path, base: dict | None) -> str:
    """The written plan's own run directory, named after the --write file and the model size,
    beside the base config's: never the base's, which training the plan would resume from."""
    base_dir = (base or {}).get("out_dir")
    parent = Path(base_dir).parent if base_dir else Path("runs")
    out_dir = str(parent / f"{Path(write_path).stem}-{count(plan.params).lower()}")
    return out_dir + "-plan" if out_dir == base_dir else out_dir


def plan_config(plan: Plan, base: dict | None = None, out_dir: str | None = None) -> dict:
    """The config sections a plan decides, laid over `base` (a config's YAML mapping); `out_dir`
    replaces the base's."""
    cfg = copy.deepcopy(base or {})
    model = plan_json(plan)["model"]
    if out_dir:
        cfg["out_dir"] = out_dir
    cfg.setdefault("out_dir", f"runs/{count(plan.params).lower()}")
    cfg["model"] = {**(cfg.get("model") or {}), **model}
    cfg["model"].pop("max_seq_len", None)
    cfg["data"] = {**(cfg.get("data") or {}), "seq_len": plan.seq_len}
    cfg["tokenizer"] = {**(cfg.get("tokenizer") or {}), "vocab_size": plan.shape.vocab_size}
    train = {k: v for k, v in (cfg.get("train") or {}).items() if k not in ("global_batch_sequences", "stop_at")}
    cfg["train"] = {**train, "max_steps": plan.steps, "global_batch_tokens": plan.global_batch_tokens,
                    "micro_batch_size": plan.micro_batch}
    cfg["optim"] = {**(cfg.get("optim") or {}), "lr": float(f"{plan.lr:.3g}"), "warmup_steps": plan.warmup_steps,
                    "schedule": "cosine", "min_lr_ratio": 0.1}
    parallel = {k: v for k, v in (cfg.get("parallel") or {}).items() if k not in ("zero_stage",)}
    if plan.chosen:
        parallel.update(backend=plan.chosen.backend, activation_checkpointing=plan.chosen.checkpointing)
        if plan.chosen.backend == "deepspeed":
            parallel["zero_stage"] = plan.chosen.zero_stage
    cfg["parallel"] = parallel
    hourly = round(plan.steps / max(plan.days * 24, 1e-9))
    every = max(1, min(hourly, plan.steps // 10))  # hourly, and at least 10 times in a run
    cfg["checkpoint"] = {**(cfg.get("checkpoint") or {}), "every": every}
    cfg["eval"] = {**(cfg.get("eval") or {}), "every": every}
    order = [f.name for f in dataclasses.fields(Config)]
    return dict(sorted(cfg.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))


def check_writable(path: str | Path, force: bool = False) -> None:
    """Refuse an existing --write file unless `force`: called before anything is planned or printed."""
    if Path(path).exists() and not force:
        raise PretrainError(f"{path} exists; choose another --write path or add --force to replace it")


def out_dir_note(out_dir: str, base: dict | None) -> str:
    """Where training the written plan goes, and why not into the base config's out_dir."""
    base_dir = (base or {}).get("out_dir")
    note = f"out_dir {out_dir}: the plan's own run directory"
    if base_dir:
        note += f", not the base config's {base_dir}, whose checkpoints training the plan would resume from"
        if not ((base or {}).get("tokenizer") or {}).get("path"):
            note += (f"; it trains its own tokenizer there unless you set tokenizer.path (e.g. to "
                     f"{Path(base_dir) / 'tokenizer.model'}, the base run's)")
    return note


def write_plan_config(plan: Plan, path: str, base: dict | None, command: str, force: bool = False,
                      out_dir: str | None = None) -> Path:
    """Write the plan's config (UTF-8) with the plan as a comment on top, after checking that
    `pretrain train` accepts it; never replaces an existing file unless `force`. `out_dir`
    (default: plan_out_dir) is the run directory the config names."""
    out = Path(path)
    check_writable(out, force)
    out_dir = out_dir or plan_out_dir(plan, out, base)
    comment = [f"# Planned by `{command}`", "# " + "-" * 70]
    comment += [f"# {name}: {value}" for name, value in plan_rows(plan)]
    comment += [f"# {out_dir_note(out_dir, base)}"]
    comment += [f"# WARNING: {w}" for w in plan.warnings]
    comment += ["# Smoke-test it on a CPU in seconds before launching:",
                f"#   pretrain train {out.name} {SMOKE_OVERRIDES} --out_dir=/tmp/plan-smoke", ""]
    # allow_unicode: a base config's non-ASCII text (a Chinese sample prompt) stays readable, not \u escapes
    text = "\n".join(comment) + yaml.safe_dump(plan_config(plan, base, out_dir), sort_keys=False,
                                               default_flow_style=None, allow_unicode=True)
    # the written config must train as it is: checked before it is published
    return write_file(out, text, check=lambda tmp: load_config(str(tmp), world_size=1))


def gpu_hours(hours: float) -> str:
    """5,143 or 0.047: whole hours once there are many, two significant digits below ten."""
    return f"{hours:,.0f}" if hours >= 10 else f"{hours:.2g}"
