"""Region weights, per-token advantages and the policy losses, registered by name (docs/algorithm.md sections 6-8).

Every loss works on the FLAT per-token tensors of one packed micro-batch (THD layout, see
:mod:`care_megatron.data.batch`) and has one signature::

    loss, metrics = get_policy_loss(name)(
        logprobs, old_logprobs, token_advantages, response_mask, token_sequence_ids, normalisers,
        config, ref_logprobs=None, entropy=None, region_ids=None)

Shapes: all per-token tensors are [T]; ``logprobs`` carries the gradient, everything else is
detached inside. ``token_sequence_ids`` gives each token's sequence within the micro-batch
(``PackedMicroBatch.token_sequence_ids()``: 0..n-1, -1 on padding). ``token_advantages`` are the
output of :func:`token_advantages` (or :func:`build_token_advantages`).

Micro-batch invariance (the loss contract of ``training/base.py``): every term is a *sum over this
micro-batch's tokens or sequences* divided by a normaliser of the *whole global batch*, computed once
per step with :func:`compute_normalisers` (and summed over data-parallel ranks by the trainer).
Summing the micro-batch losses therefore gives exactly the full-batch loss, for any split,
packing or data-parallel layout, provided a sequence is never split across micro-batches (packing
never splits one). Concretely:

* ``care``: ``L_pg = -sum_{i,t} min(rho A_hat, clip(rho) A_hat) / N_seq`` with region-weighted,
  per-sequence-normalised ``A_hat`` (section 6); ``N_seq = normalisers['num_advantaged_sequences']``,
  the sequences of the global mini-batch with a non-zero sequence-level advantage (the paper's
  "indices with nonzero sequence-level advantages").
* ``grpo`` / ``dapo`` / ``rloo`` ("token-mean"): ``-sum_{i,t} min(...) / N_tok`` with
  ``A_hat_{i,t} = A_i`` on every response token and ``N_tok = normalisers['num_tokens']``, the
  response tokens of the global batch. This is the DAPO token-level mean over the whole batch
  (not a mean of per-micro-batch means, which would depend on the split).
* ``dr_grpo``: ``-sum_{i,t} min(...) / (N_seq * L_max)``, ``L_max = normalisers['max_response_length']``
  (the generation cap, a constant), i.e. the mean over sequences of token sums divided by the
  constant, as in the Dr.GRPO paper.
* ``gspo``: sequence ratio ``s_i = exp(mean_t (logp - logp_old))`` over the response tokens of i,
  ``-sum_i min(s_i A_i, clip(s_i) A_i) / N_seq`` with ``A_i`` the mean token advantage of i.
* KL (when ``config.kl_coef > 0``): ``kl_coef * sum_{i,t} kl_t / N_tok`` (token-mean, section 6),
  estimator ``config.kl_estimator`` (:mod:`.kl`). Entropy bonus (when ``config.entropy_coef > 0``):
  ``-entropy_coef * sum_{i,t} H_t / N_tok``.

Safety limits (docs/algorithm.md section 8, on by default): the **dual clip** caps the per-token loss of a
negative-advantage token at ``config.dual_clip * |A_hat|`` (0 disables; counted in
``count/dual_clipped``), for every token-level loss above but not gspo's sequence ratio; the k3 KL
value is clamped to ``[-config.kl_clamp, config.kl_clamp]`` (None disables).

Numerics: inputs are upcast to float32 (bf16 log-probs are fine); the log-ratio is clamped to
[-20, 20] before ``exp`` and masked positions never enter an ``exp``, so padding cannot produce
inf * 0 = NaN.

Metrics (``dict[str, float]``): ``loss``, ``pg_loss``, ``kl_loss``, ``entropy_loss``, ``kl``,
``entropy`` are globally normalised, so *summing* them over micro-batches gives the step's value.
``count/*`` are additive token (sequence, for gspo) counts: ``count/clipped/<part>`` and
``count/tokens/<part>`` for part in ``all``, ``pos_adv``, ``neg_adv``, ``answer``, ``think``,
``neg_adv_answer`` (``answer`` / ``think`` / ``neg_adv_answer`` only when ``region_ids`` is given;
``neg_adv_answer``, the clip rate on negative-advantage answer tokens, is the paper's Fig. 6
quantity); ``clip_frac/<part>`` is this micro-batch's fraction (exact step fractions = summed
counts). A token counts toward clipping when its advantage is non-zero and the clipped branch is the
active one (``rho > 1 + eps_high`` with ``A > 0``, ``rho < 1 - eps_low`` with ``A < 0``).
Importance-ratio statistics over the response tokens (:func:`ratio_statistics`, token ratios for
every loss, gspo included): ``count/ratio_sum`` and ``count/log_ratio_sum`` (additive),
``min/ratio`` and ``max/ratio`` (combined by min / max, :func:`combine_loss_metrics`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from care_megatron.algorithm.kl import DEFAULT_KL_CLAMP, KL_ESTIMATORS, LOG_RATIO_CLAMP, kl_penalty
from care_megatron.rewards.regions import Region

# docs/algorithm.md section 7: (clip_low, clip_high, kl_coef) of each method
METHOD_DEFAULTS: dict[str, tuple[float, float, float]] = {
    "care": (0.2, 0.28, 0.02),
    "grpo": (0.2, 0.2, 0.02),
    "dapo": (0.2, 0.28, 0.0),
    "gspo": (3e-4, 4e-4, 0.0),
    "dr_grpo": (0.2, 0.2, 0.02),
    "rloo": (0.2, 0.2, 0.02),
}
REGION_WEIGHTED_METHODS = ("care",)
"""Methods whose token advantages are region-weighted and per-sequence normalised (section 6);
the baselines keep uniform token weights (paper appendix 8: "token-uniform weighting")."""


@dataclass
class PolicyLossConfig:
    """Coefficients of the policy loss (docs/algorithm.md sections 6-7)."""

    clip_low: float = 0.2
    """eps_low: the ratio is clipped below at 1 - clip_low."""
    clip_high: float = 0.28
    """eps_high: the ratio is clipped above at 1 + clip_high (asymmetric, DAPO's clip-higher)."""
    kl_coef: float = 0.02
    """beta: weight of the token-mean KL to the reference (0 = no KL, no reference needed)."""
    kl_estimator: str = "k3"
    """KL estimator: k1, k2 or k3 (:mod:`care_megatron.algorithm.kl`)."""
    entropy_coef: float = 0.0
    """Entropy bonus weight (0 = off); the bonus is subtracted from the loss."""
    dual_clip: float = 3.0
    """c of the dual clip (docs/algorithm.md section 8): a token with a negative advantage loses at most
    ``c * |A_hat|`` (its ratio's influence stops at ``rho = c``); every token-level clipped loss
    (care, grpo, dapo, rloo, dr_grpo), not gspo's sequence ratio. 0 disables; otherwise > 1
    (verl ``clip_ratio_c`` = 3.0)."""
    kl_clamp: float | None = DEFAULT_KL_CLAMP
    """Bound of the per-token k3 value, ``[-kl_clamp, kl_clamp]`` (verl ``low_var_kl``: 10); None disables."""

    def __post_init__(self) -> None:
        for name in ("clip_low", "clip_high", "kl_coef", "entropy_coef", "dual_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"PolicyLossConfig field '{name}': must be >= 0, got {getattr(self, name)!r}")
        if self.dual_clip and self.dual_clip <= 1:
            raise ValueError(f"PolicyLossConfig field 'dual_clip': must be 0 (off) or > 1, got {self.dual_clip!r}")
        if self.kl_clamp is not None and not self.kl_clamp > 0:
            raise ValueError(f"PolicyLossConfig field 'kl_clamp': must be None (off) or > 0, got {self.kl_clamp!r}")
        if self.clip_low >= 1:
            raise ValueError(f"PolicyLossConfig field 'clip_low': must be < 1, got {self.clip_low!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"PolicyLossConfig field 'kl_estimator': unknown {self.kl_estimator!r}; "
                             f"valid: {', '.join(KL_ESTIMATORS)}")

    @classmethod
    def for_method(cls, name: str, clip_low: float | None = None, clip_high: float | None = None,
                   kl_coef: float | None = None, kl_estimator: str = "k3", entropy_coef: float = 0.0,
                   dual_clip: float = 3.0, kl_clamp: float | None = DEFAULT_KL_CLAMP) -> "PolicyLossConfig":
        """The method's section-7 defaults, with any of them overridden (None keeps the default)."""
        if name not in METHOD_DEFAULTS:
            raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHOD_DEFAULTS)}")
        low, high, beta = METHOD_DEFAULTS[name]
        return cls(clip_low=low if clip_low is None else clip_low, clip_high=high if clip_high is None else clip_high,
                   kl_coef=beta if kl_coef is None else kl_coef, kl_estimator=kl_estimator, entropy_coef=entropy_coef,
                   dual_clip=dual_clip, kl_clamp=kl_clamp)


