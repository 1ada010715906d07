"""Build the rollout engine a run config asks for (the trainer's one entry point to the engines)."""
from __future__ import annotations

import copy
import os

from care_megatron.config.schema import RunConfig
from care_megatron.rollout.registry import get_rollout_engine


def build_rollout_engine(config: RunConfig, model, tokenizer):
    """``rollout.engine=hf``: an HFRolloutEngine on its own copy of ``model`` (the trainer updates the
    original; weights reach the engine only through ``update_weights``, as on a cluster).
    ``rollout.engine=sglang``: an SGLang engine started from the run's HF-format model directory on this
    rank's GPUs (see ``sglang_engine.rollout_placement``)."""
    name = config.rollout.engine
    if name == "hf":
        return get_rollout_engine("hf", copy.deepcopy(model).eval(), tokenizer, batch_size=config.rollout.batch_size)
    if name == "sglang":
        from care_megatron.rollout.sglang_engine import SGLangEngineConfig, rollout_placement

        placement = rollout_placement(int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
                                      config.rollout.tensor_parallel_size)
        engine_config = SGLangEngineConfig(
            model_path=config.train.init_from or config.model.name, tp_size=config.rollout.tensor_parallel_size,
            base_gpu_id=placement.base_gpu_id, mem_fraction_static=config.rollout.mem_fraction_static,
            dtype=config.model.dtype, random_seed=config.train.seed, weight_bucket_mb=config.rollout.weight_bucket_mb)
        return get_rollout_engine("sglang", engine_config, tokenizer=tokenizer)
    raise ValueError(f"unknown rollout engine {name!r}")
