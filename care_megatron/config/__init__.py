"""Typed configuration (``schema``) and its YAML / CLI loader (``loader``)."""
from care_megatron.config.loader import config_to_dict, load_config, parse_overrides
from care_megatron.config.schema import (
    AlgorithmConfig,
    ConfigError,
    DataConfig,
    ModelConfig,
    ParallelConfig,
    RolloutConfig,
    RunConfig,
    TrainConfig,
)

__all__ = [
    "AlgorithmConfig", "ConfigError", "DataConfig", "ModelConfig", "ParallelConfig", "RolloutConfig", "RunConfig",
    "TrainConfig", "config_to_dict", "load_config", "parse_overrides",
]
