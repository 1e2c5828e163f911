"""The job config: typed sections (schema.py) loaded from YAML and `--section.key=value` overrides
(parse.py, load.py) and validated once before any compute (checks.py). Read-only at runtime.

The sections are imported here; the loader on first use, because the rules of checks.py import
the data package, whose modules import the sections (a circle if this imported the loader)."""

from typing import TYPE_CHECKING, Any

from pretrain.config.schema import (
    PREPARED_MANIFEST,
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    OptimConfig,
    ParallelConfig,
    SourceConfig,
    TokenizerConfig,
    TrainConfig,
)

__all__ = ["PREPARED_MANIFEST", "CheckpointConfig", "Config", "DataConfig", "EvalConfig", "LoggingConfig",
           "OptimConfig", "ParallelConfig", "SourceConfig", "TokenizerConfig", "TrainConfig", "config_reference",
           "config_to_yaml", "grad_accum_steps", "load_config", "save_config"]

if TYPE_CHECKING:
    from pretrain.config.load import config_reference, config_to_yaml, grad_accum_steps, load_config, save_config

_LOADER = {"config_reference", "config_to_yaml", "grad_accum_steps", "load_config", "save_config"}


def __getattr__(name: str) -> Any:
    if name in _LOADER:
        from pretrain.config import load

        return getattr(load, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
