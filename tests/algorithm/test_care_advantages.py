"""CARE advantages against closed forms and hand-built groups (spec sections 2-5)."""
import math

import pytest
import torch

from care_megatron.algorithm.care import CareConfig, SubgroupRole, care_advantages
from _algorithm_helpers import angle_embeddings, concat, group

S = 0.5  # default neg_scale


def binary_group(kprime, gid=0, extra_correct=0):
    """One correct anchor, ``kprime`` failures (reward 1 / 0)."""
    n = 1 + extra_correct + kprime
    correct = [True] * (1 + extra_correct) + [False] * kprime
    rewards = [1.0 if c else 0.0 for c in correct]
    return group(rewards, correct, emb=torch.randn(n, 6), gid=gid)


@pytest.mark.parametrize("kprime", range(1, 8))
def test_signature_sqrt_kprime(kprime):
    batch = binary_group(kprime)
    raw, info = care_advantages(**batch, config=CareConfig(k=8, preselect_m=8, equalize=False))
    z = info["z_scores"]
    assert info["num_negatives"].tolist() == [kprime]
    assert z[0].item() == pytest.approx(math.sqrt(kprime), abs=1e-5)
    assert torch.allclose(z[1:], torch.full((kprime,), -1 / math.sqrt(kprime)), atol=1e-5)
    # after negative scaling
    assert raw[0].item() == pytest.approx(math.sqrt(kprime), abs=1e-5)
    assert torch.allclose(raw[1:], torch.full((kprime,), -S / math.sqrt(kprime)), atol=1e-5)
    # equalisation multiplies the whole group by sqrt(K / K')
    eq, info_eq = care_advantages(**batch, config=CareConfig(k=8, preselect_m=8, equalize=True))
    factor = math.sqrt(8 / kprime)
    assert info_eq["equalization"].item() == pytest.approx(factor)
    assert torch.allclose(eq, raw * factor, atol=1e-5)


def test_default_k_caps_negatives_and_equalises_only_when_short():
    adv, info = care_advantages(**binary_group(7), config=CareConfig())
    assert info["num_negatives"].tolist() == [4]  # K' = min(K=4, M=6, |F|=7)
    assert info["equalization"].item() == 1.0
    assert (adv != 0).sum().item() == 5
    assert adv[0].item() == pytest.approx(2.0, abs=1e-5)


def test_shrink_to_fit():
    """Fewer failures than K: K' = |F| and the group is rescaled by sqrt(K / K')."""
    adv, info = care_advantages(**binary_group(2, extra_correct=3), config=CareConfig(k=4))
    assert info["num_negatives"].tolist() == [2]
    factor = math.sqrt(4 / 2)
    assert adv[0].item() == pytest.approx(math.sqrt(2) * factor, abs=1e-5)
    assert torch.allclose(adv[1:4], torch.zeros(3))  # other positives are outside the subgroup
    assert torch.allclose(adv[4:], torch.full((2,), -S / math.sqrt(2) * factor), atol=1e-5)


def test_saturated_group_is_skipped():
    batch = group([1.0] * 5, [True] * 5, emb=torch.randn(5, 4))
    adv, info = care_advantages(**batch, config=CareConfig())
    assert torch.equal(adv, torch.zeros(5))
    assert info["saturated"].tolist() == [True]
    assert info["anchor_index"].tolist() == [-1] and info["rgr_target"].tolist() == [-1]


def test_anchor_prefers_formatted_correct_answer_over_dropped_rationale():
    """Spec 2.1 / paper Eq. 2: a correct answer without <think> (format 0: r = 0.5 at w_fmt = 0.5)
    never anchors while a correct formatted one (r = 1.0) exists. Closed form: S = {anchor, 2
    failures}, rewards (1, 0, 0) -> z = (sqrt 2, -1/sqrt 2, -1/sqrt 2); negatives x s = 0.5;
    equalisation sqrt(K / K') = sqrt(4 / 2). So anchor 2.0, negatives -0.5, the other positive 0."""
    batch = group([0.5, 1.0, 0.0, 0.0], [True, True, False, False], think=[0, 6, 4, 5], answer=[3, 3, 3, 3],
                  emb=torch.randn(4, 4))
    adv, info = care_advantages(**batch, config=CareConfig())
    assert info["anchor_index"].tolist() == [1]
    assert torch.allclose(adv, torch.tensor([0.0, 2.0, -0.5, -0.5]), atol=1e-5)
    # the old rule (now the shortest_think ablation) anchors on the rationale-free answer instead
    adv_old, info_old = care_advantages(**batch, config=CareConfig(anchor_rule="shortest_think"))
    assert info_old["anchor_index"].tolist() == [0]
    assert torch.allclose(adv_old, torch.tensor([2.0, 0.0, -0.5, -0.5]), atol=1e-5)


