"""Megatron parameters -> Hugging-Face-named full tensors, in bounded buckets, for rollout weight sync.

:func:`export_hf_weights` walks the model in the order of the shared conversion rules
(``care_megatron.models.weight_mapping.rules.tensor_rules``, the same rules the checkpoint converters use, so the
names and layouts cannot drift apart) and for each Megatron tensor:

1. gathers its tensor-parallel shards (``all_gather`` over the TP group; replicated tensors such as
   norms and the vision tower need no communication),
2. undoes Megatron's layout with ``rule_to_hf_tensors`` (group-interleaved QKV -> q/k/v, per-rank
   [gate; up] -> gate / up, vocab padding removed),
3. casts to ``dtype`` and, with pipeline parallelism, broadcasts the result from the owning stage
   to the other stages of its PP group, so every rank receives every tensor,
4. appends it to the current bucket; a bucket is yielded once the next tensor would push it past
   ``bucket_bytes`` (a tensor larger than ``bucket_bytes`` forms a bucket of its own).

Views: by default every exported tensor is fresh memory, safe to keep. With ``views=True`` a tensor
whose HF layout is a view of the local parameter (TP = 1, or a replicated tensor: norms, the vision
tower, row / column weights, gate / up halves, the un-padded vocabulary) is handed out as that view,
no copy; on CPU a fresh copy of every tensor costs page faults on top of the copy the consumer makes
anyway. Only for consumers that (a) never write to the tensors and (b) are done with a bucket before
asking the generator for the next one (the parameters may be modified, offloaded or freed once the
generator moves on or ends). ``care_megatron.rollout.colocate.sync_weights`` is such a consumer: the HF
engine's ``update_weights`` copies each tensor into its own parameters, SGLang's path flattens each
bucket into a new tensor and loads it synchronously.

Memory: the exporter keeps no reference to a bucket after yielding it, so while the consumer works
on bucket k the exporter holds only bucket k+1 being filled: peak extra memory is two buckets plus
the transient TP gather of one tensor (which is freed before the next one starts).

Names are the HF checkpoint names (``model.layers.0.self_attn.q_proj.weight``, ``visual.*`` for
Qwen2.5-VL; ``model.language_model.*`` / ``model.visual.*`` for Qwen3-VL), which SGLang's
``update_weights_from_tensor`` and the HF rollout engine's ``update_weights`` both accept.

Works in a single process without ``torch.distributed`` (TP = PP = 1), with Megatron's parallel
state (groups taken from ``megatron.core.parallel_state``), or with explicit ``tp_group`` /
``pp_group`` process groups (tests).
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from care_megatron.models.weight_mapping import ArchitectureSpec, mapping_for_config
from care_megatron.models.weight_mapping.rules import (REPLICATED, ParallelLayout, TensorRule, dims_from_config,
                                                       rule_output_hf_names, rule_to_hf_tensors, single_shard_to_hf,
                                                       tensor_rules)

VISION_PREFIX = "vision_model."


def canonical_megatron_name(name: str) -> str:
    """A wrapped model's parameter name -> the mapping's Megatron name.

    Strips wrapper prefixes (``module.`` of DDP / Float16Module, ``language_model.`` of
    :class:`~care_megatron.training.megatron.model_provider.QwenVLMegatronModel`) and maps the vision
    tower (``vision.vision_model.<name>``) to ``vision_model.<name>``.
    """
    index = name.find(VISION_PREFIX)
    if index >= 0 and (index == 0 or name[index - 1] == "."):
        return name[index:]
    while name.startswith("module."):
        name = name[len("module."):]
    if name.startswith("language_model."):
        name = name[len("language_model."):]
    return name


def _local_tensors(chunk: nn.Module) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, param in chunk.named_parameters():
        tensors[canonical_megatron_name(name)] = param.detach()
    return tensors


def _groups(tp_group, pp_group):
    """(tp_size, tp_rank, tp_group, pp_size, pp_rank, pp_group), falling back to Megatron's parallel state."""
    if tp_group is None and pp_group is None and dist.is_available() and dist.is_initialized():
        try:
            from megatron.core import parallel_state as mps

            if mps.model_parallel_is_initialized():
                tp_group = mps.get_tensor_model_parallel_group()
                pp_group = mps.get_pipeline_model_parallel_group()
        except ImportError:
            pass

    def size_rank(group):
        if group is None:
            return 1, 0
        return dist.get_world_size(group), dist.get_rank(group)

    tp_size, tp_rank = size_rank(tp_group)
    pp_size, pp_rank = size_rank(pp_group)
    return tp_size, tp_rank, tp_group, pp_size, pp_rank, pp_group


def _meta_hf_shapes(rule: TensorRule, local: torch.Tensor, tp: int, dims) -> list[tuple[tuple, torch.dtype]]:
    pieces = [torch.empty(local.shape, dtype=local.dtype, device="meta")] * tp
    return [(tuple(t.shape), t.dtype) for t in rule_to_hf_tensors(rule, pieces, dims)]


