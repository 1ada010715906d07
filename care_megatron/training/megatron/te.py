"""Transformer Engine: the only module of the package that imports ``transformer_engine``.

Used for the TE layer spec (fused LayerNorm+Linear, fused attention with THD support) and FP8
(``parallel.fp8``). When TE is missing and a config asks for it, the error names the extra.
"""
from __future__ import annotations

import functools

INSTALL_HINT = "pip install care_megatron[te]  (NVIDIA Transformer Engine, needs CUDA)"


@functools.lru_cache(maxsize=1)
def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # ImportError, or a CUDA-less build raising at import
        return False
    return True


def require_transformer_engine(reason: str) -> None:
    if not transformer_engine_available():
        raise ImportError(f"{reason} needs Transformer Engine, which does not import here: {INSTALL_HINT}")


def te_layer_spec(qk_layernorm: bool):
    """Megatron's TE GPT layer spec (fused norm+linear, TE core attention, THD packing)."""
    require_transformer_engine("parallel.transformer_impl=transformer_engine")
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)


def fp8_config_fields(fp8: str | None, first_last_bf16: bool) -> dict:
    """TransformerConfig fields for FP8 through TE's recipe (delayed scaling), {} when off."""
    if fp8 is None:
        return {}
    require_transformer_engine(f"parallel.fp8={fp8}")
    return {
        "fp8": fp8,
        "fp8_recipe": "delayed",
        "fp8_margin": 0,
        "fp8_amax_history_len": 1024,
        "fp8_amax_compute_algo": "max",
        "first_last_layers_bf16": first_last_bf16,
        "num_layers_at_start_in_bf16": 1,
        "num_layers_at_end_in_bf16": 1,
    }
