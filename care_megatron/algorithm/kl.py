"""Per-token KL estimators between the policy and the frozen reference (docs/algorithm.md sections 6 and 8).

With samples drawn from the policy and ``log_ratio = ref_logprobs - logprobs`` (log pi_ref/pi):

* ``k1 = -log_ratio`` (unbiased, can be negative),
* ``k2 = 0.5 * log_ratio**2`` (biased, low variance),
* ``k3 = exp(log_ratio) - log_ratio - 1`` (unbiased, non-negative; the spec's default).

Numerical guards (see ``docs/algorithm.md``):

* The log ratio is clamped to [-20, 20] before use, so a token the reference finds impossible cannot
  make ``exp`` overflow to inf, which would turn the loss (and, through ``0 * inf`` on masked
  positions, the gradients) into NaN. verl applies this clamp only inside its ``low_var_kl`` (k3)
  estimator; its ``kl`` (k1) and ``mse`` (k2) are unclamped. Clamping k1 / k2 as well is this
  project's choice (it only matters for tokens more than 20 nats off the reference).
* The k3 *value* is then clamped to ``[-kl_clamp, kl_clamp]`` (default 10, ``None`` disables), as
  verl / EasyR1 ``low_var_kl`` do (docs/algorithm.md section 8): one token far off the reference cannot dominate
  the step's KL term, and a clamped token gets no KL gradient. k3 >= 0, so only the upper bound
  ever acts. k1 and k2 are never value-clamped.

Inputs are upcast to float32 so bf16
log-probs give the same estimates as float32 ones up to the bf16 rounding of the inputs.
Gradients flow through ``logprobs`` only; ``ref_logprobs`` is detached.
"""
from __future__ import annotations

from typing import Callable

import torch

LOG_RATIO_CLAMP = 20.0
DEFAULT_KL_CLAMP = 10.0
"""Bound of the per-token k3 value (verl / EasyR1 ``low_var_kl``)."""


def _log_ratio(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    return (ref_logprobs.detach().float() - logprobs.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 per token: ``logp - ref`` [T] -> [T]."""
    return -_log_ratio(logprobs, ref_logprobs)


def kl_k2(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k2 per token: ``0.5 (logp - ref)^2`` [T] -> [T]."""
    return 0.5 * _log_ratio(logprobs, ref_logprobs).pow(2)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, clamp: float | None = None) -> torch.Tensor:
    """k3 per token: ``exp(ref - logp) - (ref - logp) - 1`` [T] -> [T] (>= 0), clamped to
    ``[-clamp, clamp]`` when ``clamp`` is not None."""
    log_ratio = _log_ratio(logprobs, ref_logprobs)
    k3 = torch.expm1(log_ratio) - log_ratio
    return k3 if clamp is None else k3.clamp(-clamp, clamp)


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k2": kl_k2,
    "k3": kl_k3,
}


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k3",
               k3_clamp: float | None = None) -> torch.Tensor:
    """Per-token KL estimate by name; unknown names raise listing the valid ones. ``k3_clamp`` bounds
    the k3 value (ignored by k1 / k2)."""
    try:
        fn = KL_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(f"unknown KL estimator {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}") from None
    if estimator == "k3":
        return kl_k3(logprobs, ref_logprobs, k3_clamp)
    return fn(logprobs, ref_logprobs)