def export_hf_weights(model_chunks, hf_config, bucket_bytes: int = 512 << 20, dtype: Optional[torch.dtype] = None, *,
                      tp_group=None, pp_group=None, spec: Optional[ArchitectureSpec] = None,
                      views: bool = False) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield buckets ``[(hf_name, full_tensor), ...]`` of at most ``bucket_bytes`` each.

    Args:
        model_chunks: the local model (a module) or its virtual-pipeline chunks (a list, chunk ``v``
            holding virtual stage ``v``). Parameter names follow ``care_megatron.models.weight_mapping.rules`` after
            :func:`canonical_megatron_name`.
        hf_config: the transformers config of the model (architecture, dims, tied embeddings).
        bucket_bytes: bucket capacity in bytes (default 512 MiB).
        dtype: cast every exported tensor to this dtype (None keeps the parameter dtype).
        tp_group / pp_group: process groups; default Megatron's, or none (TP = PP = 1).
        views: hand out views of the parameters where no re-layout is needed, instead of copies
            (see the module docstring for which consumers may ask for them).

    Every rank of a TP x PP grid must iterate the generator to the end (collectives inside).
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    chunks: Sequence[nn.Module] = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    spec = spec or mapping_for_config(hf_config)
    dims = dims_from_config(spec, hf_config)
    tp, tp_rank, tp_group, pp, pp_rank, pp_group = _groups(tp_group, pp_group)
    local = [_local_tensors(chunk) for chunk in chunks]
    te_names = any(n.endswith("linear_qkv.layer_norm_weight") for tensors in local for n in tensors)
    layout = ParallelLayout(tp=tp, pp=pp, vp=len(chunks) if len(chunks) > 1 else None,
                            layernorm_naming="te" if te_names else "local")
    vision_names = sorted(n[len(VISION_PREFIX):] for n in local[0] if n.startswith(VISION_PREFIX)) if pp_rank == 0 else []
    if pp > 1:
        holder = [vision_names]
        dist.broadcast_object_list(holder, src=dist.get_global_rank(pp_group, 0), group=pp_group)
        vision_names = holder[0]
    rules = [rule for rule in tensor_rules(spec, dims, layout, vision_names) if rule_output_hf_names(rule, dims)]

    # Non-owning pipeline stages learn each tensor's HF shape / dtype once, from one object exchange.
    shapes: dict[int, list] = {}
    for index, rule in enumerate(rules):
        if rule.pp_rank == pp_rank:
            tensor = local[rule.vp_stage].get(rule.megatron_name)
            if tensor is None:
                raise ValueError(f"export: the model has no parameter {rule.megatron_name} on PP rank {pp_rank}, "
                                 f"virtual stage {rule.vp_stage} (names seen: {sorted(local[rule.vp_stage])[:4]} ...)")
            if pp > 1:  # only other stages need them (working them out on meta tensors is not free)
                shapes[index] = _meta_hf_shapes(rule, tensor, tp, dims)
    if pp > 1:
        gathered = [None] * pp
        dist.all_gather_object(gathered, shapes, group=pp_group)
        for part in gathered:
            shapes.update(part)

    bucket: list[tuple[str, torch.Tensor]] = []
    bucket_size = 0
    for index, rule in enumerate(rules):
        names = rule_output_hf_names(rule, dims)
        if rule.pp_rank == pp_rank:
            tensors = [t.to(dtype) if dtype is not None and t.is_floating_point() else t
                       for t in _gather_to_hf(rule, local[rule.vp_stage][rule.megatron_name], tp, tp_group, dims,
                                              views)]
            if pp > 1:  # a collective needs contiguous memory (a view of the vocab or gate / up may not be)
                tensors = [t.contiguous() for t in tensors]
        else:
            tensors = [torch.empty(shape, dtype=dtype if dtype is not None and d.is_floating_point else d,
                                   device=_device_of(local))
                       for shape, d in shapes[index]]
        if pp > 1:
            source = dist.get_global_rank(pp_group, rule.pp_rank)
            for tensor in tensors:
                dist.broadcast(tensor, src=source, group=pp_group)
        for name, tensor in zip(names, tensors):
            size = tensor.numel() * tensor.element_size()
            if bucket and bucket_size + size > bucket_bytes:
                ready, bucket, bucket_size = bucket, [], 0
                yield ready
                del ready
            bucket.append((name, tensor))
            bucket_size += size
        del tensors
    if bucket:
        yield bucket


def _device_of(local: list[dict[str, torch.Tensor]]) -> torch.device:
    for tensors in local:
        for tensor in tensors.values():
            return tensor.device
    return torch.device("cpu")


def _gather_to_hf(rule: TensorRule, local: torch.Tensor, tp: int, tp_group, dims, views: bool = False
                  ) -> list[torch.Tensor]:
    """All-gather one tensor's TP shards (rank order) and convert them to the HF tensor(s)."""
    if views and (tp == 1 or rule.kind == REPLICATED):
        return single_shard_to_hf(rule, local, dims)
    if tp == 1 or rule.kind == REPLICATED:
        pieces = [local] * tp
    else:
        pieces = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(pieces, local.contiguous(), group=tp_group)
    out = rule_to_hf_tensors(rule, pieces, dims)
    # Replicated tensors come back as the parameter itself: hand out a copy so a consumer that
    # keeps or modifies the bucket never aliases live training weights.
    return [t.clone() if any(t.data_ptr() == p.data_ptr() for p in pieces) else t.contiguous() for t in out]


def export_weights(backend, bucket_bytes: int = 512 << 20, dtype: Optional[torch.dtype] = None, views: bool = False
                   ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """``MegatronBackend.export_weights``: the backend's policy model through :func:`export_hf_weights`.

    Needs the HF config on the backend (``backend.hf_config``) or on its policy model.
    """
    hf_config = getattr(backend, "hf_config", None) or getattr(getattr(backend, "policy", None), "hf_config", None)
    if hf_config is None:
        raise ValueError("export_weights: the backend must keep its transformers config as `hf_config` "
                         "(the weight mapping reads the architecture and dims from it)")
    chunks = getattr(backend, "policy_chunks", None) or backend.policy
    return export_hf_weights(chunks, hf_config, bucket_bytes, dtype, views=views)
