"""Distributed checkpoints through ``megatron.core.dist_checkpointing``, reshardable on load.

Model weights are saved as ShardedTensors with global shapes (Megatron's ``sharded_state_dict`` of
the GPTModel; the replicated vision tower through ``make_sharded_tensors_for_checkpoint``), so a
checkpoint written at TP=2 loads at TP=1 (or any TP dividing the heads) and vice versa. The
optimizer state goes the same way (:func:`save_optimizer`): on GPU Megatron's optimizer
``sharded_state_dict`` (the distributed optimizer's ``fully_reshardable`` format: Adam moments and
fp32 masters per model parameter), on CPU the AdamW moments as ShardedTensors shaped like their
parameters; both reload at another layout.

Every checkpoint carries ``common.pt`` (:func:`save_distributed`), so one written by megatron-core
0.19 on a Python 3.12 GPU node loads with 0.16.1 on Python 3.11 (``checkpoints_convert/`` included);
a checkpoint without it is refused there with a message naming both releases (:func:`require_loadable`).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

COMMON_FILE = "common.pt"
"""The non-tensor part of a checkpoint as megatron-core < 0.17 writes and reads it."""
FIRST_RELEASE_WITHOUT_COMMON_FILE = "0.17"


def save_distributed(sharded_state_dict: dict, path: str) -> None:
    """``dist_checkpointing.save``, then the ``common.pt`` that megatron-core < 0.17 needs to load it.

    From 0.17 on (0.19.2: ``dist_checkpointing/serialization.py``, ``save``) megatron-core stores the
    common (non-tensor) state as a ``common_state`` object inside the torch_dist files and writes no
    ``common.pt``; 0.16.1, the newest release for Python 3.11, loads that state only from ``common.pt``
    (``TorchCommonLoadStrategy.load_common``), so a GPU run's checkpoint could not be read by
    ``checkpoints_convert/`` on a Python 3.11 machine. Rank 0 writes the file from what the release
    itself reads back (``dist_checkpointing.load_common_state_dict``); 0.19 then loads that same
    content from the file (its path for such checkpoints). With 0.16.1 the save already wrote it."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(sharded_state_dict, path)
    common_file = os.path.join(path, COMMON_FILE)
    if dist.get_rank() == 0 and not os.path.exists(common_file):
        partial = common_file + ".partial"  # a crash mid-write leaves no truncated common.pt behind
        torch.save(dist_checkpointing.load_common_state_dict(path), partial)
        os.replace(partial, common_file)
    dist.barrier()


def require_loadable(path: str) -> None:
    """Refuse, naming both releases, a distributed checkpoint the installed megatron-core cannot
    read: one written by megatron-core >= 0.17 without ``common.pt`` (not by :func:`save_distributed`)
    and read by an older release, which would otherwise fail inside ``dist_checkpointing.load``."""
    from megatron.core import dist_checkpointing
    from megatron.core.package_info import __version__ as installed
    from packaging.version import Version

    if os.path.exists(os.path.join(path, COMMON_FILE)) or not dist_checkpointing.check_is_distributed_checkpoint(path):
        return
    if Version(installed) < Version(FIRST_RELEASE_WITHOUT_COMMON_FILE):
        raise RuntimeError(
            f"checkpoint {path} has no {COMMON_FILE}: it was written by megatron-core >= "
            f"{FIRST_RELEASE_WITHOUT_COMMON_FILE} (0.19.x on Python 3.12 keeps that state inside the torch_dist "
            f"files), and the installed megatron-core {installed} (the release for Python 3.11) reads it only from "
            f"{COMMON_FILE}. Read it with megatron-core 0.19.x on Python >= 3.12, or save it again with "
            f"care_megatron.training.megatron.checkpoint.save_distributed there (it adds {COMMON_FILE}).")


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
    from care_megatron.training.megatron.cpu_compat import prepare_checkpoint_writer

    os.makedirs(path, exist_ok=True)
    prepare_checkpoint_writer()
    if dist.is_initialized():
        dist.barrier()
    save_distributed(chunks_sharded_state_dict(chunks), path)


def load_model(chunks, path: str) -> None:
    """Load weights saved at any TP / PP / VP layout into a model or its chunks (resharding)."""
    from megatron.core import dist_checkpointing

    chunks = chunks if isinstance(chunks, (list, tuple)) else [chunks]
    require_loadable(path)
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
    from care_megatron.training.megatron.cpu_compat import prepare_checkpoint_writer

    os.makedirs(path, exist_ok=True)
    prepare_checkpoint_writer()
    state = {"optimizer": optimizer.sharded_state_dict(chunks_sharded_state_dict(chunks), is_loading=False), **common}
    if dist.is_initialized():
        dist.barrier()
    save_distributed(state, path)


def load_optimizer(optimizer, chunks, path: str) -> dict | None:
    """Load what :func:`save_optimizer` wrote (at any TP / PP / DP layout) into ``optimizer``; returns
    the common values, or None when ``path`` holds no optimizer checkpoint."""
    from megatron.core import dist_checkpointing

    if not dist_checkpointing.check_is_distributed_checkpoint(path):
        return None
    require_loadable(path)
    template = {"optimizer": optimizer.sharded_state_dict(chunks_sharded_state_dict(chunks), is_loading=True)}
    loaded = dist_checkpointing.load(template, path)
    optimizer.load_sharded_state_dict(loaded.pop("optimizer"))
    return loaded
