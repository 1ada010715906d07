"""Backend-independent helpers on packed (THD) micro-batches: label shifting and per-sequence pooling.

Both backends use these so that "log-prob at t", "first token of a sequence gets 0" and "mean-pool
the THINK tokens" mean exactly the same thing on plain PyTorch and on Megatron.
"""
from __future__ import annotations

import torch

from care_megatron.data.batch import PackedMicroBatch
from care_megatron.rewards.regions import Region


def sequence_start_mask(micro_batch: PackedMicroBatch, device: torch.device | None = None) -> torch.Tensor:
    """BoolTensor[T]: True at the first token of every sequence and on padding (no predictor there)."""
    T = micro_batch.num_tokens
    mask = torch.zeros(T, dtype=torch.bool, device=device or micro_batch.input_ids.device)
    starts = micro_batch.cu_seqlens[:-1].long().to(mask.device)
    mask[starts] = True
    end = int(micro_batch.cu_seqlens[-1])
    mask[end:] = True
    return mask


def align_next_token(values: torch.Tensor, micro_batch: PackedMicroBatch) -> torch.Tensor:
    """Move per-position predictions to the token they predict.

    ``values`` [T - 1] computed from hidden state t for token t + 1 becomes [T] aligned with
    ``input_ids`` (value at t = prediction of token t), with 0 at sequence starts and on padding.
    """
    out = torch.cat([values.new_zeros(1), values])
    return out.masked_fill(sequence_start_mask(micro_batch, values.device), 0.0)


def pool_think_hidden(hidden: torch.Tensor, micro_batch: PackedMicroBatch) -> torch.Tensor:
    """Mean of ``hidden`` [T, D] over each sequence's THINK response tokens -> [n, D].

    Spec section 2.3: the rationale embedding pools the <think> tokens; a rollout without a think
    span pools all of its response tokens. Sequences with no response token get a zero vector.
    """
    seq_ids = micro_batch.token_sequence_ids().to(hidden.device)
    n = micro_batch.num_sequences
    response = micro_batch.loss_mask.to(hidden.device) & (seq_ids >= 0)
    think = response & (micro_batch.region_ids.to(hidden.device) == int(Region.THINK))
    safe_ids = seq_ids.clamp(min=0)
    think_count = torch.zeros(n, device=hidden.device).index_add_(0, safe_ids, think.float())
    use_think = think_count[safe_ids] > 0
    chosen = torch.where(use_think, think, response)
    weights = chosen.to(hidden.dtype)
    sums = torch.zeros(n, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
    sums.index_add_(0, safe_ids, hidden * weights[:, None])
    counts = torch.zeros(n, dtype=hidden.dtype, device=hidden.device).index_add_(0, safe_ids, weights)
    return sums / counts.clamp(min=1)[:, None]
