"""Core attention of the local (non-Transformer-Engine) layer spec, on torch's fused kernels.

Megatron's stock local ``DotProductAttention`` materialises the full [b, h, s, s] score matrix
(measured: out of memory on an H100 at the 3B shape with 8k tokens). :class:`TorchCoreAttention`
replaces it in the ``ModuleSpec`` with:

* unpacked batches (``sbhd``): ``F.scaled_dot_product_attention`` with ``is_causal``;
* packed batches (``thd``, ``PackedSeqParams.cu_seqlens_q``): a per-document causal mask, run by the
  first available of

  - ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (flash varlen; CUDA, bf16/fp16),
  - ``flex``: ``torch.nn.attention.flex_attention`` with a block mask built from ``cu_seqlens``
    (compiled; CUDA),
  - ``loop``: SDPA per document over the ``cu_seqlens`` slices (any device; the CPU path and the
    reference the others are tested against).

  None of them builds a dense [T x T] mask.

* context parallelism (``context_parallel_size > 1``, THD only): keys / values all-gathered over the
  CP group, this rank's query chunks attend to their documents' prefixes
  (``context_parallel.context_parallel_attention``).

The backend is chosen per call from the device / dtype; :func:`force_packed_backend` pins one
(tests, benchmarks).
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from care_megatron.training.megatron.compiled_flex import compiled_flex_attention

_FORCED_BACKEND: str | None = None
PACKED_BACKENDS = ("varlen", "flex", "loop")


@contextlib.contextmanager
def force_packed_backend(name: str | None):
    """Pin the packed-attention backend (``varlen``, ``flex``, ``loop``) inside the block."""
    global _FORCED_BACKEND
    if name is not None and name not in PACKED_BACKENDS:
        raise ValueError(f"unknown packed attention backend {name!r}; valid: {', '.join(PACKED_BACKENDS)}")
    previous, _FORCED_BACKEND = _FORCED_BACKEND, name
    try:
        yield
    finally:
        _FORCED_BACKEND = previous


def _varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def choose_packed_backend(query: torch.Tensor) -> str:
    """``varlen`` / ``flex`` on CUDA half precision, ``loop`` otherwise (or the forced one)."""
    if _FORCED_BACKEND is not None:
        return _FORCED_BACKEND
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16):
        return "varlen" if _varlen_available() else "flex"
    return "loop"


def packed_causal_attention_loop(q, k, v, cu_seqlens, scale):
    """Reference per-document causal attention. q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    enable_gqa = q.shape[1] != k.shape[1]
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        qs, ks, vs = (x[start:end].transpose(0, 1) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=enable_gqa)
        out[start:end] = o.transpose(0, 1)
    return out


@functools.lru_cache(maxsize=1)
def _varlen_parameters() -> frozenset:
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def packed_causal_attention_varlen(q, k, v, cu_seqlens, scale, max_seqlen: int | None = None):
    """Flash varlen. Adapts to the torch version's signature: ``is_causal`` (2.10) or
    ``window_size=(-1, 0)`` (2.11+); ``scale`` when accepted (else the default 1/sqrt(d), checked).
    GQA: K/V keep their own (fewer) heads. Every version's varlen_attn hands them straight to
    ``aten._flash_attention_forward``, whose kernels take ``Hq % Hkv == 0`` heads natively (the
    backward sums each group's dK / dV); torch >= 2.12 only asks for ``enable_gqa=True`` first.
    ``max_seqlen``: the longest document, when the caller knows it (no host sync per layer)."""
    from torch.nn.attention.varlen import varlen_attn

    params = _varlen_parameters()
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max()) if max_seqlen is None else int(max_seqlen)
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    if "scale" in params:
        kwargs["scale"] = scale
    elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:
        raise ValueError("this torch's varlen_attn has no scale argument; use the flex or loop backend")
    if q.shape[1] != k.shape[1]:
        if q.shape[1] % k.shape[1]:
            raise ValueError(f"GQA needs the query heads ({q.shape[1]}) to be a multiple of the KV heads ({k.shape[1]})")
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def document_block_mask(cu_seqlens: torch.Tensor, total: int, device):
    """flex_attention block mask: token i sees token j iff same document and j <= i (cached per
    boundaries, so the layers of one micro-batch build it once)."""
    return _document_block_mask(tuple(int(x) for x in cu_seqlens.tolist()), total, str(device))


