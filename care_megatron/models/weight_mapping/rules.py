"""The one source of truth for Hugging Face <-> Megatron-Core parameter names and layouts.

Everything here is pure tensor / string arithmetic: no process groups, no Megatron model. The
checkpoint converters (``checkpoints_convert/hf_to_megatron.py``, ``megatron_to_hf.py``), the Megatron
model provider and the rollout weight export
(``care_megatron/training/megatron/weight_export.py``) all go through :func:`tensor_rules` and the
per-rule functions :func:`rule_to_megatron_shards` / :func:`rule_to_hf_tensors`, so a layout
decided here is the layout everywhere.

Megatron side (megatron-core 0.16.1 ``GPTModel`` names, checked against a real model by
``tests/convert/test_cli.py::test_mapping_names_match_megatron_gpt_model``)::

    embedding.word_embeddings.weight               [V_pad / tp, H]   vocab padded, dim-0 sharded
    decoder.layers.{l}.input_layernorm.weight      [H]               local spec (TE spec: linear_qkv.layer_norm_weight)
    decoder.layers.{l}.self_attention.linear_qkv.weight  [G/tp * (Q/G + 2) * D, H]
    decoder.layers.{l}.self_attention.linear_qkv.bias    [G/tp * (Q/G + 2) * D]  (Qwen2 family)
    decoder.layers.{l}.self_attention.q_layernorm.weight [D]         (Qwen3 family QK-norm)
    decoder.layers.{l}.self_attention.k_layernorm.weight [D]
    decoder.layers.{l}.self_attention.linear_proj.weight [H, Q * D / tp]     dim-1 sharded
    decoder.layers.{l}.pre_mlp_layernorm.weight    [H]               local spec (TE spec: mlp.linear_fc1.layer_norm_weight)
    decoder.layers.{l}.mlp.linear_fc1.weight       [2 * F / tp, H]   [gate shard; up shard] per rank
    decoder.layers.{l}.mlp.linear_fc2.weight       [H, F / tp]       dim-1 sharded
    decoder.final_layernorm.weight                 [H]
    output_layer.weight                            [V_pad / tp, H]   absent when tied and PP = 1
    vision_model.<HF vision-tower name>            replicated on every TP rank of PP stage 0

``l`` is local to the (virtual) pipeline stage; :func:`layer_placement` gives the global indices.
QKV layout: for each of the G key/value groups, the Q/G query heads of that group, then its key
head, then its value head (head_dim rows each); TP rank r holds groups [r*G/tp, (r+1)*G/tp).

Hugging Face side: the on-disk (``save_pretrained`` / hub) names, e.g. ``model.layers.0.self_attn.
q_proj.weight`` and ``visual.blocks.0.attn.qkv.weight`` for Qwen2.5-VL, ``model.language_model.*``
and ``model.visual.*`` for Qwen3-VL. The in-memory names of transformers 5 models
(``model.language_model.*`` / ``model.visual.*``) are accepted on input and normalised by
:meth:`ArchitectureSpec.canonical_hf_name`. Which prefixes and optional tensors each architecture has
is :mod:`care_megatron.models.weight_mapping.architectures`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch

from care_megatron.models.weight_mapping.architectures import ArchitectureSpec, mapping_for_config

LAYERNORM_NAMINGS = ("local", "te")


@dataclass(frozen=True)
class LanguageModelDims:
    """The numbers of the decoder that decide tensor shapes and layouts."""

    num_layers: int
    """Decoder layers."""
    hidden_size: int
    """Residual width H."""
    num_attention_heads: int
    """Query heads Q."""
    num_key_value_heads: int
    """Key/value heads G (GQA groups); Q must be a multiple of G."""
    head_dim: int
    """Per-head width D (Qwen3 sets it explicitly; otherwise H / Q)."""
    ffn_hidden_size: int
    """SwiGLU inner width F."""
    vocab_size: int
    """Unpadded vocabulary V of the HF checkpoint."""
    tie_word_embeddings: bool
    """Output projection shares the input embedding (Qwen2.5-VL-3B); no ``lm_head.weight`` on disk."""
    qkv_bias: bool
    """Q/K/V projections carry biases."""
    qk_layernorm: bool
    """Per-head RMSNorm on queries and keys."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "ffn_hidden_size", "vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def check_tensor_parallel(self, tp: int) -> None:
        """Raise ValueError when ``tp`` cannot shard this decoder evenly."""
        if tp < 1:
            raise ValueError(f"tp must be >= 1, got {tp}")
        if self.num_key_value_heads % tp:
            raise ValueError(f"tp={tp} must divide num_key_value_heads={self.num_key_value_heads} "
                             "(each rank holds whole KV groups)")
        if self.ffn_hidden_size % tp:
            raise ValueError(f"tp={tp} must divide intermediate_size={self.ffn_hidden_size}")


