"""``update/param_norm``: the L2 norm of the parameter change over one RL step, ||theta_after - theta_before||.

The paper's Fig. 7 plots a per-step update magnitude beside the rescue ablation's accuracy gain. The
norm is taken over the whole step (all its optimizer updates and PPO epochs), so one number per step
whatever the update schedule.

Cost: one host copy of this rank's trainable parameters before the step (in their own dtype) and one
pass after it that brings each tensor back to its device one at a time, so GPU memory grows by a few
fp32 copies of the largest parameter tensor at most (the difference of two bf16 / fp32 values is taken
in fp32, its squares summed in fp64). Each unique parameter is counted once across model parallelism: a backend
names the parameters it owns (:meth:`owned_parameters`) and the group over which the partial sums of
squares add up (Megatron: tensor-parallel duplicates, e.g. the replicated vision tower and the norms,
count on TP rank 0 only, as in Megatron's gradient-norm clipping; the sum is over the model-parallel
group). Data-parallel replicas hold the same parameters and are not summed.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch


class ParameterSnapshot:
    """Host copies of ``parameters`` now; :meth:`distance` = the L2 norm of their change since, summed over
    ``group`` (a process group whose ranks hold disjoint parameter shards; None: this process only)."""

    def __init__(self, parameters: Iterable[torch.Tensor], group=None):
        self.parameters = [p for p in parameters]
        self.group = group
        self.copies = [p.detach().to("cpu", copy=True) for p in self.parameters]

    def distance(self) -> float:
        total = torch.zeros((), dtype=torch.float64)
        for param, before in zip(self.parameters, self.copies):
            delta = param.detach().float() - before.to(param.device).float()
            total += float(delta.square().sum(dtype=torch.float64))
        if self.group is not None:
            from care_megatron.training.megatron.parallel_state import all_reduce_host_values

            total = all_reduce_host_values([float(total)], self.group)[0]
        return math.sqrt(float(total))


def snapshot_parameters(backend) -> Optional[ParameterSnapshot]:
    """A snapshot of the parameters ``backend`` updates (its ``owned_parameters()``: parameters, group),
    or None when the backend does not name them (the metric is then not logged)."""
    owned = getattr(backend, "owned_parameters", None)
    if owned is None:
        return None
    parameters, group = owned()
    return ParameterSnapshot(parameters, group)
