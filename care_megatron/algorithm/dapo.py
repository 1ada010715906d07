"""DAPO's data-side mechanisms (docs/algorithm.md section 7): dynamic sampling and the soft overlong penalty.

* :func:`dynamic_sampling_filter` drops every group whose rewards have zero variance (all equal:
  every rollout right, or every rollout wrong with the same format score), because its GRPO
  advantages are all zero; the trainer refills the batch with fresh prompts until it has enough
  groups (or gives up after its retry budget) and logs how many were dropped.
* :func:`soft_overlong_penalty` is DAPO's length-aware shaping term, added to the reward:
  0 up to ``max_length - buffer`` tokens, then a linear ramp down to ``-penalty`` at ``max_length``,
  and ``-penalty`` beyond (a truncated response).

Choices: "zero variance" is tested as ``max == min`` inside the group (exact, no tolerance, so
rewards that differ only by the format bonus are kept); a group of one rollout has zero variance
and is dropped. Both functions are vectorised over groups and never modify their inputs.
"""
from __future__ import annotations

import torch


def dynamic_sampling_filter(group_index: torch.Tensor, rewards: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Keep-mask of the rollouts in groups with non-zero reward variance.

    ``group_index`` LongTensor[N], ``rewards`` FloatTensor[N] -> ``keep`` BoolTensor[N] and
    ``info`` with ``num_groups``, ``num_kept_groups``, ``num_dropped_groups`` (ints) and
    ``dropped_group_ids`` (LongTensor of the dropped group_index values).
    """
    if group_index.shape != rewards.shape or rewards.dim() != 1:
        raise ValueError(f"group_index {tuple(group_index.shape)} and rewards {tuple(rewards.shape)} must both be [N]")
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards must be finite for dynamic sampling")
    group_ids, group_of = torch.unique(group_index, sorted=True, return_inverse=True)
    num_groups = group_ids.numel()
    r = rewards.detach().double()
    high = torch.full((num_groups,), -torch.inf, dtype=torch.float64, device=r.device).scatter_reduce(
        0, group_of, r, reduce="amax")
    low = torch.full((num_groups,), torch.inf, dtype=torch.float64, device=r.device).scatter_reduce(
        0, group_of, r, reduce="amin")
    keep_group = high > low
    info = {
        "num_groups": int(num_groups),
        "num_kept_groups": int(keep_group.sum()),
        "num_dropped_groups": int((~keep_group).sum()),
        "dropped_group_ids": group_ids[~keep_group],
    }
    return keep_group[group_of], info


def soft_overlong_penalty(response_lengths: torch.Tensor, max_length: int, buffer: int,
                          penalty: float = 1.0) -> torch.Tensor:
    """DAPO soft overlong punishment per rollout -> FloatTensor[N] (<= 0), to add to the reward.

    ``response_lengths`` LongTensor[N] generated tokens; ``max_length`` the generation cap;
    ``buffer`` the ramp width (``AlgorithmConfig.dapo_overlong_buffer``); ``penalty`` the value at
    the cap (``dapo_overlong_penalty``). ``buffer = 0`` gives a hard ``-penalty`` above the cap only.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not 0 <= buffer <= max_length:
        raise ValueError(f"buffer must be in [0, max_length], got {buffer}")
    if penalty < 0:
        raise ValueError(f"penalty must be >= 0, got {penalty}")
    length = response_lengths.double()
    start = max_length - buffer
    if buffer > 0:
        ramp = (start - length) / buffer * penalty
    else:
        ramp = torch.zeros_like(length)
    out = torch.where(length <= start, 0.0, ramp)
    out = torch.where(length > max_length, -float(penalty), out)
    return out.float()