def text_config_of(hf_config):
    """The decoder's config: ``text_config`` of a VLM config, else the config itself."""
    return getattr(hf_config, "text_config", None) or hf_config


def tie_word_embeddings_of(hf_config) -> bool:
    """Tied embeddings flag; the top-level config is authoritative (transformers writes both)."""
    value = getattr(hf_config, "tie_word_embeddings", None)
    if value is None:
        value = getattr(text_config_of(hf_config), "tie_word_embeddings", False)
    return bool(value)


def dims_from_config(spec: ArchitectureSpec, hf_config) -> LanguageModelDims:
    """Read :class:`LanguageModelDims` from a transformers config; ValueError on unsupported options."""
    text = text_config_of(hf_config)
    heads = text.num_attention_heads
    attention_bias = bool(getattr(text, "attention_bias", False))
    if attention_bias and not spec.always_qkv_bias:
        # Qwen3's attention_bias adds an o_proj bias too; Megatron's only knob for that
        # (add_bias_linear) would also add MLP biases the checkpoint does not have.
        raise ValueError(f"{spec.name}: attention_bias=True (o_proj bias) is not supported by the Megatron mapping")
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return LanguageModelDims(
        num_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        num_attention_heads=heads,
        num_key_value_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        ffn_hidden_size=text.intermediate_size,
        vocab_size=text.vocab_size,
        tie_word_embeddings=tie_word_embeddings_of(hf_config),
        qkv_bias=spec.always_qkv_bias or attention_bias,
        qk_layernorm=spec.qk_layernorm,
    )


# --------------------------------------------------------------------------------------------------
# Shared arithmetic: vocab padding and layer placement (also used by the Megatron model provider)
# --------------------------------------------------------------------------------------------------

