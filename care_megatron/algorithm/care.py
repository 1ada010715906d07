"""CARE advantages: anchor, hard negatives, subgroup z-scores, all-negative rescue, RGR bookkeeping.

Implements sections 2-5 of the project's algorithm document, ``docs/algorithm.md``, over a whole
batch of groups at once. Every step is
a tensor operation on a padded ``[G, S]`` view of the batch (see :mod:`.groups`); the only Python
loops run over the K negatives picked farthest-first (K <= ~8), never over groups or rollouts.

Choices the spec leaves open, made here and relied on by the tests:

* **Tie-breaks.** "Lower index" means earlier in the flat batch (the rollout order inside a
  group). Anchor ``max_reward`` (the default, the paper's Eq. 2): highest reward r among the
  positives, then fewest think tokens, then fewest answer tokens, then lowest index, so a correct
  answer that dropped its rationale (lower r under a format term) never anchors while a formatted
  correct one exists. ``shortest_think`` (the ablation, the reference code's rule): fewest think
  tokens, then fewest answer tokens, then lowest index, ignoring r.
  ``random``: a uniform draw among the positives from a generator seeded with ``config.seed``.
  Rescue pseudo-anchor: highest reward, then highest ``sequence_logprobs``, then lowest index.
* **Cosine selector** (default): candidates are the failures sorted by ascending
  ``d = 1 - cos(e_i, e_a)`` (ties: lower index), the first ``M`` are preselected, and
  ``K' = min(K, M, |F|)`` are picked farthest-first inside the preselection: the nearest first,
  then repeatedly the candidate whose minimum cosine distance to the already picked negatives is
  largest (ties: lower index). The anchor is *not* part of the set the distances are measured to
  during this pass (the spec says "start with the nearest").
* **Other selectors** pick the same number ``K' = min(K, M, |F|)`` so an ablation changes which
  failures enter the subgroup, never how many: ``random`` (uniform, seeded), ``farthest`` (largest
  ``d``, ties lower index), ``mixed`` (``ceil(K'/2)`` nearest then ``floor(K'/2)`` farthest of the
  rest).
* **Rescue negatives** (section 4): ``K' = min(K, |group| - 1)`` failures picked farthest-first
  *seeded with the pseudo-anchor*: the first pick is the failure farthest from ``p``, each next one
  maximises its minimum distance to ``{p} + picked``. No preselection, whatever the selector.
* **RGR target**: the nearest (smallest ``d``) selected hard negative of an anchored group; with the
  cosine selector that is the first one picked.
* **Reflected samples** (``reflected_from[j] = i``) never take part in anchor or negative selection,
  so the selection is identical with and without them (the trainer calls this function before and
  after resampling). If ``i`` is a selected negative of an anchored group, ``j`` replaces ``i`` in
  the subgroup statistics and ``i`` gets 0; otherwise (``i`` not selected, or its group is a
  rescue group: RGR is disabled there) ``j`` gets 0 and is flagged in ``info['reflection_ignored']``.
  A reflected sample must carry the same ``group_index`` as its source (else ``ValueError``).
* **Robust statistics**: 20% trimmed mean drops ``floor(0.2 n)`` values from each end of the ``n``
  subgroup rewards; the median of an even count is the mean of the two middle values; when
  ``1.4826 * MAD`` is not above ``eps`` (more than half the subgroup shares one reward, e.g. binary
  rewards with K' >= 2) the scale falls back to the population std, because a zero scale would blow
  the z-scores up to ``1/eps``.
* Reward statistics are computed in float64 and returned in the dtype of ``rewards`` (float32 or
  wider). Cosine distances are computed in the embeddings' precision (float32 for bf16/fp16/fp32
  inputs) from one per-group Gram matrix of the raw embeddings scaled by inverse norms, then
  compared in float64; two failures whose distances differ only below float32 resolution count as
  tied (lower index wins). Only embeddings of rollouts taking part in selection are checked for
  finiteness (reflected samples' embeddings are never read).
* Non-finite rewards or embeddings raise ``ValueError`` naming the rows: a verifier bug must stop
  the step loudly rather than train on garbage. An empty batch returns empty tensors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntEnum

import torch

from care_megatron.algorithm.groups import build_group_layout

ANCHOR_RULES = ("max_reward", "shortest_think", "random")
NEGATIVE_SELECTORS = ("cosine", "random", "farthest", "mixed")


class SubgroupRole(IntEnum):
    """Role of a rollout in its group's subgroup, as returned in ``info['role']``."""

    NONE = 0
    """Outside every subgroup (advantage 0)."""
    ANCHOR = 1
    """The verifier-positive anchor (section 2)."""
    NEGATIVE = 2
    """A selected hard negative, or a rescue negative."""
    PSEUDO_ANCHOR = 3
    """The rescue pseudo-anchor of an all-negative group (section 4)."""
    REFLECTED_POSITIVE = 4
    """A successful RGR sample in its source's place (section 5)."""
    REFLECTED_NEGATIVE = 5
    """A failed RGR sample in its source's place, scaled by ``reflect_neg_scale``."""


