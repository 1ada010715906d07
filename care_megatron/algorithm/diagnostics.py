"""Per-step diagnostics of docs/algorithm.md section 9, as a flat ``dict[str, float]`` ready for JSONL / TensorBoard.

:func:`advantage_diagnostics` covers everything computed from rewards and advantages (any
estimator; the CARE-only keys appear when its ``info`` is given). Clip fractions, KL and entropy
come from the policy loss metrics (:mod:`.policy_losses`), which the trainer sums over
micro-batches; :func:`clip_fractions` turns those summed counts into exact step fractions.

Definitions chosen where the paper leaves room:

* ``reward/mean``, ``accuracy/mean``, ``format/mean``, ``length/*``: over the G original rollouts
  per prompt only, so CARE's curves compare with the baselines' (which have no RGR samples). The
  RGR samples are reported apart: ``rgr/reward_mean``, ``rgr/success_rate``, ``rgr/trigger_rate``.
  Advantage-based keys (``signal/*``, ``adv/*``, ``signature/*``) cover every trained sequence,
  reflected ones included: they describe the update.
* ``signal/failure_share``: ``sum_{failures} |A_i| / sum_i |A_i|`` with failures = ``accuracy < 1``
  (so a rescue pseudo-anchor counts as a failure); 0 when every advantage is 0.
* ``signature/*``: from CARE's pre-scaling z-scores of anchored groups (true anchors and selected
  negatives; reflected samples and rescue groups excluded because rescue reproduces the signature
  by construction). Per realised K': ``signature/anchor_z/k{K'}`` and ``signature/neg_z/k{K'}`` (bucket
  means) beside ``signature/anchor_theory/k{K'}`` = sqrt(K') and ``signature/neg_theory/k{K'}`` =
  -1/sqrt(K'); ``signature/anchor_ratio`` = mean z_a / sqrt(K') and ``signature/neg_ratio`` = mean
  z_neg * (-sqrt(K')) (the theory-normalised check, 1 for binary rewards); ``signature/pearson`` the
  Pearson correlation of observed z against theory over all those members (omitted when it is
  undefined: fewer than two points or no spread).
* ``adv/anchor_mean``: mean final advantage of the anchors of anchored groups (the paper's Fig. 5 right
  axis); omitted when no group is anchored.
* ``kprime/hist/{K'}``: fraction of the groups in play (anchored or rescued) with that K'.
* ``adv/neg_var_ratio``: variance of the failures' advantages over the variance of all advantages,
  both over subgroup members for CARE (over all rollouts for baselines); omitted when undefined.
* ``rgr/trigger_rate``: reflected samples per group; ``rgr/eligible_rate``: groups with an RGR target
  per group; ``rgr/success_rate``: correct reflected samples / reflected samples;
  ``rgr/reward_mean``: mean reward of the reflected samples (0 when none).
"""
from __future__ import annotations

import math

import torch

from care_megatron.algorithm.care import SubgroupRole


def _mean(x: torch.Tensor) -> float:
    return float(x.double().mean()) if x.numel() else 0.0


def _variance(x: torch.Tensor) -> float:
    return float(x.double().var(unbiased=False)) if x.numel() else 0.0


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    if a.numel() < 2:
        return None
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / denom if denom > 0 else None