def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Smallest size >= ``vocab_size`` divisible by ``divisible_by * tp`` (Megatron's rule)."""
    unit = divisible_by * tp
    return ((vocab_size + unit - 1) // unit) * unit


def layers_per_stage(num_layers: int, pp: int, vp: Optional[int] = None,
                     first_stage_layers: Optional[int] = None,
                     last_stage_layers: Optional[int] = None) -> list[int]:
    """Layer counts of the ``pp * (vp or 1)`` model stages, in model order.

    Even split by default, the remainder going to the later middle stages; the first / last stage
    may be given a fixed count (they also hold the vision tower / the output layer). The Megatron
    backend's ``parallel_state.layers_per_pipeline_stage`` is this function.
    """
    stages = pp * (vp or 1)
    if pp < 1 or (vp is not None and vp < 1):
        raise ValueError(f"pp and vp must be >= 1, got pp={pp}, vp={vp}")
    counts = [0] * stages
    fixed_stages = set()
    if first_stage_layers is not None:
        counts[0] = first_stage_layers
        fixed_stages.add(0)
    if last_stage_layers is not None and stages > 1:
        counts[-1] = last_stage_layers
        fixed_stages.add(stages - 1)
    free = [i for i in range(stages) if i not in fixed_stages]
    remaining = num_layers - sum(counts)
    if remaining < 0 or (free and remaining < len(free)) or (not free and remaining):
        raise ValueError(f"cannot place {num_layers} layers on {stages} pipeline stages "
                         f"(pp={pp}, vp={vp}, first={first_stage_layers}, last={last_stage_layers})")
    if free:
        base, extra = divmod(remaining, len(free))
        for j, i in enumerate(free):
            counts[i] = base + (1 if j >= len(free) - extra else 0)
    return counts


def layer_placement(num_layers: int, pp: int, vp: Optional[int] = None, **stage_overrides) -> dict[tuple[int, int], list[int]]:
    """Global decoder-layer indices held by each ``(pp_rank, vp_stage)``.

    Interleaved order: virtual chunk ``v`` of pipeline rank ``r`` is model stage ``v * pp + r``
    (Megatron's interleaved schedule). Without interleaving ``vp_stage`` is always 0.
    """
    counts = layers_per_stage(num_layers, pp, vp, **stage_overrides)
    placement = {}
    start = 0
    for stage, count in enumerate(counts):
        vp_stage, pp_rank = divmod(stage, pp)
        placement[(pp_rank, vp_stage)] = list(range(start, start + count))
        start += count
    return placement


# --------------------------------------------------------------------------------------------------
# Per-tensor layout transforms
# --------------------------------------------------------------------------------------------------

def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: LanguageModelDims) -> torch.Tensor:
    """HF q/k/v projections -> Megatron's full (unsharded) ``linear_qkv``.

    q [Q*D, ...], k [G*D, ...], v [G*D, ...] (weights [.., H] or biases) -> [G*(Q/G+2)*D, ...]: for
    each group g, its Q/G query heads, then key head g, then value head g.
    """
    groups, per, d = dims.num_key_value_heads, dims.heads_per_group, dims.head_dim
    tail = q.shape[1:]
    fused = torch.cat([q.reshape(groups, per * d, *tail), k.reshape(groups, d, *tail),
                       v.reshape(groups, d, *tail)], dim=1)
    return fused.reshape(groups * (per + 2) * d, *tail)


def split_qkv(qkv: torch.Tensor, dims: LanguageModelDims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv` (works on any whole number of groups, e.g. one TP shard)."""
    per, d = dims.heads_per_group, dims.head_dim
    tail = qkv.shape[1:]
    groups = qkv.shape[0] // ((per + 2) * d)
    grouped = qkv.reshape(groups, (per + 2) * d, *tail)
    q, k, v = torch.split(grouped, [per * d, d, d], dim=1)
    return (q.reshape(groups * per * d, *tail).contiguous(), k.reshape(groups * d, *tail).contiguous(),
            v.reshape(groups * d, *tail).contiguous())


def shard(tensor: torch.Tensor, tp: int, dim: int) -> list[torch.Tensor]:
    """Even split along ``dim`` into ``tp`` contiguous pieces (ValueError when not divisible)."""
    if tensor.shape[dim] % tp:
        raise ValueError(f"dimension {dim} of size {tensor.shape[dim]} is not divisible by tp={tp}")
    return [piece.contiguous() for piece in torch.chunk(tensor, tp, dim=dim)]


def pad_vocab(weight: torch.Tensor, padded: int) -> torch.Tensor:
    """Append zero rows up to ``padded`` (the padding rows are never targets)."""
    if padded < weight.shape[0]:
        raise ValueError(f"padded vocab {padded} is smaller than the vocabulary {weight.shape[0]}")
    if padded == weight.shape[0]:
        return weight
    return torch.cat([weight, weight.new_zeros(padded - weight.shape[0], *weight.shape[1:])], dim=0)


# --------------------------------------------------------------------------------------------------
# Rules: one HF <-> Megatron correspondence per Megatron tensor
# --------------------------------------------------------------------------------------------------

# Layout kinds: how the HF tensors become the per-TP-rank Megatron shards.
REPLICATED = "replicated"  # same tensor on every TP rank (norms, vision tower)
ROW = "row"                # split on dim 0 (column-parallel linear)
COLUMN = "column"          # split on dim 1 (row-parallel linear: linear_proj, linear_fc2)
QKV = "qkv"                # q, k, v fused group-wise, then split on dim 0
GATE_UP = "gate_up"        # per rank [gate shard; up shard]
VOCAB = "vocab"            # vocab padded, then split on dim 0


@dataclass(frozen=True)
class TensorRule:
    """One Megatron tensor and the HF tensor(s) it is made of."""

    megatron_name: str
    """Name inside the owning (virtual) pipeline stage's state dict, layer index stage-local."""
    hf_names: tuple[str, ...]
    """On-disk HF names, in the order the layout kind expects (q, k, v / gate, up)."""
    kind: str
    """Layout kind: replicated, row, column, qkv, gate_up or vocab."""
    pp_rank: int
    """Pipeline rank owning the tensor."""
    vp_stage: int
    """Virtual pipeline chunk owning the tensor (0 without interleaving)."""
    global_layer: Optional[int] = None
    """Global decoder-layer index (None outside the decoder layers)."""


@dataclass(frozen=True)
class ParallelLayout:
    """The target parallel layout of a conversion."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    vp: Optional[int] = None
    """Virtual pipeline chunks per rank (None: no interleaving)."""
    layernorm_naming: str = "local"
    """``local`` (``input_layernorm`` / ``pre_mlp_layernorm``, the local spec) or ``te`` (norms fused into
    ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``, the Transformer Engine spec)."""
    vocab_divisible_by: int = 128
    """Vocab padding unit before multiplying by tp (Megatron's ``make_vocab_size_divisible_by``)."""
    padded_vocab: Optional[int] = None
    """Explicit padded vocabulary (overrides the rule above; a torch_dist checkpoint written at TP = 1
    for a TP = 4 run pads to the TP = 4 size). Must be divisible by ``tp``."""

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"tp and pp must be >= 1, got tp={self.tp}, pp={self.pp}")
        if self.vp is not None and self.vp < 1:
            raise ValueError(f"vp must be None or >= 1, got {self.vp}")
        if self.layernorm_naming not in LAYERNORM_NAMINGS:
            raise ValueError(f"layernorm_naming must be one of {LAYERNORM_NAMINGS}, got {self.layernorm_naming!r}")
        if self.padded_vocab is not None and self.padded_vocab % self.tp:
            raise ValueError(f"padded_vocab={self.padded_vocab} is not divisible by tp={self.tp}")

    def padded_vocab_for(self, vocab_size: int) -> int:
        """The padded vocabulary of this layout for an unpadded ``vocab_size``."""
        if self.padded_vocab is not None:
            return self.padded_vocab
        return padded_vocab_size(vocab_size, self.tp, self.vocab_divisible_by)

    @property
    def num_vp(self) -> int:
        return self.vp or 1


def _layer_rules(spec: ArchitectureSpec, dims: LanguageModelDims, layer: int, local: int, pp_rank: int,
                 vp_stage: int, naming: str) -> list[TensorRule]:
    hf = f"{spec.lm_prefix}layers.{layer}."
    mg = f"decoder.layers.{local}."
    input_norm = "self_attention.linear_qkv.layer_norm_weight" if naming == "te" else "input_layernorm.weight"
    pre_mlp_norm = "mlp.linear_fc1.layer_norm_weight" if naming == "te" else "pre_mlp_layernorm.weight"
    attn = f"{hf}self_attn."
    rows = [
        (input_norm, (f"{hf}input_layernorm.weight",), REPLICATED),
        ("self_attention.linear_qkv.weight", (f"{attn}q_proj.weight", f"{attn}k_proj.weight", f"{attn}v_proj.weight"), QKV),
    ]
    if dims.qkv_bias:
        rows.append(("self_attention.linear_qkv.bias", (f"{attn}q_proj.bias", f"{attn}k_proj.bias", f"{attn}v_proj.bias"), QKV))
    if dims.qk_layernorm:
        rows += [("self_attention.q_layernorm.weight", (f"{attn}q_norm.weight",), REPLICATED),
                 ("self_attention.k_layernorm.weight", (f"{attn}k_norm.weight",), REPLICATED)]
    rows += [
        ("self_attention.linear_proj.weight", (f"{attn}o_proj.weight",), COLUMN),
        (pre_mlp_norm, (f"{hf}post_attention_layernorm.weight",), REPLICATED),
        ("mlp.linear_fc1.weight", (f"{hf}mlp.gate_proj.weight", f"{hf}mlp.up_proj.weight"), GATE_UP),
        ("mlp.linear_fc2.weight", (f"{hf}mlp.down_proj.weight",), COLUMN),
    ]
    return [TensorRule(mg + name, hf_names, kind, pp_rank, vp_stage, layer) for name, hf_names, kind in rows]


def tensor_rules(spec: ArchitectureSpec, dims: LanguageModelDims, layout: ParallelLayout,
                 vision_names: Iterable[str] = (), **stage_overrides) -> list[TensorRule]:
    """Every Megatron tensor of the model with its HF source(s), in model order.

    ``vision_names`` are the vision-tower weight names relative to the vision prefix (e.g.
    ``blocks.0.attn.qkv.weight``); they map to ``vision_model.<name>`` on PP stage 0, replicated.
    Ordering: vision, embedding, decoder layers by global index, final norm, output layer, so an
    exporter walking the list visits each pipeline stage's tensors contiguously.
    """
    dims.check_tensor_parallel(layout.tp)
    placement = layer_placement(dims.num_layers, layout.pp, layout.vp, **stage_overrides)
    last_pp, last_vp = layout.pp - 1, layout.num_vp - 1
    rules: list[TensorRule] = []
    if vision_names:
        if not spec.has_vision:
            raise ValueError(f"{spec.name} has no vision tower but vision weights were given")
        for name in vision_names:
            rules.append(TensorRule(f"vision_model.{name}", (spec.vision_prefix + name,), REPLICATED, 0, 0))
    embed_hf = f"{spec.lm_prefix}embed_tokens.weight"
    rules.append(TensorRule("embedding.word_embeddings.weight", (embed_hf,), VOCAB, 0, 0))
    for (pp_rank, vp_stage), layers in sorted(placement.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        for local, layer in enumerate(layers):
            rules += _layer_rules(spec, dims, layer, local, pp_rank, vp_stage, layout.layernorm_naming)
    rules.append(TensorRule("decoder.final_layernorm.weight", (f"{spec.lm_prefix}norm.weight",), REPLICATED,
                            last_pp, last_vp))
    # Tied + PP=1: GPTModel has no output_layer.weight (it reuses the embedding). Tied + PP>1: the
    # last stage keeps its own copy, initialised from the embedding.
    if not dims.tie_word_embeddings:
        rules.append(TensorRule("output_layer.weight", ("lm_head.weight",), VOCAB, last_pp, last_vp))
    elif layout.pp > 1 or layout.num_vp > 1:
        rules.append(TensorRule("output_layer.weight", (embed_hf,), VOCAB, last_pp, last_vp))
    return rules


def rule_to_megatron_shards(rule: TensorRule, hf_tensors: Sequence[torch.Tensor], dims: LanguageModelDims,
                            layout: ParallelLayout) -> list[torch.Tensor]:
    """HF tensor(s) of ``rule`` -> the ``tp`` Megatron shards, in TP-rank order."""
    tp = layout.tp
    if len(hf_tensors) != len(rule.hf_names):
        raise ValueError(f"{rule.megatron_name}: expected {len(rule.hf_names)} HF tensors, got {len(hf_tensors)}")
    if rule.kind == REPLICATED:
        return [hf_tensors[0]] * tp
    if rule.kind == ROW:
        return shard(hf_tensors[0], tp, 0)
    if rule.kind == COLUMN:
        return shard(hf_tensors[0], tp, 1)
    if rule.kind == VOCAB:
        weight = hf_tensors[0]
        if weight.shape[0] != dims.vocab_size:
            raise ValueError(f"{rule.hf_names[0]} has {weight.shape[0]} rows but the config's vocab_size is "
                             f"{dims.vocab_size} (mismatched config?)")
        return shard(pad_vocab(weight, layout.padded_vocab_for(dims.vocab_size)), tp, 0)
    if rule.kind == QKV:
        q, k, v = hf_tensors
        expected_q = dims.num_attention_heads * dims.head_dim
        expected_kv = dims.num_key_value_heads * dims.head_dim
        if q.shape[0] != expected_q or k.shape[0] != expected_kv or v.shape[0] != expected_kv:
            raise ValueError(f"{rule.hf_names[0]}: q/k/v rows {q.shape[0]}/{k.shape[0]}/{v.shape[0]} do not match "
                             f"heads={dims.num_attention_heads}, kv_heads={dims.num_key_value_heads}, "
                             f"head_dim={dims.head_dim} (mismatched config?)")
        return shard(fuse_qkv(q, k, v, dims), tp, 0)
    if rule.kind == GATE_UP:
        gate, up = hf_tensors
        if gate.shape[0] != dims.ffn_hidden_size or up.shape != gate.shape:
            raise ValueError(f"{rule.hf_names[0]}: gate/up shapes {tuple(gate.shape)}/{tuple(up.shape)} do not "
                             f"match intermediate_size={dims.ffn_hidden_size} (mismatched config?)")
        return [torch.cat([g, u], dim=0) for g, u in zip(shard(gate, tp, 0), shard(up, tp, 0))]
    raise ValueError(f"unknown layout kind {rule.kind!r}")


def rule_to_hf_tensors(rule: TensorRule, shards: Sequence[torch.Tensor], dims: LanguageModelDims) -> list[torch.Tensor]:
    """The ``tp`` Megatron shards of ``rule`` (TP-rank order) -> HF tensor(s), aligned with ``rule.hf_names``."""
    if rule.kind == REPLICATED:
        return [shards[0]]
    if rule.kind == ROW:
        return [torch.cat(list(shards), dim=0)]
    if rule.kind == COLUMN:
        return [torch.cat(list(shards), dim=1)]
    if rule.kind == VOCAB:
        return [torch.cat(list(shards), dim=0)[: dims.vocab_size].contiguous()]
    if rule.kind == QKV:
        parts = [split_qkv(piece, dims) for piece in shards]
        return [torch.cat([p[i] for p in parts], dim=0) for i in range(3)]
    if rule.kind == GATE_UP:
        halves = [torch.chunk(piece, 2, dim=0) for piece in shards]
        return [torch.cat([h[0] for h in halves], dim=0), torch.cat([h[1] for h in halves], dim=0)]
    raise ValueError(f"unknown layout kind {rule.kind!r}")


def single_shard_to_hf(rule: TensorRule, local: torch.Tensor, dims: LanguageModelDims) -> list[torch.Tensor]:
    """:func:`rule_to_hf_tensors` of one whole tensor (TP = 1, or a replicated tensor) with no copy
    where the HF layout is a view of the Megatron one: replicated / row / column tensors come back
    as ``local`` itself, the vocabulary without its padding and gate / up as slices of it. Only
    QKV needs a re-layout (heads are interleaved per group): one copy per output, not two (no
    ``torch.cat`` of a single piece). Values are bit-identical to :func:`rule_to_hf_tensors`, but
    the views alias ``local``."""
    if rule.kind in (REPLICATED, ROW, COLUMN):
        return [local]
    if rule.kind == VOCAB:
        return [local[: dims.vocab_size]]
    if rule.kind == QKV:
        return list(split_qkv(local, dims))
    if rule.kind == GATE_UP:
        return list(torch.chunk(local, 2, dim=0))
    raise ValueError(f"unknown layout kind {rule.kind!r}")


def rule_output_hf_names(rule: TensorRule, dims: LanguageModelDims) -> tuple[str, ...]:
    """HF names a rule produces when converting back (the tied last-stage output copy produces none)."""
    if rule.megatron_name == "output_layer.weight" and dims.tie_word_embeddings:
        return ()
    return rule.hf_names


# --------------------------------------------------------------------------------------------------
# Whole-model conversions on state dicts
# --------------------------------------------------------------------------------------------------

ShardKey = tuple  # (pp_rank, tp_rank) or (pp_rank, tp_rank, vp_stage) when vp is set


def shard_key(layout: ParallelLayout, pp_rank: int, tp_rank: int, vp_stage: int) -> ShardKey:
    return (pp_rank, tp_rank) if layout.vp is None else (pp_rank, tp_rank, vp_stage)


# Buffers transformers keeps in some state dicts that are not weights (recomputed at load).
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def canonicalise_hf_names(spec: ArchitectureSpec, names: Iterable[str]) -> dict[str, str]:
    """{on-disk name: given name}; ValueError naming the first weight that belongs to no known prefix."""
    mapping = {}
    for name in names:
        if name.endswith(_IGNORED_HF_SUFFIXES):
            continue
        canonical = spec.canonical_hf_name(name)
        if canonical is None:
            raise ValueError(f"{spec.name}: weight {name!r} is not under {spec.lm_prefix!r}"
                             f"{' or ' + repr(spec.vision_prefix) if spec.vision_prefix else ''}; wrong architecture?")
        mapping[canonical] = name
    return mapping


def vision_names_of(spec: ArchitectureSpec, canonical_names: Iterable[str]) -> list[str]:
    """Vision-tower names relative to the vision prefix, sorted for a stable order."""
    if spec.vision_prefix is None:
        return []
    return sorted(n[len(spec.vision_prefix):] for n in canonical_names if n.startswith(spec.vision_prefix))


def hf_to_megatron_state_dicts(hf_state_dict: Mapping[str, torch.Tensor], hf_config, tp: int = 1, pp: int = 1,
                               vp: Optional[int] = None, layernorm_naming: str = "local",
                               spec: Optional[ArchitectureSpec] = None,
                               progress: Optional[Callable[[TensorRule], None]] = None) -> dict[ShardKey, dict[str, torch.Tensor]]:
    """Convert an HF state dict into per-rank Megatron state dicts.

    Returns ``{(pp_rank, tp_rank): state_dict}`` (``(pp_rank, tp_rank, vp_stage)`` when ``vp`` is
    given). ``hf_state_dict`` may be a lazy mapping (tensors read on access), which keeps memory at
    one copy of the model. Raises ValueError on unknown / missing / unused weights or shapes that do
    not match the config.
    """
    spec = spec or mapping_for_config(hf_config)
    dims = dims_from_config(spec, hf_config)
    layout = ParallelLayout(tp=tp, pp=pp, vp=vp, layernorm_naming=layernorm_naming)
    names = canonicalise_hf_names(spec, hf_state_dict.keys())
    rules = tensor_rules(spec, dims, layout, vision_names_of(spec, names))
    out: dict[ShardKey, dict[str, torch.Tensor]] = {}
    for pp_rank in range(pp):
        for vp_stage in range(layout.num_vp):
            for tp_rank in range(tp):
                out[shard_key(layout, pp_rank, tp_rank, vp_stage)] = {}
    check_coverage(spec, dims, rules, names)
    for rule in rules:
        tensors = [hf_state_dict[names[n]] for n in rule.hf_names]
        for tp_rank, piece in enumerate(rule_to_megatron_shards(rule, tensors, dims, layout)):
            out[shard_key(layout, rule.pp_rank, tp_rank, rule.vp_stage)][rule.megatron_name] = piece
        if progress is not None:
            progress(rule)
    return out


def check_coverage(spec: ArchitectureSpec, dims: LanguageModelDims, rules: Sequence[TensorRule],
                   available: Iterable[str]) -> None:
    """ValueError when a rule needs an HF weight that is absent, or an HF weight is used by no rule.

    Checked before any tensor is read, so a mismatched config fails fast. A tied model's
    ``lm_head.weight`` (present in in-memory state dicts) is the embedding and may be left over.
    """
    available = set(available)
    needed = set()
    for rule in rules:
        missing = [n for n in rule.hf_names if n not in available]
        if missing:
            raise ValueError(f"{spec.name}: HF weight(s) {missing} needed for {rule.megatron_name} are missing "
                             "(mismatched config or truncated checkpoint?)")
        needed.update(rule.hf_names)
    unused = sorted(available - needed - ({"lm_head.weight"} if dims.tie_word_embeddings else set()))
    if unused:
        raise ValueError(f"{spec.name}: HF weights not covered by the mapping (mismatched config?): {unused[:8]}"
                         f"{' ...' if len(unused) > 8 else ''}")


def infer_layout_from_shards(shards: Mapping[ShardKey, Mapping[str, torch.Tensor]]) -> ParallelLayout:
    """tp / pp / vp and the layernorm naming from the keys of a ``{(pp, tp[, vp]): state_dict}`` mapping."""
    keys = list(shards)
    if not keys:
        raise ValueError("no Megatron shards given")
    pp = 1 + max(k[0] for k in keys)
    tp = 1 + max(k[1] for k in keys)
    vp = (1 + max(k[2] for k in keys)) if len(keys[0]) == 3 else None
    te = any(name.endswith("linear_qkv.layer_norm_weight") for sd in shards.values() for name in sd)
    return ParallelLayout(tp=tp, pp=pp, vp=vp, layernorm_naming="te" if te else "local")


def iter_megatron_to_hf(shards: Mapping[ShardKey, Mapping[str, torch.Tensor]], hf_config,
                        layout: Optional[ParallelLayout] = None, spec: Optional[ArchitectureSpec] = None,
                        check_unknown: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, tensor)`` rule by rule from per-rank Megatron state dicts (streaming form of
    :func:`megatron_to_hf_state_dict`; only one rule's tensors are materialised at a time)."""
    spec = spec or mapping_for_config(hf_config)
    dims = dims_from_config(spec, hf_config)
    layout = layout or infer_layout_from_shards(shards)
    first = shards[shard_key(layout, 0, 0, 0)]
    vision = sorted(n[len("vision_model."):] for n in first if n.startswith("vision_model."))
    rules = tensor_rules(spec, dims, layout, vision)
    if check_unknown:
        expected: dict[ShardKey, set] = {k: set() for k in shards}
        for rule in rules:
            for tp_rank in range(layout.tp):
                expected.setdefault(shard_key(layout, rule.pp_rank, tp_rank, rule.vp_stage), set()).add(rule.megatron_name)
        for key, state in shards.items():
            extra = sorted(n for n in state if n not in expected[key] and not n.endswith("_extra_state"))
            if extra:
                raise ValueError(f"Megatron shard {key} has tensors the {spec.name} mapping does not know: {extra[:8]}")
    for rule in rules:
        names = rule_output_hf_names(rule, dims)
        if not names:
            continue
        pieces = []
        for tp_rank in range(layout.tp):
            key = shard_key(layout, rule.pp_rank, tp_rank, rule.vp_stage)
            state = shards.get(key)
            if state is None or rule.megatron_name not in state:
                raise ValueError(f"Megatron tensor {rule.megatron_name} missing from shard {key}")
            pieces.append(state[rule.megatron_name])
        yield from zip(names, rule_to_hf_tensors(rule, pieces, dims))


def megatron_to_hf_state_dict(shards: Mapping[ShardKey, Mapping[str, torch.Tensor]], hf_config, tp: Optional[int] = None,
                              pp: Optional[int] = None, vp: Optional[int] = None,
                              spec: Optional[ArchitectureSpec] = None) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_megatron_state_dicts`: per-rank Megatron state dicts -> HF on-disk names.

    tp / pp / vp and the layernorm naming default to what the shard keys show. Tied models get no
    ``lm_head.weight`` (as ``save_pretrained`` writes them). ValueError on missing or unknown tensors.
    """
    inferred = infer_layout_from_shards(shards)
    layout = ParallelLayout(tp=tp or inferred.tp, pp=pp or inferred.pp, vp=vp if vp is not None else inferred.vp,
                            layernorm_naming=inferred.layernorm_naming)
    return dict(iter_megatron_to_hf(shards, hf_config, layout, spec))


def hf_to_megatron_rank_state_dict(hf_state_dict: Mapping[str, torch.Tensor], hf_config, tp_size: int, tp_rank: int,
                                   padded_vocab: Optional[int] = None, pp_size: int = 1, pp_rank: int = 0,
                                   vp_size: Optional[int] = None, vp_stage: int = 0, *,
                                   language_prefix: str = "language_model.", vision_prefix: str = "vision.",
                                   layernorm_naming: str = "local",
                                   spec: Optional[ArchitectureSpec] = None) -> dict[str, torch.Tensor]:
    """The state dict of ONE rank's model chunk, named for a model that nests the ``GPTModel`` under
    ``language_prefix`` and the vision tower (``vision_model.*``) under ``vision_prefix``.

    The defaults match ``care_megatron.training.megatron.model_provider.QwenVLMegatronModel``
    (``language_model.decoder.layers...``, ``vision.vision_model.blocks...``); pass empty prefixes for a
    bare ``GPTModel``. ``padded_vocab`` overrides the ``128 * tp`` padding. Only this rank's pipeline
    stage is converted.
    """
    spec = spec or mapping_for_config(hf_config)
    dims = dims_from_config(spec, hf_config)
    layout = ParallelLayout(tp=tp_size, pp=pp_size, vp=vp_size, layernorm_naming=layernorm_naming,
                            padded_vocab=padded_vocab)
    names = canonicalise_hf_names(spec, hf_state_dict.keys())
    rules = tensor_rules(spec, dims, layout, vision_names_of(spec, names))
    check_coverage(spec, dims, rules, names)
    out = {}
    for rule in rules:
        if rule.pp_rank != pp_rank or rule.vp_stage != vp_stage:
            continue
        tensors = [hf_state_dict[names[n]] for n in rule.hf_names]
        piece = rule_to_megatron_shards(rule, tensors, dims, layout)[tp_rank]
        prefix = vision_prefix if rule.megatron_name.startswith("vision_model.") else language_prefix
        out[prefix + rule.megatron_name] = piece
    return out


def architecture_converters(spec: ArchitectureSpec):
    """``(hf_to_megatron, megatron_to_hf)`` bound to ``spec``: what each per-architecture module exports.

    ``hf_to_megatron(hf_state_dict, hf_config, tp_size, tp_rank, padded_vocab=None, **kwargs)`` is
    :func:`hf_to_megatron_rank_state_dict` (one rank's state dict; see it for the names and options);
    ``megatron_to_hf(shards, hf_config, **kwargs)`` is :func:`megatron_to_hf_state_dict`
    (``{(pp, tp[, vp]): state_dict}`` -> HF on-disk names).
    """
    def hf_to_megatron(hf_state_dict, hf_config, tp_size: int, tp_rank: int, padded_vocab=None, **kwargs):
        return hf_to_megatron_rank_state_dict(hf_state_dict, hf_config, tp_size, tp_rank, padded_vocab, spec=spec,
                                              **kwargs)

    def megatron_to_hf(shards, hf_config, **kwargs):
        return megatron_to_hf_state_dict(shards, hf_config, spec=spec, **kwargs)

    hf_to_megatron.__doc__ = f"One rank's Megatron state dict of {spec.name} (``hf_to_megatron_rank_state_dict``)."
    megatron_to_hf.__doc__ = f"Megatron shards of {spec.name} -> HF on-disk names (``megatron_to_hf_state_dict``)."
    return hf_to_megatron, megatron_to_hf
