"""Hugging Face <-> Megatron-Core checkpoint conversion.

One mapping module per architecture (:mod:`.qwen2`, :mod:`.qwen3`, :mod:`.qwen2_5_vl`,
:mod:`.qwen3_vl`), all described by :class:`~checkpoints_convert.common.ArchitectureSpec` and
converted by the shared rules in :mod:`checkpoints_convert.common` (the single source of truth the
rollout weight export also uses).
"""
from __future__ import annotations

import importlib

from checkpoints_convert.common import (ArchitectureSpec, LanguageModelDims, ParallelLayout, TensorRule,
                                        dims_from_config, hf_to_megatron_rank_state_dict, hf_to_megatron_state_dicts,
                                        iter_megatron_to_hf, layer_placement, layers_per_stage,
                                        megatron_to_hf_state_dict, padded_vocab_size, rule_to_hf_tensors,
                                        rule_to_megatron_shards, tensor_rules)

ARCHITECTURE_MODULES = ("qwen2", "qwen3", "qwen2_5_vl", "qwen3_vl")


def get_mapping(name: str) -> ArchitectureSpec:
    """The :class:`ArchitectureSpec` registered under ``name``; ValueError listing the valid names."""
    if name not in ARCHITECTURE_MODULES:
        raise ValueError(f"unknown architecture {name!r}; supported: {', '.join(ARCHITECTURE_MODULES)}")
    return importlib.import_module(f"checkpoints_convert.{name}").SPEC


def mapping_for_config(hf_config) -> ArchitectureSpec:
    """Pick the mapping from ``config.architectures`` (or ``model_type``); ValueError when none fits."""
    architectures = tuple(getattr(hf_config, "architectures", None) or ())
    model_type = getattr(hf_config, "model_type", None)
    specs = [get_mapping(name) for name in ARCHITECTURE_MODULES]
    for spec in specs:
        if any(a in spec.hf_architectures for a in architectures):
            return spec
    for spec in specs:
        if model_type in spec.model_types:
            return spec
    supported = sorted(a for spec in specs for a in spec.hf_architectures)
    raise ValueError(f"unsupported architecture {list(architectures) or model_type!r}; "
                     f"supported: {', '.join(supported)}")


__all__ = ["ARCHITECTURE_MODULES", "ArchitectureSpec", "LanguageModelDims", "ParallelLayout", "TensorRule",
           "dims_from_config", "get_mapping", "hf_to_megatron_rank_state_dict", "hf_to_megatron_state_dicts",
           "iter_megatron_to_hf", "layer_placement", "layers_per_stage", "mapping_for_config",
           "megatron_to_hf_state_dict", "padded_vocab_size", "rule_to_hf_tensors", "rule_to_megatron_shards",
           "tensor_rules"]
