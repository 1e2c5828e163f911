"""An IsoFLOP sweep (Hoffmann et al. 2022, approach 2): for each compute budget, several model
sizes trained on exactly the tokens that budget buys, on the user's own data mix; `pretrain
scaling fit` then fits L(N, D) to their final validation losses.

Sizes per budget span tokens-per-parameter ratios from ~3 to ~120 (the optimum, ~20, in the
middle on a log scale), taken from the shape family (scaling/shapes.py) at the config's
vocabulary; where the family is too coarse for that (tiny models, whose embedding dominates),
neighbouring widths fill up the requested number of sizes. Every run keeps the config's data, batch and optimizer settings; only the shape and
the step count change, and it evaluates once, at its last step."""

from __future__ import annotations

import json
import logging
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pretrain.config.load import load_config
from pretrain.config.schema import Config
from pretrain.errors import PretrainError
from pretrain.models import ModelArgs, count_params, flops_per_token
from pretrain.scaling.shapes import shape_for_params, shape_for_width, widths

log = logging.getLogger("pretrain")

TOKENS_PER_PARAM_RANGE = (20 / 6, 20 * 6)
MIN_STEPS = 10  # a run shorter than this says little about its size


@dataclass(frozen=True)
class SweepRun:
    budget: float
    shape: ModelArgs
    steps: int
    out_dir: str
    overrides: tuple[str, ...]

    @property
    def params(self) -> int:
        return count_params(self.shape)


def plan_sweep(cfg: Config, budgets: list[float], sizes: int, sweep_dir: str, shared_overrides: Sequence[str] = ()
               ) -> tuple[list[SweepRun], list[str]]:
    """The runs of the grid (and notes on budgets or sizes left out): `sizes` shapes per budget.
    Each run's overrides start with `shared_overrides` (the sweep's own overrides of the config)."""
    if sizes < 2:
        raise PretrainError(f"--sizes {sizes}: an IsoFLOP curve needs at least 2 model sizes per budget (5+ is better)")
    if not isinstance(cfg.model, ModelArgs):
        raise PretrainError(f"the sweep trains the Llama shapes of scaling/shapes.py, but the config has model.name="
                            f"{cfg.model.name}; sweep a config with model.name: llama")
    vocab, seq_len, batch = cfg.model.vocab_size, cfg.data.seq_len, cfg.train.global_batch_tokens
    assert batch is not None  # validate() derives it
    runs, notes = [], []
    low_ratio, high_ratio = TOKENS_PER_PARAM_RANGE
    for budget in sorted(budgets):
        smallest, largest = math.sqrt(budget / (6 * high_ratio)), math.sqrt(budget / (6 * low_ratio))
        targets = [smallest * (largest / smallest) ** (i / (sizes - 1)) for i in range(sizes)]
        shapes: dict[int, ModelArgs] = {}
        for target in targets:
            shape = shape_for_params(target, vocab, seq_len)
            shapes.setdefault(shape.d_model, shape)
        while len(shapes) < sizes:  # the family is coarse among tiny models: add neighbouring widths
            wider = [d for d in widths() if d > max(shapes)][:1]
            narrower = [d for d in widths() if d < min(shapes)][-1:]
            if not wider + narrower:
                break
            for d in (wider + narrower)[:sizes - len(shapes)]:
                shapes[d] = shape_for_width(d, vocab, seq_len)
        for shape in sorted(shapes.values(), key=lambda s: s.d_model):
            steps = round(budget / (flops_per_token(shape, seq_len) * batch))
            if steps < MIN_STEPS:
                notes.append(f"budget {budget:.3g}: {count_params(shape):,} parameters would train only {steps} steps "
                             f"of {batch} tokens; left out (raise the budget or lower train.global_batch_tokens)")
                continue
            out_dir = str(Path(sweep_dir) / f"c{budget:.2e}_n{count_params(shape)}")
            overrides = [*shared_overrides, f"--out_dir={out_dir}", f"--train.max_steps={steps}",
                         f"--optim.warmup_steps={min(cfg.optim.warmup_steps, steps // 5)}",
                         f"--eval.every={steps}", "--checkpoint.every=0", "--eval.sample_tokens=0",
                         *(f"--model.{name}={getattr(shape, name)}" for name in
                           ("d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "tie_embeddings"))]
            runs.append(SweepRun(budget, shape, steps, out_dir, tuple(overrides)))
        if len(shapes) < 2:
            notes.append(f"budget {budget:.3g} has only {len(shapes)} distinct model size: the shape family has no "
                         "smaller models at this vocabulary; raise the budget")
    if not runs:
        raise PretrainError("no run of the sweep is long enough: " + "; ".join(notes))
    return runs, notes


def shared_setup(cfg: Config, sweep_dir: str) -> list[str]:
    """Overrides that let every run share one tokenizer (and the tokenized data) instead of each
    training its own: the config's tokenizer.path, or one in the sweep directory."""
    if cfg.tokenizer.path:
        return []
    return [f"--tokenizer.path={Path(sweep_dir) / 'tokenizer.model'}"]


def finished(run: SweepRun) -> bool:
    """Whether the run's metrics already hold its final validation loss (a rerun skips it)."""
    path = Path(run.out_dir) / "metrics.jsonl"
    if not path.is_file():
        return False
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("step") == run.steps and "val_loss" in record:
            return True
    return False


def launch_commands(config_path: str, runs: list[SweepRun], launcher: str = "pretrain train") -> list[str]:
    return [f"{launcher} {shlex.quote(config_path)} " + " ".join(shlex.quote(o) for o in run.overrides)
            for run in runs]


def run_sweep(config_path: str, runs: list[SweepRun]) -> list[str]:
    """Train the runs one after the other in this process, skipping finished ones; returns their
    output directories."""
    from pretrain.data import load_or_train_tokenizer
    from pretrain.trainer import Trainer

    first = load_config(config_path, list(runs[0].overrides))
    load_or_train_tokenizer(first)  # once, before the runs share it
    for i, run in enumerate(runs, 1):
        label = (f"[{i}/{len(runs)}] budget {run.budget:.3g} FLOPs, {run.params:,} parameters, {run.steps} steps "
                 f"-> {run.out_dir}")
        if finished(run):
            log.info("%s: already done", label)
            continue
        log.info("%s", label)
        code = Trainer(load_config(config_path, list(run.overrides))).train()
        if code:
            raise PretrainError(f"sweep run {run.out_dir} stopped with exit code {code}; rerun the sweep to go on")
    return [run.out_dir for run in runs]
