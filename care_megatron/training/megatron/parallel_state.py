"""Process groups and the pure arithmetic of model parallelism.

* :func:`initialize_parallel` brings up ``torch.distributed`` (NCCL on GPU, gloo on CPU) and
  Megatron's tensor / pipeline / context / data-parallel groups from a
  :class:`care_megatron.config.schema.ParallelConfig`.
* :func:`validate_parallel_layout` checks a parallel config against a model shape before any
  process group exists (divisibility, heads vs TP, sequence parallel) and raises ``ValueError``
  naming the field.
* Pure functions used by the model provider and tested on CPU without CUDA schedules:
  :func:`padded_vocab_size`, :func:`layers_per_pipeline_stage`, :func:`stage_layer_offset`,
  :func:`global_layer_name`, :func:`context_parallel_split_indices`.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from care_megatron.config.schema import ParallelConfig


@dataclass
class ModelShape:
    """The numbers of a decoder that parallelism must divide."""

    num_layers: int
    """Decoder layers."""
    num_attention_heads: int
    """Query heads."""
    num_query_groups: int
    """KV heads (GQA groups)."""
    hidden_size: int
    """Model width."""
    vocab_size: int
    """Tokenizer / embedding rows before padding."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_attention_heads", "num_query_groups", "hidden_size", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelShape.{name} must be >= 1")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError("ModelShape.num_query_groups must divide num_attention_heads")


