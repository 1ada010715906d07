"""care_megatron.algorithm: CARE and its baselines as pure, vectorised PyTorch (docs/algorithm.md).

No torch.distributed, Megatron or SGLang here: everything runs the same on CPU and GPU and is
unit-tested against closed forms and a per-group loop reference (``tools/bench_advantages.py``).

* :mod:`.care`: ``CareConfig``, ``care_advantages`` (anchor, hard negatives, rescue, RGR bookkeeping).
* :mod:`.advantages`: ``AdvantageInputs``, ``register_advantage`` / ``get_advantage_fn``
  (grpo, dr_grpo, rloo, dapo, gspo, care).
* :mod:`.policy_losses`: ``region_weights``, ``token_advantages``, ``compute_normalisers``,
  ``PolicyLossConfig``, ``register_policy_loss`` / ``get_policy_loss``.
* :mod:`.kl`: k1 / k2 / k3 estimators. :mod:`.dapo`: dynamic sampling, soft overlong penalty.
* :mod:`.diagnostics`: the section-8 metrics.
"""
from care_megatron.algorithm.advantages import (
    AdvantageInputs,
    advantage_names,
    get_advantage_fn,
    register_advantage,
)
from care_megatron.algorithm.care import CareConfig, SubgroupRole, care_advantages
from care_megatron.algorithm.dapo import dynamic_sampling_filter, soft_overlong_penalty
from care_megatron.algorithm.diagnostics import advantage_diagnostics, clip_fractions
from care_megatron.algorithm.kl import kl_penalty
from care_megatron.algorithm.policy_losses import (
    METHOD_DEFAULTS,
    PolicyLossConfig,
    build_token_advantages,
    compute_normalisers,
    get_policy_loss,
    policy_loss_names,
    region_weights,
    register_policy_loss,
    token_advantages,
)

__all__ = [
    "AdvantageInputs", "advantage_names", "get_advantage_fn", "register_advantage",
    "CareConfig", "SubgroupRole", "care_advantages",
    "dynamic_sampling_filter", "soft_overlong_penalty",
    "advantage_diagnostics", "clip_fractions", "kl_penalty",
    "METHOD_DEFAULTS", "PolicyLossConfig", "build_token_advantages", "compute_normalisers", "get_policy_loss",
    "policy_loss_names", "region_weights", "register_policy_loss", "token_advantages",
]