@dataclass
class CareConfig:
    """Hyper-parameters of CARE's advantage computation (docs/algorithm.md sections 2-6)."""

    k: int = 4
    """K: target number of hard negatives per subgroup (paper: G = 8, K = 4)."""
    preselect_m: int = 6
    """M: nearest failures preselected before the farthest-first pass (6: the spec's value; the paper names
    M without a number)."""
    neg_scale: float = 0.5
    """s: negatives get ``-s * |z|`` (reference value 0.5; keeps negatives from over-sharpening)."""
    reflect_neg_scale: float = 0.25
    """s_refl: scale of a failed RGR sample, smaller than ``neg_scale`` (0.25: the spec's value; the paper
    adopts one in its appendix 9.3 sweep, but the number was lost in text extraction)."""
    eps: float = 1e-6
    """Added to the subgroup std before dividing (and to the region-weight sum of section 6)."""
    equalize: bool = True
    """Multiply a group's advantages by sqrt(K / K') when K' < K, so groups with few failures are
    not under-weighted (paper appendix 9.1: faster, steadier training)."""
    robust_stats: bool = False
    """Use a 20%-trimmed mean and 1.4826 * MAD instead of mean / population std."""
    rescue: bool = True
    """All-negative rescue (section 4): a zero-sum pseudo-contrast in groups with no positive."""
    rescue_delta: float = 0.1
    """delta: magnitude of the rescue pseudo-rewards (only the z-scores matter, so any positive value
    gives the same advantages up to eps; 0.1 is the spec's value: the paper fixes one, but the number was
    lost in text extraction)."""
    anchor_rule: str = "max_reward"
    """Anchor among the positives: ``max_reward`` (spec section 2.1, paper Eq. 2: highest r, ties ->
    fewest think tokens, fewest answer tokens, lowest index), ``shortest_think`` (fewest think tokens
    ignoring r; the reference code's rule, which anchors on rationale-free correct answers when the
    reward has a format term, so the format collapses) or ``random``."""
    negative_selector: str = "cosine"
    """Hard-negative selector: ``cosine`` (nearest M, farthest-first), ``random``, ``farthest``, ``mixed``."""
    think_weight_pos: float = 0.005
    """gamma_pos: token weight of a positive's <think> tokens in the region-weighted loss (section 6)."""
    think_weight_neg: float = 0.0
    """Token weight of a failed response's <think> tokens (section 6: 0, failed rationales are masked;
    the paper's "RW (fail-think unmasked)" ablation sets it to gamma_pos)."""
    seed: int = 0
    """Seed of the ``random`` anchor rule and the ``random`` selector (a fresh CPU generator per call, so
    the calls before and after RGR draw the same). The trainer replaces it every step with a value
    derived from (``train.seed``, this base seed, step, data-parallel rank): see
    ``care_megatron.trainer.derive_seed``."""

    def __post_init__(self) -> None:
        def check(cond: bool, name: str, message: str) -> None:
            if not cond:
                raise ValueError(f"CareConfig field '{name}': {message}")

        check(isinstance(self.k, int) and self.k >= 1, "k", f"must be an integer >= 1, got {self.k!r}")
        check(isinstance(self.preselect_m, int) and self.preselect_m >= 1, "preselect_m",
              f"must be an integer >= 1, got {self.preselect_m!r}")
        check(self.neg_scale >= 0, "neg_scale", f"must be >= 0, got {self.neg_scale!r}")
        check(self.reflect_neg_scale >= 0, "reflect_neg_scale", f"must be >= 0, got {self.reflect_neg_scale!r}")
        check(self.eps > 0, "eps", f"must be > 0, got {self.eps!r}")
        check(self.rescue_delta > 0, "rescue_delta", f"must be > 0, got {self.rescue_delta!r}")
        check(self.anchor_rule in ANCHOR_RULES, "anchor_rule",
              f"unknown rule {self.anchor_rule!r}; valid: {', '.join(ANCHOR_RULES)}")
        check(self.negative_selector in NEGATIVE_SELECTORS, "negative_selector",
              f"unknown selector {self.negative_selector!r}; valid: {', '.join(NEGATIVE_SELECTORS)}")
        check(0 <= self.think_weight_pos <= 1, "think_weight_pos", f"must be in [0, 1], got {self.think_weight_pos!r}")
        check(0 <= self.think_weight_neg <= 1, "think_weight_neg", f"must be in [0, 1], got {self.think_weight_neg!r}")
        check(isinstance(self.seed, int), "seed", f"must be an integer, got {self.seed!r}")