def validate_parallel_layout(parallel: ParallelConfig, shape: ModelShape, world_size: int | None = None) -> int:
    """Check ``parallel`` against ``shape``; return the data-parallel size.

    Raises ``ValueError`` naming the offending config field.
    """
    tp, pp, cp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size, parallel.context_parallel_size
    if shape.num_attention_heads % tp:
        raise ValueError(f"config field 'parallel.tensor_model_parallel_size': {tp} must divide the "
                         f"{shape.num_attention_heads} attention heads")
    if shape.num_query_groups % tp:
        raise ValueError(f"config field 'parallel.tensor_model_parallel_size': {tp} must divide the "
                         f"{shape.num_query_groups} KV heads (query groups); KV-head replication is not supported")
    if shape.hidden_size % tp:
        raise ValueError(f"config field 'parallel.tensor_model_parallel_size': {tp} must divide hidden_size {shape.hidden_size}")
    vp = parallel.virtual_pipeline_model_parallel_size
    stages = pp * (vp or 1)
    if shape.num_layers < stages:
        raise ValueError(f"config field 'parallel.pipeline_model_parallel_size': {stages} (virtual) stages for "
                         f"only {shape.num_layers} layers")
    if vp is not None and (vp < 1 or pp <= 2):
        # with 2 stages the interleaved schedule's forward and backward p2p messages of one batch run
        # between the same two ranks and can pair up crosswise (measured: wrong gradients at PP=2 x VP=2)
        raise ValueError("config field 'parallel.virtual_pipeline_model_parallel_size': needs >= 1 and "
                         "pipeline_model_parallel_size > 2 (Megatron's interleaved schedule)")
    if world_size is not None:
        model_parallel = tp * pp * cp
        if world_size % model_parallel:
            raise ValueError(f"config field 'parallel.tensor_model_parallel_size': world size {world_size} is not "
                             f"divisible by TP*PP*CP = {model_parallel}")
        return world_size // model_parallel
    return 1


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int, multiple: int = 128) -> int:
    """Smallest size >= ``vocab_size`` divisible by ``multiple * tensor_parallel_size``.

    Megatron shards embedding rows evenly over TP; the padding rows are never targets and get
    masked out of the softmax (see ``logprobs.vocab_parallel_logprobs``' ``vocab_size``).
    """
    unit = multiple * tensor_parallel_size
    return ((vocab_size + unit - 1) // unit) * unit


def layers_per_pipeline_stage(num_layers: int, pipeline_size: int, virtual_size: int | None = None,
                              first_stage_layers: int | None = None, last_stage_layers: int | None = None) -> list[int]:
    """Layer counts of each (virtual) pipeline stage, in model order.

    Even split by default; the first / last stage may be given fewer layers (they also hold the
    vision tower / the output layer), the rest spread evenly with the remainder going to the later
    middle stages. Returns ``pipeline_size * (virtual_size or 1)`` counts summing to ``num_layers``.
    One rule with the checkpoint converter (``care_megatron.models.weight_mapping.layers_per_stage``).
    """
    from care_megatron.models.weight_mapping import layers_per_stage

    return layers_per_stage(num_layers, pipeline_size, virtual_size, first_stage_layers=first_stage_layers,
                            last_stage_layers=last_stage_layers)


def stage_layer_offset(counts: list[int], pipeline_rank: int, pipeline_size: int, virtual_rank: int = 0) -> int:
    """Global index of the first layer held by ``(pipeline_rank, virtual_rank)``.

    Interleaved order: virtual chunk ``v`` of rank ``r`` is model stage ``v * pipeline_size + r``.
    """
    stage = virtual_rank * pipeline_size + pipeline_rank
    return sum(counts[:stage])


def global_layer_name(local_name: str, offset: int) -> str:
    """Map a stage-local parameter name (``decoder.layers.3.mlp...``) to its global layer number."""
    prefix = "decoder.layers."
    if not local_name.startswith(prefix):
        return local_name
    rest = local_name[len(prefix):]
    index, _, tail = rest.partition(".")
    return f"{prefix}{int(index) + offset}.{tail}"


def context_parallel_split_indices(cu_seqlens: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Token indices a CP rank holds under Megatron's load-balanced split.

    Each sequence (length divisible by ``2 * cp_size``) is cut into ``2 * cp_size`` chunks and rank
    ``r`` takes chunks ``r`` and ``2 * cp_size - 1 - r`` so causal work is balanced. Returns a
    LongTensor of packed-token indices in the order the rank sees them.
    """
    pieces = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        length = end - start
        if length % (2 * cp_size):
            raise ValueError(f"sequence length {length} must be divisible by 2 * context_parallel_size = {2 * cp_size}")
        chunk = length // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            pieces.append(torch.arange(start + c * chunk, start + (c + 1) * chunk))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def initialize_parallel(parallel: ParallelConfig, seed: int = 0, force_cpu: bool = False) -> dict:
    """Initialise ``torch.distributed`` (if needed) and Megatron's model-parallel groups.

    Reads RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from the environment (torchrun); a
    single process without them gets a one-rank gloo group on a free port. Returns
    ``{"device", "tp_rank", "tp_size", "pp_rank", "pp_size", "dp_rank", "dp_size", "cp_rank", "cp_size", "cpu"}``
    (``dp_*`` exclude CP: the ranks of a CP group read the same micro-batches).
    """
    try:
        from megatron.core import parallel_state as mps
    except ImportError as exc:
        raise ImportError(f"parallel.backend=megatron needs megatron-core: pip install 'care_megatron[megatron]' ({exc})") from exc

    from care_megatron.training.megatron import cpu_compat

    use_cpu = force_cpu or not torch.cuda.is_available()
    if use_cpu:
        cpu_compat.enable_cpu_mode(force=True)
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("LOCAL_RANK", "0")
        dist.init_process_group(backend="gloo" if use_cpu else "nccl", timeout=datetime.timedelta(minutes=10))
    if not use_cpu:
        # also when the process group came from elsewhere: object collectives over NCCL (metrics,
        # pipeline broadcasts) and collective_device() use the current CUDA device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not mps.model_parallel_is_initialized():
        mps.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tensor_model_parallel_size,
            pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
            context_parallel_size=parallel.context_parallel_size,
        )
    cpu_compat.seed_model_parallel_rng(seed, mps.get_tensor_model_parallel_rank())
    return {
        "device": torch.device("cpu") if use_cpu else torch.device("cuda", torch.cuda.current_device()),
        "tp_rank": mps.get_tensor_model_parallel_rank(),
        "tp_size": mps.get_tensor_model_parallel_world_size(),
        "pp_rank": mps.get_pipeline_model_parallel_rank(),
        "pp_size": mps.get_pipeline_model_parallel_world_size(),
        "dp_rank": mps.get_data_parallel_rank(),
        "dp_size": mps.get_data_parallel_world_size(),
        "cp_rank": mps.get_context_parallel_rank(),
        "cp_size": mps.get_context_parallel_world_size(),
        "cpu": use_cpu,
    }


def collective_device(group=None) -> torch.device:
    """The device a tensor must be on for a collective over ``group``.

    NCCL accepts CUDA tensors only ("No backend type associated with device type cpu"), so a
    host-built tensor (a count, a metric sum) goes to the current CUDA device for an NCCL group; a
    group whose backend serves CPU tensors (gloo, or ``cpu:gloo,cuda:nccl``) keeps it on the host.
    float64 is fine on both."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_host_values(values, group=None, op=None) -> torch.Tensor:
    """All-reduce host numbers (a list or a CPU tensor) over ``group`` on the group's device; returns
    a float64 CPU tensor. No-op (a copy) without a group or with one rank."""
    tensor = torch.as_tensor(values, dtype=torch.float64)
    if group is None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return tensor.clone()
    on_device = tensor.to(collective_device(group), copy=True)
    dist.all_reduce(on_device, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return on_device.cpu()


def destroy_parallel() -> None:
    """Tear down Megatron's groups and the default process group (tests, end of run)."""
    from megatron.core import parallel_state as mps

    if mps.model_parallel_is_initialized():
        mps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
