"""Fused region-weighted clipped surrogate + k3 KL (docs/algorithm.md sections 6 and 8), one op.

``region_policy_loss`` returns ``(loss, stats)``: the scalar loss, already divided by the global
normalisers (training/base.py loss contract), and a :class:`RegionLossStats` whose tensors stay on
the device (no host sync inside the op, so it can be CUDA-graph captured); call
``stats.to_metrics()`` when logging. On CUDA the forward is one Triton kernel plus a tiny
reduction and the backward one kernel producing d loss / d logprobs; elsewhere the torch reference
runs under autograd. ``force_kernel_backend`` pins either.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from care_megatron.kernels._dispatch import resolve_backend
from care_megatron.kernels.region_loss.reference import (
    BUCKETS,
    NUM_STATS,
    STAT_NAMES,
    region_policy_loss_reference,
    region_token_weights,
    sequence_weight_sums,
)

__all__ = [
    "BUCKETS",
    "NUM_STATS",
    "STAT_NAMES",
    "RegionLossConfig",
    "RegionLossStats",
    "region_policy_loss",
    "region_token_weights",
    "sequence_weight_sums",
]


@dataclass
class RegionLossConfig:
    """Hyper-parameters of the section-6 objective."""

    gamma_pos: float = 0.005
    """Weight of ``<think>`` tokens of positive (or successfully reflected) responses; (ref) 0.005."""
    clip_low: float = 0.2
    """eps_low: the ratio is clipped below at 1 - clip_low for negative token advantages."""
    clip_high: float = 0.28
    """eps_high: the ratio is clipped above at 1 + clip_high for positive token advantages (DAPO's
    clip-higher, 0.28 for CARE)."""
    kl_coef: float = 0.02
    """beta, the coefficient of the token-mean k3 KL to the reference policy; 0 disables it."""
    weight_eps: float = 1e-6
    """eps in A_hat = A w / (sum_t w + eps): keeps all-zero-weight sequences finite (they get 0)."""
    dual_clip: float = 3.0
    """c of the dual clip: a negative-advantage token loses at most c |A_hat| (0 disables, else > 1)."""
    kl_clamp: float | None = 10.0
    """Bound of the per-token k3 value (None disables)."""
    gamma_neg: float = 0.0
    """Weight of ``<think>`` tokens of negative responses (0: the paper's masked failed think)."""

    def __post_init__(self) -> None:
        if self.gamma_pos < 0:
            raise ValueError(f"gamma_pos must be >= 0; got {self.gamma_pos}")
        if not 0 <= self.clip_low < 1:
            raise ValueError(f"clip_low must be in [0, 1); got {self.clip_low}")
        if self.clip_high < 0:
            raise ValueError(f"clip_high must be >= 0; got {self.clip_high}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0; got {self.kl_coef}")
        if self.weight_eps <= 0:
            raise ValueError(f"weight_eps must be > 0; got {self.weight_eps}")
        if self.dual_clip < 0 or 0 < self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be 0 (off) or > 1; got {self.dual_clip}")
        if self.kl_clamp is not None and not self.kl_clamp > 0:
            raise ValueError(f"kl_clamp must be None (off) or > 0; got {self.kl_clamp}")
        if self.gamma_neg < 0:
            raise ValueError(f"gamma_neg must be >= 0; got {self.gamma_neg}")


@dataclass
class RegionLossStats:
    """Device-side statistics of one call; ``values`` [NUM_STATS] fp32 laid out as ``STAT_NAMES``."""

    values: torch.Tensor
    """Unnormalised surrogate sum, KL sum, then clipped-high / clipped-low / active token counts per bucket."""
    seq_normaliser: torch.Tensor
    """N_seq used by this call (0-dim)."""
    token_normaliser: torch.Tensor
    """Token normaliser used by this call (0-dim)."""

    def to_metrics(self) -> dict[str, float]:
        """Floats for logging (one host sync): the raw counts and sums, plus the normalised losses."""
        values = self.values.detach().float().cpu().tolist()
        metrics = dict(zip(STAT_NAMES, values))
        metrics["pg_loss"] = metrics["pg_sum"] / float(self.seq_normaliser)
        metrics["kl"] = metrics["kl_sum"] / float(self.token_normaliser)
        return metrics


def _as_scalar_tensor(value, device: torch.device, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=torch.float32, device=device).reshape(())
    if not isinstance(value, torch.Tensor) and not float(value) > 0:
        raise ValueError(f"{name} must be > 0; got {value}")
    return tensor


class _FusedRegionLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logprobs, old_logprobs, ref_logprobs, advantages, region_ids, is_positive, has_answer, loss_mask, weight_sums, seq_normaliser, token_normaliser, config):
        from care_megatron.kernels.region_loss import triton as triton_ops

        inputs = dict(
            logprobs=logprobs, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, advantages=advantages,
            region_ids=region_ids, is_positive=is_positive, has_answer=has_answer, loss_mask=loss_mask,
            weight_sums=weight_sums,
        )
        stats = triton_ops.region_loss_forward(inputs, config)
        loss = stats[0] / seq_normaliser
        if ref_logprobs is not None:
            loss = loss + config.kl_coef * stats[1] / token_normaliser
        ctx.save_for_backward(logprobs, old_logprobs, ref_logprobs, advantages, region_ids, is_positive, has_answer, loss_mask, weight_sums, seq_normaliser, token_normaliser)
        ctx.config = config
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, grad_stats):
        from care_megatron.kernels.region_loss import triton as triton_ops

        (logprobs, old_logprobs, ref_logprobs, advantages, region_ids, is_positive, has_answer, loss_mask, weight_sums,
         seq_normaliser, token_normaliser) = ctx.saved_tensors
        inputs = dict(
            logprobs=logprobs, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, advantages=advantages,
            region_ids=region_ids, is_positive=is_positive, has_answer=has_answer, loss_mask=loss_mask,
            weight_sums=weight_sums,
        )
        config = ctx.config
        grad_logprobs = triton_ops.region_loss_backward(
            inputs, grad_loss.reshape(()).contiguous(), seq_normaliser, token_normaliser, config)
        return (grad_logprobs,) + (None,) * 11


