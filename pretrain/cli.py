"""`pretrain <command>`: the command-line entry point."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pretrain.errors import PretrainError

log = logging.getLogger("pretrain")

OVERRIDES_HELP = "config overrides, --section.key=value (value parsed as YAML), e.g. --train.max_steps=100"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if extra and not getattr(args, "accepts_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.run(args, extra)
    except PretrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        return report_interruption(exc)


def report_interruption(exc: KeyboardInterrupt) -> int:
    """Say once (rank 0 of a torchrun job) what a Ctrl-C that stopped at once cost."""
    from pretrain.parallel.launch_env import launch_env
    from pretrain.resilience.preemption import INTERRUPTED_EXIT_CODE

    if launch_env().rank == 0:
        print(f"interrupted: {exc}" if str(exc) else "interrupted", file=sys.stderr)
    return INTERRUPTED_EXIT_CODE


def build_parser() -> argparse.ArgumentParser:
    from pretrain.config.load import config_reference

    parser = argparse.ArgumentParser(
        prog="pretrain", description="Pretrain a Llama-style base model on your own data.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pretrain {package_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser(
        "train", help="train a model from a YAML config",
        description="Train a model. Every config key can be overridden as --section.key=value.",
        epilog="config keys (--key=default  (type)  meaning):\n" + config_reference(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", help="YAML config file, e.g. configs/demo.yaml")
    train.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    train.set_defaults(run=run_train, accepts_overrides=True)

    preflight = commands.add_parser(
        "preflight", help="check a job before it spends its allocation (run it as you run train)",
        description="Under the same launcher as `pretrain train` (e.g. torchrun): check that every rank answers, "
                    "time an all-reduce (algorithm and bus bandwidth), measure the device's matmul FLOP/s against "
                    "its datasheet peak, estimate memory per rank for the config and check that out_dir has room "
                    "for two checkpoints. Exits 1 naming the problem and the fix when a check fails. Training runs "
                    "the cheap checks (memory, disk, ranks) itself when it starts.")
    preflight.add_argument("config", help="YAML config file")
    preflight.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    preflight.set_defaults(run=run_preflight, accepts_overrides=True)

    check = commands.add_parser(
        "config", help="validate a config and print it fully resolved",
        description="Load, override and validate a config without training; print the result as YAML.",
    )
    check.add_argument("config", help="YAML config file")
    check.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    check.set_defaults(run=run_config, accepts_overrides=True)

    tok = commands.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tokenizer_command",
                                                                                 metavar="ACTION", required=True)
    tok_train = tok.add_parser(
        "train", help="train a sentencepiece BPE tokenizer on the config's data sources",
        description="Train the tokenizer the config names (tokenizer.path, default out_dir/tokenizer.model) "
                    "on the training split of data.sources, using tokenizer.vocab_size and tokenizer.train_chars.",
    )
    tok_train.add_argument("config", help="YAML config file")
    tok_train.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    tok_train.add_argument("--force", action="store_true", help="retrain even if the tokenizer file exists")
    tok_train.set_defaults(run=run_tokenizer_train, accepts_overrides=True)

    data = commands.add_parser("data", help="data tools").add_subparsers(dest="data_command", metavar="ACTION",
                                                                        required=True)
    prepare = data.add_parser(
        "prepare", help="tokenize the config's sources into memory-mapped token shards",
        description="Tokenize every source of data.sources once into data.prepared_dir/<source name>/ "
                    "(token ids, held-out token ids and a manifest, written atomically). Training with the "
                    "same data.prepared_dir reads windows of the shards at random across each source "
                    "instead of tokenizing (for a source up to data.in_memory_max_bytes: exactly the "
                    "batches its text gives). The tokenizer is trained first if missing.",
    )
    prepare.add_argument("config", help="YAML config file")
    prepare.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    prepare.add_argument("--force", action="store_true", help="rebuild sources whose shards are up to date")
    prepare.add_argument("--workers", type=int, default=None, help="tokenizer processes (default: all cores)")
    prepare.set_defaults(run=run_data_prepare, accepts_overrides=True)

    export = commands.add_parser(
        "export", help="export a checkpoint as a Hugging Face model or a plain torch state dict",
        description="Export the weights of a training checkpoint (any backend, any world size). --format hf writes "
                    "a LlamaForCausalLM directory (config.json, safetensors, generation_config.json, tokenizer) "
                    "that transformers loads with from_pretrained; it is published only after it reproduced the "
                    "checkpoint's logits on a fixed batch (the parity check). --format torch writes model.pt "
                    "(parameter names -> fp32 tensors) with the run's config.yaml and tokenizer.model. Either "
                    "output also works as --checkpoint.init_from.",
    )
    export.add_argument("checkpoint", help="checkpoint directory, e.g. out/checkpoints/step_00001000")
    export.add_argument("--format", choices=("hf", "torch"), required=True, help="output format")
    export.add_argument("--out", required=True, help="output directory (written whole or not at all)")
    export.add_argument("--max-shard-size", default="5GB",
                        help="hf: largest safetensors file, e.g. 5GB, 500MB, 2GiB (default: 5GB)")
    export.add_argument("--no-parity-check", action="store_true",
                        help="hf: skip comparing the export's logits with the checkpoint's (that loads the model "
                             "twice in host memory); only for models too big for it")
    export.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    export.set_defaults(run=run_export)

    evaluate = commands.add_parser(
        "eval", help="evaluate a checkpoint, or every checkpoint of a run as it lands (--watch)",
        description="Validation loss, perplexity and bits per byte (per data source) of a checkpoint of any backend "
                    "and world size, on the same held-out sequences as the training run's in-loop evaluation. "
                    "Records go to OUT_DIR/eval/validation.jsonl keyed by step and tokens seen. With --watch OUT_DIR "
                    "it evaluates every complete checkpoint without a record, then waits for new ones until the "
                    "run's last step (a restarted watcher picks up where it stopped).")
    evaluate.add_argument("checkpoint", nargs="?", help="checkpoint directory, e.g. out/checkpoints/step_00001000")
    evaluate.add_argument("overrides", nargs="*", help=OVERRIDES_HELP + " (e.g. --data.sources=... if the data moved)")
    evaluate.add_argument("--watch", metavar="OUT_DIR", help="a training run's out_dir to follow")
    evaluate.add_argument("--interval", type=float, default=60.0, help="seconds between looks for new checkpoints")
    evaluate.add_argument("--once", action="store_true", help="with --watch: evaluate what is there, then exit")
    evaluate.add_argument("--json", action="store_true",
                          help="print the checkpoint's record as one JSON object (for scripts) instead of a line")
    evaluate.set_defaults(run=run_eval, accepts_overrides=True)

    from pretrain.observability.report import add_command as add_report_command
    from pretrain.scaling.cli import add_commands as add_scaling_commands

    add_scaling_commands(commands, OVERRIDES_HELP)
    add_report_command(commands)
    return parser


def package_version() -> str:
    """The installed package's version (pyproject.toml's, through the package metadata)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pretrain")
    except PackageNotFoundError:
        return "(version unknown: not installed; pip install -e .)"


