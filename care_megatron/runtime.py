"""Process-level helpers shared by the RL loop, SFT and evaluation."""
from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import numpy as np
import torch

from care_megatron.config.schema import RunConfig


def seed_everything(seed: int, threads: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)


def is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def policy_model_config(config: RunConfig):
    """The model to start RL from: ``train.init_from`` (an SFT output directory) when set, else ``model.name``."""
    init = config.train.init_from
    if not init:
        return config.model
    if not Path(init).is_dir():
        raise FileNotFoundError(f"config field 'train.init_from': {init} does not exist; run care-sft first "
                                f"(or set train.init_from=null to start from model.name)")
    return dataclasses.replace(config.model, name=str(init), tokenizer=str(init))
