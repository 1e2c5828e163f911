"""Eval hooks: user functions called with every newly completed checkpoint.

A hook is `package.module:function` from `eval.hooks`, called on rank 0 as
`function(checkpoint, step, config, **eval.hook_options[spec])` with the checkpoint directory,
its step and the run's Config; a dict of numbers it returns is logged like any other metric
(under `eval/<function>/<key>`) and appended to out_dir/eval/<function>.jsonl. With
`eval.hooks_async` the hooks run one at a time in a separate process and training does not wait;
their results are logged when they arrive. A hook that raises is logged with its traceback and
training goes on. Hooks are imported only from what the config names: a module installed or on
PYTHONPATH, or a file beside the config file (`pretrain train` puts the config's directory on the
search path, after everything else, as Python does for a script's directory)."""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import sys
import traceback
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Callable

from pretrain.config.schema import Config
from pretrain.errors import ConfigError
from pretrain.evaluation.validation import append_record
from pretrain.observability.tracking import flatten
from pretrain.resilience.preemption import ignore_interrupts

log = logging.getLogger("pretrain")


def add_hook_dir(directory: str) -> None:
    """Let hooks be imported from modules in `directory` (the config file's). Appended to
    sys.path, so a file there never shadows an installed module; a hook process spawned by
    eval.hooks_async inherits sys.path."""
    if directory not in sys.path:
        sys.path.append(directory)


def resolve_hook(spec: str) -> Callable:
    """The function `package.module:function` names; a ConfigError with the fix if it is not there."""
    module_name, _, function_name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError([f"eval.hooks entry {spec!r} cannot be imported ({exc}); check that the module is "
                           "beside the config file, installed or on PYTHONPATH, and the function name"]) from None
    if not callable(function):
        raise ConfigError([f"eval.hooks entry {spec!r} is not a function"])
    return function


def run_hook(spec: str, checkpoint: str, step: int, config: Config, options: dict) -> tuple[dict | None, str | None]:
    """(metrics, None) or (None, traceback): never raises, so one bad hook cannot stop training."""
    try:
        result = resolve_hook(spec)(checkpoint, step, config, **options)
    except Exception:
        return None, traceback.format_exc()
    if result is not None and not isinstance(result, dict):
        return None, f"{spec} returned {type(result).__name__}, not a dict of metrics"
    return result or {}, None


class HookRunner:
    """Calls the configured hooks for each published checkpoint and logs what they return.
    Built on every rank, so that a hook that cannot be imported stops all of them at once; only
    the `enabled` one (rank 0) calls hooks."""

    def __init__(self, cfg: Config, log_metrics: Callable[[dict], None], enabled: bool = True):
        self.cfg, self.log_metrics = cfg, log_metrics
        for spec in cfg.eval.hooks:
            resolve_hook(spec)  # a typo fails now, before any compute
        self.specs = list(cfg.eval.hooks) if enabled else []
        self.pending: list[tuple[str, int, Future]] = []
        self.pool = None
        if self.specs and cfg.eval.hooks_async:
            # the terminal's Ctrl-C reaches this process too; the trainer decides what it means
            self.pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=ignore_interrupts)

    def checkpoint_ready(self, checkpoint: Path, step: int) -> None:
        for spec in self.specs:
            args = (spec, str(checkpoint), step, self.cfg, dict(self.cfg.eval.hook_options.get(spec, {})))
            if self.pool is None:
                self._report(spec, step, *run_hook(*args))
            else:
                self.pending.append((spec, step, self.pool.submit(run_hook, *args)))

    def poll(self, wait: bool = False) -> None:
        """Log the results of background hooks that finished (all of them, with `wait`)."""
        still = []
        for spec, step, future in self.pending:
            if wait or future.done():
                try:
                    self._report(spec, step, *future.result())
                except Exception:  # the worker process itself died
                    self._report(spec, step, None, traceback.format_exc())
            else:
                still.append((spec, step, future))
        self.pending = still

    def close(self) -> None:
        self.poll(wait=True)
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def _report(self, spec: str, step: int, metrics: dict | None, error: str | None) -> None:
        name = spec.rpartition(":")[2]
        if error is not None:
            log.error("eval hook %s failed on the checkpoint of step %d (training goes on):\n%s", spec, step, error)
            append_record(Path(self.cfg.out_dir), {"step": step, "hook": spec, "error": error}, f"{name}.jsonl")
            return
        assert metrics is not None  # what the hook returned, as it did not fail
        append_record(Path(self.cfg.out_dir), {"step": step, **metrics}, f"{name}.jsonl")
        numbers = flatten(metrics, f"eval/{name}/")
        if numbers:
            self.log_metrics({"step": step, **numbers})
