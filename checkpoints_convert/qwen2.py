"""Qwen2 / Qwen2.5 causal LMs (``Qwen2ForCausalLM``): Q/K/V biases, no QK-norm, no vision tower."""
from checkpoints_convert.common import ArchitectureSpec

SPEC = ArchitectureSpec(
    name="qwen2",
    hf_architectures=("Qwen2ForCausalLM",),
    model_types=("qwen2",),
    lm_prefix="model.",
    vision_prefix=None,
    qk_layernorm=False,
    always_qkv_bias=True,
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
