"""Qwen3-VL (``Qwen3VLForConditionalGeneration``).

Decoder: Qwen3 layout (QK-norm, no biases), interleaved M-RoPE (no weights). Vision tower:
``Qwen3VLVisionModel`` weights (``patch_embed.proj`` with bias, learned ``pos_embed``, LayerNorm
blocks with ``mlp.linear_fc1/fc2``, ``merger.*`` and the DeepStack mergers
``deepstack_merger_list.{i}.*``), kept under their own names as ``vision_model.<name>`` on PP stage
0 and replicated over TP. The DeepStack features are added to the decoder's hidden states by the
model code; they carry no decoder-side weights.

On disk (hub and ``save_pretrained``): ``model.language_model.*``, ``model.visual.*`` and
``lm_head.weight``.
"""
from checkpoints_convert.common import ArchitectureSpec

SPEC = ArchitectureSpec(
    name="qwen3_vl",
    hf_architectures=("Qwen3VLForConditionalGeneration",),
    model_types=("qwen3_vl",),
    lm_prefix="model.language_model.",
    vision_prefix="model.visual.",
    qk_layernorm=True,
    always_qkv_bias=False,
    lm_aliases=(),
    vision_aliases=("visual.",),
)


def hf_to_megatron(hf_state_dict, hf_config, tp_size: int, tp_rank: int, padded_vocab=None, **kwargs):
    """One rank's Megatron state dict of this architecture (see
    :func:`checkpoints_convert.common.hf_to_megatron_rank_state_dict` for the names and options)."""
    from checkpoints_convert.common import hf_to_megatron_rank_state_dict

    return hf_to_megatron_rank_state_dict(hf_state_dict, hf_config, tp_size, tp_rank, padded_vocab, spec=SPEC, **kwargs)


def megatron_to_hf(shards, hf_config, **kwargs):
    """``{(pp, tp[, vp]): state_dict}`` of this architecture -> HF on-disk names (see
    :func:`checkpoints_convert.common.megatron_to_hf_state_dict`)."""
    from checkpoints_convert.common import megatron_to_hf_state_dict

    return megatron_to_hf_state_dict(shards, hf_config, spec=SPEC, **kwargs)
