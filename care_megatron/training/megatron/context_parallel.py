"""Context parallelism (CP) for THD-packed micro-batches.

Layout (Megatron's convention, the one Transformer Engine's CP attention and Megatron's THD RoPE
expect): every sequence of the packed micro-batch is padded at its end to a multiple of
``2 * cp_size`` tokens and cut into ``2 * cp_size`` equal chunks; CP rank ``r`` holds chunks ``r``
and ``2 * cp_size - 1 - r`` of every sequence (load-balanced causal work), in sequence order. The
packed-sequence parameters carry the *global* padded boundaries; each rank's activations hold
only its own tokens. Padding sits at the end of a sequence, so under the causal mask no real token
ever attends to it: real tokens' outputs are exact.

What this module provides:

* :class:`ContextParallelLayout` / :func:`build_layout` - the padded global layout of one
  micro-batch and this rank's token indices into it;
* :func:`gather_from_context_parallel` - all-gather of per-rank rows, backward = this rank's slice
  (every CP rank computes the same loss from the gathered values, so its upstream gradient is
  complete; summing over CP would count it ``cp_size`` times);
* :func:`all_gather_sum_backward` - all-gather of keys / values for attention, backward = sum of
  the gradients every rank's queries sent to this rank's keys (reduce-scatter);
* :func:`context_parallel_attention` - per-document causal attention of this rank's queries
  against the gathered keys / values: ``loop`` (SDPA per chunk with a small lower-right causal
  mask; CPU, and the reference) or ``flex`` (one ``flex_attention`` call with a document mask; CUDA).
  Neither builds a dense [T x T] mask.

The local (non-TE) spec uses all-gather CP (``cp_comm_type="all_gather"`` in Megatron's terms):
each rank holds the full keys / values of the micro-batch for one layer at a time. The TE spec
uses Transformer Engine's own CP attention (ring P2P by default) on the same layout.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from care_megatron.training.megatron.compiled_flex import compiled_flex_attention
from care_megatron.training.megatron.parallel_state import context_parallel_split_indices


@dataclass
class ContextParallelLayout:
    """The padded global layout of one packed micro-batch under CP, seen from one rank."""

    cp_size: int
    cp_rank: int
    padded_cu_seqlens: torch.Tensor
    """int32 [n + 1 (+1 tail segment)]: global boundaries after per-sequence padding."""
    orig_to_padded: torch.Tensor
    """long [n_real]: padded index of each real (unpadded-batch) token ``0 .. cu_seqlens[-1]-1``."""
    input_ids: torch.Tensor
    """long [T_pad]: token ids in the padded layout (pad positions hold ``pad_id``)."""
    position_ids: torch.Tensor
    """long [3, T_pad]: M-RoPE positions in the padded layout (pads continue their sequence)."""
    local_index: torch.Tensor
    """long [T_pad / cp]: padded indices this rank holds, in the order its activations hold them."""
    gather_order: torch.Tensor
    """long [T_pad]: ``cat(ranks' local rows)[gather_order]`` is the padded order."""

    @property
    def num_padded_tokens(self) -> int:
        return int(self.padded_cu_seqlens[-1])


def build_layout(cu_seqlens: torch.Tensor, input_ids: torch.Tensor, position_ids: torch.Tensor, *, cp_size: int,
                 cp_rank: int, total_multiple: int = 1, pad_id: int = 0, min_total: int = 0) -> ContextParallelLayout:
    """Pad each real sequence to a multiple of ``2 * cp_size``; add a tail segment (a multiple of
    ``2 * cp_size`` long) so the total is a multiple of ``total_multiple`` (sequence parallelism
    needs the per-rank length divisible by TP: pass ``2 * cp_size * tp``).

    ``min_total``: make the padded total at least this (a multiple of ``total_multiple``; every
    micro-batch of a step gets the same length under the interleaved pipeline schedule).
    ``cu_seqlens`` are the real sequences' boundaries (the batch's padding tail, beyond
    ``cu_seqlens[-1]``, is dropped: it carries no prediction).
    """
    if cp_size < 1 or not 0 <= cp_rank < cp_size:
        raise ValueError(f"context parallel rank {cp_rank} / size {cp_size} out of range")
    unit = 2 * cp_size
    if cu_seqlens.numel() and int(cu_seqlens[0]) != 0:
        raise ValueError("cu_seqlens must start at 0")
    if total_multiple % unit:
        raise ValueError(f"total_multiple {total_multiple} must be a multiple of 2 * cp_size = {unit}")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long().cpu()
    padded = (lengths + unit - 1) // unit * unit
    padded = torch.where(lengths > 0, padded, torch.zeros_like(padded))
    total = int(padded.sum())
    tail = (-total) % total_multiple
    if total == 0 and tail == 0:
        tail = total_multiple  # an empty micro-batch still gives every rank a (padding) chunk
    if min_total:
        if min_total % total_multiple:
            raise ValueError(f"min_total {min_total} must be a multiple of {total_multiple}")
        tail = max(tail, min_total - total)
    seg_lengths = torch.cat([padded, padded.new_tensor([tail])]) if tail else padded
    padded_cu = torch.zeros(seg_lengths.numel() + 1, dtype=torch.int32)
    padded_cu[1:] = torch.cumsum(seg_lengths, 0)
    t_pad = int(padded_cu[-1])

    starts = cu_seqlens[:-1].long().cpu()
    seq_of_token = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    n_real = int(lengths.sum())
    within = torch.arange(n_real) - starts[seq_of_token] if n_real else torch.zeros(0, dtype=torch.long)
    orig_to_padded = padded_cu[:-1].long()[seq_of_token] + within
    first = int(cu_seqlens[0]) if cu_seqlens.numel() else 0
    device = input_ids.device
    orig_to_padded = orig_to_padded.to(device)
    real = torch.arange(first, first + n_real, device=device)

    ids = torch.full((t_pad,), pad_id, dtype=input_ids.dtype, device=device)
    ids[orig_to_padded] = input_ids[real]
    # pads continue their sequence's positions (last + 1, + 2, ...); the tail segment holds 0
    pos = torch.zeros(3, t_pad, dtype=position_ids.dtype, device=device)
    n_seq = lengths.numel()
    if n_seq and n_real:
        seg = torch.repeat_interleave(torch.arange(seg_lengths.numel()), seg_lengths)
        in_seq = (seg < n_seq).nonzero(as_tuple=True)[0]
        s_idx = seg[in_seq]
        extra = in_seq - padded_cu[:-1].long()[s_idx] - lengths[s_idx] + 1     # >= 1 on pads
        last = (cu_seqlens[1:].long().cpu() - 1).clamp(min=0)[s_idx]
        pos[:, in_seq.to(device)] = position_ids[:, last.to(device)] + extra.to(device, position_ids.dtype)
    pos[:, orig_to_padded] = position_ids[:, real]

    local_index = context_parallel_split_indices(padded_cu, cp_size, cp_rank).to(device)
    gather_order = _gather_order_cached(tuple(padded_cu.tolist()), cp_size).to(device)
    return ContextParallelLayout(cp_size, cp_rank, padded_cu.to(device), orig_to_padded, ids, pos, local_index,
                                 gather_order)


class _GatherRows(torch.autograd.Function):
    """all-gather along dim 0 (equal sizes, rank order); backward keeps this rank's slice of the
    gradient (every rank consumed the gathered rows identically, so its own slice is complete)."""

    @staticmethod
    def forward(ctx, local, group):
        size = dist.get_world_size(group)
        ctx.group, ctx.rank, ctx.n = group, dist.get_rank(group), local.shape[0]
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n].contiguous(), None