@functools.lru_cache(maxsize=4)
def _document_block_mask(cu: tuple, total: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    bounds = torch.tensor(cu, dtype=torch.long)
    lengths = (bounds[1:] - bounds[:-1]).to(device)
    document = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)

    def mask_mod(b, h, q_idx, kv_idx):
        return (document[q_idx] == document[kv_idx]) & (kv_idx <= q_idx)

    # compiled mask construction on CUDA: the eager one evaluates mask_mod over the whole [T, T] grid
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=total, KV_LEN=total, device=device,
                             _compile=device.startswith("cuda"))


def packed_causal_attention_flex(q, k, v, cu_seqlens, scale, compiled: bool = True):
    from torch.nn.attention.flex_attention import flex_attention

    total = q.shape[0]
    block_mask = document_block_mask(cu_seqlens, total, q.device)
    fn = compiled_flex_attention() if compiled else flex_attention
    out = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], block_mask=block_mask,
             scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out[0].transpose(0, 1)


def packed_causal_attention(q, k, v, cu_seqlens, scale, backend: str | None = None, max_seqlen: int | None = None):
    """Dispatch per-document causal attention on THD tensors (see module docstring). K/V may have
    fewer heads than Q (GQA); no backend repeats them."""
    backend = backend or choose_packed_backend(q)
    if backend == "varlen":
        return packed_causal_attention_varlen(q, k, v, cu_seqlens, scale, max_seqlen)
    if backend == "flex":
        return packed_causal_attention_flex(q, k, v, cu_seqlens, scale, compiled=q.is_cuda)
    return packed_causal_attention_loop(q, k, v, cu_seqlens, scale)


def _cp_backend(query: torch.Tensor) -> str:
    """Context-parallel attention backend: ``flex`` on CUDA, ``loop`` elsewhere; a forced ``flex`` /
    ``loop`` applies, a forced ``varlen`` maps to ``flex`` (flash varlen's causal alignment for
    query chunks shorter than their key prefix is not relied on)."""
    if _FORCED_BACKEND in ("flex", "loop"):
        return _FORCED_BACKEND
    return "flex" if query.is_cuda else "loop"


class TorchCoreAttention(MegatronModule):
    """Megatron core-attention module (same constructor / forward as ``DotProductAttention``).

    Input per Megatron convention: ``sbhd`` q [s, b, Hq/tp, D], k/v [s, b, Hkv/tp, D] -> [s, b, Hq/tp*D];
    ``thd`` (``packed_seq_params.qkv_format == "thd"``) q [T, Hq/tp, D] -> [T, Hq/tp*D].
    Attention dropout is not supported (RL fine-tuning runs with 0).
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None, **unused):
        super().__init__(config=config)
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError("TorchCoreAttention: attention_dropout must be 0 (config field attention_dropout)")
        self.cp_size = config.context_parallel_size
        self.cp_group = getattr(pg_collection, "cp", None) if pg_collection is not None else None
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
        if config.apply_query_key_layer_scaling:
            raise ValueError("TorchCoreAttention does not implement apply_query_key_layer_scaling")

    def _context_parallel_group(self):
        if self.cp_group is None:
            from megatron.core import parallel_state as mps

            self.cp_group = mps.get_context_parallel_group()
        return self.cp_group

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **unused):
        if attention_bias is not None:
            raise ValueError("TorchCoreAttention: attention_bias is not supported")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if mask_type != AttnMaskType.causal:
            raise ValueError(f"TorchCoreAttention supports causal masks only, got {mask_type}")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            cu = packed_seq_params.cu_seqlens_q_padded
            if cu is None:
                cu = packed_seq_params.cu_seqlens_q
            if self.cp_size > 1:
                from care_megatron.training.megatron.context_parallel import context_parallel_attention

                out = context_parallel_attention(query, key, value, cu, self._context_parallel_group(),
                                                 self.softmax_scale, backend=_cp_backend(query))
            else:
                known = packed_seq_params.max_seqlen_q  # an int from build_packed_seq_params: no host sync here
                out = packed_causal_attention(query, key, value, cu, self.softmax_scale,
                                              max_seqlen=known if isinstance(known, int) else None)
            return out.reshape(out.shape[0], -1)
        if self.cp_size > 1:
            raise ValueError("context parallelism with the local spec runs on THD-packed micro-batches only")
        # sbhd -> b h s d for SDPA
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
