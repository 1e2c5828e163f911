"""Loading the job config: YAML, then `--section.key=value` overrides, then type checks and the
rules of pretrain/config/checks.py, every problem reported at once before any compute."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import yaml

from pretrain.config.checks import validate
from pretrain.config.parse import apply_override, build, load_yaml_text, parse_overrides, reference, to_dict
from pretrain.config.schema import Config
from pretrain.errors import ConfigError, PretrainError
from pretrain.parallel.launch_env import launch_env


def load_config(path: str | None, overrides: Sequence[str] = (), world_size: int | None = None) -> Config:
    """Read a YAML file, apply `--section.key=value` overrides, type-check and validate.

    Raises ConfigError listing every problem found."""
    source = path or "the command line"
    data = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError([f"config file {path!r} is not UTF-8 text (byte {exc.start}: {exc.reason}); save "
                               "it as UTF-8"]) from None
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
            raise ConfigError([f"cannot read config file {path!r}: {getattr(exc, 'strerror', None) or exc}"]) from None
        try:
            data = load_yaml_text(text)
        except yaml.YAMLError as exc:
            raise ConfigError([f"{path} is not valid YAML: {exc}"]) from None
        if data is None:  # an empty file: every default
            data = {}
    pairs, problems = parse_overrides(list(overrides))
    if isinstance(data, dict):
        for key, value in pairs:
            problem = apply_override(data, key, value)
            if problem:
                problems.append(problem)
    config = build(Config, data, "", problems)
    if problems:
        raise ConfigError(problems, source)
    if world_size is None:
        try:
            world_size = launch_env().world_size
        except PretrainError as exc:  # torchrun's variables, malformed
            raise ConfigError([str(exc)], source) from None
    return validate(config, world_size, source)


def grad_accum_steps(cfg: Config, dp_size: int) -> int:
    """Micro-batches per data-parallel rank per optimizer step, for `dp_size` such ranks
    (ParallelDims.dp_size; exact: validate() checked divisibility)."""
    per_micro_step = cfg.train.micro_batch_size * cfg.data.seq_len * dp_size
    assert cfg.train.global_batch_tokens is not None  # filled in by validate()
    return cfg.train.global_batch_tokens // per_micro_step


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)


def save_config(cfg: Config, out_dir: str) -> Path:
    """Write the resolved config to out_dir/config.yaml atomically (never half-written)."""
    from pretrain.resilience.atomic_dir import write_file

    return write_file(Path(out_dir) / "config.yaml", config_to_yaml(cfg))


def config_reference() -> str:
    """Every key with its type, default and help text, for `pretrain train --help`."""
    return reference(Config)
