"""Dense per-group layout of a flat batch of rollouts, shared by every advantage estimator.

A batch arrives flat: ``N`` rollouts, each tagged with the prompt (group) it was sampled for. The
estimators work on a padded ``[G, S]`` view (``G`` groups, ``S`` = size of the largest group) so
every per-group statistic is one tensor operation instead of a Python loop over groups.

Choices made here (documented because other modules rely on them):

* Groups are numbered ``0..G-1`` in ascending order of their ``group_index`` value
  (``torch.unique`` order), not in order of first appearance.
* Inside a group, rollouts keep their order in the flat batch; "lower index" tie-breaks in the
  spec therefore mean "earlier in the batch", which is the same as the rollout number within the
  group when the trainer lays rollouts out group by group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GroupLayout:
    """Mapping between a flat batch and its padded per-group view.

    Shapes: ``group_ids`` LongTensor[G] (the distinct ``group_index`` values, ascending);
    ``group_of`` LongTensor[N] (dense group number of every flat row, including rows left out of
    the layout); ``index`` LongTensor[G, S] (flat row at each padded slot, -1 on padding);
    ``valid`` BoolTensor[G, S]; ``sizes`` LongTensor[G] (rows of each group in the layout).
    """

    group_ids: torch.Tensor
    group_of: torch.Tensor
    index: torch.Tensor
    valid: torch.Tensor
    sizes: torch.Tensor

    @property
    def num_groups(self) -> int:
        return int(self.group_ids.numel())

    @property
    def width(self) -> int:
        return int(self.index.shape[1])

    def gather(self, values: torch.Tensor, fill=0) -> torch.Tensor:
        """Per-row ``values`` [N, ...] -> padded [G, S, ...], ``fill`` on padding."""
        safe = self.index.clamp(min=0)
        out = values[safe]
        mask = self.valid
        while mask.dim() < out.dim():
            mask = mask.unsqueeze(-1)
        return torch.where(mask, out, torch.as_tensor(fill, dtype=out.dtype, device=out.device))

    def scatter(self, padded: torch.Tensor, num_rows: int, fill=0) -> torch.Tensor:
        """Padded [G, S] -> per-row [N] (rows outside the layout get ``fill``)."""
        out = padded.new_full((num_rows,), fill)
        out[self.index[self.valid]] = padded[self.valid]
        return out


def build_group_layout(group_index: torch.Tensor, include: torch.Tensor | None = None) -> GroupLayout:
    """Build the padded ``[G, S]`` view of ``group_index`` (LongTensor[N]).

    ``include`` (BoolTensor[N] or None) restricts which rows occupy slots; every distinct
    ``group_index`` value still gets a group number. Runs in O(N log N) tensor operations.
    """
    if group_index.dim() != 1:
        raise ValueError(f"group_index must be 1-D, got shape {tuple(group_index.shape)}")
    device = group_index.device
    n = group_index.numel()
    group_ids, group_of = torch.unique(group_index, sorted=True, return_inverse=True)
    num_groups = group_ids.numel()
    rows = torch.arange(n, device=device) if include is None else torch.nonzero(include, as_tuple=False).flatten()
    groups_of_rows = group_of[rows]
    order = torch.sort(groups_of_rows, stable=True).indices
    rows = rows[order]
    groups_sorted = groups_of_rows[order]
    sizes = torch.bincount(groups_sorted, minlength=num_groups)
    starts = torch.cumsum(sizes, 0) - sizes
    position = torch.arange(rows.numel(), device=device) - starts[groups_sorted]
    width = int(sizes.max()) if num_groups > 0 and rows.numel() > 0 else 0
    index = torch.full((num_groups, width), -1, dtype=torch.long, device=device)
    if rows.numel():
        index[groups_sorted, position] = rows
    return GroupLayout(group_ids=group_ids, group_of=group_of, index=index, valid=index >= 0, sizes=sizes)