def _load(args: argparse.Namespace, extra: list[str]):
    from pretrain.config.load import load_config

    overrides = [*args.overrides, *extra]
    cfg = load_config(args.config, overrides)
    if cfg.eval.hooks:  # a hook module may sit beside the config, as a script's modules sit beside it
        from pretrain.evaluation.hook_runner import add_hook_dir

        add_hook_dir(os.path.dirname(os.path.abspath(args.config)))
    return cfg


def run_train(args: argparse.Namespace, extra: list[str]) -> int:
    from pretrain.observability.log_setup import setup_logging

    cfg = _load(args, extra)
    from pretrain.parallel import dist_info_from_env, exit_process
    from pretrain.trainer import Trainer

    dist = dist_info_from_env(cfg.train.device)
    setup_logging(dist.rank, cfg.logging.all_ranks)
    try:
        code = Trainer(cfg, dist).train()
    except KeyboardInterrupt as exc:
        if dist.world_size == 1:
            raise
        code = report_interruption(exc)
    if dist.world_size > 1:
        exit_process(code)  # everything is written; see exit_process for why not a normal exit
    return code


def run_preflight(args: argparse.Namespace, extra: list[str]) -> int:
    from pretrain.hardware import preflight
    from pretrain.observability.log_setup import setup_logging
    from pretrain.parallel import exit_process
    from pretrain.parallel.launch_env import launch_env

    env = launch_env()
    setup_logging(env.rank)
    code = preflight.main(args.config, [*args.overrides, *extra])
    if env.world_size > 1:
        exit_process(code)
    return code


def run_config(args: argparse.Namespace, extra: list[str]) -> int:
    from pretrain.config.load import config_to_yaml

    print(config_to_yaml(_load(args, extra)), end="")
    return 0


