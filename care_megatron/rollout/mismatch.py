"""Train / rollout mismatch: how far the trainer's log-probs are from the rollout engine's.

The rollout engine (SGLang kernels, bf16, a different batch layout) and the trainer (Megatron /
PyTorch) compute the log-prob of the same token under the same weights differently. The gap is the
most reported silent failure of RL systems, so it is logged every step, and truncated importance
sampling (TIS) can correct the policy gradient for it.

All functions are pure torch and follow the per-token alignment of ``care_megatron.data.batch``:
tensors are [T] (packed) or [B, L], and ``mask`` selects the response tokens.
"""
from __future__ import annotations

import torch


def logprob_temperature(sampling_temperature: float) -> float:
    """Temperature the behaviour log-probs are taken at: ``T`` when sampling at ``T > 0``, 1 when
    greedy (``T == 0``).

    Both rollout engines report ``log_softmax(logits / T)`` (before top-k / top-p), so the trainer
    must divide its logits by this same value before its log-softmax for the importance ratio and
    for :func:`rollout_mismatch` to compare like with like.
    """
    if sampling_temperature < 0:
        raise ValueError(f"sampling temperature must be >= 0, got {sampling_temperature}")
    return float(sampling_temperature) if sampling_temperature > 0 else 1.0


def rollout_mismatch(
    logp_train: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean absolute log-prob gap over response tokens.

    Args:
        logp_train: FloatTensor[...]: trainer log-probs (no grad needed) of the sampled tokens.
        logp_rollout: FloatTensor[...]: behaviour log-probs from the rollout engine, same shape.
        mask: BoolTensor[...]: True on response tokens.

    Returns:
        ``(mean |logp_train - logp_rollout|, metrics)`` with metrics
        ``rollout/mismatch_abs_mean``, ``rollout/mismatch_abs_max``, ``rollout/mismatch_mean``
        (signed: > 0 means the trainer finds the tokens likelier) and
        ``rollout/mismatch_k3_kl`` (k3 estimate of KL(rollout || train) per token). A mask with no
        token gives 0 everywhere.
    """
    if logp_train.shape != logp_rollout.shape or logp_train.shape != mask.shape:
        raise ValueError(
            f"rollout_mismatch: shapes differ: train {tuple(logp_train.shape)}, rollout "
            f"{tuple(logp_rollout.shape)}, mask {tuple(mask.shape)}"
        )
    mask = mask.bool()
    diff = (logp_train.detach().float() - logp_rollout.detach().float())[mask]
    if diff.numel() == 0:
        zero = torch.zeros((), dtype=torch.float32)
        return zero, {"rollout/mismatch_abs_mean": 0.0, "rollout/mismatch_abs_max": 0.0,
                      "rollout/mismatch_mean": 0.0, "rollout/mismatch_k3_kl": 0.0}
    abs_mean = diff.abs().mean()
    # k3 with log-ratio log(p_train / p_rollout) sampled under the rollout policy.
    k3 = (torch.exp(diff) - diff - 1).mean()
    return abs_mean, {
        "rollout/mismatch_abs_mean": float(abs_mean),
        "rollout/mismatch_abs_max": float(diff.abs().max()),
        "rollout/mismatch_mean": float(diff.mean()),
        "rollout/mismatch_k3_kl": float(k3),
    }


def truncated_importance_weights(
    logp_train_old: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor, cap: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated importance sampling weights ``min(exp(logp_train_old - logp_rollout), cap)``.

    The policy-gradient loss is computed with the trainer's old log-probs as the proximal policy,
    but the tokens were drawn by the rollout engine; multiplying each token's loss by this weight
    corrects for the gap, truncated at ``cap`` (>= 1) to bound the variance.

    Args:
        logp_train_old: FloatTensor[...]: trainer log-probs of the sampled tokens before the update.
        logp_rollout: FloatTensor[...]: behaviour log-probs from the rollout engine.
        mask: BoolTensor[...]: response tokens; weights elsewhere are 0.
        cap: truncation value, >= 1.

    Returns:
        ``(weights, metrics)``: weights FloatTensor[...] with no gradient, 0 outside ``mask``;
        metrics ``rollout/tis_weight_mean`` and ``rollout/tis_clip_frac`` (share of response tokens
        whose weight was truncated) over masked tokens.
    """
    if cap < 1:
        raise ValueError(f"truncated_importance_weights: cap must be >= 1, got {cap}")
    if logp_train_old.shape != logp_rollout.shape or logp_train_old.shape != mask.shape:
        raise ValueError(
            f"truncated_importance_weights: shapes differ: {tuple(logp_train_old.shape)}, "
            f"{tuple(logp_rollout.shape)}, {tuple(mask.shape)}"
        )
    mask = mask.bool()
    log_ratio = (logp_train_old.detach().float() - logp_rollout.detach().float())
    # Clamp the log-ratio, not the ratio, so exp never overflows on masked-out garbage.
    ratio = torch.exp(torch.clamp(log_ratio, max=float(torch.log(torch.tensor(cap)))))
    weights = torch.where(mask, torch.clamp(ratio, max=cap), torch.zeros_like(ratio))
    n = int(mask.sum())
    if n == 0:
        return weights, {"rollout/tis_weight_mean": 0.0, "rollout/tis_clip_frac": 0.0}
    clipped = (log_ratio > float(torch.log(torch.tensor(cap)))) & mask
    return weights, {
        "rollout/tis_weight_mean": float(weights[mask].mean()),
        "rollout/tis_clip_frac": float(clipped.sum()) / n,
    }
