"""Build the Megatron-Core Qwen-VL model from a Hugging Face config: config, layer spec, modules.

* :func:`transformer_config_from_hf` -> ``megatron.core.transformer.TransformerConfig`` for the
  text decoder (RMSNorm, SwiGLU, GQA, QKV bias for Qwen2.5 / QK-norm for Qwen3, M-RoPE sections).
* :func:`build_layer_spec` -> the ``ModuleSpec`` of one decoder layer: Transformer Engine's when
  it imports (or is demanded), otherwise Megatron's local spec with its core attention swapped for
  :class:`care_megatron.training.megatron.attention.TorchCoreAttention` (SDPA / varlen / flex).
* :class:`QwenVLMegatronModel`: ``language_model`` (a ``GPTModel`` with ``position_embedding_type
  ="mrope"``) plus ``vision`` (:class:`VisionTower`, first pipeline stage only).

Parameter names of the local spec (the names the HF<->Megatron mapping targets), per TP rank,
under ``language_model.``::

    embedding.word_embeddings.weight                      [V_pad/tp, H]   rows sharded
    decoder.layers.{i}.input_layernorm.weight             [H]
    decoder.layers.{i}.self_attention.linear_qkv.weight   [(Hq+2Hkv)/tp * d, H]  per-query-group
        interleaved: for each KV group g of this rank: q heads of g, then k_g, then v_g
    decoder.layers.{i}.self_attention.linear_qkv.bias     [(Hq+2Hkv)/tp * d]  (Qwen2.5)
    decoder.layers.{i}.self_attention.q_layernorm.weight  [d]  (Qwen3; k_layernorm likewise)
    decoder.layers.{i}.self_attention.linear_proj.weight  [H, Hq/tp * d]   columns sharded
    decoder.layers.{i}.pre_mlp_layernorm.weight           [H]
    decoder.layers.{i}.mlp.linear_fc1.weight              [2F/tp, H]  this rank's [gate; up] shards
    decoder.layers.{i}.mlp.linear_fc2.weight              [H, F/tp]
    decoder.final_layernorm.weight                        [H]
    output_layer.weight                                   [V_pad/tp, H]   (absent when tied)

The TE spec fuses the two norms: ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``.
The vision tower's parameters are ``vision.vision_model.<name under HF model.visual.>``, replicated.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from care_megatron.config.schema import ParallelConfig
from care_megatron.training.megatron import te as te_module
from care_megatron.training.megatron.parallel_state import ModelShape, padded_vocab_size, validate_parallel_layout

log = logging.getLogger(__name__)


@dataclass
class TextModelFacts:
    """What the decoder needs from an HF Qwen-VL config, in one place."""

    arch: str
    """``qwen2_5_vl`` or ``qwen3_vl``."""
    num_layers: int
    """Decoder layers."""
    hidden_size: int
    """Model width H."""
    ffn_hidden_size: int
    """SwiGLU inner width F."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int
    """KV heads."""
    head_dim: int
    """Per-head width d."""
    vocab_size: int
    """Unpadded vocabulary."""
    rms_norm_eps: float
    """RMSNorm epsilon."""
    rope_theta: float
    """RoPE base."""
    mrope_section: list[int]
    """M-RoPE split of the d/2 rotary frequencies into (t, h, w)."""
    mrope_interleaved: bool
    """Qwen3-VL interleaves t/h/w frequencies instead of contiguous sections."""
    qkv_bias: bool
    """Qwen2.5: biases on q/k/v projections."""
    qk_layernorm: bool
    """Qwen3: RMSNorm on per-head q and k."""
    tie_word_embeddings: bool
    """Output layer shares the embedding matrix."""
    image_token_id: int
    """``<|image_pad|>`` id."""
    max_position_embeddings: int
    """Longest position."""

    def __post_init__(self) -> None:
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(f"TextModelFacts.mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}")

    def shape(self) -> ModelShape:
        return ModelShape(self.num_layers, self.num_attention_heads, self.num_query_groups, self.hidden_size, self.vocab_size)


