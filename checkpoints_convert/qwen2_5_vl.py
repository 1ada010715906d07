"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): to / from Megatron for one architecture.

``SPEC`` (weight prefixes, optional tensors) is :data:`care_megatron.models.weight_mapping.architectures.QWEN2_5_VL`;
``hf_to_megatron(hf_state_dict, hf_config, tp_size, tp_rank, padded_vocab=None, **kwargs)`` gives one
rank's Megatron state dict and ``megatron_to_hf(shards, hf_config, **kwargs)`` the HF on-disk names
(see :func:`care_megatron.models.weight_mapping.architecture_converters`).
"""
from care_megatron.models.weight_mapping import architecture_converters
from care_megatron.models.weight_mapping.architectures import QWEN2_5_VL as SPEC

hf_to_megatron, megatron_to_hf = architecture_converters(SPEC)
