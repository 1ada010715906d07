"""Torch reference for CARE's region-weighted token objective (docs/algorithm.md sections 6 and 8).

Pure, readable and differentiable by torch autograd; the Triton kernels in ``triton.py`` must match
it to the tolerances of ``tests/kernels/test_region_loss.py``.

Per token t of response i (all inputs are per-token ``[T]`` tensors on the packed token axis):

* weight ``w_it``: answer-span tokens 1; think tokens ``gamma_pos`` for a positive sequence,
  ``gamma_neg`` (default 0; the "failed think unmasked" ablation) for a negative one; other tokens
  0; a sequence without an answer span weighs 1 on every response token. Only ``loss_mask`` tokens (response tokens) ever weigh.
* ``A_hat_it = A_i * w_it / (sum_t w_it + eps)``; the per-sequence sum comes in as ``weight_sums``
  (broadcast per token), computed by the caller over the *whole* sequence
  (:func:`sequence_weight_sums`), so splitting a sequence across micro-batches cannot change it.
* ``rho = exp(logp - logp_old)``; surrogate
  ``-min(rho A_hat, clip(rho, 1 - eps_low, 1 + eps_high) A_hat)``, summed and divided by
  ``seq_normaliser`` (N_seq of the global batch). Dual clip (``dual_clip`` = c > 1, 0 disables):
  a token with ``A_hat < 0`` loses at most ``c * |A_hat|`` (equivalently: its ratio stops counting
  at ``rho = c``; no gradient beyond).
* k3 KL ``exp(d) - d - 1`` with ``d = ref - logp`` clamped to [-20, 20], the k3 value clamped to
  ``[-kl_clamp, kl_clamp]`` (None disables; a clamped token has no KL gradient), over ``loss_mask``
  tokens, summed, divided by ``token_normaliser`` and multiplied by ``kl_coef``. Same limits as
  :mod:`care_megatron.algorithm.kl` and the ``care`` policy loss.

Statistics (one fp32 vector, so a fused kernel can fill it without host syncs), layout
``STAT_NAMES``: the unnormalised surrogate sum, the unnormalised KL sum, then for each bucket
(positive/negative x answer/think, "answer" meaning any weighted non-think token) the number of
tokens clipped above (A_hat > 0, rho > 1 + eps_high), clipped below (A_hat < 0, rho < 1 - eps_low)
and active (w > 0), then the tokens the dual clip capped.
"""
from __future__ import annotations

import torch

from care_megatron.rewards.regions import Region

BUCKETS = ("positive_answer", "positive_think", "negative_answer", "negative_think")
STAT_NAMES = (
    ("pg_sum", "kl_sum")
    + tuple(f"clipped_high/{bucket}" for bucket in BUCKETS)
    + tuple(f"clipped_low/{bucket}" for bucket in BUCKETS)
    + tuple(f"active/{bucket}" for bucket in BUCKETS)
    + tuple(f"dual_clipped/{bucket}" for bucket in BUCKETS)
)
KL_LOG_RATIO_CLAMP = 20.0
"""|ref - logp| bound before exp (as ``algorithm.kl.LOG_RATIO_CLAMP``)."""
NUM_STATS = len(STAT_NAMES)


def region_token_weights(
    region_ids: torch.Tensor,
    is_positive: torch.Tensor,
    has_answer: torch.Tensor,
    loss_mask: torch.Tensor,
    gamma_pos: float,
    gamma_neg: float = 0.0,
) -> torch.Tensor:
    """Section-6 token weights w [T] fp32 from region ids [T] and per-token flags [T] (bool)."""
    answer = region_ids == int(Region.ANSWER)
    think = region_ids == int(Region.THINK)
    think_weight = torch.where(is_positive.bool(), gamma_pos, gamma_neg)
    weights = answer.float() + torch.where(think, think_weight, 0.0).float()
    weights = torch.where(has_answer.bool(), weights, torch.ones_like(weights))
    return weights * loss_mask.float()