def text_facts_from_hf(hf_config, arch: str = "qwen2_5_vl") -> TextModelFacts:
    """Read a transformers Qwen2.5-VL / Qwen3-VL config (v4 or v5 rope layout)."""
    text = getattr(hf_config, "text_config", hf_config)
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    mrope_section = list(rope.get("mrope_section", []))
    theta = rope.get("rope_theta", getattr(text, "rope_theta", 10000.0))
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    tie = getattr(hf_config, "tie_word_embeddings", None)
    if tie is None:
        tie = getattr(text, "tie_word_embeddings", False)
    return TextModelFacts(
        arch=arch,
        num_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        ffn_hidden_size=text.intermediate_size,
        num_attention_heads=text.num_attention_heads,
        num_query_groups=text.num_key_value_heads,
        head_dim=head_dim,
        vocab_size=text.vocab_size,
        rms_norm_eps=text.rms_norm_eps,
        rope_theta=float(theta),
        mrope_section=mrope_section,
        mrope_interleaved=bool(rope.get("mrope_interleaved", arch == "qwen3_vl")),
        qkv_bias=arch == "qwen2_5_vl",
        qk_layernorm=arch == "qwen3_vl",
        tie_word_embeddings=bool(tie),
        image_token_id=int(getattr(hf_config, "image_token_id", -1)),
        max_position_embeddings=getattr(text, "max_position_embeddings", 32768),
    )


def resolve_transformer_impl(parallel: ParallelConfig) -> str:
    """``auto`` -> ``transformer_engine`` when TE imports, else ``local``; logged."""
    impl = parallel.transformer_impl
    if impl == "auto":
        impl = "transformer_engine" if te_module.transformer_engine_available() else "local"
    if impl == "transformer_engine":
        te_module.require_transformer_engine("parallel.transformer_impl=transformer_engine")
    log.info("megatron layer implementation: %s", impl)
    return impl


def transformer_config_from_hf(facts: TextModelFacts, parallel: ParallelConfig, dtype: torch.dtype,
                               use_cpu_initialization: bool, impl: str):
    """Megatron ``TransformerConfig`` of the text decoder."""
    from megatron.core.transformer import TransformerConfig

    recompute = {}
    if parallel.recompute == "full":
        recompute = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    elif parallel.recompute == "selective":
        recompute = {"recompute_granularity": "selective"}
    if parallel.fp8 and impl != "transformer_engine":  # auto resolved to local: FP8 would be silently off
        te_module.require_transformer_engine(f"parallel.fp8={parallel.fp8}")
        raise ValueError("config field 'parallel.fp8': FP8 needs transformer_impl=transformer_engine")
    fp8 = te_module.fp8_config_fields(parallel.fp8, parallel.fp8_first_last_bf16, parallel.fp8_recipe)
    return TransformerConfig(
        num_layers=facts.num_layers,
        hidden_size=facts.hidden_size,
        ffn_hidden_size=facts.ffn_hidden_size,
        num_attention_heads=facts.num_attention_heads,
        num_query_groups=facts.num_query_groups,
        kv_channels=facts.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=facts.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=facts.qkv_bias,
        qk_layernorm=facts.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        mrope_section=list(facts.mrope_section),
        rotary_interleaved=False,
        apply_rope_fusion=False,  # fused THD RoPE restarts positions per sequence: wrong for M-RoPE
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        context_parallel_size=parallel.context_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=use_cpu_initialization,
        **recompute,
        **fp8,
    )


class LocalRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` with Megatron's norm constructor, in ``config.params_dtype``, usable under
    sequence parallelism: every norm of the local spec.

    Megatron's ``WrappedTorchNorm`` (0.16.1 and 0.19.2, ``transformer/torch_norm.py``) builds
    ``torch.nn.RMSNorm`` without a dtype, so its weight stays fp32 beside bf16 linears (Megatron-LM
    casts the whole model afterwards in ``Float16Module``; nothing does here), and it refuses sequence
    parallelism, where each TP rank sees only its slice of the tokens and the weight's gradient is
    partial. This norm is built in the parameters' dtype and marks its weight ``sequence_parallel``
    under SP, so the gradient is summed over TP (``finalize_model_grads`` on GPU, the CPU path's
    explicit all-reduce).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        setattr(self.weight, "sequence_parallel", bool(config.sequence_parallel))


def build_layer_spec(impl: str, qk_layernorm: bool, config=None, vp_stage: int | None = None):
    """Layer spec for ``impl`` (``transformer_engine`` | ``local``).

    The local spec is Megatron's with its core attention swapped for :class:`TorchCoreAttention`,
    returned as a whole-block spec whose norms (input, pre-MLP, QK, final) are :class:`LocalRMSNorm`:
    given a bare layer spec, megatron-core picks the final norm at import time
    (``transformer_block.LayerNormImpl``: TE's norm, else apex's ``FusedLayerNorm``, which asserts
    LayerNorm and so fails on Qwen's RMSNorm when apex is installed without TE), and its own torch
    norm would stay fp32 in a bf16 model.
    """
    if impl == "transformer_engine":
        return te_module.te_layer_spec(qk_layernorm)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from care_megatron.training.megatron.attention import TorchCoreAttention

    spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = TorchCoreAttention
    if config is None:
        return spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    spec.submodules.input_layernorm = LocalRMSNorm
    spec.submodules.pre_mlp_layernorm = LocalRMSNorm
    if qk_layernorm:
        spec.submodules.self_attention.submodules.q_layernorm = LocalRMSNorm
        spec.submodules.self_attention.submodules.k_layernorm = LocalRMSNorm
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config, vp_stage=vp_stage),
                                      layer_norm=LocalRMSNorm)


class QwenVLMegatronModel(nn.Module):
    """``language_model`` (GPTModel, M-RoPE) + ``vision`` (replicated HF tower, first stage only)."""

    def __init__(self, hf_config, facts: TextModelFacts, parallel: ParallelConfig, dtype: torch.dtype,
                 use_cpu_initialization: bool, pre_process: bool = True, post_process: bool = True,
                 vp_stage: int | None = None):
        super().__init__()
        from megatron.core.models.gpt import GPTModel

        validate_parallel_layout(parallel, facts.shape())
        self.facts = facts
        self.impl = resolve_transformer_impl(parallel)
        self.config = transformer_config_from_hf(facts, parallel, dtype, use_cpu_initialization, self.impl)
        self.padded_vocab_size = padded_vocab_size(facts.vocab_size, parallel.tensor_model_parallel_size)
        self.language_model = GPTModel(
            config=self.config,
            transformer_layer_spec=build_layer_spec(self.impl, facts.qk_layernorm, self.config, vp_stage),
            vocab_size=self.padded_vocab_size,
            max_sequence_length=facts.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=facts.tie_word_embeddings,
            position_embedding_type="mrope",
            rotary_base=int(facts.rope_theta) if float(facts.rope_theta).is_integer() else facts.rope_theta,
            vp_stage=vp_stage,
        )
        self.vision = None
        if pre_process and getattr(hf_config, "vision_config", None) is not None:
            from care_megatron.training.megatron.vision import VisionTower

            self.vision = VisionTower(hf_config.vision_config, facts.arch).to(dtype)

    # --- attributes Megatron's schedules / finalize_model_grads look up on the wrapped model ---
    @property
    def pre_process(self) -> bool:
        return self.language_model.pre_process

    @property
    def post_process(self) -> bool:
        return self.language_model.post_process

    @property
    def model_type(self):
        return self.language_model.model_type

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        return self.language_model.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline stages > 0 receive the previous stage's hidden states here."""
        self.language_model.set_input_tensor(input_tensor)

    def output_weight(self) -> torch.Tensor:
        """This rank's [V_pad/tp, H] output projection (the embedding when tied)."""
        return self.language_model.shared_embedding_or_output_weight() if self.facts.tie_word_embeddings \
            else self.language_model.output_layer.weight


# ---------------------------------------------------------------------------------------------
# Names: the shared mapping (care_megatron.models.weight_mapping) uses bare GPTModel names and ``vision_model.*``;
# this wrapper nests them under ``language_model.`` / ``vision.``.
# ---------------------------------------------------------------------------------------------

def from_mapping_name(name: str) -> str:
    """``decoder.layers.0...`` -> ``language_model.decoder.layers.0...``; ``vision_model.x`` -> ``vision.vision_model.x``."""
    return "vision." + name if name.startswith("vision_model.") else "language_model." + name


def to_mapping_name(name: str) -> str:
    """Inverse of :func:`from_mapping_name` (the names the shared mapping and weight export use)."""
    if name.startswith("vision.vision_model."):
        return name[len("vision."):]
    if name.startswith("language_model."):
        return name[len("language_model."):]
    raise KeyError(f"not a QwenVLMegatronModel parameter name: {name!r}")


def shared_mapping_state_dict(hf_state_dict: dict, hf_config, *, tp: int, tp_rank: int, pp: int = 1, pp_rank: int = 0,
                              vp: int | None = None, vp_stage: int = 0, impl: str = "local",
                              padded_vocab: int | None = None) -> dict:
    """This rank's :class:`QwenVLMegatronModel` state dict through the shared HF->Megatron mapping
    (``care_megatron.models.weight_mapping.hf_to_megatron_rank_state_dict``: one rank's stage converted, rule by
    rule)."""
    from care_megatron.models.weight_mapping import hf_to_megatron_rank_state_dict

    return hf_to_megatron_rank_state_dict(hf_state_dict, hf_config, tp, tp_rank, padded_vocab, pp_size=pp,
                                          pp_rank=pp_rank, vp_size=vp, vp_stage=vp_stage,
                                          language_prefix="language_model.", vision_prefix="vision.",
                                          layernorm_naming="te" if impl == "transformer_engine" else "local")
