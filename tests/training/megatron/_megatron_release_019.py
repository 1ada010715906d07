"""megatron-core 0.19.2 where it differs from the installed 0.16.1, for the CPU suite.

A GPU node on Python 3.12 resolves ``[megatron]`` to megatron-core 0.19.x; this CPU suite runs 0.16.1
(the newest release for Python 3.11). Each piece below was read in the 0.19.2 wheel (file and
function named) and is built from 0.16.1's own parts, so it does what 0.19.2 does where the tests
look: the same parameter-group matching rule, the same files on disk.
"""
from __future__ import annotations

import contextlib
import io
import os

import torch
import torch.distributed as dist

PARAM_GROUP_IDENTIFIER_KEYS = ("end_wd", "max_lr", "min_lr", "optimizer", "start_wd", "wd_mult", "lr_mult",
                               "is_expert_parallel", "is_decoupled_lr")
"""``megatron/core/optimizer/optimizer.py``: ``param_group_identifier_keys`` = the sorted fields of
``ParamGroupOverride`` plus the three structural flags (0.16.1 matches on the last four only)."""


def group_identifier(group: dict) -> tuple:
    """0.19.2's ``_identifier_for``: a missing key (or its NeMo ``pre_`` alias) counts as None."""
    return tuple(group[key] if key in group else group.get(f"pre_{key}") for key in PARAM_GROUP_IDENTIFIER_KEYS)


def match_saved_groups(current_groups: list, saved_groups: list) -> list:
    """0.19.2's ``MegatronOptimizer._filter_and_reorder_param_groups``: each current group takes the
    saved group with its identifier, else ValueError (the distributed optimizer's ``load_state_dict``
    indexes a dict with the same identifiers: KeyError)."""
    saved_by_identifier = {group_identifier(group): group for group in saved_groups}
    matched = []
    for group, params in zip(current_groups, [g["params"] for g in saved_groups]):
        key = group_identifier(group)
        if key not in saved_by_identifier:
            raise ValueError(f"Could not find parameter group with key {key} in loaded checkpoint.")
        matched.append({**saved_by_identifier[key], "params": params})
    return matched


def _common_state_key() -> str:
    from megatron.core.dist_checkpointing import ShardedObject

    return ShardedObject("common_state", None, (1,), (0,)).unique_key


def common_state_in_files(checkpoint_dir: str) -> dict:
    """The ``common_state`` object 0.19.2 stores inside the torch_dist files."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    key = _common_state_key()
    holder = {key: io.BytesIO()}
    dcp_load(holder, storage_reader=FileSystemReader(checkpoint_dir), no_dist=True)
    loaded = holder[key]
    if isinstance(loaded, io.BytesIO):
        loaded.seek(0)
        loaded = torch.load(loaded, weights_only=True)
    return loaded[0]


def load_common_state_dict(checkpoint_dir: str) -> dict:
    """0.19.2's ``dist_checkpointing.serialization.load_common_state_dict``: ``common.pt`` when the
    checkpoint has one, else the ``common_state`` object inside the torch_dist files."""
    legacy = os.path.join(checkpoint_dir, "common.pt")
    if os.path.exists(legacy):
        return torch.load(legacy, map_location="cpu")
    return common_state_in_files(checkpoint_dir)


@contextlib.contextmanager
def saving_like_release_019():
    """``dist_checkpointing.save`` / ``load_common_state_dict`` as in 0.19.2 (``serialization.save``):
    the common state is stored as the ShardedObject ``common_state`` (replica_id = rank) inside the
    torch_dist files, and no ``common.pt`` is written."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedObject
    from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonSaveStrategy

    save_0_16 = dist_checkpointing.save
    originals = dist_checkpointing.save, dist_checkpointing.load_common_state_dict, TorchCommonSaveStrategy.save_common

    def save(sharded_state_dict, checkpoint_dir, **kwargs):
        sharded, common = save_preprocess(sharded_state_dict, True)
        sharded["common_state"] = ShardedObject("common_state", common, (1,), (0,), replica_id=dist.get_rank())
        return save_0_16(sharded, checkpoint_dir, **kwargs)  # its own common part is now empty

    dist_checkpointing.save = save
    dist_checkpointing.load_common_state_dict = load_common_state_dict
    TorchCommonSaveStrategy.save_common = lambda self, common_state_dict, checkpoint_dir: None  # no common.pt
    try:
        yield
    finally:
        dist_checkpointing.save, dist_checkpointing.load_common_state_dict, TorchCommonSaveStrategy.save_common = originals