def run_tokenizer_train(args: argparse.Namespace, extra: list[str]) -> int:
    from pathlib import Path

    from pretrain.data import load_or_train_tokenizer
    from pretrain.observability.log_setup import setup_logging

    cfg = _load(args, extra)
    setup_logging()
    if args.force:
        Path(cfg.tokenizer_path).unlink(missing_ok=True)
    tokenizer = load_or_train_tokenizer(cfg)
    print(f"{tokenizer.path}: {tokenizer.vocab_size} pieces")
    return 0


def run_data_prepare(args: argparse.Namespace, extra: list[str]) -> int:
    import dataclasses

    from pretrain.data import load_or_train_tokenizer
    from pretrain.data.prepared import prepare
    from pretrain.errors import ConfigError
    from pretrain.observability.log_setup import setup_logging

    cfg = _load(args, extra)
    if not cfg.data.prepared_dir:  # checked before the tokenizer is trained or a source is read
        raise ConfigError(["data.prepared_dir is not set: it is the directory `pretrain data prepare` writes the "
                           "token shards to; set it in the config or pass --data.prepared_dir=DIR, e.g. "
                           "--data.prepared_dir=/data/prepared"], args.config)
    setup_logging()
    # The tokenizer is trained on (and the sources are read from) the raw files, never the shards.
    raw = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prepared_dir=None))
    tokenizer = load_or_train_tokenizer(raw)
    for m in prepare(cfg, tokenizer, force=args.force, workers=args.workers, progress=sys.stderr.isatty()):
        print(f"{m['source']}: {m['train_tokens']:,} training tokens, {m['val_tokens']:,} held-out tokens, "
              f"{m['chunks']} chunks ({m['dtype']})")
    print(f"train on them with --data.prepared_dir={cfg.data.prepared_dir}")
    return 0


def run_export(args: argparse.Namespace, extra: list[str]) -> int:
    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.format == "hf":
        from pretrain.export.hf import export_hf, require_transformers
        from pretrain.export.shards import parse_size

        require_transformers()
        max_shard_bytes = parse_size(args.max_shard_size)
        if args.no_parity_check:
            progress("WARNING: --no-parity-check: the exported model will NOT be compared with the checkpoint; "
                     "nothing shows that it computes the same logits. Run the parity check wherever the model "
                     "fits twice in memory.")
        out = export_hf(args.checkpoint, args.out, max_shard_bytes, parity=not args.no_parity_check,
                        force=args.force, progress=progress)
    else:
        from pretrain.export.torch_format import export_torch

        out = export_torch(args.checkpoint, args.out, force=args.force, progress=progress)
    print(f"exported {args.checkpoint} to {out}")
    return 0


def run_eval(args: argparse.Namespace, extra: list[str]) -> int:
    import json
    from pathlib import Path

    from pretrain.evaluation.validation import append_record, describe_record, evaluate_checkpoint, watch
    from pretrain.observability.log_setup import setup_logging

    overrides = [*args.overrides, *extra]
    if bool(args.checkpoint) == bool(args.watch):
        raise PretrainError("give a checkpoint directory, or --watch OUT_DIR, e.g. pretrain eval --watch runs/demo")
    if args.json and args.watch:
        raise PretrainError("--json prints the record of one checkpoint; --watch appends every record to "
                            "OUT_DIR/eval/validation.jsonl, read that instead")
    setup_logging(stream=sys.stderr if args.json else None)  # with --json, stdout holds the JSON alone
    if args.checkpoint:
        record = evaluate_checkpoint(args.checkpoint, overrides)
        append_record(Path(args.checkpoint).resolve().parent.parent, record)
        print(json.dumps(record) if args.json else describe_record(record))
        return 0
    from pretrain.config.load import load_config
    from pretrain.observability.tracking import wandb_sink

    cfg = load_config(str(Path(args.watch) / "config.yaml"), overrides, world_size=1)
    tracker = wandb_sink(cfg, out_dir=args.watch, prefix="eval/")  # into the training's own run, under eval/
    try:
        records = watch(args.watch, overrides, args.interval, args.once, tracker.write if tracker else None,
                        stop_after_step=cfg.train.max_steps)
    finally:
        if tracker:
            tracker.close()
    print(f"evaluated {len(records)} checkpoint(s); records in {Path(args.watch) / 'eval' / 'validation.jsonl'}")
    return 0


if __name__ == "__main__":  # `python -m pretrain.cli ...`, as `pretrain ...` and `python -m pretrain ...`
    sys.exit(main())
