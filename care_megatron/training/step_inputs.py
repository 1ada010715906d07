"""Per-token loss inputs of one RL step, built once per global batch (spec section 6, loss contract).

Everything a policy loss reads per token is attached to the packed micro-batches as ``token_fields``
before the update: behaviour (old) log-probs, reference log-probs, token weights and token
advantages. Because a sequence is never split across micro-batches and the normalisers are
computed over the whole step, the loss is the same for any packing or micro-batching.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from care_megatron.algorithm.kl import LOG_RATIO_CLAMP
from care_megatron.algorithm.policy_losses import (PolicyLossConfig, build_token_advantages, clip_counts, clipped_tokens,
                                                   compute_normalisers, ratio_statistics, token_log_ratio)
from care_megatron.data.batch import PackedMicroBatch
from care_megatron.data.packing import restore_order, unpack
from care_megatron.training.base import ForwardOutputs
from care_megatron.training.megatron.parallel_state import all_reduce_host_values


def per_sequence_logprobs(packed: list[PackedMicroBatch], outputs: list[ForwardOutputs]) -> list[torch.Tensor]:
    """Per-token log-probs of each sequence, in the original sequence order."""
    return restore_order(packed, [[t.detach().cpu() for t in unpack(mb, out.logprobs)] for mb, out in zip(packed, outputs)])


def per_sequence_embeddings(packed: list[PackedMicroBatch], outputs: list[ForwardOutputs]) -> torch.Tensor:
    """Think embeddings [N, D] in the original sequence order."""
    rows = restore_order(packed, [list(out.think_embeddings.detach().cpu()) for out in outputs])
    return torch.stack(rows)


def attach_loss_inputs(packed: list[PackedMicroBatch], method: str, sequence_advantages: torch.Tensor,
                       positive: torch.Tensor, think_weight_pos: float, max_response_length: int,
                       tis_cap: float | None = None, group=None,
                       think_weight_neg: float = 0.0) -> dict[str, float]:
    """Fill ``token_weights`` / ``token_advantages`` on every micro-batch; return the rollout-mismatch /
    TIS metrics. The loss normalisers are per mini-batch: :func:`loss_normalisers` on each update's
    micro-batches after this call, then :func:`reduce_normalisers`.

    ``group``: the data-parallel process group; the mismatch / TIS metrics are then token-weighted
    over every rank's micro-batches.

    ``sequence_advantages`` [N] and ``positive`` [N] are indexed by the original sequence order.
    With ``tis_cap`` the token advantages are multiplied by truncated importance weights
    ``min(exp(old - rollout), cap)``; the weights are >= 0, so this equals weighting the clipped
    surrogate per token.
    """
    from care_megatron.rollout.mismatch import rollout_mismatch, truncated_importance_weights

    metrics: dict[str, float] = {}
    gaps, counts, tis = [], [], []
    for mb in packed:
        seq_ids = mb.token_sequence_ids()
        index = mb.sequence_indices
        weights, token_adv = build_token_advantages(method, sequence_advantages[index], seq_ids, mb.loss_mask,
                                                    mb.region_ids, positive[index], think_weight_pos,
                                                    think_weight_neg=think_weight_neg)
        if "rollout_logprobs" in mb.token_fields:
            _, m = rollout_mismatch(mb.token_fields["old_logprobs"], mb.token_fields["rollout_logprobs"], mb.loss_mask)
            gaps.append(m["rollout/mismatch_abs_mean"] * int(mb.loss_mask.sum()))
            counts.append(int(mb.loss_mask.sum()))
            if tis_cap is not None:
                w, tm = truncated_importance_weights(mb.token_fields["old_logprobs"], mb.token_fields["rollout_logprobs"],
                                                     mb.loss_mask, tis_cap)
                token_adv = token_adv * w
                tis.append(tm["rollout/tis_weight_mean"] * int(mb.loss_mask.sum()))
        mb.token_fields["token_weights"] = weights
        mb.token_fields["token_advantages"] = token_adv
        if method == "care":  # per-token inputs of the fused region-weighted loss (kernels.region_loss)
            add_fused_region_fields(mb, seq_ids, sequence_advantages[index], positive[index], weights,
                                    tis=tis_cap is not None)
    sums = all_reduce_host_values([sum(gaps), float(sum(counts)), sum(tis), float(sum(counts) if tis else 0)], group)
    gap, tokens, tis_sum, tis_tokens = sums.tolist()
    if tokens:
        metrics["rollout/mismatch_abs_mean"] = gap / tokens
    if tis_tokens:
        metrics["rollout/tis_weight_mean"] = tis_sum / tis_tokens
    return metrics


def loss_normalisers(packed: list[PackedMicroBatch], max_response_length: int) -> dict[str, float]:
    """This rank's loss normalisers over ``packed`` (one mini-batch: the micro-batches of one optimizer
    update), after :func:`attach_loss_inputs` filled the token weights and advantages; sum them over
    data-parallel ranks with :func:`reduce_normalisers`."""
    return compute_normalisers([mb.loss_mask for mb in packed], [mb.token_sequence_ids() for mb in packed],
                               [mb.token_fields["token_weights"] for mb in packed],
                               max_response_length=max_response_length,
                               token_advantages=[mb.token_fields["token_advantages"] for mb in packed])


def add_fused_region_fields(mb: PackedMicroBatch, seq_ids: torch.Tensor, sequence_advantages: torch.Tensor,
                            positive: torch.Tensor, weights: torch.Tensor, tis: bool) -> None:
    """Per-token broadcasts the fused CARE loss reads: A_i, is_positive, has_answer and the weight
    sum of the token's whole sequence (so micro-batching cannot change it)."""
    from care_megatron.rewards.regions import Region

    valid = seq_ids >= 0
    safe = seq_ids.clamp(min=0)
    n = mb.num_sequences
    answer = (mb.region_ids == int(Region.ANSWER)) & mb.loss_mask & valid
    has_answer = torch.zeros(n).index_add_(0, safe[valid], answer[valid].float()) > 0
    sums = torch.zeros(n).index_add_(0, safe[valid], weights[valid].float())
    zero = torch.zeros_like(weights)
    mb.token_fields["sequence_advantages"] = torch.where(valid, sequence_advantages.float()[safe], zero)
    mb.token_fields["is_positive"] = valid & positive.bool()[safe]
    mb.token_fields["has_answer"] = valid & has_answer[safe]
    mb.token_fields["weight_sums"] = torch.where(valid, sums[safe], zero)
    if tis:  # truncated importance weights live in token_advantages only: the fused op cannot apply them
        mb.token_fields["fused_region_loss_unsupported"] = torch.ones_like(weights)


