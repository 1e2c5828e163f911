"""`python -m pretrain.torchrun [torchrun options] -m pretrain train CONFIG [overrides]`: torchrun,
for the launch scripts, with two differences a person at a terminal notices.

- The config is validated once, before any process starts: torchrun would restart a job whose
  config is invalid `--max-restarts` times and bury the error under copies of it and a
  ChildFailedError traceback. A config error exits 2 at once.
- Ctrl-C ends quietly: torchrun passes it on to the ranks (which save a checkpoint and say so,
  once) and then raises SignalException with a traceback; here it exits 128 + the signal.

Everything else, options included, is torchrun's own."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from pretrain.errors import ConfigError

if TYPE_CHECKING:
    import argparse


def world_size(nnodes: str, nproc_per_node: str) -> int | None:
    """Processes of the job when the command line fixes them (not for elastic node ranges or
    nproc_per_node=auto/gpu, which only the nodes know)."""
    low, _, high = nnodes.partition(":")
    if (high and high != low) or not low.isdigit() or not nproc_per_node.isdigit():
        return None
    return int(low) * int(nproc_per_node)


def check_config(args: argparse.Namespace) -> None:
    """Raise ConfigError when the job is `pretrain train` with a config that does not validate."""
    from pretrain.config.load import load_config

    script_args = list(args.training_script_args)
    if not (args.module and args.training_script == "pretrain"
            and script_args[:1] == ["train"] and len(script_args) > 1):
        return
    config, overrides = script_args[1], script_args[2:]
    if config.startswith("-"):
        return  # `train --help` and the like: the ranks answer those
    load_config(config, overrides, world_size(str(args.nnodes), str(args.nproc_per_node)))


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import record
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(argv)
    try:
        check_config(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    try:
        record(run)(args)  # as torchrun's own main: a failed rank's error file is reported
    except SignalException as exc:  # the ranks have already said what they did with it
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
