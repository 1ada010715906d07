"""Advantage estimators registered by name, one shared signature (docs/algorithm.md section 7).

Every estimator is ``fn(batch: AdvantageInputs, config) -> (advantages FloatTensor[N], info dict)``
so the trainer calls any of them by ``AlgorithmConfig.name``:

    advantages, info = get_advantage_fn(name)(batch, care_config)

``config`` is a :class:`~care_megatron.algorithm.care.CareConfig` for ``care``; the baselines only
read its ``eps`` (1e-6 when ``config`` is None).

Baseline conventions (docs/algorithm.md section 7), all vectorised over groups with scatter/bincount:

* ``grpo`` / ``dapo`` / ``gspo``: ``(r - mean_g) / (std_g + eps)`` with the *sample*
  (Bessel-corrected) std, as verl and TRL compute it; the three differ only in their losses, and
  DAPO additionally in dynamic sampling / overlong shaping (:mod:`.dapo`), applied before this.
* ``dr_grpo``: ``r - mean_g`` (no std).
* ``rloo``: ``r_i - mean of the other rollouts of the group`` = ``n/(n-1) (r_i - mean_g)``.
* A group of one rollout gets 0 in every baseline; a group with equal rewards gets 0.
* Baselines do not use RGR: rows with ``reflected_from >= 0`` are treated as ordinary members of
  their group (the trainer never produces them for a baseline run).
* Non-finite rewards raise ``ValueError`` naming the rows (same policy as ``care``).

Every ``info`` holds ``group_of`` (dense group number per row), ``group_mean`` / ``group_std``
(per group), ``group_size`` and ``zero_variance_groups`` (count), which the diagnostics read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from care_megatron.algorithm.care import CareConfig, care_advantages


@dataclass
class AdvantageInputs:
    """Everything any estimator may need about a batch of N rollouts (only ``care`` reads all of it).

    Shapes: ``group_index`` LongTensor[N]; ``rewards`` FloatTensor[N]; ``correct`` BoolTensor[N];
    ``think_lengths`` / ``answer_lengths`` / ``response_lengths`` LongTensor[N];
    ``think_embeddings`` FloatTensor[N, D] or None (needed by ``care``); ``sequence_logprobs``
    FloatTensor[N] or None (``care`` rescue tie-break; zeros when None); ``reflected_from``
    LongTensor[N] or None (RGR source row, -1 for ordinary rollouts).
    """

    group_index: torch.Tensor
    """Which prompt each rollout answers; rollouts of one prompt share a value."""
    rewards: torch.Tensor
    """Overall reward r (docs/algorithm.md section 1)."""
    correct: torch.Tensor | None = None
    """Correctness gate (accuracy == 1); ``care`` requires it."""
    think_lengths: torch.Tensor | None = None
    """Tokens in the <think> span (anchor rule); zeros when None."""
    answer_lengths: torch.Tensor | None = None
    """Tokens in the <answer> span (anchor tie-break); zeros when None."""
    think_embeddings: torch.Tensor | None = None
    """Rationale embeddings (any scale) for hard-negative selection; ``care`` requires it."""
    sequence_logprobs: torch.Tensor | None = None
    """Summed behaviour log-probs (rescue pseudo-anchor tie-break)."""
    reflected_from: torch.Tensor | None = None
    """RGR sample -> source row, -1 otherwise."""
    response_lengths: torch.Tensor | None = None
    """Generated tokens per rollout (diagnostics, DAPO overlong shaping)."""

    def __post_init__(self) -> None:
        n = self.rewards.numel()
        for name in ("group_index", "correct", "think_lengths", "answer_lengths", "sequence_logprobs",
                     "reflected_from", "response_lengths"):
            value = getattr(self, name)
            if value is not None and (value.dim() != 1 or value.numel() != n):
                raise ValueError(f"AdvantageInputs field '{name}': shape {tuple(value.shape)} != [{n}]")
        if self.think_embeddings is not None and (self.think_embeddings.dim() != 2 or self.think_embeddings.shape[0] != n):
            raise ValueError(f"AdvantageInputs field 'think_embeddings': shape {tuple(self.think_embeddings.shape)} != [{n}, D]")


AdvantageFn = Callable[[AdvantageInputs, object], "tuple[torch.Tensor, dict]"]
_REGISTRY: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator registering an estimator under ``name`` (a second registration of one name raises)."""

    def wrap(fn: AdvantageFn) -> AdvantageFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return wrap