def fused_region_loss_applies(method: str, loss_config: PolicyLossConfig, mb: PackedMicroBatch) -> bool:
    """The fused op computes exactly CARE's loss: k3 KL, no entropy bonus, no TIS re-weighting."""
    return (method == "care" and loss_config.kl_estimator == "k3" and loss_config.entropy_coef == 0
            and "weight_sums" in mb.token_fields and "fused_region_loss_unsupported" not in mb.token_fields)


def fused_care_loss(outputs: ForwardOutputs, mb: PackedMicroBatch, normalisers: dict, loss_config: PolicyLossConfig,
                    think_weight_pos: float, think_weight_neg: float = 0.0):
    """CARE's spec-section-6 loss through ``kernels.region_loss`` (one Triton kernel each way on CUDA).

    Same value and gradient as the ``care`` policy loss (tested); the kernel's clip statistics are
    bucketed by correctness x region (``count/{clipped,tokens}/{positive,negative}_{answer,think}``);
    the advantage-sign buckets the other losses report (``all``, ``pos_adv``, ``neg_adv``, ``answer``,
    ``think``, ``neg_adv_answer``) and the ratio statistics are a few element-wise torch ops beside it.
    """
    from care_megatron.kernels.region_loss import RegionLossConfig, region_policy_loss

    f = mb.token_fields
    config = RegionLossConfig(gamma_pos=think_weight_pos, clip_low=loss_config.clip_low,
                              clip_high=loss_config.clip_high, kl_coef=loss_config.kl_coef,
                              dual_clip=loss_config.dual_clip, kl_clamp=loss_config.kl_clamp, gamma_neg=think_weight_neg)
    ref = f.get("ref_logprobs") if loss_config.kl_coef > 0 else None
    loss, stats = region_policy_loss(
        outputs.logprobs, f["old_logprobs"], f["sequence_advantages"], mb.region_ids, f["is_positive"],
        f["has_answer"], mb.loss_mask, f["weight_sums"], max(float(normalisers["num_advantaged_sequences"]), 1.0),
        max(float(normalisers["num_tokens"]), 1.0), ref_logprobs=ref, config=config)
    raw = stats.to_metrics()
    metrics = {"loss": float(loss.detach()), "pg_loss": raw["pg_loss"], "kl": raw["kl"],
               "kl_loss": loss_config.kl_coef * raw["kl"] if ref is not None else 0.0}
    for key, value in raw.items():
        if key.startswith(("clipped_high/", "clipped_low/")):
            bucket = key.split("/", 1)[1]
            metrics[f"count/clipped/{bucket}"] = metrics.get(f"count/clipped/{bucket}", 0.0) + value
        elif key.startswith("active/"):
            metrics[f"count/tokens/{key.split('/', 1)[1]}"] = value
        elif key.startswith("dual_clipped/"):
            metrics["count/dual_clipped"] = metrics.get("count/dual_clipped", 0.0) + value
    metrics.update(_sign_bucket_metrics(outputs.logprobs, mb, loss_config))
    return loss, metrics