def test_anchor_tie_breaking():
    # max_reward (default): highest reward; ties -> fewest think tokens, then fewest answer tokens,
    # then lowest index. Rows 1-3 share r = 1; rows 2 and 3 tie on think (3), row 3 has the shorter answer.
    batch = group([0.9, 1.0, 1.0, 1.0, 0.1], [True] * 4 + [False], think=[1, 7, 3, 3, 1], answer=[1, 1, 4, 2, 1],
                  emb=torch.randn(5, 4))
    _, info = care_advantages(**batch, config=CareConfig())
    assert info["anchor_index"].tolist() == [3]
    # full tie on (r, think, answer): the lowest index
    batch_tie = group([1.0, 1.0, 0.0], [True, True, False], think=[3, 3, 1], answer=[2, 2, 1], emb=torch.randn(3, 4))
    assert care_advantages(**batch_tie, config=CareConfig())[1]["anchor_index"].tolist() == [0]
    # shortest_think: fewest think tokens ignoring r, then fewest answer tokens, then lowest index
    batch = group([1, 1, 1, 1, 0, 0], [True] * 4 + [False] * 2, think=[9, 5, 5, 5, 1, 1], answer=[1, 4, 2, 2, 1, 1],
                  emb=torch.randn(6, 4))
    _, info = care_advantages(**batch, config=CareConfig(anchor_rule="shortest_think"))
    assert info["anchor_index"].tolist() == [2]
    # failures with shorter thinks never anchor
    assert info["role"][4].item() == SubgroupRole.NEGATIVE
    batch = group([0.9, 1.0, 1.0, 1.0, 0.1], [True] * 4 + [False], answer=[1, 3, 2, 2, 1], emb=torch.randn(5, 4))
    # random: a positive, reproducible for a seed
    picks = {care_advantages(**batch, config=CareConfig(anchor_rule="random", seed=s))[1]["anchor_index"].item()
             for s in range(20)}
    assert picks <= {0, 1, 2, 3} and len(picks) > 1
    again = care_advantages(**batch, config=CareConfig(anchor_rule="random", seed=3))[1]["anchor_index"]
    assert torch.equal(again, care_advantages(**batch, config=CareConfig(anchor_rule="random", seed=3))[1]["anchor_index"])


def test_failure_above_mean_still_negative():
    # partial-credit rewards: the first failure sits above the subgroup mean (0.23) but is pushed down
    batch = group([0.6, 0.55, 0.0, 0.0, 0.0], [True, False, False, False, False], emb=torch.randn(5, 4))
    adv, info = care_advantages(**batch, config=CareConfig())
    mean = (0.6 + 0.55) / 5
    std = math.sqrt(sum((r - mean) ** 2 for r in [0.6, 0.55, 0, 0, 0]) / 5)
    z_fail = (0.55 - mean) / (std + 1e-6)
    assert z_fail > 0 and info["z_scores"][1].item() == pytest.approx(z_fail, rel=1e-5)
    assert adv[1].item() == pytest.approx(-S * z_fail, rel=1e-5)
    assert adv[0].item() > 0


def test_robust_variant_on_outlier_group():
    rewards = [1.0, 0.1, 0.2, 0.15, -5.0]
    batch = group(rewards, [True] + [False] * 4, emb=torch.randn(5, 4))
    adv, info = care_advantages(**batch, config=CareConfig(robust_stats=True))
    # 20% trimmed mean of 5 values drops one from each end: mean(0.1, 0.15, 0.2) = 0.15
    location = 0.15
    # median 0.15; absolute deviations 0.85, 0.05, 0.05, 0, 5.15 -> MAD 0.05
    scale = 1.4826 * 0.05
    assert info["subgroup_mean"].item() == pytest.approx(location, rel=1e-6)
    assert info["subgroup_std"].item() == pytest.approx(scale, rel=1e-6)
    assert adv[0].item() == pytest.approx((1.0 - location) / (scale + 1e-6), rel=1e-5)
    assert adv[4].item() == pytest.approx(-S * (5.15 / (scale + 1e-6)), rel=1e-5)
    plain, _ = care_advantages(**batch, config=CareConfig())
    assert plain[0].item() < 2.0 < adv[0].item()  # the outlier inflates the plain std, not the robust scale
    # binary rewards {1, 0, 0, 0, 0} make the MAD 0: the scale falls back to the population std (0.4)
    # while the trimmed mean drops the anchor (location 0), so the negatives sit at the location
    adv_bin, info_bin = care_advantages(**binary_group(4), config=CareConfig(robust_stats=True, k=4))
    assert info_bin["subgroup_std"].item() == pytest.approx(0.4, rel=1e-6)
    assert adv_bin[0].item() == pytest.approx(1.0 / (0.4 + 1e-6), rel=1e-6)
    assert torch.equal(adv_bin[1:], torch.zeros(4))