# ---------------------------------------------------------------------------------------------
# region weights and per-token advantages (section 6)
# ---------------------------------------------------------------------------------------------

def _per_sequence_sum(values: torch.Tensor, token_sequence_ids: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Sum of ``values`` [T] per sequence -> [n]; padding (-1) is dropped."""
    keep = token_sequence_ids >= 0
    out = torch.zeros(num_sequences, dtype=values.dtype, device=values.device)
    return out.index_add_(0, token_sequence_ids[keep], values[keep])


def _num_sequences(token_sequence_ids: torch.Tensor) -> int:
    return int(token_sequence_ids.max()) + 1 if token_sequence_ids.numel() else 0


def region_weights(
    region_ids: torch.Tensor,
    response_mask: torch.Tensor,
    token_sequence_ids: torch.Tensor,
    positive: torch.Tensor,
    think_weight_pos: float = 0.005,
    think_weight_neg: float = 0.0,
) -> torch.Tensor:
    """Token weights w_{i,t} of docs/algorithm.md section 6 -> FloatTensor[T].

    ``region_ids`` LongTensor[T] (:class:`Region` codes); ``response_mask`` BoolTensor[T];
    ``token_sequence_ids`` LongTensor[T] (-1 on padding); ``positive`` BoolTensor[n] per sequence
    (verifier-correct rollouts and successful reflections). Answer tokens (tags included) get 1;
    think tokens ``think_weight_pos`` for a positive, ``think_weight_neg`` for a negative (0 by
    default: the paper masks failed rationales; > 0 is its "fail-think unmasked" ablation); other tokens 0; a response
    with no answer token gets 1 on every response token. Non-response tokens always get 0.
    Choice: "positive" is the correctness gate, so a rescue pseudo-anchor (a failure with a positive
    advantage) gets no think weight; its answer tokens carry its update.
    """
    n = positive.numel()
    valid = response_mask.bool() & (token_sequence_ids >= 0)
    seq = token_sequence_ids.clamp(min=0)
    is_answer = valid & (region_ids == int(Region.ANSWER))
    is_think = valid & (region_ids == int(Region.THINK))
    has_answer = _per_sequence_sum(is_answer.float(), token_sequence_ids, n) > 0
    think_weight = torch.where(positive.bool()[seq], think_weight_pos, think_weight_neg)
    weights = torch.where(is_answer, 1.0, torch.where(is_think, think_weight, 0.0))
    weights = torch.where(has_answer[seq], weights, 1.0)
    return torch.where(valid, weights, 0.0).float()


def token_advantages(
    sequence_advantages: torch.Tensor,
    token_sequence_ids: torch.Tensor,
    token_weights: torch.Tensor,
    eps: float = 1e-6,
    normalise: bool = True,
) -> torch.Tensor:
    """Spread sequence advantages A_i [n] over tokens -> FloatTensor[T].

    ``normalise=True`` (CARE, section 6): ``A_i * w_{i,t} / (sum_t w_{i,t} + eps)``.
    ``normalise=False`` (baselines): ``A_i * w_{i,t}``; with ``w`` the response mask this is
    ``A_i`` on every response token. Padding tokens (sequence id -1) get 0. No gradient.
    """
    n = sequence_advantages.numel()
    w = token_weights.detach().float()
    seq = token_sequence_ids.clamp(min=0)
    a = sequence_advantages.detach().float()[seq] if n else torch.zeros_like(w)
    if normalise:
        totals = _per_sequence_sum(w, token_sequence_ids, n)
        out = a * w / (totals[seq] + eps) if n else w * 0
    else:
        out = a * w
    return torch.where(token_sequence_ids >= 0, out, 0.0)


def build_token_advantages(
    method: str,
    sequence_advantages: torch.Tensor,
    token_sequence_ids: torch.Tensor,
    response_mask: torch.Tensor,
    region_ids: torch.Tensor | None = None,
    positive: torch.Tensor | None = None,
    think_weight_pos: float = 0.005,
    eps: float = 1e-6,
    think_weight_neg: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token weights and token advantages the way ``method`` wants them -> ``(weights [T], A_hat [T])``.

    CARE: :func:`region_weights` then normalised :func:`token_advantages` (needs ``region_ids``
    and ``positive``). Baselines: uniform weights on response tokens, un-normalised.
    """
    mask = response_mask.bool() & (token_sequence_ids >= 0)
    if method in REGION_WEIGHTED_METHODS:
        if region_ids is None or positive is None:
            raise ValueError(f"{method} token advantages need region_ids and positive")
        weights = region_weights(region_ids, mask, token_sequence_ids, positive, think_weight_pos, think_weight_neg)
        return weights, token_advantages(sequence_advantages, token_sequence_ids, weights, eps, normalise=True)
    weights = mask.float()
    return weights, token_advantages(sequence_advantages, token_sequence_ids, weights, eps, normalise=False)


def compute_normalisers(
    response_masks: torch.Tensor | Iterable[torch.Tensor],
    token_sequence_ids: torch.Tensor | Iterable[torch.Tensor],
    token_weights: torch.Tensor | Iterable[torch.Tensor] | None = None,
    max_response_length: int | None = None,
    token_advantages: torch.Tensor | Iterable[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Global loss normalisers of one mini-batch (one optimizer update), computed once over all its micro-batches.

    Each argument is one [T] tensor (the whole batch flat) or one tensor per micro-batch.
    Returns ``num_sequences`` (sequences with any non-zero weight on a response token; with
    ``token_weights=None`` the weight is the response mask, i.e. sequences with a response),
    ``num_advantaged_sequences`` (CARE's N_seq, spec section 6: sequences with a non-zero advantage on
    a response token, i.e. a non-zero sequence-level advantage; without ``token_advantages`` every
    sequence counted by ``num_sequences``), ``num_tokens`` (response tokens) and
    ``max_response_length`` (the Dr.GRPO constant; defaults to the longest response seen). Under data
    parallelism the trainer sums the counts over ranks and takes the max of ``max_response_length``
    (the generation cap). ``num_sequences`` is the denominator of gspo and dr_grpo (every sequence).
    """
    def as_list(x):
        return [x] if isinstance(x, torch.Tensor) else list(x)

    masks, seqs = as_list(response_masks), as_list(token_sequence_ids)
    weights = [None] * len(masks) if token_weights is None else as_list(token_weights)
    advantages = [None] * len(masks) if token_advantages is None else as_list(token_advantages)
    if not (len(masks) == len(seqs) == len(weights) == len(advantages)):
        raise ValueError("compute_normalisers: response_masks, token_sequence_ids, token_weights and "
                         "token_advantages differ in length")
    num_sequences = num_advantaged = num_tokens = longest = 0
    for mask, seq, w, adv in zip(masks, seqs, weights, advantages):
        valid = mask.bool() & (seq >= 0)
        n = _num_sequences(seq)
        weighted = valid if w is None else valid & (w != 0)
        counted = _per_sequence_sum(weighted.float(), seq, n) > 0
        num_sequences += int(counted.sum())
        num_advantaged += int(counted.sum()) if adv is None else int(
            (_per_sequence_sum((valid & (adv != 0)).float(), seq, n) > 0).sum())
        num_tokens += int(valid.sum())
        if n:
            longest = max(longest, int(_per_sequence_sum(valid.float(), seq, n).max()))
    return {
        "num_sequences": float(num_sequences),
        "num_advantaged_sequences": float(num_advantaged),
        "num_tokens": float(num_tokens),
        "max_response_length": float(max_response_length if max_response_length is not None else longest),
    }


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------

PolicyLossFn = Callable[..., "tuple[torch.Tensor, dict[str, float]]"]
_REGISTRY: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator registering a policy loss under ``name``."""

    def wrap(fn: PolicyLossFn) -> PolicyLossFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"policy loss {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def get_policy_loss(name: str) -> PolicyLossFn:
    """The loss registered as ``name``; unknown names raise listing the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown policy loss {name!r}; valid: {', '.join(sorted(_REGISTRY))}") from None


def policy_loss_names() -> list[str]:
    return sorted(_REGISTRY)


def _normaliser(normalisers: dict, key: str) -> float:
    if key not in normalisers:
        raise ValueError(f"normalisers lack {key!r} (use compute_normalisers); got {sorted(normalisers)}")
    return max(float(normalisers[key]), 1.0)  # an empty step gives a zero loss, not 0/0


def _check_shapes(**tensors) -> None:
    t = tensors["logprobs"].shape
    for name, value in tensors.items():
        if value is not None and value.shape != t:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(t)} like logprobs")


def clip_counts(clipped: torch.Tensor, considered: torch.Tensor, advantages: torch.Tensor,
                 region_ids: torch.Tensor | None) -> dict[str, float]:
    parts = {"all": considered, "pos_adv": considered & (advantages > 0), "neg_adv": considered & (advantages < 0)}
    if region_ids is not None:
        parts["answer"] = considered & (region_ids == int(Region.ANSWER))
        parts["think"] = considered & (region_ids == int(Region.THINK))
        parts["neg_adv_answer"] = parts["neg_adv"] & parts["answer"]
    metrics = {}
    for part, mask in parts.items():
        total = int(mask.sum())
        hit = int((clipped & mask).sum())
        metrics[f"count/tokens/{part}"] = float(total)
        metrics[f"count/clipped/{part}"] = float(hit)
        metrics[f"clip_frac/{part}"] = hit / total if total else 0.0
    return metrics


def clipped_tokens(ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, config: PolicyLossConfig) -> torch.Tensor:
    """BoolTensor[T]: tokens whose clipped branch is active (``rho > 1 + eps_high`` with ``A > 0``,
    ``rho < 1 - eps_low`` with ``A < 0``); ``ratio`` and ``advantages`` detached."""
    return mask & (((advantages > 0) & (ratio > 1.0 + config.clip_high)) | ((advantages < 0) & (ratio < 1.0 - config.clip_low)))


def token_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``logp - logp_old`` on ``mask`` (0 elsewhere, so padding never reaches an ``exp``), float32."""
    return torch.where(mask, logprobs.float() - old_logprobs.detach().float(), 0.0)


def ratio_statistics(log_ratio: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Token importance-ratio statistics over ``mask`` from a (detached) log-ratio [T]:
    ``count/ratio_sum``, ``count/log_ratio_sum`` (additive over micro-batches, ranks and updates: the
    step's ``ppo/ratio_mean`` and ``ppo/approx_kl``, verl's ``ppo_kl`` = mean of logp_old - logp, are
    these over ``count/response_tokens``) and ``min/ratio`` / ``max/ratio`` (+inf / -inf without
    tokens, the identities of min / max, so every micro-batch and rank reports the same keys)."""
    log_ratio = log_ratio.detach().float()[mask]
    if not log_ratio.numel():
        return {"count/ratio_sum": 0.0, "count/log_ratio_sum": 0.0, "min/ratio": math.inf, "max/ratio": -math.inf}
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    return {"count/ratio_sum": float(ratio.sum()), "count/log_ratio_sum": float(log_ratio.sum()),
            "min/ratio": float(ratio.min()), "max/ratio": float(ratio.max())}


def combine_loss_metrics(total: dict[str, float], metrics: dict[str, float]) -> dict[str, float]:
    """Fold one micro-batch's loss metrics into ``total`` (in place, returned): ``min/*`` by minimum,
    ``max/*`` by maximum, everything else (globally normalised losses, ``count/*``) by sum. The
    backends use it over micro-batches and data-parallel ranks, the trainer over updates."""
    for key, value in metrics.items():
        value = float(value)
        if key in total and key.startswith("min/"):
            total[key] = min(total[key], value)
        elif key in total and key.startswith("max/"):
            total[key] = max(total[key], value)
        else:
            total[key] = total.get(key, 0.0) + value
    return total


def _regularisers(logprobs, mask, normalisers, config, ref_logprobs, entropy):
    """KL and entropy terms, token-mean over the global response tokens."""
    num_tokens = _normaliser(normalisers, "num_tokens")
    zero = logprobs.float().sum() * 0.0
    kl_sum = zero
    if ref_logprobs is not None:
        kl_tok = kl_penalty(torch.where(mask, logprobs.float(), 0.0), torch.where(mask, ref_logprobs.float(), 0.0),
                            config.kl_estimator, config.kl_clamp)
        kl_sum = torch.where(mask, kl_tok, 0.0).sum()
    elif config.kl_coef > 0:
        raise ValueError(f"kl_coef = {config.kl_coef} needs ref_logprobs")
    entropy_sum = zero
    if entropy is not None:
        # without the bonus the entropy is a metric only: no gradient path (the log-prob op skips its backward)
        entropy_sum = torch.where(mask, (entropy if config.entropy_coef else entropy.detach()).float(), 0.0).sum()
    elif config.entropy_coef > 0:
        raise ValueError(f"entropy_coef = {config.entropy_coef} needs entropy")
    kl_loss = config.kl_coef * kl_sum / num_tokens
    entropy_loss = -config.entropy_coef * entropy_sum / num_tokens
    metrics = {"kl": float(kl_sum.detach()) / num_tokens, "entropy": float(entropy_sum.detach()) / num_tokens}
    return kl_loss, entropy_loss, metrics


def _token_clipped_surrogate(logprobs, old_logprobs, token_advantages, mask, config):
    """Per-token ``-min(rho A, clip(rho) A)`` (0 off the mask), dual-clipped for ``A < 0``, the
    clipped-branch indicator, the detached log-ratio and the dual-clip indicator."""
    log_ratio = token_log_ratio(logprobs, old_logprobs, mask)
    ratio = torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    adv = token_advantages.detach().float()
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - config.clip_low, 1.0 + config.clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)
    ratio_d = ratio.detach()
    dual_clipped = torch.zeros_like(mask)
    if config.dual_clip:
        # a negative-advantage token far above the trust region (rho > c) would otherwise push with
        # its whole ratio: cap its loss at c |A| (the capped branch is constant, so no gradient)
        cap = -config.dual_clip * adv
        dual_clipped = mask & (adv < 0) & (per_token > cap)
        per_token = torch.where(adv < 0, torch.minimum(per_token, cap), per_token)
    per_token = torch.where(mask, per_token, 0.0)
    return per_token, clipped_tokens(ratio_d, adv, mask, config), log_ratio.detach(), dual_clipped


def _token_level_loss(divisor_keys, logprobs, old_logprobs, token_advantages, response_mask, token_sequence_ids,
                      normalisers, config, ref_logprobs, entropy, region_ids):
    _check_shapes(logprobs=logprobs, old_logprobs=old_logprobs, token_advantages=token_advantages,
                  response_mask=response_mask, token_sequence_ids=token_sequence_ids, ref_logprobs=ref_logprobs,
                  entropy=entropy, region_ids=region_ids)
    mask = response_mask.bool() & (token_sequence_ids >= 0)
    per_token, is_clipped, log_ratio, dual_clipped = _token_clipped_surrogate(logprobs, old_logprobs,
                                                                              token_advantages, mask, config)
    divisor = 1.0
    for key in divisor_keys:
        divisor *= _normaliser(normalisers, key)
    pg_loss = per_token.sum() / divisor
    kl_loss, entropy_loss, metrics = _regularisers(logprobs, mask, normalisers, config, ref_logprobs, entropy)
    loss = pg_loss + kl_loss + entropy_loss
    adv = token_advantages.detach().float()
    metrics.update(clip_counts(is_clipped, mask & (adv != 0), adv, region_ids))
    metrics.update(ratio_statistics(log_ratio, mask))
    metrics.update({
        "loss": float(loss.detach()),
        "pg_loss": float(pg_loss.detach()),
        "kl_loss": float(kl_loss.detach()),
        "entropy_loss": float(entropy_loss.detach()),
        "count/response_tokens": float(mask.sum()),
        "count/dual_clipped": float(dual_clipped.sum()),
    })
    return loss, metrics


@register_policy_loss("care")
def care_policy_loss(logprobs, old_logprobs, token_advantages, response_mask, token_sequence_ids, normalisers,
                     config: PolicyLossConfig, ref_logprobs=None, entropy=None, region_ids=None):
    """CARE (section 6): region-weighted clipped surrogate summed over tokens / N_seq (sequences with a
    non-zero advantage), + KL + entropy."""
    return _token_level_loss(("num_advantaged_sequences",), logprobs, old_logprobs, token_advantages, response_mask,
                             token_sequence_ids, normalisers, config, ref_logprobs, entropy, region_ids)


def _token_mean_loss(logprobs, old_logprobs, token_advantages, response_mask, token_sequence_ids, normalisers,
                     config: PolicyLossConfig, ref_logprobs=None, entropy=None, region_ids=None):
    """Token-mean clipped surrogate over the global batch's response tokens (GRPO / DAPO / RLOO)."""
    return _token_level_loss(("num_tokens",), logprobs, old_logprobs, token_advantages, response_mask,
                             token_sequence_ids, normalisers, config, ref_logprobs, entropy, region_ids)


for _name in ("grpo", "dapo", "rloo"):
    register_policy_loss(_name)(_token_mean_loss)


@register_policy_loss("dr_grpo")
def dr_grpo_policy_loss(logprobs, old_logprobs, token_advantages, response_mask, token_sequence_ids, normalisers,
                        config: PolicyLossConfig, ref_logprobs=None, entropy=None, region_ids=None):
    """Dr.GRPO: token sums / (N_seq * max_response_length), a constant per step."""
    return _token_level_loss(("num_sequences", "max_response_length"), logprobs, old_logprobs, token_advantages,
                             response_mask, token_sequence_ids, normalisers, config, ref_logprobs, entropy, region_ids)


@register_policy_loss("gspo")
def gspo_policy_loss(logprobs, old_logprobs, token_advantages, response_mask, token_sequence_ids, normalisers,
                     config: PolicyLossConfig, ref_logprobs=None, entropy=None, region_ids=None):
    """GSPO: sequence ratio ``exp(mean_t(logp - logp_old))`` clipped at the sequence level / N_seq.

    ``A_i`` is the mean token advantage of sequence i over its response tokens (the baselines'
    token advantages are uniform, so this is the sequence advantage). Clip metrics count sequences.
    """
    _check_shapes(logprobs=logprobs, old_logprobs=old_logprobs, token_advantages=token_advantages,
                  response_mask=response_mask, token_sequence_ids=token_sequence_ids, ref_logprobs=ref_logprobs,
                  entropy=entropy, region_ids=region_ids)
    mask = response_mask.bool() & (token_sequence_ids >= 0)
    n = _num_sequences(token_sequence_ids)
    lengths = _per_sequence_sum(mask.float(), token_sequence_ids, n)
    has_tokens = lengths > 0
    log_ratio = token_log_ratio(logprobs, old_logprobs, mask)
    mean_log_ratio = _per_sequence_sum(log_ratio, token_sequence_ids, n) / lengths.clamp(min=1)
    seq_ratio = torch.exp(mean_log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    adv_tok = torch.where(mask, token_advantages.detach().float(), 0.0)
    seq_adv = _per_sequence_sum(adv_tok, token_sequence_ids, n) / lengths.clamp(min=1)
    unclipped = seq_ratio * seq_adv
    clipped = seq_ratio.clamp(1.0 - config.clip_low, 1.0 + config.clip_high) * seq_adv
    per_sequence = torch.where(has_tokens, -torch.minimum(unclipped, clipped), 0.0)
    pg_loss = per_sequence.sum() / _normaliser(normalisers, "num_sequences")
    kl_loss, entropy_loss, metrics = _regularisers(logprobs, mask, normalisers, config, ref_logprobs, entropy)
    loss = pg_loss + kl_loss + entropy_loss
    r = seq_ratio.detach()
    is_clipped = clipped_tokens(r, seq_adv, has_tokens, config)
    metrics.update(clip_counts(is_clipped, has_tokens & (seq_adv != 0), seq_adv, None))
    metrics.update(ratio_statistics(log_ratio, mask))
    metrics.update({
        "loss": float(loss.detach()),
        "pg_loss": float(pg_loss.detach()),
        "kl_loss": float(kl_loss.detach()),
        "entropy_loss": float(entropy_loss.detach()),
        "count/response_tokens": float(mask.sum()),
    })
    return loss, metrics