def get_advantage_fn(name: str) -> AdvantageFn:
    """The estimator registered as ``name``; unknown names raise listing the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown advantage estimator {name!r}; valid: {', '.join(sorted(_REGISTRY))}") from None


def advantage_names() -> list[str]:
    return sorted(_REGISTRY)


def _check_rewards(rewards: torch.Tensor) -> None:
    bad = ~torch.isfinite(rewards)
    if bad.any():
        rows = torch.nonzero(bad).flatten()[:8].tolist()
        raise ValueError(f"rewards must be finite; non-finite at rows {rows} (check the verifier)")


def group_statistics(group_index: torch.Tensor, rewards: torch.Tensor):
    """Per-group size, mean and sample std (Bessel; 0 for a group of one), all float64.

    Returns ``(group_of LongTensor[N], size LongTensor[G], mean [G], sample_std [G])``.
    """
    _check_rewards(rewards)
    _, group_of = torch.unique(group_index, sorted=True, return_inverse=True)
    num_groups = int(group_of.max()) + 1 if group_of.numel() else 0
    r = rewards.detach().double()
    size = torch.bincount(group_of, minlength=num_groups)
    total = torch.zeros(num_groups, dtype=torch.float64, device=r.device).index_add_(0, group_of, r)
    mean = total / size.clamp(min=1)
    sq = torch.zeros_like(total).index_add_(0, group_of, (r - mean[group_of]) ** 2)
    sample_std = torch.where(size > 1, (sq / (size - 1).clamp(min=1)).sqrt(), 0.0)
    return group_of, size, mean, sample_std


def _baseline_info(group_of, size, mean, std) -> dict:
    return {
        "group_of": group_of,
        "group_size": size,
        "group_mean": mean.float(),
        "group_std": std.float(),
        "zero_variance_groups": int(((std == 0) & (size > 0)).sum()),
    }


def _out_dtype(rewards: torch.Tensor) -> torch.dtype:
    return rewards.dtype if rewards.dtype in (torch.float32, torch.float64) else torch.float32


def group_zscore(batch: AdvantageInputs, config=None) -> tuple[torch.Tensor, dict]:
    """``(r - mean_g) / (sample_std_g + eps)``; 0 for groups of one. Shapes: [N] -> [N]."""
    eps = getattr(config, "eps", 1e-6)
    group_of, size, mean, std = group_statistics(batch.group_index, batch.rewards)
    r = batch.rewards.detach().double()
    adv = (r - mean[group_of]) / (std[group_of] + eps)
    adv = torch.where(size[group_of] > 1, adv, 0.0)
    return adv.to(_out_dtype(batch.rewards)), _baseline_info(group_of, size, mean, std)


@register_advantage("grpo")
def grpo_advantages(batch: AdvantageInputs, config=None) -> tuple[torch.Tensor, dict]:
    """GRPO: z-score over the whole group with the sample std (docs/algorithm.md section 7)."""
    return group_zscore(batch, config)


@register_advantage("dapo")
def dapo_advantages(batch: AdvantageInputs, config=None) -> tuple[torch.Tensor, dict]:
    """DAPO: the GRPO z-score; dynamic sampling and overlong shaping happen before (see :mod:`.dapo`)."""
    return group_zscore(batch, config)


@register_advantage("gspo")
def gspo_advantages(batch: AdvantageInputs, config=None) -> tuple[torch.Tensor, dict]:
    """GSPO: the GRPO z-score; the sequence-level ratio lives in the loss."""
    return group_zscore(batch, config)


@register_advantage("dr_grpo")
def dr_grpo_advantages(batch: AdvantageInputs, config=None) -> tuple[torch.Tensor, dict]:
    """Dr.GRPO: ``r - mean_g``, no std division (docs/algorithm.md section 7)."""
    group_of, size, mean, std = group_statistics(batch.group_index, batch.rewards)
    adv = batch.rewards.detach().double() - mean[group_of]
    return adv.to(_out_dtype(batch.rewards)), _baseline_info(group_of, size, mean, std)


@register_advantage("rloo")
def rloo_advantages(batch: AdvantageInputs, config=None) -> tuple[torch.Tensor, dict]:
    """RLOO: ``r_i - (sum_g - r_i) / (n_g - 1)``; 0 for groups of one (docs/algorithm.md section 7)."""
    group_of, size, mean, std = group_statistics(batch.group_index, batch.rewards)
    r = batch.rewards.detach().double()
    n = size[group_of].double()
    total = mean[group_of] * n
    adv = torch.where(n > 1, r - (total - r) / (n - 1).clamp(min=1), 0.0)
    return adv.to(_out_dtype(batch.rewards)), _baseline_info(group_of, size, mean, std)


def _as_care_config(config) -> CareConfig:
    if config is None:
        return CareConfig()
    if not isinstance(config, CareConfig):
        raise TypeError(f"care advantages need a CareConfig, got {type(config).__name__}")
    return config


@register_advantage("care")
def care_advantage_fn(batch: AdvantageInputs, config: CareConfig | None = None) -> tuple[torch.Tensor, dict]:
    """CARE (docs/algorithm.md sections 2-5) through :func:`care_megatron.algorithm.care.care_advantages`."""
    if batch.correct is None or batch.think_embeddings is None:
        raise ValueError("care advantages need AdvantageInputs.correct and AdvantageInputs.think_embeddings")
    n = batch.rewards.numel()
    zeros = torch.zeros(n, dtype=torch.long, device=batch.rewards.device)
    return care_advantages(
        batch.group_index,
        batch.rewards,
        batch.correct,
        zeros if batch.think_lengths is None else batch.think_lengths,
        zeros if batch.answer_lengths is None else batch.answer_lengths,
        batch.think_embeddings,
        zeros.double() if batch.sequence_logprobs is None else batch.sequence_logprobs,
        _as_care_config(config),
        reflected_from=batch.reflected_from,
    )
