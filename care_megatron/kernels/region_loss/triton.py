"""Triton kernels for the region-weighted loss: one forward kernel (per-block loss / KL sums and
clip statistics, no atomics so results are deterministic) and one backward kernel (d loss / d logp
for every token). Same contract as ``reference.py``; kernels become Triton kernels lazily through
:func:`care_megatron.kernels._dispatch.jit_for_device`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from care_megatron.kernels._dispatch import jit_for_device
from care_megatron.kernels.region_loss.reference import NUM_STATS

BLOCK_TOKENS = 1024


def _region_loss_forward_kernel(
    logprobs_ptr,
    old_logprobs_ptr,
    ref_logprobs_ptr,
    advantages_ptr,
    region_ids_ptr,
    is_positive_ptr,
    has_answer_ptr,
    loss_mask_ptr,
    weight_sums_ptr,
    block_stats_ptr,
    num_tokens,
    gamma_pos,
    gamma_neg,
    clip_low,
    clip_high,
    weight_eps,
    dual_clip,
    kl_clamp,
    HAS_REF: tl.constexpr,
    DUAL_CLIP: tl.constexpr,
    KL_CLAMP: tl.constexpr,
    NUM_STATS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    block = tl.program_id(0)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < num_tokens
    mask = tl.load(loss_mask_ptr + offsets, mask=in_range, other=0) != 0
    region = tl.load(region_ids_ptr + offsets, mask=in_range, other=0)
    positive = tl.load(is_positive_ptr + offsets, mask=in_range, other=0) != 0
    has_answer = tl.load(has_answer_ptr + offsets, mask=in_range, other=0) != 0
    is_think = region == 1
    weight = tl.where(region == 2, 1.0, tl.where(is_think, tl.where(positive, gamma_pos, gamma_neg), 0.0))
    weight = tl.where(has_answer, weight, 1.0)
    weight = tl.where(mask, weight, 0.0)
    active = weight > 0
    weight_sum = tl.load(weight_sums_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
    advantage = tl.load(advantages_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
    token_advantage = advantage * weight / (weight_sum + weight_eps)
    # zero the inputs of tokens without loss before exp(), as the reference does
    logp = tl.where(mask, tl.load(logprobs_ptr + offsets, mask=in_range, other=0.0).to(tl.float32), 0.0)
    old = tl.where(active, tl.load(old_logprobs_ptr + offsets, mask=in_range, other=0.0).to(tl.float32), logp)
    ratio = tl.exp(logp - old)
    clipped_ratio = tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
    surrogate = -tl.minimum(ratio * token_advantage, clipped_ratio * token_advantage)
    if DUAL_CLIP:
        cap = -dual_clip * token_advantage
        dual_clipped = active & (token_advantage < 0) & (surrogate > cap)
        surrogate = tl.where(token_advantage < 0, tl.minimum(surrogate, cap), surrogate)
    else:
        dual_clipped = active & (token_advantage != token_advantage)  # all False
    surrogate = tl.where(active, surrogate, 0.0)
    stats_row = block_stats_ptr + block * NUM_STATS
    tl.store(stats_row + 0, tl.sum(surrogate, axis=0))
    if HAS_REF:
        ref = tl.where(mask, tl.load(ref_logprobs_ptr + offsets, mask=in_range, other=0.0).to(tl.float32), logp)
        delta = tl.minimum(tl.maximum(ref - logp, -20.0), 20.0)
        k3 = tl.exp(delta) - delta - 1.0
        if KL_CLAMP:
            k3 = tl.minimum(tl.maximum(k3, -kl_clamp), kl_clamp)
        k3 = tl.where(mask, k3, 0.0)
        tl.store(stats_row + 1, tl.sum(k3, axis=0))
    else:
        tl.store(stats_row + 1, 0.0)
    clipped_high = active & (token_advantage > 0) & (ratio > 1.0 + clip_high)
    clipped_low = active & (token_advantage < 0) & (ratio < 1.0 - clip_low)
    # bucket = 2 * negative + think: positive_answer, positive_think, negative_answer, negative_think
    bucket_of_token = tl.where(positive, 0, 2) + tl.where(is_think, 1, 0)
    for bucket in tl.static_range(4):
        in_bucket = bucket_of_token == bucket
        tl.store(stats_row + 2 + bucket, tl.sum(tl.where(clipped_high & in_bucket, 1.0, 0.0), axis=0))
        tl.store(stats_row + 6 + bucket, tl.sum(tl.where(clipped_low & in_bucket, 1.0, 0.0), axis=0))
        tl.store(stats_row + 10 + bucket, tl.sum(tl.where(active & in_bucket, 1.0, 0.0), axis=0))
        tl.store(stats_row + 14 + bucket, tl.sum(tl.where(dual_clipped & in_bucket, 1.0, 0.0), axis=0))


def _region_loss_backward_kernel(
    logprobs_ptr,
    old_logprobs_ptr,
    ref_logprobs_ptr,
    advantages_ptr,
    region_ids_ptr,
    is_positive_ptr,
    has_answer_ptr,
    loss_mask_ptr,
    weight_sums_ptr,
    grad_output_ptr,
    seq_normaliser_ptr,
    token_normaliser_ptr,
    grad_logprobs_ptr,
    num_tokens,
    gamma_pos,
    gamma_neg,
    clip_low,
    clip_high,
    kl_coef,
    weight_eps,
    dual_clip,
    kl_clamp,
    HAS_REF: tl.constexpr,
    DUAL_CLIP: tl.constexpr,
    KL_CLAMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    block = tl.program_id(0)
    offsets = block * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < num_tokens
    mask = tl.load(loss_mask_ptr + offsets, mask=in_range, other=0) != 0
    region = tl.load(region_ids_ptr + offsets, mask=in_range, other=0)
    positive = tl.load(is_positive_ptr + offsets, mask=in_range, other=0) != 0
    has_answer = tl.load(has_answer_ptr + offsets, mask=in_range, other=0) != 0
    weight = tl.where(region == 2, 1.0, tl.where(region == 1, tl.where(positive, gamma_pos, gamma_neg), 0.0))
    weight = tl.where(has_answer, weight, 1.0)
    weight = tl.where(mask, weight, 0.0)
    active = weight > 0
    weight_sum = tl.load(weight_sums_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
    advantage = tl.load(advantages_ptr + offsets, mask=in_range, other=0.0).to(tl.float32)
    token_advantage = advantage * weight / (weight_sum + weight_eps)
    logp = tl.where(mask, tl.load(logprobs_ptr + offsets, mask=in_range, other=0.0).to(tl.float32), 0.0)
    old = tl.where(active, tl.load(old_logprobs_ptr + offsets, mask=in_range, other=0.0).to(tl.float32), logp)
    ratio = tl.exp(logp - old)
    # the clipped branch is constant in logp: it wins (and kills the gradient) only strictly
    # outside the trust region in the direction the advantage pushes
    clipped = ((token_advantage > 0) & (ratio > 1.0 + clip_high)) | ((token_advantage < 0) & (ratio < 1.0 - clip_low))
    if DUAL_CLIP:
        # the cap c |A_hat| is constant too: a negative-advantage token above it has no gradient
        clipped_ratio = tl.minimum(tl.maximum(ratio, 1.0 - clip_low), 1.0 + clip_high)
        surrogate = -tl.minimum(ratio * token_advantage, clipped_ratio * token_advantage)
        clipped = clipped | ((token_advantage < 0) & (surrogate > -dual_clip * token_advantage))
    grad_surrogate = tl.where(active & (~clipped), -ratio * token_advantage, 0.0)
    grad_output = tl.load(grad_output_ptr).to(tl.float32)
    grad = grad_surrogate / tl.load(seq_normaliser_ptr).to(tl.float32)
    if HAS_REF:
        ref = tl.where(mask, tl.load(ref_logprobs_ptr + offsets, mask=in_range, other=0.0).to(tl.float32), logp)
        raw_delta = ref - logp
        delta = tl.minimum(tl.maximum(raw_delta, -20.0), 20.0)
        # d k3 / d logp = 1 - exp(delta), zero where either clamp holds the value constant
        live = mask & (raw_delta >= -20.0) & (raw_delta <= 20.0)
        if KL_CLAMP:
            k3 = tl.exp(delta) - delta - 1.0
            live = live & (k3 <= kl_clamp) & (k3 >= -kl_clamp)
        grad_k3 = tl.where(live, 1.0 - tl.exp(delta), 0.0)
        grad += kl_coef * grad_k3 / tl.load(token_normaliser_ptr).to(tl.float32)
    grad = grad * grad_output
    tl.store(grad_logprobs_ptr + offsets, grad.to(grad_logprobs_ptr.dtype.element_ty), mask=in_range)


def _flag(tensor: torch.Tensor) -> torch.Tensor:
    """Bool tensors as uint8 views (no copy) so every Triton version loads them the same way."""
    return tensor.view(torch.uint8) if tensor.dtype == torch.bool else tensor


def _token_inputs(inputs: dict) -> tuple:
    """The per-token tensors both kernels take first, in their parameter order (the log-probs stand
    in for an absent reference: ``HAS_REF`` keeps them unread)."""
    logprobs, ref = inputs["logprobs"], inputs["ref_logprobs"]
    return (logprobs, inputs["old_logprobs"], ref if ref is not None else logprobs, inputs["advantages"],
            inputs["region_ids"], _flag(inputs["is_positive"]), _flag(inputs["has_answer"]),
            _flag(inputs["loss_mask"]), inputs["weight_sums"])


def _scalars(config) -> dict:
    """The config's scalars and switches as the kernels take them (disabled limits pass a dummy 0)."""
    return dict(gamma_pos=float(config.gamma_pos), gamma_neg=float(config.gamma_neg), clip_low=float(config.clip_low),
                clip_high=float(config.clip_high), weight_eps=float(config.weight_eps),
                dual_clip=float(config.dual_clip), kl_clamp=float(config.kl_clamp or 0.0),
                DUAL_CLIP=bool(config.dual_clip), KL_CLAMP=config.kl_clamp is not None)


