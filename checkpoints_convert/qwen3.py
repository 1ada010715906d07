"""Qwen3 causal LMs (``Qwen3ForCausalLM``): per-head QK RMSNorm, no Q/K/V biases, no vision tower."""
from checkpoints_convert.common import ArchitectureSpec, architecture_converters

SPEC = ArchitectureSpec(
    name="qwen3",
    hf_architectures=("Qwen3ForCausalLM",),
    model_types=("qwen3",),
    lm_prefix="model.",
    vision_prefix=None,
    qk_layernorm=True,
    always_qkv_bias=False,
)


hf_to_megatron, megatron_to_hf = architecture_converters(SPEC)
