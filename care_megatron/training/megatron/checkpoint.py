"""Distributed checkpoints through ``megatron.core.dist_checkpointing``, reshardable on load.

Model weights are saved as ShardedTensors with global shapes (Megatron's ``sharded_state_dict`` of
the GPTModel; the replicated vision tower through ``make_sharded_tensors_for_checkpoint``), so a
checkpoint written at TP=2 loads at TP=1 (or any TP dividing the heads) and vice versa. The
optimizer state goes the same way (:func:`save_optimizer`): on GPU Megatron's optimizer
``sharded_state_dict`` (the distributed optimizer's ``fully_reshardable`` format: Adam moments and
fp32 masters per model parameter), on CPU the AdamW moments as ShardedTensors shaped like their
parameters; both reload at another layout.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def model_sharded_state_dict(model) -> dict:
    """ShardedStateDict of :class:`QwenVLMegatronModel` (language model + replicated vision)."""
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    sharded = model.language_model.sharded_state_dict(prefix="language_model.")
    if model.vision is not None:
        vision_state = model.vision.state_dict(prefix="", keep_vars=True)
        sharded.update(make_sharded_tensors_for_checkpoint(vision_state, "vision."))
    return sharded


def chunks_sharded_state_dict(chunks) -> dict:
    """One ShardedStateDict over this rank's model chunks (virtual pipeline stages).

    The storage keys are the chunks' *global* names (Megatron offsets each chunk's layers by its
    stage), so the files do not depend on the chunking; the dict keys get a ``chunk{v}.`` prefix
    only to keep two chunks' local names apart."""
    chunks = chunks if isinstance(chunks, (list, tuple)) else [chunks]
    if len(chunks) == 1:
        return model_sharded_state_dict(chunks[0])
    return {f"chunk{v}.{k}": t for v, chunk in enumerate(chunks) for k, t in model_sharded_state_dict(chunk).items()}


def save_model(chunks, path: str) -> None:
    """Save a model (or its list of virtual-pipeline chunks) as a distributed checkpoint."""
    from megatron.core import dist_checkpointing

    from care_megatron.training.megatron.cpu_compat import prepare_checkpoint_writer

    os.makedirs(path, exist_ok=True)
    prepare_checkpoint_writer()
    if dist.is_initialized():
        dist.barrier()
    dist_checkpointing.save(chunks_sharded_state_dict(chunks), path)


def load_model(chunks, path: str) -> None:
    """Load weights saved at any TP / PP / VP layout into a model or its chunks (resharding)."""
    from megatron.core import dist_checkpointing

    chunks = chunks if isinstance(chunks, (list, tuple)) else [chunks]
    loaded = dist_checkpointing.load(chunks_sharded_state_dict(chunks), path)
    for v, chunk in enumerate(chunks):
        prefix = f"chunk{v}." if len(chunks) > 1 else ""
        state = {k[len(prefix):]: t for k, t in loaded.items() if k.startswith(prefix)}
        missing, _ = chunk.load_state_dict(state, strict=False)
        real_missing = [k for k in missing if not k.endswith("_extra_state")]
        if real_missing:
            raise RuntimeError(f"checkpoint {path} lacks {len(real_missing)} parameters, e.g. {real_missing[:3]}")


def save_optimizer(optimizer, chunks, path: str, common: dict) -> None:
    """Save the optimizer's ``sharded_state_dict`` (laid out like the model's parameters, so it
    reshards on load) and the plain values in ``common`` as one distributed checkpoint."""
    from megatron.core import dist_checkpointing

    from care_megatron.training.megatron.cpu_compat import prepare_checkpoint_writer

    os.makedirs(path, exist_ok=True)
    prepare_checkpoint_writer()
    state = {"optimizer": optimizer.sharded_state_dict(chunks_sharded_state_dict(chunks), is_loading=False), **common}
    if dist.is_initialized():
        dist.barrier()
    dist_checkpointing.save(state, path)


def load_optimizer(optimizer, chunks, path: str) -> dict | None:
    """Load what :func:`save_optimizer` wrote (at any TP / PP / DP layout) into ``optimizer``; returns
    the common values, or None when ``path`` holds no optimizer checkpoint."""
    from megatron.core import dist_checkpointing

    if not dist_checkpointing.check_is_distributed_checkpoint(path):
        return None
    template = {"optimizer": optimizer.sharded_state_dict(chunks_sharded_state_dict(chunks), is_loading=True)}
    loaded = dist_checkpointing.load(template, path)
    optimizer.load_sharded_state_dict(loaded.pop("optimizer"))
    return loaded
