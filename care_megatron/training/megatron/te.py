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


def fp8_config_fields(fp8: str | None, first_last_bf16: bool, recipe: str = "tensorwise") -> dict:
    """TransformerConfig fields for FP8 through TE, {} when off.

    ``recipe`` is one of ``care_megatron.config.schema.FP8_RECIPES``; ``ParallelConfig`` has already
    refused ``first_last_layers_bf16`` with the delayed recipe, as megatron-core's
    ``TransformerConfig.__post_init__`` would, which is why the default recipe is ``tensorwise``
    (per-tensor current scaling, TE >= 2.2). The amax-history fields only mean something to ``delayed``."""
    if fp8 is None:
        return {}
    require_transformer_engine(f"parallel.fp8={fp8}")
    fields = {"fp8": fp8, "fp8_recipe": recipe, "first_last_layers_bf16": first_last_bf16}
    if first_last_bf16:
        fields.update(num_layers_at_start_in_bf16=1, num_layers_at_end_in_bf16=1)
    if recipe == "delayed":
        fields.update(fp8_margin=0, fp8_amax_history_len=1024, fp8_amax_compute_algo="max")
    return fields


def fp8_token_alignment(recipe: str | None) -> int:
    """Rows every FP8 GEMM's token dimension must divide by (megatron-core's ``get_fp8_align_size``:
    32 for MXFP8's 1x32 blocks, 16 otherwise); 1 without FP8."""
    if recipe is None:
        return 1
    return 32 if recipe == "mxfp8" else 16


def packed_token_multiple(tp_size: int, sequence_parallel: bool, fp8_recipe: str | None) -> int:
    """A packed micro-batch's length must be a multiple of this: under sequence parallelism each TP
    rank holds T / TP rows, and under FP8 the rows each rank's GEMMs see must divide by the FP8
    alignment (``fp8_recipe`` None = no FP8)."""
    return (tp_size if sequence_parallel else 1) * fp8_token_alignment(fp8_recipe)