class _GatherRowsSumBackward(_GatherRows):
    """The same all-gather; backward sums the gradient over ranks first (each rank's queries sent
    gradient to every rank's keys / values), then keeps this rank's slice."""

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        if grad.is_cuda and "nccl" in str(dist.get_backend(ctx.group)):
            out = torch.empty((ctx.n,) + tuple(grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, group=ctx.group)
            return out, None
        dist.all_reduce(grad, group=ctx.group)  # gloo has no reduce-scatter
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n].contiguous(), None


def gather_from_context_parallel(local: torch.Tensor, layout: ContextParallelLayout, group) -> torch.Tensor:
    """This rank's rows [T_pad / cp, ...] -> every rank's rows in padded order [T_pad, ...].

    For values every CP rank then consumes identically (log-probs, entropy): the gradient of rank r's
    rows is the upstream gradient at those rows, not a sum over ranks.
    """
    if layout.cp_size == 1:
        return local.index_select(0, layout.gather_order)
    return _GatherRows.apply(local, group).index_select(0, layout.gather_order)


def all_gather_sum_backward(local: torch.Tensor, group) -> torch.Tensor:
    """Keys / values for attention: rank order concat; backward sums what every rank's queries sent."""
    return _GatherRowsSumBackward.apply(local, group)


@functools.lru_cache(maxsize=16)
def _attention_plan(cu: tuple, cp_size: int, cp_rank: int):
    """Per local chunk: (local start, length, key start, key end, query offset within the key range)."""
    pieces, local = [], 0
    for start, end in zip(cu[:-1], cu[1:]):
        length = end - start
        if length == 0:
            continue
        chunk = length // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            pieces.append((local, chunk, start, start + (c + 1) * chunk, c * chunk))
            local += chunk
    return tuple(pieces)