def test_hard_negative_selection_on_hand_built_embeddings():
    # anchor at 0 degrees; failures at f1..f7
    angles = [0, 10, 12, 40, 25, 60, 80, 170]
    batch = group([1.0] + [0.0] * 7, [True] + [False] * 7, emb=angle_embeddings(angles))
    _, info = care_advantages(**batch, config=CareConfig(k=4, preselect_m=6))
    # nearest 6 exclude the 170-degree failure; farthest-first from the nearest (10): 80, then 40, then 60
    assert info["hard_negative_indices"][0].tolist() == [1, 6, 3, 5]
    assert info["rgr_target"].tolist() == [1]
    # a wider preselection lets the opposite failure in, picked second
    _, info = care_advantages(**batch, config=CareConfig(k=4, preselect_m=7))
    assert info["hard_negative_indices"][0].tolist()[:2] == [1, 7]
    # embeddings at any scale give the same choice
    scaled = dict(batch, think_embeddings=batch["think_embeddings"] * torch.tensor([3.0, 0.1, 7, 2, 5, 1, 9, 4]).unsqueeze(1))
    _, info_scaled = care_advantages(**scaled, config=CareConfig(k=4, preselect_m=6))
    assert info_scaled["hard_negative_indices"][0].tolist() == [1, 6, 3, 5]
    # ablation selectors pick the same number of failures
    _, far = care_advantages(**batch, config=CareConfig(negative_selector="farthest"))
    assert far["hard_negative_indices"][0].tolist() == [7, 6, 5, 3]
    _, mixed = care_advantages(**batch, config=CareConfig(negative_selector="mixed"))
    assert mixed["hard_negative_indices"][0].tolist() == [1, 2, 7, 6]
    _, rnd = care_advantages(**batch, config=CareConfig(negative_selector="random", seed=1))
    chosen = rnd["hard_negative_indices"][0].tolist()
    assert len(set(chosen)) == 4 and set(chosen) <= set(range(1, 8))
    assert mixed["rgr_target"].tolist() == [1] and far["rgr_target"].tolist() == [3]


def test_farthest_first_tie_breaks_to_lower_index():
    # two failures at the same place: the nearest-first pick and the tie both go to the lower index
    batch = group([1.0, 0.0, 0.0, 0.0], [True, False, False, False], emb=angle_embeddings([0, 30, 30, 90]))
    _, info = care_advantages(**batch, config=CareConfig(k=2))
    assert info["hard_negative_indices"][0].tolist() == [1, 3]
    batch = group([1.0, 0.0, 0.0, 0.0], [True, False, False, False], emb=angle_embeddings([0, 30, 60, 0]))
    _, info = care_advantages(**batch, config=CareConfig(k=2))
    # from 0 deg (row 3, nearest) both 30 and 60 ... 60 is farther; then k=2 stops
    assert info["hard_negative_indices"][0].tolist() == [3, 2]


def test_rescue_reproduces_signature_zero_sum():
    rewards = [0.1, 0.0, 0.1, 0.0, 0.1, 0.0, 0.0, 0.1]
    batch = group(rewards, [False] * 8, emb=torch.randn(8, 5), logprobs=[-5, -1, -3, -2, -9, -1, -1, -4])
    before = batch["rewards"].clone()
    adv, info = care_advantages(**batch, config=CareConfig(k=4))
    assert torch.equal(batch["rewards"], before)  # true rewards untouched
    # pseudo-anchor: highest reward (0.1), ties -> highest summed log-prob (-3 at row 2)
    assert info["rescue"].tolist() == [True] and info["anchor_index"].tolist() == [2]
    assert info["role"][2].item() == SubgroupRole.PSEUDO_ANCHOR
    z = info["z_scores"]
    members = info["in_subgroup"]
    assert members.sum().item() == 5
    assert z[members].sum().item() == pytest.approx(0.0, abs=1e-5)  # zero-sum before scaling
    # sqrt(K'), K' = 4; the pseudo-reward std is delta / sqrt(K') = 0.05, so eps = 1e-6 shows at 2e-5
    assert z[2].item() == pytest.approx(2.0, rel=1e-4)
    others = members.clone()
    others[2] = False
    assert torch.allclose(z[others], torch.full((4,), -0.5), rtol=1e-4)
    assert torch.allclose(adv[others], torch.full((4,), -S * 0.5), rtol=1e-4)
    assert info["rgr_target"].tolist() == [-1]  # RGR is disabled in all-negative groups