_BIG = torch.iinfo(torch.long).max


def _first_true_column(mask: torch.Tensor) -> torch.Tensor:
    """LongTensor[G]: lowest column where ``mask`` [G, S] is True (S when none)."""
    cols = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, cols, mask.shape[1]).min(dim=1).values if mask.shape[1] else mask.new_zeros(mask.shape[0], dtype=torch.long)


def _lexicographic_pick(candidates: torch.Tensor, keys: list[tuple[torch.Tensor, bool]]) -> torch.Tensor:
    """Column of the best candidate per row: keys compared in order (True = larger wins), then lowest column."""
    if candidates.shape[1] == 0:
        return torch.zeros(candidates.shape[0], dtype=torch.long, device=candidates.device)
    for key, larger in keys:
        fill = -math.inf if larger else math.inf
        masked = torch.where(candidates, key.double(), fill)
        best = masked.max(dim=1, keepdim=True).values if larger else masked.min(dim=1, keepdim=True).values
        candidates = candidates & (masked == best)
    return _first_true_column(candidates)


def _take_first(order: torch.Tensor, count: torch.Tensor, width: int) -> torch.Tensor:
    """First ``count[g]`` columns of ``order`` [G, S], padded with -1 to [G, width]."""
    g, s = order.shape
    out = torch.full((g, width), -1, dtype=torch.long, device=order.device)
    w = min(width, s)
    slots = torch.arange(w, device=order.device).expand(g, w)
    out[:, :w] = torch.where(slots < count.unsqueeze(1), order[:, :w], -1)
    return out


