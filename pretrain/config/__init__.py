"""The job config: typed sections (schema.py) loaded from YAML and `--section.key=value` overrides
(parse.py, load.py) and validated once before any compute (checks.py). Read-only at runtime."""

from pretrain.config.load import config_reference, config_to_yaml, grad_accum_steps, load_config, save_config
from pretrain.config.schema import (
    PREPARED_MANIFEST,
    SUPPORTED_FILES,
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
    data_file_kind,
)

__all__ = ["PREPARED_MANIFEST", "SUPPORTED_FILES", "CheckpointConfig", "Config", "DataConfig", "EvalConfig",
           "LoggingConfig", "OptimConfig", "ParallelConfig", "SourceConfig", "TokenizerConfig", "TrainConfig",
           "config_reference", "config_to_yaml", "data_file_kind", "grad_accum_steps", "load_config", "save_config"]
