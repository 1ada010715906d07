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
    rank's GPUs (see ``sglang_engine.rollout_placement``). SGLang sizes its KV pool from the GPU memory
    free at start-up (``mem_cache/kv_cache_configurator.py``): put the trainer to sleep first."""
    name = config.rollout.engine
    if name == "hf":
        return get_rollout_engine("hf", copy.deepcopy(model).eval(), tokenizer, batch_size=config.rollout.batch_size)
    if name == "sglang":
        return _build_sglang(config, model, tokenizer)
    raise ValueError(f"unknown rollout engine {name!r}")


def _hf_model_dir(config: RunConfig, model, tokenizer) -> str:
    """The HF-format directory SGLang starts from: ``train.init_from`` / ``model.name`` when it is one,
    else the initial policy written once to ``<output_dir>/hf_init`` (registry models live in memory)."""
    for candidate in (config.train.init_from, config.model.name):
        if candidate and os.path.isdir(candidate):
            return candidate
    from care_megatron.sft import save_policy
    from care_megatron.runtime import is_main_process

    path = os.path.join(config.train.output_dir, "hf_init")
    if is_main_process():
        save_policy(model, tokenizer, __import__("pathlib").Path(path))
        save_image_processor(config, model, path)
    _barrier()
    return path


def save_image_processor(config: RunConfig, model, path: str) -> None:
    """Write the trainer's image processor (patch sizes of the vision tower, ``data.min_pixels`` /
    ``data.max_pixels``) as ``preprocessor_config.json`` next to the weights: SGLang loads its
    processor from the model directory, and with the trainer's bounds it leaves the trainer-sized
    images the engine sends (``sglang_engine.trainer_sized_image``) as they are."""
    from care_megatron.data.prompting import build_image_processor

    vision = model.config.vision_config
    build_image_processor(config.model.arch, min_pixels=config.data.min_pixels, max_pixels=config.data.max_pixels,
                          patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                          temporal_patch_size=vision.temporal_patch_size).save_pretrained(path)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _build_sglang(config: RunConfig, model, tokenizer):
    """One SGLang engine per rollout-TP group, started by the group's first local rank; every trainer
    rank talks to it through a :class:`GroupedRolloutEngine`."""
    import torch.distributed as dist

    from care_megatron.rollout.grouped import GroupedRolloutEngine, rollout_groups
    from care_megatron.rollout.sglang_engine import rollout_placement

    tp = config.rollout.tensor_parallel_size
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    placement = rollout_placement(local_rank, local_world, tp)
    model_dir = _hf_model_dir(config, model, tokenizer)
    engine = None
    if placement.is_engine_owner:
        engine_config = sglang_engine_config(config, placement, model_dir, model)
        engine = get_rollout_engine("sglang", engine_config, tokenizer=tokenizer)
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed:
        if tp != 1:
            raise ValueError("config field 'rollout.tensor_parallel_size': > 1 needs a torchrun launch (one rank per GPU)")
        return engine
    group, owner = None, None
    for ranks in rollout_groups(dist.get_world_size(), local_world, tp):  # every rank creates every group
        g = dist.new_group(ranks)
        if dist.get_rank() in ranks:
            group, owner = g, ranks[0]
    stops = [None]
    if engine is not None:
        stops = [engine.stop_token_ids]
    dist.broadcast_object_list(stops, src=owner, group=group)
    return GroupedRolloutEngine(engine, group=group, owner_rank=owner, stop_token_ids=stops[0],
                                tp_rank=placement.tp_rank, group_size=tp,
                                sglang_api=engine.api if engine is not None else _sglang_api())


def sglang_engine_config(config: RunConfig, placement, model_dir: str, model):
    """The start-up settings of the engine of ``placement`` (a ``rollout_placement``): its GPUs, its
    own NCCL rendezvous port (one range per engine slot of the node, so the node's engines never
    draw the same one), the trainer's image geometry (patch and merge sizes, pixel bounds), and the
    policy's context length (the trainer cannot score longer sequences either)."""
    from care_megatron.rollout.sglang_engine import SGLangEngineConfig, pick_nccl_port

    hf_config = getattr(model, "config", None)
    vision = getattr(hf_config, "vision_config", None)
    text = hf_config.get_text_config() if hf_config is not None else None
    return SGLangEngineConfig(
        model_path=model_dir, tp_size=config.rollout.tensor_parallel_size, base_gpu_id=placement.base_gpu_id,
        mem_fraction_static=config.rollout.mem_fraction_static, dtype=config.model.dtype,
        random_seed=config.train.seed, weight_bucket_mb=config.rollout.weight_bucket_mb,
        nccl_port=pick_nccl_port(placement.engine_index),
        image_patch_size=int(getattr(vision, "patch_size", 14)),
        image_merge_size=int(getattr(vision, "spatial_merge_size", 2)),
        image_min_pixels=config.data.min_pixels, image_max_pixels=config.data.max_pixels,
        context_length=getattr(text, "max_position_embeddings", None))


def _sglang_api():
    from care_megatron.rollout.sglang_engine import load_sglang_api

    return load_sglang_api()