def test_rescue_small_group_equalised_and_farthest_first():
    # pseudo-anchor at 0 deg (highest reward); others at 10, 20, 90, 100, 170; K = 2
    batch = group([0.1, 0, 0, 0, 0, 0], [False] * 6, emb=angle_embeddings([0, 10, 20, 90, 100, 170]))
    adv, info = care_advantages(**batch, config=CareConfig(k=2))
    assert info["negative_indices"][0].tolist() == [5, 3]
    batch3 = group([0.0, 0.0, 0.0], [False] * 3, emb=torch.randn(3, 4), logprobs=[-3, -1, -2])
    adv3, info3 = care_advantages(**batch3, config=CareConfig(k=4))
    assert info3["anchor_index"].tolist() == [1] and info3["num_negatives"].tolist() == [2]
    factor = math.sqrt(4 / 2)
    assert adv3[1].item() == pytest.approx(math.sqrt(2) * factor, rel=1e-4)
    assert torch.allclose(adv3[[0, 2]], torch.full((2,), -S / math.sqrt(2) * factor), rtol=1e-4)
    off, info_off = care_advantages(**batch3, config=CareConfig(rescue=False))
    assert torch.equal(off, torch.zeros(3)) and info_off["rescue"].tolist() == [False]


def _with_reflection(base, source, reward, correct):
    n = base["rewards"].numel()
    refl = dict(
        group_index=base["group_index"][source:source + 1],
        rewards=torch.tensor([reward]),
        correct=torch.tensor([correct]),
        think_lengths=torch.tensor([4]),
        answer_lengths=torch.tensor([2]),
        think_embeddings=torch.randn(1, base["think_embeddings"].shape[1], dtype=base["think_embeddings"].dtype),
        sequence_logprobs=torch.tensor([0.0]),
    )
    batch = concat(base, refl)
    reflected_from = torch.full((n + 1,), -1, dtype=torch.long)
    reflected_from[n] = source
    return batch, reflected_from


def test_reflected_success_enters_as_positive():
    base = group([1.0, 0.0, 0.0, 0.0, 0.0], [True] + [False] * 4, emb=angle_embeddings([0, 10, 50, 90, 130]))
    _, info0 = care_advantages(**base, config=CareConfig())
    target = info0["rgr_target"].item()
    assert target == 1
    batch, reflected_from = _with_reflection(base, target, 1.0, True)
    adv, info = care_advantages(**batch, config=CareConfig(), reflected_from=reflected_from)
    assert torch.equal(info["hard_negative_indices"], info0["hard_negative_indices"])  # selection unchanged
    # subgroup rewards {1, 1, 0, 0, 0}: mean 0.4, population std sqrt(0.24)
    std = math.sqrt(0.24)
    z_pos, z_neg = 0.6 / (std + 1e-6), -0.4 / (std + 1e-6)
    assert adv[target].item() == 0.0
    assert adv[5].item() == pytest.approx(z_pos, rel=1e-5) and adv[0].item() == pytest.approx(z_pos, rel=1e-5)
    assert torch.allclose(adv[2:5], torch.full((3,), -S * abs(z_neg)), rtol=1e-5)
    assert info["role"][5].item() == SubgroupRole.REFLECTED_POSITIVE and info["reflection_used"][5]


def test_reflected_failure_uses_reduced_scale():
    base = group([1.0, 0.0, 0.0, 0.0, 0.0], [True] + [False] * 4, emb=angle_embeddings([0, 10, 50, 90, 130]))
    batch, reflected_from = _with_reflection(base, 1, 0.1, False)
    adv, info = care_advantages(**batch, config=CareConfig(), reflected_from=reflected_from)
    r = [1.0, 0.1, 0.0, 0.0, 0.0]
    mean = sum(r) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / 5)
    assert adv[1].item() == 0.0
    assert adv[5].item() == pytest.approx(-0.25 * abs((0.1 - mean) / (std + 1e-6)), rel=1e-5)
    assert adv[2].item() == pytest.approx(-0.5 * abs((0.0 - mean) / (std + 1e-6)), rel=1e-5)
    assert info["role"][5].item() == SubgroupRole.REFLECTED_NEGATIVE


