"""Which Hugging Face architectures the HF <-> Megatron mapping knows, and how each names its weights.

One :class:`ArchitectureSpec` per architecture (prefixes of the language model and the vision tower,
optional tensors); the layout arithmetic that uses them is :mod:`.rules`. This module depends on
nothing else in the package, so the rules, the Megatron backend and the command-line converters
(``checkpoints_convert/``) all look architectures up here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ArchitectureSpec:
    """How one Hugging Face architecture's weights are named and which optional tensors it has."""

    name: str
    """Registry name: ``qwen2``, ``qwen3``, ``qwen2_5_vl`` or ``qwen3_vl``."""
    hf_architectures: tuple[str, ...]
    """``config.architectures`` entries that select this mapping."""
    model_types: tuple[str, ...]
    """``config.model_type`` values that select this mapping (used when ``architectures`` is absent)."""
    lm_prefix: str
    """On-disk prefix of the language-model weights (``model.`` or ``model.language_model.``)."""
    vision_prefix: Optional[str]
    """On-disk prefix of the vision tower (``visual.`` / ``model.visual.``); None for text-only models."""
    qk_layernorm: bool
    """Per-head RMSNorm on queries and keys (Qwen3 family)."""
    always_qkv_bias: bool
    """Q/K/V projections always carry a bias (Qwen2 family) regardless of ``attention_bias``."""
    lm_aliases: tuple[str, ...] = ()
    """Other prefixes under which the language-model weights may appear (in-memory transformers 5 names)."""
    vision_aliases: tuple[str, ...] = ()
    """Other prefixes under which the vision-tower weights may appear."""

    def __post_init__(self) -> None:
        if not self.lm_prefix.endswith("."):
            raise ValueError(f"lm_prefix must end with '.', got {self.lm_prefix!r}")
        if self.vision_prefix is not None and not self.vision_prefix.endswith("."):
            raise ValueError(f"vision_prefix must end with '.', got {self.vision_prefix!r}")

    @property
    def has_vision(self) -> bool:
        return self.vision_prefix is not None

    def canonical_hf_name(self, name: str) -> Optional[str]:
        """Map any accepted spelling of an HF weight name to its on-disk name (None when unknown).

        Vision prefixes are tried first: ``model.visual.`` also starts with the LM prefix ``model.``.
        """
        if name == "lm_head.weight":
            return name
        if self.vision_prefix is not None:
            for prefix in sorted((self.vision_prefix, *self.vision_aliases), key=len, reverse=True):
                if name.startswith(prefix):
                    return self.vision_prefix + name[len(prefix):]
        for prefix in sorted((self.lm_prefix, *self.lm_aliases), key=len, reverse=True):
            if name.startswith(prefix):
                return self.lm_prefix + name[len(prefix):]
        return None


# Qwen2 / Qwen2.5 causal LMs (``Qwen2ForCausalLM``): Q/K/V biases, no QK-norm, no vision tower.
QWEN2 = ArchitectureSpec(
    name="qwen2",
    hf_architectures=("Qwen2ForCausalLM",),
    model_types=("qwen2",),
    lm_prefix="model.",
    vision_prefix=None,
    qk_layernorm=False,
    always_qkv_bias=True,
)

# Qwen3 causal LMs (``Qwen3ForCausalLM``): per-head QK RMSNorm, no Q/K/V biases, no vision tower.
QWEN3 = ArchitectureSpec(
    name="qwen3",
    hf_architectures=("Qwen3ForCausalLM",),
    model_types=("qwen3",),
    lm_prefix="model.",
    vision_prefix=None,
    qk_layernorm=True,
    always_qkv_bias=False,
)

# Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``).
# Decoder: Qwen2 layout (Q/K/V biases, no QK-norm), M-RoPE (rotary, no weights). The 3B model ties
# its embeddings, 7B does not (read from ``tie_word_embeddings``). Vision tower: the transformers
# ``Qwen2_5_VisionTransformerPretrainedModel`` weights (``patch_embed``, ``blocks.*`` with fused
# ``attn.qkv`` and a gated MLP, ``merger.ln_q`` / ``merger.mlp.{0,2}``), kept under their own names as
# ``vision_model.<name>`` on PP stage 0 and replicated over TP.
# On disk (hub, ``save_pretrained``): ``model.*`` and ``visual.*``; in memory (transformers 5):
# ``model.language_model.*`` and ``model.visual.*``.
QWEN2_5_VL = ArchitectureSpec(
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

# Qwen3-VL (``Qwen3VLForConditionalGeneration``).
# Decoder: Qwen3 layout (QK-norm, no biases), interleaved M-RoPE (no weights). Vision tower:
# ``Qwen3VLVisionModel`` weights (``patch_embed.proj`` with bias, learned ``pos_embed``, LayerNorm
# blocks with ``mlp.linear_fc1/fc2``, ``merger.*`` and the DeepStack mergers
# ``deepstack_merger_list.{i}.*``), kept under their own names as ``vision_model.<name>`` on PP stage
# 0 and replicated over TP. The DeepStack features are added to the decoder's hidden states by the
# model code; they carry no decoder-side weights.
# On disk (hub and ``save_pretrained``): ``model.language_model.*``, ``model.visual.*`` and
# ``lm_head.weight``.
QWEN3_VL = ArchitectureSpec(
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

ARCHITECTURES: dict[str, ArchitectureSpec] = {spec.name: spec for spec in (QWEN2, QWEN3, QWEN2_5_VL, QWEN3_VL)}
ARCHITECTURE_NAMES = tuple(ARCHITECTURES)


def get_mapping(name: str) -> ArchitectureSpec:
    """The :class:`ArchitectureSpec` registered under ``name``; ValueError listing the valid names."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; supported: {', '.join(ARCHITECTURE_NAMES)}")
    return ARCHITECTURES[name]


def mapping_for_config(hf_config) -> ArchitectureSpec:
    """Pick the mapping from ``config.architectures`` (or ``model_type``); ValueError when none fits."""
    architectures = tuple(getattr(hf_config, "architectures", None) or ())
    model_type = getattr(hf_config, "model_type", None)
    for spec in ARCHITECTURES.values():
        if any(a in spec.hf_architectures for a in architectures):
            return spec
    for spec in ARCHITECTURES.values():
        if model_type in spec.model_types:
            return spec
    supported = sorted(a for spec in ARCHITECTURES.values() for a in spec.hf_architectures)
    raise ValueError(f"unsupported architecture {list(architectures) or model_type!r}; "
                     f"supported: {', '.join(supported)}")