def region_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    region_ids: torch.Tensor,
    is_positive: torch.Tensor,
    has_answer: torch.Tensor,
    loss_mask: torch.Tensor,
    weight_sums: torch.Tensor,
    seq_normaliser: float | torch.Tensor,
    token_normaliser: float | torch.Tensor,
    ref_logprobs: torch.Tensor | None = None,
    config: RegionLossConfig | None = None,
) -> tuple[torch.Tensor, RegionLossStats]:
    """CARE section-6 loss over one packed micro-batch.

    Per-token [T] inputs on the packed axis: ``logprobs`` (fp32 or bf16, the only input with a
    gradient), ``old_logprobs`` (behaviour), ``advantages`` (the sequence advantage A_i broadcast
    to its tokens), ``region_ids`` (Region codes, int), ``is_positive`` / ``has_answer`` /
    ``loss_mask`` (bool, the first two per-sequence flags broadcast), ``weight_sums`` (sum_t w_it of
    the token's *whole* sequence, :func:`sequence_weight_sums`), ``ref_logprobs`` (None: no KL
    term). ``seq_normaliser`` (N_seq) and ``token_normaliser`` (response tokens) are global-batch
    counts (floats or 0-dim tensors). Returns (loss 0-dim fp32, :class:`RegionLossStats`).
    """
    config = config or RegionLossConfig()
    num_tokens = logprobs.shape
    named = dict(old_logprobs=old_logprobs, advantages=advantages, region_ids=region_ids, is_positive=is_positive,
                 has_answer=has_answer, loss_mask=loss_mask, weight_sums=weight_sums)
    if ref_logprobs is not None:
        named["ref_logprobs"] = ref_logprobs
    if logprobs.dim() != 1:
        raise ValueError(f"logprobs must be [T]; got {tuple(logprobs.shape)}")
    for name, tensor in named.items():
        if tensor.shape != num_tokens:
            raise ValueError(f"{name} must have the shape of logprobs {tuple(num_tokens)}; got {tuple(tensor.shape)}")
        if tensor.device != logprobs.device:
            raise ValueError(f"{name} is on {tensor.device}, logprobs on {logprobs.device}")
    seq_norm = _as_scalar_tensor(seq_normaliser, logprobs.device, "seq_normaliser")
    token_norm = _as_scalar_tensor(token_normaliser, logprobs.device, "token_normaliser")
    use_kl = ref_logprobs is not None and config.kl_coef > 0
    ref = ref_logprobs if use_kl else None
    if resolve_backend(logprobs.device) == "triton":
        contiguous = [t.contiguous() for t in (logprobs, old_logprobs)]
        loss, values = _FusedRegionLoss.apply(
            contiguous[0], contiguous[1], None if ref is None else ref.contiguous(), advantages.contiguous(),
            region_ids.contiguous(), is_positive.contiguous(), has_answer.contiguous(), loss_mask.contiguous(),
            weight_sums.contiguous(), seq_norm, token_norm, config,
        )
    else:
        loss, values = region_policy_loss_reference(
            logprobs, old_logprobs, advantages, region_ids, is_positive, has_answer, loss_mask, weight_sums,
            seq_norm, token_norm, ref, config.gamma_pos, config.clip_low, config.clip_high, config.kl_coef,
            config.weight_eps, config.dual_clip, config.kl_clamp, config.gamma_neg,
        )
    return loss, RegionLossStats(values=values, seq_normaliser=seq_norm, token_normaliser=token_norm)
