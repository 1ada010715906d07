"""Which model a run's policy starts from; shared by the RL loop, SFT and evaluation."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from care_megatron.config.schema import ConfigError, RunConfig


def policy_model_config(config: RunConfig):
    """The model to start RL from: ``train.init_from`` (an SFT output directory) when set, else ``model.name``."""
    init = config.train.init_from
    if not init:
        return config.model
    if not Path(init).is_dir():
        raise ConfigError("train.init_from", f"{init} does not exist; run care-sft first "
                                             f"(or set train.init_from=null to start from model.name)")
    return dataclasses.replace(config.model, name=str(init), tokenizer=str(init))