def advantage_diagnostics(
    rewards: torch.Tensor,
    accuracy: torch.Tensor,
    advantages: torch.Tensor,
    format_scores: torch.Tensor | None = None,
    think_lengths: torch.Tensor | None = None,
    answer_lengths: torch.Tensor | None = None,
    info: dict | None = None,
) -> dict[str, float]:
    """Section-8 metrics from one step's rollouts. All inputs [N]; ``info`` from ``care_advantages``
    (its ``is_reflected`` separates the RGR samples from the original rollouts)."""
    rewards, accuracy, advantages = rewards.detach(), accuracy.detach().double(), advantages.detach().double()
    failed = accuracy < 1
    original = torch.ones_like(failed) if info is None else ~info["is_reflected"].bool()
    out = {"reward/mean": _mean(rewards[original]), "accuracy/mean": _mean(accuracy[original])}
    if format_scores is not None:
        out["format/mean"] = _mean(format_scores[original])
    if think_lengths is not None:
        out["length/think_mean"] = _mean(think_lengths[original])
    if answer_lengths is not None:
        out["length/answer_mean"] = _mean(answer_lengths[original])
    magnitude = advantages.abs()
    total = float(magnitude.sum())
    out["signal/failure_share"] = float(magnitude[failed].sum()) / total if total > 0 else 0.0
    out["adv/abs_mean"] = _mean(magnitude)

    members = torch.ones_like(failed) if info is None else info["in_subgroup"]
    var_all = _variance(advantages[members])
    if var_all > 0:
        out["adv/neg_var_ratio"] = _variance(advantages[members & failed]) / var_all

    if info is None:
        return out
    num_groups = max(int(info["group_ids"].numel()), 1)
    out["groups/count"] = float(info["group_ids"].numel())
    anchored, rescue = info["anchored"], info["rescue"]
    in_play = anchored | rescue
    out["groups/anchored_rate"] = float(anchored.sum()) / num_groups
    out["groups/saturated_rate"] = float(info["saturated"].sum()) / num_groups
    out["rescue/rate"] = float(rescue.sum()) / num_groups
    kprime = info["num_negatives"]
    played = max(int(in_play.sum()), 1)
    for value in torch.unique(kprime[in_play]).tolist():
        out[f"kprime/hist/{value}"] = float((kprime[in_play] == value).sum()) / played
    out["kprime/mean"] = _mean(kprime[in_play].double())

    # the sqrt(K') / -1/sqrt(K') signature on pre-scaling z-scores of anchored groups
    role, z, group_of = info["role"], info["z_scores"].double(), info["group_of"]
    row_kprime = kprime[group_of].double()
    row_anchored = anchored[group_of]
    is_anchor = row_anchored & (role == int(SubgroupRole.ANCHOR))
    is_negative = row_anchored & (role == int(SubgroupRole.NEGATIVE))
    theory = torch.where(is_anchor, row_kprime.sqrt(), -1.0 / row_kprime.clamp(min=1).sqrt())
    for value in torch.unique(kprime[anchored]).tolist():
        bucket = row_kprime == value
        out[f"signature/anchor_z/k{value}"] = _mean(z[is_anchor & bucket])
        out[f"signature/neg_z/k{value}"] = _mean(z[is_negative & bucket])
        out[f"signature/anchor_theory/k{value}"] = math.sqrt(value)
        out[f"signature/neg_theory/k{value}"] = -1.0 / math.sqrt(value)
    if bool(is_anchor.any()):
        out["adv/anchor_mean"] = _mean(advantages[is_anchor])
        out["signature/anchor_ratio"] = _mean(z[is_anchor] / theory[is_anchor])
    if bool(is_negative.any()):
        out["signature/neg_ratio"] = _mean(z[is_negative] / theory[is_negative])
    checked = is_anchor | is_negative
    pearson = _pearson(z[checked], theory[checked])
    if pearson is not None:
        out["signature/pearson"] = pearson

    reflected = info["is_reflected"]
    out["rgr/eligible_rate"] = float((info["rgr_target"] >= 0).sum()) / num_groups
    out["rgr/trigger_rate"] = float(reflected.sum()) / num_groups
    out["rgr/success_rate"] = _mean((accuracy[reflected] >= 1).double()) if bool(reflected.any()) else 0.0
    out["rgr/reward_mean"] = _mean(rewards[reflected])
    return out


def clip_fractions(summed_loss_metrics: dict[str, float]) -> dict[str, float]:
    """Exact step clip fractions from the policy-loss ``count/*`` metrics summed over micro-batches (and
    updates); a part with no tokens in the step has no fraction, so means over steps are not pulled to 0."""
    out = {}
    for key, total in summed_loss_metrics.items():
        if key.startswith("count/tokens/") and total:  # no tokens of that kind: no fraction (not 0)
            part = key[len("count/tokens/"):]
            clipped = summed_loss_metrics.get(f"count/clipped/{part}", 0.0)
            out[f"clip_frac/{part}"] = clipped / total
    # share of negative-advantage tokens the dual clip capped (the fused CARE kernel buckets its counts by
    # correctness, not advantage sign, so its steps omit this fraction)
    if "count/dual_clipped" in summed_loss_metrics and "count/tokens/neg_adv" in summed_loss_metrics:
        total = summed_loss_metrics["count/tokens/neg_adv"]
        if total:
            out["clip_frac/dual"] = summed_loss_metrics["count/dual_clipped"] / total
    return out