def _sign_bucket_metrics(logprobs: torch.Tensor, mb: PackedMicroBatch, loss_config: PolicyLossConfig) -> dict:
    """Clip counts by advantage sign and region, and the ratio statistics, for the fused path (the
    same keys and definitions as the policy losses' :func:`~care_megatron.algorithm.policy_losses.clip_counts`)."""
    mask = mb.loss_mask.to(logprobs.device).bool() & (mb.token_sequence_ids().to(logprobs.device) >= 0)
    log_ratio = token_log_ratio(logprobs.detach(), mb.token_fields["old_logprobs"].to(logprobs.device), mask)
    adv = mb.token_fields["token_advantages"].to(logprobs.device).float()
    clipped = clipped_tokens(torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)), adv, mask, loss_config)
    counts = {k: v for k, v in clip_counts(clipped, mask & (adv != 0), adv, mb.region_ids.to(logprobs.device)).items()
              if k.startswith("count/")}
    return {**counts, **ratio_statistics(log_ratio, mask), "count/response_tokens": float(mask.sum())}


def make_loss_fn(policy_loss, loss_config: PolicyLossConfig, method: str = "", think_weight_pos: float = 0.005,
                 fused: bool | None = None, think_weight_neg: float = 0.0):
    """Adapt a registered policy loss to the backend loss contract ``loss_fn(outputs, micro_batch, normalisers)``.

    ``fused``: use the fused CARE kernel (``kernels.region_loss``) when it computes the same loss;
    None = on CUDA tensors only (the kernel's torch reference is not faster than the plain loss on CPU).
    """

    def loss_fn(outputs: ForwardOutputs, mb: PackedMicroBatch, normalisers: dict[str, Any]):
        use_fused = outputs.logprobs.is_cuda if fused is None else fused
        if use_fused and fused_region_loss_applies(method, loss_config, mb):
            return fused_care_loss(outputs, mb, normalisers, loss_config, think_weight_pos, think_weight_neg)
        return policy_loss(outputs.logprobs, mb.token_fields["old_logprobs"], mb.token_fields["token_advantages"],
                           mb.loss_mask, mb.token_sequence_ids().to(outputs.logprobs.device), normalisers, loss_config,
                           ref_logprobs=mb.token_fields.get("ref_logprobs"), entropy=outputs.entropy,
                           region_ids=mb.region_ids)

    return loss_fn


def reduce_normalisers(normalisers: dict[str, float], group=None) -> dict[str, float]:
    """Global loss normalisers over data-parallel ranks: counts summed, the length cap maximised."""
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return normalisers
    # on the group's device: NCCL rejects host tensors (the DP group is NCCL on GPU, DP=1 included)
    summed = ("num_sequences", "num_advantaged_sequences", "num_tokens")
    counts = all_reduce_host_values([normalisers[key] for key in summed], group)
    longest = all_reduce_host_values([normalisers["max_response_length"]], group, op=dist.ReduceOp.MAX)
    return {**normalisers, **{key: float(value) for key, value in zip(summed, counts.tolist())},
            "max_response_length": float(longest[0])}
