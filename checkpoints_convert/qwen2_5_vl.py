"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``).

Decoder: Qwen2 layout (Q/K/V biases, no QK-norm), M-RoPE (rotary, no weights). The 3B model ties
its embeddings, 7B does not (read from ``tie_word_embeddings``). Vision tower: the transformers
``Qwen2_5_VisionTransformerPretrainedModel`` weights (``patch_embed``, ``blocks.*`` with fused
``attn.qkv`` and a gated MLP, ``merger.ln_q`` / ``merger.mlp.{0,2}``), kept under their own names as
``vision_model.<name>`` on PP stage 0 and replicated over TP.

On disk (hub, ``save_pretrained``): ``model.*`` and ``visual.*``; in memory (transformers 5):
``model.language_model.*`` and ``model.visual.*``.
"""
from checkpoints_convert.common import ArchitectureSpec, architecture_converters

SPEC = ArchitectureSpec(
    name="qwen2_5_vl",
    hf_architectures=("Qwen2_5_VLForConditionalGeneration",),
    model_types=("qwen2_5_vl",),
    lm_prefix="model.",
    vision_prefix="visual.",
    qk_layernorm=False,
    always_qkv_bias=True,
    lm_aliases=("model.language_model.",),
    vision_aliases=("model.visual.",),
)


hf_to_megatron, megatron_to_hf = architecture_converters(SPEC)
