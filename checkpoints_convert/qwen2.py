"""Qwen2 / Qwen2.5 causal LMs (``Qwen2ForCausalLM``): Q/K/V biases, no QK-norm, no vision tower."""
from checkpoints_convert.common import ArchitectureSpec, architecture_converters

SPEC = ArchitectureSpec(
    name="qwen2",
    hf_architectures=("Qwen2ForCausalLM",),
    model_types=("qwen2",),
    lm_prefix="model.",
    vision_prefix=None,
    qk_layernorm=False,
    always_qkv_bias=True,
)


hf_to_megatron, megatron_to_hf = architecture_converters(SPEC)
