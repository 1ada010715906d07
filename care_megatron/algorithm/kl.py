"""Per-token KL estimators between the policy and the frozen reference (spec section 6).

With samples drawn from the policy and ``log_ratio = ref_logprobs - logprobs`` (log pi_ref/pi):

* ``k1 = -log_ratio`` (unbiased, can be negative),
* ``k2 = 0.5 * log_ratio**2`` (biased, low variance),
* ``k3 = exp(log_ratio) - log_ratio - 1`` (unbiased, non-negative; the spec's default).

Choice: the log ratio is clamped to [-20, 20] before use (as verl does) so a token the reference
finds impossible cannot make ``exp`` overflow to inf, which would turn the loss (and, through
``0 * inf`` on masked positions, the gradients) into NaN. Inputs are upcast to float32 so bf16
log-probs give the same estimates as float32 ones up to the bf16 rounding of the inputs.
Gradients flow through ``logprobs`` only; ``ref_logprobs`` is detached.
"""
from __future__ import annotations

from typing import Callable

import torch

LOG_RATIO_CLAMP = 20.0


def _log_ratio(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return (ref_logprobs.detach().float() - logprobs.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 per token: ``logp - ref`` [T] -> [T]."""
    return -_log_ratio(logprobs, ref_logprobs)


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 per token: ``0.5 (logp - ref)^2`` [T] -> [T]."""
    return 0.5 * _log_ratio(logprobs, ref_logprobs).pow(2)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 per token: ``exp(ref - logp) - (ref - logp) - 1`` [T] -> [T] (>= 0)."""
    log_ratio = _log_ratio(logprobs, ref_logprobs)
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL estimate by name; unknown names raise listing the valid ones."""
    try:
        fn = KL_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}") from None
    return fn(logprobs, ref_logprobs)