def region_loss_forward(inputs: dict, config) -> torch.Tensor:
    """Stats vector [NUM_STATS] fp32 (see reference.STAT_NAMES) from the per-token ``inputs`` and a
    ``RegionLossConfig``."""
    logprobs = inputs["logprobs"]
    num_tokens = logprobs.numel()
    num_blocks = max(triton.cdiv(num_tokens, BLOCK_TOKENS), 1)
    block_stats = torch.empty(num_blocks, NUM_STATS, dtype=torch.float32, device=logprobs.device)
    kernel = jit_for_device(_region_loss_forward_kernel, logprobs.device)
    kernel[(num_blocks,)](
        *_token_inputs(inputs),
        block_stats,
        num_tokens,
        **_scalars(config),
        HAS_REF=inputs["ref_logprobs"] is not None,
        NUM_STATS=NUM_STATS,
        BLOCK=BLOCK_TOKENS,
    )
    return block_stats.sum(0)


def region_loss_backward(
    inputs: dict,
    grad_output: torch.Tensor,
    seq_normaliser: torch.Tensor,
    token_normaliser: torch.Tensor,
    config,
) -> torch.Tensor:
    """d loss / d logprobs [T] (dtype of logprobs), scaled by the 0-dim ``grad_output``; ``config`` a
    ``RegionLossConfig``."""
    logprobs = inputs["logprobs"]
    num_tokens = logprobs.numel()
    grad_logprobs = torch.empty_like(logprobs)
    if num_tokens == 0:
        return grad_logprobs
    kernel = jit_for_device(_region_loss_backward_kernel, logprobs.device)
    kernel[(triton.cdiv(num_tokens, BLOCK_TOKENS),)](
        *_token_inputs(inputs),
        grad_output,
        seq_normaliser,
        token_normaliser,
        grad_logprobs,
        num_tokens,
        kl_coef=float(config.kl_coef),
        **_scalars(config),
        HAS_REF=inputs["ref_logprobs"] is not None,
        BLOCK=BLOCK_TOKENS,
    )
    return grad_logprobs
