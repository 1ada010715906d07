"""Hugging Face <-> Megatron-Core parameter names and layouts, shared by the Megatron backend, the
rollout weight export and the command-line converters in ``checkpoints_convert/``.

:mod:`.architectures` says how each supported architecture names its weights
(:func:`get_mapping`, :func:`mapping_for_config`); :mod:`.rules` turns a spec plus a parallel layout
into per-tensor rules and converts whole state dicts with them.
"""
from care_megatron.models.weight_mapping.architectures import (ARCHITECTURE_NAMES, ARCHITECTURES, ArchitectureSpec,
                                                               get_mapping, mapping_for_config)
from care_megatron.models.weight_mapping.rules import (LanguageModelDims, ParallelLayout, TensorRule,
                                                       architecture_converters, dims_from_config,
                                                       hf_to_megatron_rank_state_dict, hf_to_megatron_state_dicts,
                                                       iter_megatron_to_hf, layer_placement, layers_per_stage,
                                                       megatron_to_hf_state_dict, padded_vocab_size,
                                                       rule_to_hf_tensors, rule_to_megatron_shards, tensor_rules)

__all__ = ["ARCHITECTURES", "ARCHITECTURE_NAMES", "ArchitectureSpec", "LanguageModelDims", "ParallelLayout",
           "TensorRule", "architecture_converters", "dims_from_config", "get_mapping",
           "hf_to_megatron_rank_state_dict", "hf_to_megatron_state_dicts", "iter_megatron_to_hf",
           "layer_placement", "layers_per_stage", "mapping_for_config", "megatron_to_hf_state_dict",
           "padded_vocab_size", "rule_to_hf_tensors", "rule_to_megatron_shards", "tensor_rules"]