def _farthest_first(
    pairwise: torch.Tensor,
    candidates: torch.Tensor,
    start_dist: torch.Tensor,
    count: torch.Tensor,
    width: int,
    tie_keys: torch.Tensor,
) -> torch.Tensor:
    """Greedy farthest-point picks, vectorised over rows.

    ``pairwise`` [G, C, C] distances between candidates; ``candidates`` BoolTensor[G, C];
    ``start_dist`` [G, C] the distance of each candidate to the set already chosen (the nearest
    negative, or the rescue pseudo-anchor); ``count`` [G] picks per row (<= 0: none);
    ``tie_keys`` [G, C] smaller wins ties (the rollout column).
    Returns LongTensor[G, width] of candidate positions, -1 beyond ``count``.
    """
    g, c = candidates.shape
    rows = torch.arange(g, device=candidates.device)
    picked = torch.zeros_like(candidates)
    min_dist = start_dist.clone()
    out = torch.full((g, width), -1, dtype=torch.long, device=candidates.device)
    for step in range(width):
        active = count > step
        available = candidates & ~picked
        score = torch.where(available, min_dist, -math.inf)
        best = score.max(dim=1, keepdim=True).values
        tied = available & (score == best)
        choice_key = torch.where(tied, tie_keys, _BIG).min(dim=1, keepdim=True).values
        choice = (tied & (tie_keys == choice_key)).long().argmax(dim=1)
        active = active & available.any(dim=1)
        out[:, step] = torch.where(active, choice, -1)
        picked[rows[active], choice[active]] = True
        min_dist = torch.where(active.unsqueeze(1), torch.minimum(min_dist, pairwise[rows, choice]), min_dist)
    return out


