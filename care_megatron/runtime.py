"""Process-level helpers shared by the RL loop, SFT and evaluation."""
from __future__ import annotations

import random

import numpy as np
import torch

from care_megatron.config.schema import RunConfig
from care_megatron.models.policy import policy_model_config  # noqa: F401  (moved; trainer / SFT import it from here)


def seed_everything(seed: int, threads: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)


def is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