def test_reflection_outside_subgroup_is_ignored_and_mismatched_group_rejected():
    allneg = group([0.1, 0.0, 0.0], [False] * 3, emb=torch.randn(3, 4))
    batch, reflected_from = _with_reflection(allneg, 1, 1.0, True)
    adv, info = care_advantages(**batch, config=CareConfig(), reflected_from=reflected_from)
    assert adv[3].item() == 0.0 and info["reflection_ignored"][3] and adv[1].item() != 0.0
    bad_group = dict(batch, group_index=torch.tensor([0, 0, 0, 7]))
    with pytest.raises(ValueError, match="same group_index"):
        care_advantages(**bad_group, config=CareConfig(), reflected_from=reflected_from)


def test_edge_cases_empty_singleton_equal_and_nan():
    empty = group([], [], emb=torch.zeros(0, 4))
    adv, info = care_advantages(**empty, config=CareConfig())
    assert adv.shape == (0,) and info["anchor_index"].numel() == 0
    for correct in (True, False):  # G = 1
        adv, _ = care_advantages(**group([1.0 if correct else 0.0], [correct], emb=torch.randn(1, 4)))
        assert adv.tolist() == [0.0]
    # all-equal rewards among failures: the rescue still gives a well-defined contrast
    adv, info = care_advantages(**group([0.0] * 4, [False] * 4, emb=torch.randn(4, 4)))
    assert torch.isfinite(adv).all() and info["anchor_index"].tolist() == [0]
    # zero embedding vectors do not crash (cosine distance 1 to everything)
    adv, _ = care_advantages(**group([1.0, 0.0, 0.0], [True, False, False], emb=torch.zeros(3, 4)))
    assert torch.isfinite(adv).all()
    with pytest.raises(ValueError, match="rewards must be finite"):
        care_advantages(**group([1.0, float("nan"), 0.0], [True, False, False]))
    emb = torch.randn(3, 4)
    emb[2, 1] = float("inf")
    with pytest.raises(ValueError, match="think_embeddings"):
        care_advantages(**group([1.0, 0.0, 0.0], [True, False, False], emb=emb))
    with pytest.raises(ValueError, match="shape"):
        care_advantages(**dict(group([1.0, 0.0], [True, False]), rewards=torch.zeros(3)))


def test_no_gradient_through_inputs():
    batch = binary_group(3)
    batch["think_embeddings"].requires_grad_(True)
    batch["rewards"].requires_grad_(True)
    batch["sequence_logprobs"].requires_grad_(True)
    adv, info = care_advantages(**batch)
    assert not adv.requires_grad and adv.grad_fn is None
    assert not info["z_scores"].requires_grad


def test_many_groups_are_independent():
    """A batch of groups gives each group the result it gets alone, whatever the row order."""
    groups = [binary_group(k, gid=10 * k) for k in (1, 3, 5)] + [group([0.1, 0.0, 0.0], [False] * 3, gid=2)]
    batch = concat(*groups)
    perm = torch.randperm(batch["rewards"].numel())
    shuffled = {k: v[perm] for k, v in batch.items()}
    adv, _ = care_advantages(**shuffled, config=CareConfig())
    alone = torch.cat([care_advantages(**g, config=CareConfig())[0] for g in groups])
    assert torch.allclose(adv, alone[perm], atol=1e-6)


def test_config_validation_names_the_field():
    for field, value in [("k", 0), ("preselect_m", 0), ("neg_scale", -1.0), ("eps", 0.0), ("rescue_delta", 0.0),
                         ("anchor_rule", "longest"), ("negative_selector", "nearest"), ("think_weight_pos", 2.0)]:
        with pytest.raises(ValueError, match=field):
            CareConfig(**{field: value})


def test_float_correct_is_gated_at_accuracy_one():
    batch = group([0.5, 1.0, 0.0], [False, True, False], think=[1, 9, 1], emb=torch.randn(3, 4))
    as_bool, info_bool = care_advantages(**batch)
    as_float, info_float = care_advantages(**dict(batch, correct=torch.tensor([0.5, 1.0, 0.0])))
    assert torch.equal(as_bool, as_float) and info_float["anchor_index"].tolist() == [1]