def _robust_location_scale(values: torch.Tensor, mask: torch.Tensor, eps: float):
    """20%-trimmed mean and 1.4826 * MAD of the masked values of each row (float64 [G, C])."""
    n = mask.sum(dim=1)
    cols = torch.arange(values.shape[1], device=values.device).expand_as(values)

    def sorted_valid(x):
        return torch.sort(torch.where(mask, x, math.inf), dim=1).values

    def median(x_sorted):
        lo = ((n - 1).clamp(min=0) // 2).unsqueeze(1)
        hi = (n // 2).clamp(max=max(values.shape[1] - 1, 0)).unsqueeze(1)
        return 0.5 * (x_sorted.gather(1, lo) + x_sorted.gather(1, hi)).squeeze(1)

    s = sorted_valid(values)
    cut = torch.floor(0.2 * n.double()).long().unsqueeze(1)
    keep = (cols >= cut) & (cols < n.unsqueeze(1) - cut)
    kept = keep.sum(dim=1).clamp(min=1)
    location = torch.where(keep, s, 0.0).sum(dim=1) / kept
    med = median(s)
    mad = median(sorted_valid((values - med.unsqueeze(1)).abs()))
    scale = 1.4826 * mad
    centred = torch.where(mask, values - (torch.where(mask, values, 0.0).sum(1) / n.clamp(min=1)).unsqueeze(1), 0.0)
    population_std = (centred.pow(2).sum(1) / n.clamp(min=1)).sqrt()
    scale = torch.where(scale > eps, scale, population_std)
    return location, scale


def _group_cosine_distances(think_embeddings: torch.Tensor, rows_of: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Cosine distances between the rollouts of each group -> float64 [G, S, S] (padding rows: 1).

    One gather (none when the batch is laid out group by group with equal sizes) and one batched
    Gram product: at realistic embedding sizes (D = 2-4k) reading the embeddings dominates the
    cost, so they are read twice in all; norms come from the Gram diagonal.
    """
    emb = think_embeddings.detach()
    if emb.dtype not in (torch.float32, torch.float64):
        emb = emb.float()
    num_groups, width = rows_of.shape
    contiguous = (
        bool(valid.all())
        and rows_of.numel() == emb.shape[0]
        and torch.equal(rows_of.flatten(), torch.arange(rows_of.numel(), device=rows_of.device))
    )
    vectors = emb.view(num_groups, width, emb.shape[1]) if contiguous else emb[rows_of.clamp(min=0)]
    gram = torch.bmm(vectors, vectors.transpose(1, 2))
    squared_norm = torch.diagonal(gram, dim1=1, dim2=2)
    bad = valid & ~torch.isfinite(squared_norm)
    if bool(bad.any()):
        rows = rows_of[bad][:8].tolist()
        raise ValueError(f"think_embeddings must be finite (and their squares representable); bad rows {rows}")
    inv_norm = torch.where(valid, squared_norm, 0.0).clamp(min=1e-24).rsqrt()
    cosine = gram * inv_norm.unsqueeze(2) * inv_norm.unsqueeze(1)
    return torch.where(valid.unsqueeze(2) & valid.unsqueeze(1), 1.0 - cosine.double(), 1.0)


def _check_inputs(n, group_index, rewards, correct, think_lengths, answer_lengths, think_embeddings,
                  sequence_logprobs, reflected_from):
    for name, t in (("group_index", group_index), ("rewards", rewards), ("correct", correct),
                    ("think_lengths", think_lengths), ("answer_lengths", answer_lengths),
                    ("sequence_logprobs", sequence_logprobs)):
        if t.dim() != 1 or t.numel() != n:
            raise ValueError(f"{name} must have shape [{n}], got {tuple(t.shape)}")
    if think_embeddings.dim() != 2 or think_embeddings.shape[0] != n:
        raise ValueError(f"think_embeddings must have shape [{n}, D], got {tuple(think_embeddings.shape)}")
    if reflected_from is not None and (reflected_from.dim() != 1 or reflected_from.numel() != n):
        raise ValueError(f"reflected_from must have shape [{n}], got {tuple(reflected_from.shape)}")
    bad = ~torch.isfinite(rewards)
    if bad.any():
        rows = torch.nonzero(bad).flatten()[:8].tolist()
        raise ValueError(f"rewards must be finite; non-finite at rows {rows} (check the verifier)")


def care_advantages(
    group_index: torch.Tensor,
    rewards: torch.Tensor,
    correct: torch.Tensor,
    think_lengths: torch.Tensor,
    answer_lengths: torch.Tensor,
    think_embeddings: torch.Tensor,
    sequence_logprobs: torch.Tensor,
    config: CareConfig | None = None,
    reflected_from: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """CARE sequence-level advantages for a batch of groups (docs/algorithm.md sections 2-5).

    Args (N rollouts, G distinct groups, D embedding size):
        group_index: LongTensor[N]; rollouts of one prompt share a value.
        rewards: FloatTensor[N], overall reward r (section 1).
        correct: BoolTensor[N], the correctness gate (a float tensor is read as accuracy, gated at 1).
        think_lengths, answer_lengths: LongTensor[N], tokens in the <think> / <answer> spans.
        think_embeddings: FloatTensor[N, D], rationale embeddings at any scale (L2-normalised here,
            never differentiated).
        sequence_logprobs: FloatTensor[N], summed behaviour log-probs (rescue tie-break).
        config: :class:`CareConfig` (defaults when None).
        reflected_from: LongTensor[N] or None; row j of an RGR sample holds the row of the hard
            negative it was resampled from, -1 for ordinary rollouts.

    Returns:
        advantages: FloatTensor[N], 0 outside every subgroup, no gradient.
        info: dict of tensors. Per group [G]: ``group_ids`` (the group_index values),
            ``anchor_index`` (row of the anchor or pseudo-anchor, -1), ``num_negatives`` (K'),
            ``equalization`` (the sqrt(K/K') factor applied, 1 when none), ``anchored``,
            ``rescue``, ``saturated`` (every rollout correct), ``rgr_target`` (row of the hard
            negative RGR should reflect, -1), ``subgroup_mean``, ``subgroup_std``; [G, K]:
            ``hard_negative_indices`` (selected original rollouts), ``negative_indices`` (after RGR
            substitution); per row [N]: ``group_of``, ``role`` (:class:`SubgroupRole` codes),
            ``in_subgroup``, ``z_scores`` (pre-scaling z, 0 outside), ``is_reflected``,
            ``reflection_used``, ``reflection_ignored``.
    """
    config = config or CareConfig()
    n = int(rewards.numel())
    device = rewards.device
    if reflected_from is None:
        reflected_from = torch.full((n,), -1, dtype=torch.long, device=device)
    _check_inputs(n, group_index, rewards, correct, think_lengths, answer_lengths, think_embeddings,
                  sequence_logprobs, reflected_from)
    out_dtype = rewards.dtype if rewards.dtype in (torch.float32, torch.float64) else torch.float32
    k = config.k

    reflected_from = reflected_from.long()
    is_reflected = reflected_from >= 0
    if is_reflected.any():
        src = reflected_from[is_reflected]
        if int(src.max()) >= n:
            raise ValueError(f"reflected_from points outside the batch (max {int(src.max())}, N = {n})")
        if is_reflected[src].any():
            raise ValueError("reflected_from must point at an original rollout, not at another reflected sample")
        if (group_index[src] != group_index[is_reflected]).any():
            raise ValueError("a reflected sample must have the same group_index as the rollout it was resampled from")
        if torch.unique(src).numel() != src.numel():
            raise ValueError("reflected_from: at most one reflected sample per source rollout")

    layout = build_group_layout(group_index, include=~is_reflected)
    num_groups, width = layout.num_groups, layout.width
    rows_of = layout.index
    valid = layout.valid
    cols = torch.arange(width, device=device).expand(num_groups, width)
    group_rows = torch.arange(num_groups, device=device)

    r_all = rewards.detach().double()
    r = layout.gather(r_all)
    # a float "correct" is read as accuracy: the gate is accuracy == 1 (docs/algorithm.md section 1), not > 0
    gate = correct >= 1 if correct.is_floating_point() else correct.bool()
    is_pos = layout.gather(gate) & valid
    is_fail = valid & ~is_pos
    think_len = layout.gather(think_lengths.long())
    answer_len = layout.gather(answer_lengths.long())
    logprob = layout.gather(sequence_logprobs.detach().double())
    distance = _group_cosine_distances(think_embeddings, rows_of, valid)  # [G, S, S] float64

    num_pos = is_pos.sum(1)
    num_fail = is_fail.sum(1)
    size = valid.sum(1)
    anchored = (num_pos > 0) & (num_fail > 0)
    saturated = (num_pos > 0) & (num_fail == 0)
    rescue = (num_pos == 0) & (size >= 2) if config.rescue else torch.zeros_like(anchored)

    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    random_keys = torch.rand((num_groups, width), generator=generator, dtype=torch.float64).to(device)

    # --- anchor (section 2.1) and pseudo-anchor (section 4) -----------------------------------
    if config.anchor_rule == "shortest_think":
        anchor_col = _lexicographic_pick(is_pos, [(think_len, False), (answer_len, False)])
    elif config.anchor_rule == "max_reward":
        anchor_col = _lexicographic_pick(is_pos, [(r, True), (think_len, False), (answer_len, False)])
    else:
        anchor_col = _lexicographic_pick(is_pos, [(random_keys, False)])
    pseudo_col = _lexicographic_pick(valid, [(r, True), (logprob, True)])

    neg_cols = torch.full((num_groups, k), -1, dtype=torch.long, device=device)
    kprime = torch.zeros(num_groups, dtype=torch.long, device=device)
    rgr_col = torch.full((num_groups,), -1, dtype=torch.long, device=device)

    # --- hard negatives of anchored groups (section 2.4) --------------------------------------
    ga = torch.nonzero(anchored).flatten()
    if ga.numel():
        local = torch.arange(ga.numel(), device=device)
        group_distance = distance[ga]
        dist = group_distance[local, anchor_col[ga]]
        fail = is_fail[ga]
        kp = torch.clamp(num_fail[ga], max=min(k, config.preselect_m))
        ascending = torch.sort(torch.where(fail, dist, math.inf), dim=1, stable=True).indices
        if config.negative_selector == "cosine":
            m = min(config.preselect_m, width)
            pre = ascending[:, :m]
            pre_valid = fail.gather(1, pre)
            pairwise = group_distance.gather(1, pre.unsqueeze(2).expand(-1, -1, width)).gather(
                2, pre.unsqueeze(1).expand(-1, m, -1))
            # the nearest failure is always the first pick; the rest are farthest-first from the picked set
            slot = torch.arange(m, device=device).expand_as(pre)
            rest = _farthest_first(pairwise, pre_valid & (slot > 0), pairwise[:, 0, :], kp - 1, k - 1, tie_keys=pre)
            first = torch.where(kp > 0, pre[:, 0], -1).unsqueeze(1)
            chosen = torch.cat([first, torch.where(rest >= 0, pre.gather(1, rest.clamp(min=0)), -1)], dim=1)
        elif config.negative_selector == "random":
            order = torch.sort(torch.where(fail, random_keys[ga], math.inf), dim=1, stable=True).indices
            chosen = _take_first(order, kp, k)
        elif config.negative_selector == "farthest":
            order = torch.sort(torch.where(fail, dist, -math.inf), dim=1, descending=True, stable=True).indices
            chosen = _take_first(order, kp, k)
        else:  # mixed
            n_near = (kp + 1) // 2
            near = _take_first(ascending, n_near, k)
            near_mask = (near.unsqueeze(2) == cols[ga].unsqueeze(1)).any(dim=1)  # -1 slots match nothing
            far_order = torch.sort(torch.where(fail & ~near_mask, dist, -math.inf), dim=1, descending=True,
                                   stable=True).indices
            far = _take_first(far_order, kp - n_near, k)
            slots = torch.arange(k, device=device).expand(ga.numel(), k)
            shifted = far.gather(1, (slots - n_near.unsqueeze(1)).clamp(min=0))
            chosen = torch.where(slots < n_near.unsqueeze(1), near, torch.where(slots < kp.unsqueeze(1), shifted, -1))
        neg_cols[ga] = chosen
        kprime[ga] = kp
        # RGR: the nearest selected negative (ties: lower column)
        chosen_dist = torch.where(chosen >= 0, dist.gather(1, chosen.clamp(min=0)), math.inf)
        chosen_key = torch.where(chosen >= 0, chosen, _BIG)
        best = chosen_dist.min(dim=1, keepdim=True).values
        nearest = torch.where(chosen_dist == best, chosen_key, _BIG).min(dim=1).values
        rgr_col[ga] = torch.where(kp > 0, nearest, -1)

    # --- rescue negatives (section 4): farthest-first seeded with the pseudo-anchor ----------
    gr = torch.nonzero(rescue).flatten()
    if gr.numel():
        pairwise = distance[gr]
        local = torch.arange(gr.numel(), device=device)
        p = pseudo_col[gr]
        candidates = valid[gr] & (cols[gr] != p.unsqueeze(1))
        kp = torch.clamp(size[gr] - 1, max=k)
        picks = _farthest_first(pairwise, candidates, pairwise[local, p], kp, k, tie_keys=cols[gr])
        neg_cols[gr] = picks
        kprime[gr] = kp

    # --- subgroup members ----------------------------------------------------------------------
    in_play = anchored | rescue
    lead_col = torch.where(anchored, anchor_col, pseudo_col)
    member_cols = torch.cat([lead_col.unsqueeze(1), neg_cols], dim=1)  # [G, 1 + K]
    member_valid = (member_cols >= 0) & in_play.unsqueeze(1)
    member_valid[:, 0] &= lead_col < width
    member_rows = torch.where(member_valid, rows_of.gather(1, member_cols.clamp(min=0, max=max(width - 1, 0))), -1) \
        if width else torch.full_like(member_cols, -1)
    hard_negative_rows = member_rows[:, 1:].clone()

    # RGR substitution: a reflected sample takes its source's place among the negatives
    reflection_of = torch.full((n,), -1, dtype=torch.long, device=device)
    reflected_rows = torch.nonzero(is_reflected).flatten()
    reflection_of[reflected_from[reflected_rows]] = reflected_rows
    sub = reflection_of[member_rows.clamp(min=0)]
    slot_is_negative = torch.zeros_like(member_valid)
    slot_is_negative[:, 1:] = True
    substitute = member_valid & slot_is_negative & anchored.unsqueeze(1) & (sub >= 0)
    member_rows = torch.where(substitute, sub, member_rows)

    member_reward = torch.where(member_valid, r_all[member_rows.clamp(min=0)], 0.0)
    # rescue groups use the zero-sum pseudo-rewards, true rewards untouched
    kp_d = kprime.double().clamp(min=1).unsqueeze(1)
    pseudo = torch.where(slot_is_negative, -config.rescue_delta / kp_d, config.rescue_delta)
    member_reward = torch.where(rescue.unsqueeze(1) & member_valid, pseudo, member_reward)

    count = member_valid.sum(1).clamp(min=1).double()
    if config.robust_stats:
        mean, std = _robust_location_scale(member_reward, member_valid, config.eps)
    else:
        mean = torch.where(member_valid, member_reward, 0.0).sum(1) / count
        std = (torch.where(member_valid, member_reward - mean.unsqueeze(1), 0.0).pow(2).sum(1) / count).sqrt()
    z = torch.where(member_valid, (member_reward - mean.unsqueeze(1)) / (std.unsqueeze(1) + config.eps), 0.0)

    member_correct = gate[member_rows.clamp(min=0)] & member_valid
    reflected_positive = substitute & member_correct
    reflected_negative = substitute & ~member_correct
    negative_scale = torch.where(reflected_negative, config.reflect_neg_scale, config.neg_scale)
    scaled = torch.where(slot_is_negative & ~reflected_positive, -negative_scale * z.abs(), z)
    equalization = torch.ones(num_groups, dtype=torch.float64, device=device)
    if config.equalize:
        shrunk = in_play & (kprime > 0) & (kprime < k)
        equalization = torch.where(shrunk, torch.sqrt(k / kprime.double().clamp(min=1)), equalization)
    final = torch.where(member_valid, scaled * equalization.unsqueeze(1), 0.0)

    flat_rows = member_rows[member_valid]
    advantages = torch.zeros(n, dtype=torch.float64, device=device)
    advantages[flat_rows] = final[member_valid]
    z_scores = torch.zeros(n, dtype=torch.float64, device=device)
    z_scores[flat_rows] = z[member_valid]

    role_matrix = torch.full_like(member_cols, int(SubgroupRole.NEGATIVE))
    role_matrix[:, 0] = torch.where(anchored, int(SubgroupRole.ANCHOR), int(SubgroupRole.PSEUDO_ANCHOR))
    role_matrix = torch.where(reflected_positive, int(SubgroupRole.REFLECTED_POSITIVE), role_matrix)
    role_matrix = torch.where(reflected_negative, int(SubgroupRole.REFLECTED_NEGATIVE), role_matrix)
    role = torch.zeros(n, dtype=torch.long, device=device)
    role[flat_rows] = role_matrix[member_valid]
    in_subgroup = role != int(SubgroupRole.NONE)
    reflection_used = is_reflected & in_subgroup

    def rows_at(col_tensor):
        ok = (col_tensor >= 0) & (col_tensor < width)
        return torch.where(ok, rows_of[group_rows, col_tensor.clamp(min=0, max=max(width - 1, 0))], -1) if width \
            else torch.full_like(col_tensor, -1)

    info = {
        "group_ids": layout.group_ids,
        "group_of": layout.group_of,
        "anchor_index": torch.where(in_play, rows_at(lead_col), -1),
        "hard_negative_indices": hard_negative_rows,
        "negative_indices": torch.where(member_valid[:, 1:], member_rows[:, 1:], -1),
        "num_negatives": torch.where(in_play, kprime, 0),
        "equalization": equalization.to(out_dtype),
        "anchored": anchored,
        "rescue": rescue,
        "saturated": saturated,
        "rgr_target": torch.where(anchored, rows_at(rgr_col), -1),
        "subgroup_mean": torch.where(in_play, mean, 0.0).to(out_dtype),
        "subgroup_std": torch.where(in_play, std, 0.0).to(out_dtype),
        "role": role,
        "in_subgroup": in_subgroup,
        "z_scores": z_scores.to(out_dtype),
        "is_reflected": is_reflected,
        "reflection_used": reflection_used,
        "reflection_ignored": is_reflected & ~in_subgroup,
    }
    return advantages.to(out_dtype), info