@functools.lru_cache(maxsize=16)
def _gather_order_cached(cu: tuple, cp_size: int) -> torch.Tensor:
    cu_t = torch.tensor(cu, dtype=torch.long)
    all_index = torch.cat([context_parallel_split_indices(cu_t, cp_size, r) for r in range(cp_size)])
    order = torch.empty_like(all_index)
    order[all_index] = torch.arange(all_index.numel())
    return order


def context_parallel_attention(q, k, v, cu_seqlens_padded: torch.Tensor, group, scale: float,
                               backend: str | None = None) -> torch.Tensor:
    """Per-document causal attention under CP (all-gather keys / values).

    q [T_pad/cp, Hq, D], k / v [T_pad/cp, Hkv, D] hold this rank's tokens (Megatron's load-balanced
    order); ``cu_seqlens_padded`` are the global padded boundaries. Returns [T_pad/cp, Hq, D].
    """
    cp_size, cp_rank = dist.get_world_size(group), dist.get_rank(group)
    cu = tuple(int(x) for x in cu_seqlens_padded.tolist())
    order = _gather_order_cached(cu, cp_size).to(q.device)
    k_full = all_gather_sum_backward(k, group).index_select(0, order)   # [T_pad, Hkv, D], padded order
    v_full = all_gather_sum_backward(v, group).index_select(0, order)
    return local_queries_attention(q, k_full, v_full, cu, cp_size, cp_rank, scale, backend)


def local_queries_attention(q, k_full, v_full, cu: tuple, cp_size: int, cp_rank: int, scale: float,
                            backend: str | None = None) -> torch.Tensor:
    """The compute half of :func:`context_parallel_attention` (no communication): rank ``cp_rank``'s
    queries q [T_pad/cp, Hq, D] against every key / value in padded order [T_pad, Hkv, D]."""
    backend = backend or ("flex" if q.is_cuda else "loop")
    if backend == "flex":
        return _cp_attention_flex(q, k_full, v_full, cu, cp_size, cp_rank, scale)
    if backend != "loop":
        raise ValueError(f"context-parallel attention backend must be 'loop' or 'flex', got {backend!r}")
    out = torch.empty_like(q)
    enable_gqa = q.shape[1] != k_full.shape[1]
    for local, n, k_start, k_end, q_offset in _attention_plan(cu, cp_size, cp_rank):
        qs = q[local:local + n].transpose(0, 1)
        ks, vs = (x[k_start:k_end].transpose(0, 1) for x in (k_full, v_full))
        rows = torch.arange(n, device=q.device)[:, None] + q_offset
        mask = torch.arange(k_end - k_start, device=q.device)[None, :] <= rows     # lower-right causal
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)
        out[local:local + n] = o.transpose(0, 1)
    return out


@functools.lru_cache(maxsize=4)
def _cp_block_mask(cu: tuple, cp_size: int, cp_rank: int, q_len: int, kv_len: int, device: str):
    """flex_attention block mask of one rank's queries (cached: every layer of a micro-batch reuses
    it). Query row i is padded position ``q_global[i]``; it sees keys of its document up to itself."""
    from torch.nn.attention.flex_attention import create_block_mask

    cu_t = torch.tensor(cu, dtype=torch.long)
    q_global = context_parallel_split_indices(cu_t, cp_size, cp_rank).to(device)
    lengths = cu_t[1:] - cu_t[:-1]
    document = torch.repeat_interleave(torch.arange(lengths.numel()), lengths).to(device)
    q_doc = document[q_global]

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_doc[q_idx] == document[kv_idx]) & (kv_idx <= q_global[q_idx])

    # compiled mask construction on CUDA: the eager one evaluates mask_mod over the whole [Q, KV] grid
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=q_len, KV_LEN=kv_len, device=device,
                             _compile=str(device).startswith("cuda"))


def _cp_attention_flex(q, k_full, v_full, cu: tuple, cp_size: int, cp_rank: int, scale: float):
    from torch.nn.attention.flex_attention import flex_attention

    block_mask = _cp_block_mask(cu, cp_size, cp_rank, q.shape[0], k_full.shape[0], str(q.device))
    fn = compiled_flex_attention() if q.is_cuda else flex_attention
    out = fn(q.transpose(0, 1)[None], k_full.transpose(0, 1)[None], v_full.transpose(0, 1)[None],
             block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k_full.shape[1])
    return out[0].transpose(0, 1)
