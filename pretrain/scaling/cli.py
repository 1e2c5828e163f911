"""`pretrain presets`, `pretrain plan`, `pretrain scaling sweep` and `pretrain scaling fit`."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path

from pretrain.errors import PretrainError

SUFFIXES = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def amount(text: str) -> float:
    """A positive number, in plain or scientific notation or with a K/M/B/T suffix: 7e9, 7B, 1.4T."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([KMBGT]?)\s*", text, flags=re.I)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive amount; write e.g. 7e9, 7B or 1.4T")
    return float(match.group(1)) * SUFFIXES.get(match.group(2).upper(), 1.0)


def source_amount(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: write a source's unique tokens as NAME=TOKENS, e.g. finance=20B")
    return name, amount(value)


def add_commands(commands: argparse._SubParsersAction, overrides_help: str) -> None:
    from pretrain.scaling.gpus import ALIASES, DEFAULT_GPU, GPUS
    from pretrain.scaling.laws import DEFAULT_LAW, PUBLISHED_LAWS
    from pretrain.scaling.planner import DEFAULT_MFU

    presets = commands.add_parser(
        "presets", help="list the model presets of configs/presets (or regenerate them)",
        description="The preset family: Llama-style shapes from ~20M to ~70B parameters, each at its compute-optimal "
                    "token count with batch size, learning rate and parallel layout from the scaling laws.")
    presets.add_argument("--write", metavar="DIR", help="(re)write the preset YAML files into DIR, e.g. configs/presets")
    presets.set_defaults(run=run_presets)

    plan = commands.add_parser(
        "plan", help="turn a compute budget into a model size, token count, batch, LR, layout and schedule",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Plan a training run from published scaling laws (or your own fitted one).\n\nBudget: --flops, or "
                    "--gpus x --gpu x --days at --mfu. Or fix the model size (--params) or the token count (--tokens). "
                    "Amounts take K/M/B/T suffixes.\n\nexamples:\n  pretrain plan --gpus 64 --gpu h100 --days 21 "
                    "--write plan.yaml\n  pretrain plan --flops 1e21 --json\n  pretrain plan --params 7B --gpus 32\n"
                    "  pretrain plan --base my.yaml --source finance=20B --source web=2T --gpus 256 --days 30")
    budget = plan.add_argument_group("budget")
    budget.add_argument("--flops", type=amount, help="training compute in FLOPs, e.g. 1e21")
    budget.add_argument("--gpus", type=int, help="number of GPUs (with --days: the budget; alone: the cluster "
                                                 "for memory and days; default 8)")
    budget.add_argument("--gpu", choices=sorted([*GPUS, *ALIASES]), metavar="GPU",
                        help=f"GPU type: {', '.join(GPUS)} (default {DEFAULT_GPU}); "
                             + ", ".join(f"{alias} means {name}" for alias, name in ALIASES.items()))
    budget.add_argument("--days", type=float, help="wall-clock days on --gpus")
    budget.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                        help=f"model FLOPs utilisation assumed (default {DEFAULT_MFU})")
    budget.add_argument("--params", type=amount, help="fix the model size instead, e.g. 7B")
    budget.add_argument("--tokens", type=amount, help="fix the token count instead, e.g. 2T")
    plan.add_argument("--law", default=DEFAULT_LAW,
                      help=f"{' | '.join(PUBLISHED_LAWS)} | a law file from `pretrain scaling fit` (default {DEFAULT_LAW})")
    plan.add_argument("--inference-tokens", type=amount, default=0.0,
                      help="tokens the model will serve over its life: trains a smaller model longer "
                           "(Sardana & Frankle 2023)")
    plan.add_argument("--source", type=source_amount, action="append", default=[], metavar="NAME=TOKENS",
                      help="unique tokens available in a data source (repeatable); warns beyond ~4 epochs")
    plan.add_argument("--price-per-gpu-hour", type=float, help="$ per GPU-hour, for the cost")
    plan.add_argument("--seq-len", type=int, help="sequence length (default: the --base config's, else 2048 "
                                                  "below 1B parameters, 4096 from 1B)")
    plan.add_argument("--vocab-size", type=int, help="vocabulary (default: the --base config's, else 32000)")
    plan.add_argument("--base", metavar="CONFIG", help="config whose data sources and other settings the written "
                                                       "config keeps (source weights come from it)")
    plan.add_argument("--write", metavar="CONFIG", help="write a config that `pretrain train` runs as it is, with "
                                                        "its own out_dir (runs/<CONFIG's name>-<size>, beside the "
                                                        "--base config's out_dir)")
    plan.add_argument("--force", action="store_true", help="replace the --write file if it exists")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON instead of a table")
    plan.set_defaults(run=run_plan)

    scaling = commands.add_parser("scaling", help="fit your own scaling law from cheap runs").add_subparsers(
        dest="scaling_command", metavar="ACTION", required=True)
    sweep = scaling.add_parser(
        "sweep", help="train an IsoFLOP grid of small models on a config's data",
        description="For each --flops budget, train --sizes model sizes (tokens-per-parameter ~3 to ~120) with the "
                    "config's data, batch and optimizer, each evaluated at its last step. Runs one after the other "
                    "here, skipping finished ones, or --commands prints one launch command per run for a cluster. "
                    "Then: pretrain scaling fit SWEEP_DIR.\n\nexample:\n  pretrain scaling sweep my.yaml --flops 1e17 "
                    "3e17 1e18 --commands --launcher 'torchrun --nproc_per_node 8 -m pretrain train'",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_argument("config", help="YAML config with your data mix")
    sweep.add_argument("overrides", nargs="*", help=overrides_help)
    sweep.add_argument("--flops", type=amount, nargs="+", required=True, metavar="C",
                       help="compute budgets, e.g. 1e17 3e17 1e18 (on a CPU: 1e12 3e12)")
    sweep.add_argument("--sizes", type=int, default=5, help="model sizes per budget (default 5)")
    sweep.add_argument("--out-dir", default="runs/sweep", help="where the runs go (default runs/sweep)")
    sweep.add_argument("--commands", action="store_true", help="print the launch commands instead of running")
    sweep.add_argument("--launcher", default="pretrain train",
                       help="command that --commands lines start with (default 'pretrain train'), e.g. "
                            "'python -m pretrain train' or 'torchrun --nproc_per_node 8 -m pretrain train'")
    sweep.set_defaults(run=run_sweep, accepts_overrides=True)

    fit = scaling.add_parser(
        "fit", help="fit L(N, D) = E + A/N^alpha + B/D^beta to finished runs",
        description="Fit the Chinchilla loss law to the final validation losses of runs (approach 3: Huber loss on "
                    "log residuals, L-BFGS from a grid of starts), with bootstrap uncertainty; draw the IsoFLOP curves "
                    "and the fitted frontier; write a law file that `pretrain plan --law` uses.")
    fit.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (or a sweep directory holding them)")
    fit.add_argument("--out", default="law.json", help="law file to write (default law.json)")
    fit.add_argument("--plot", help="PNG of the IsoFLOP curves and frontier (default: next to --out)")
    fit.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for uncertainty (default 100)")
    fit.add_argument("--target-params", type=amount, help="predict the loss of a run of this size ...")
    fit.add_argument("--target-tokens", type=amount, help="... trained on this many tokens")
    fit.set_defaults(run=run_fit)


def run_presets(args: argparse.Namespace, extra: list[str]) -> int:
    from pretrain.scaling.presets import presets_table, write_presets

    print("\n".join(presets_table()))
    if args.write:
        for path in write_presets(args.write):
            print(f"wrote {path}")
    return 0


def run_plan(args: argparse.Namespace, extra: list[str]) -> int:
    from pretrain.config.load import load_config
    from pretrain.config.parse import load_yaml_text
    from pretrain.scaling.plan_output import (
        check_writable,
        format_plan,
        out_dir_note,
        plan_json,
        plan_out_dir,
        write_plan_config,
    )
    from pretrain.scaling.planner import PlanRequest, make_plan

    if args.write:
        check_writable(args.write, args.force)  # before any planning: an existing file costs nothing
    base_yaml, weights, seq_len, vocab = None, {}, args.seq_len, args.vocab_size
    if args.base:
        cfg = load_config(args.base)  # validated: its errors show before planning
        base_yaml = load_yaml_text(Path(args.base).read_text(encoding="utf-8")) or {}
        weights = {s.name: s.weight for s in cfg.data.sources}
        seq_len, vocab = seq_len or cfg.data.seq_len, vocab or cfg.model.vocab_size
        unknown = sorted(set(dict(args.source)) - set(weights))
        if unknown:
            raise PretrainError(f"--source names {unknown} are not sources of {args.base} "
                                f"({', '.join(weights)}); use those names")
    request = PlanRequest(flops=args.flops, gpus=args.gpus, gpu=args.gpu, days=args.days, mfu=args.mfu,
                          params=args.params, tokens=args.tokens, law=args.law, inference_tokens=args.inference_tokens,
                          seq_len=seq_len, vocab_size=vocab or 32000, source_tokens=dict(args.source),
                          source_weights=weights, price_per_gpu_hour=args.price_per_gpu_hour)
    plan = make_plan(request)
    out_dir = plan_out_dir(plan, args.write, base_yaml) if args.write else None
    if args.json:
        print(json.dumps({**plan_json(plan), "out_dir": out_dir}, indent=2))
    else:
        print(format_plan(plan))
    if args.write:
        command = "pretrain plan " + " ".join(shlex.quote(a) for a in sys.argv[2:])
        assert out_dir is not None  # plan_out_dir gave one for --write
        path = write_plan_config(plan, args.write, base_yaml, command, force=args.force, out_dir=out_dir)
        print(f"wrote {path}; {out_dir_note(out_dir, base_yaml)}; check it in seconds on a CPU with the smoke-test "
              "command at its top", file=sys.stderr)
    return 0


def run_sweep(args: argparse.Namespace, extra: list[str]) -> int:
    from pretrain.config.load import load_config
    from pretrain.observability.log_setup import setup_logging
    from pretrain.scaling.sweep import launch_commands, plan_sweep, run_sweep, shared_setup

    overrides = [*args.overrides, *extra]
    cfg = load_config(args.config, overrides)
    runs, notes = plan_sweep(cfg, args.flops, args.sizes, args.out_dir, [*overrides, *shared_setup(cfg, args.out_dir)])
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if args.commands:
        print("\n".join(launch_commands(args.config, runs, args.launcher)))
        print(f"# then: pretrain scaling fit {args.out_dir}")
        return 0
    setup_logging()
    run_sweep(args.config, runs)
    print(f"{len(runs)} runs done in {args.out_dir}; fit them with: pretrain scaling fit {args.out_dir}")
    return 0


def run_fit(args: argparse.Namespace, extra: list[str]) -> int:
    from pretrain.scaling.fit import bootstrap, fit_law, fit_report, plot_isoflops, read_runs
    from pretrain.scaling.laws import save_law

    points = read_runs(args.runs)
    n, d, loss = [p.n_params for p in points], [p.tokens for p in points], [p.loss for p in points]
    law = fit_law(n, d, loss)
    uncertainty = bootstrap(n, d, loss, samples=args.bootstrap, best=law) if args.bootstrap else {}
    print("\n".join(fit_report(points, law, uncertainty)))
    extra_fields = {"uncertainty": uncertainty, "runs": [p.out_dir for p in points]}
    if args.target_params or args.target_tokens:
        if not (args.target_params and args.target_tokens):
            raise PretrainError("give both --target-params and --target-tokens to predict a run's loss")
        predicted = law.loss(args.target_params, args.target_tokens)
        extra_fields["target"] = {"params": args.target_params, "tokens": args.target_tokens, "loss": predicted}
        print(f"predicted loss of {args.target_params:.3g} parameters on {args.target_tokens:.3g} tokens: "
              f"{predicted:.3f}")
    out = save_law(law, args.out, extra_fields)
    plot = plot_isoflops(points, law, args.plot or str(Path(args.out).with_suffix(".png")))
    print(f"wrote {out} (use it with: pretrain plan --law {out} ...) and {plot}")
    return 0