def sequence_weight_sums(token_weights: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Per-token broadcast of each sequence's weight sum.

    token_weights [T]; cu_seqlens [n + 1] int boundaries of the packed sequences (tokens past
    ``cu_seqlens[-1]`` are padding and get 0). Call it on whole sequences, before micro-batching.
    """
    num_tokens = token_weights.numel()
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    sequence_index = torch.repeat_interleave(torch.arange(lengths.numel(), device=token_weights.device), lengths)
    sums = torch.zeros(lengths.numel(), dtype=torch.float32, device=token_weights.device)
    sums.index_add_(0, sequence_index, token_weights[: sequence_index.numel()].float())
    out = torch.zeros(num_tokens, dtype=torch.float32, device=token_weights.device)
    out[: sequence_index.numel()] = sums[sequence_index]
    return out


def region_policy_loss_reference(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    region_ids: torch.Tensor,
    is_positive: torch.Tensor,
    has_answer: torch.Tensor,
    loss_mask: torch.Tensor,
    weight_sums: torch.Tensor,
    seq_normaliser: torch.Tensor,
    token_normaliser: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    gamma_pos: float,
    clip_low: float,
    clip_high: float,
    kl_coef: float,
    weight_eps: float,
    dual_clip: float = 0.0,
    kl_clamp: float | None = None,
    gamma_neg: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Section-6 loss (scalar fp32, differentiable wrt ``logprobs``) and the stats vector [NUM_STATS]."""
    mask = loss_mask.bool()
    weights = region_token_weights(region_ids, is_positive, has_answer, mask, gamma_pos, gamma_neg)
    active = weights > 0
    token_advantages = advantages.float() * weights / (weight_sums.float() + weight_eps)
    # tokens that carry no loss are zeroed *before* exp(): a stray value there (padding, -inf) must
    # not turn into inf * 0 = nan in the forward or the backward pass
    logp = torch.where(mask, logprobs.float(), torch.zeros_like(logprobs, dtype=torch.float32))
    log_ratio = logp - torch.where(active, old_logprobs.float(), logp.detach())
    ratio = log_ratio.exp()
    clipped_ratio = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    surrogate = -torch.minimum(ratio * token_advantages, clipped_ratio * token_advantages)
    dual_clipped = torch.zeros_like(mask)
    if dual_clip:
        cap = -dual_clip * token_advantages
        dual_clipped = active & (token_advantages < 0) & (surrogate > cap)
        surrogate = torch.where(token_advantages < 0, torch.minimum(surrogate, cap), surrogate)
    pg_sum = torch.where(active, surrogate, torch.zeros_like(surrogate)).sum()
    loss = pg_sum / seq_normaliser
    kl_sum = torch.zeros((), dtype=torch.float32, device=logprobs.device)
    if ref_logprobs is not None:
        ref_minus_logp = torch.where(mask, ref_logprobs.float(), logp.detach()) - logp
        ref_minus_logp = ref_minus_logp.clamp(-KL_LOG_RATIO_CLAMP, KL_LOG_RATIO_CLAMP)
        k3 = ref_minus_logp.exp() - ref_minus_logp - 1.0
        if kl_clamp is not None:
            k3 = k3.clamp(-kl_clamp, kl_clamp)
        kl_sum = torch.where(mask, k3, torch.zeros_like(k3)).sum()
        loss = loss + kl_coef * kl_sum / token_normaliser

    with torch.no_grad():
        think = region_ids == int(Region.THINK)
        bucket = (~is_positive.bool()).long() * 2 + think.long()
        clipped_high = active & (token_advantages > 0) & (ratio > 1.0 + clip_high)
        clipped_low = active & (token_advantages < 0) & (ratio < 1.0 - clip_low)
        counts = [
            torch.zeros(len(BUCKETS), dtype=torch.float32, device=logprobs.device).index_add_(0, bucket, flags.float())
            for flags in (clipped_high, clipped_low, active, dual_clipped)
        ]
        stats = torch.cat([pg_sum.detach().reshape(1), kl_sum.detach().reshape(1), *counts])
    return loss, stats
