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
from checkpoints_convert.common import ArchitectureSpec, architecture_converters

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


hf_to_megatron, megatron_to_hf = architecture_converters(SPEC)
