"""Per-token loss inputs of one RL step, built once per global batch (spec section 6, loss contract).

Everything a policy loss reads per token is attached to the packed micro-batches as ``token_fields``
before the update: behaviour (old) log-probs, reference log-probs, token weights and token
advantages. Because a sequence is never split across micro-batches and the normalisers are
computed over the whole step, the loss is the same for any packing or micro-batching.
"""
from __future__ import annotations

from typing import Any

import torch

from care_megatron.algorithm.policy_losses import PolicyLossConfig, build_token_advantages, compute_normalisers
from care_megatron.data.batch import PackedMicroBatch
from care_megatron.data.packing import restore_order, unpack
from care_megatron.training.base import ForwardOutputs


def per_sequence_logprobs(packed: list[PackedMicroBatch], outputs: list[ForwardOutputs]) -> list[torch.Tensor]:
    """Per-token log-probs of each sequence, in the original sequence order."""
    return restore_order(packed, [[t.detach().cpu() for t in unpack(mb, out.logprobs)] for mb, out in zip(packed, outputs)])


def per_sequence_embeddings(packed: list[PackedMicroBatch], outputs: list[ForwardOutputs]) -> torch.Tensor:
    """Think embeddings [N, D] in the original sequence order."""
    rows = restore_order(packed, [list(out.think_embeddings.detach().cpu()) for out in outputs])
    return torch.stack(rows)


def attach_loss_inputs(packed: list[PackedMicroBatch], method: str, sequence_advantages: torch.Tensor,
                       positive: torch.Tensor, think_weight_pos: float, max_response_length: int,
                       tis_cap: float | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """Fill ``token_weights`` / ``token_advantages`` on every micro-batch; return ``(normalisers, metrics)``.

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
                                                    mb.region_ids, positive[index], think_weight_pos)
        if "rollout_logprobs" in mb.token_fields:
            _, m = rollout_mismatch(mb.token_fields["old_logprobs"], mb.token_fields["rollout_logprobs"], mb.loss_mask)
            gaps.append(m["rollout/mismatch_abs_mean"] * int(mb.loss_mask.sum()))
            counts.append(int(mb.loss_mask.sum()))
            if tis_cap is not None:
                w, tm = truncated_importance_weights(mb.token_fields["old_logprobs"], mb.token_fields["rollout_logprobs"],
                                                     mb.loss_mask, tis_cap)
                token_adv = token_adv * w
                tis.append(tm["rollout/tis_weight_mean"])
        mb.token_fields["token_weights"] = weights
        mb.token_fields["token_advantages"] = token_adv
    if counts and sum(counts):
        metrics["rollout/mismatch_abs_mean"] = sum(gaps) / sum(counts)
    if tis:
        metrics["rollout/tis_weight_mean"] = sum(tis) / len(tis)
    normalisers = compute_normalisers([mb.loss_mask for mb in packed], [mb.token_sequence_ids() for mb in packed],
                                      [mb.token_fields["token_weights"] for mb in packed],
                                      max_response_length=max_response_length)
    return normalisers, metrics


def make_loss_fn(policy_loss, loss_config: PolicyLossConfig):
    """Adapt a registered policy loss to the backend loss contract ``loss_fn(outputs, micro_batch, normalisers)``."""

    def loss_fn(outputs: ForwardOutputs, mb: PackedMicroBatch, normalisers: dict[str, Any]):
        return policy_loss(outputs.logprobs, mb.token_fields["old_logprobs"], mb.token_fields["token_advantages"],
                           mb.loss_mask, mb.token_sequence_ids().to(outputs.logprobs.device), normalisers, loss_config,
                           ref_logprobs=mb.token_fields.get("ref_logprobs"), entropy=outputs.entropy,
                           region_ids=mb.region_ids)

    return loss_fn
