"""Baseline advantage estimators on hand-computed groups, and the registry (spec section 7)."""
import math

import pytest
import torch

from care_megatron.algorithm.advantages import AdvantageInputs, advantage_names, get_advantage_fn, register_advantage
from care_megatron.algorithm.care import CareConfig, care_advantages
from _algorithm_helpers import group

# group 5: four rollouts; group 9: a single rollout; group 2: equal rewards
GROUP_INDEX = torch.tensor([5, 5, 9, 5, 2, 5, 2])
REWARDS = torch.tensor([1.0, 0.0, 0.7, 0.5, 0.3, 0.0, 0.3])
MAIN = [0, 1, 3, 5]  # rows of group 5: rewards 1, 0, 0.5, 0


def inputs():
    return AdvantageInputs(group_index=GROUP_INDEX, rewards=REWARDS)


def test_grpo_dapo_gspo_sample_std_zscore():
    mean = 1.5 / 4
    sample_std = math.sqrt(((1 - mean) ** 2 + 2 * mean ** 2 + (0.5 - mean) ** 2) / 3)
    expected = torch.tensor([(1 - mean), -mean, 0.0, (0.5 - mean), 0.0, -mean, 0.0]) / (sample_std + 1e-6)
    expected[[2, 4, 6]] = 0.0  # group of one, equal rewards
    for name in ("grpo", "dapo", "gspo"):
        adv, info = get_advantage_fn(name)(inputs(), None)
        assert torch.allclose(adv, expected, atol=1e-6), name
        assert info["zero_variance_groups"] == 2
    assert sample_std == pytest.approx(0.478714, abs=1e-6)


def test_dr_grpo_mean_only():
    adv, _ = get_advantage_fn("dr_grpo")(inputs(), None)
    assert torch.allclose(adv, torch.tensor([0.625, -0.375, 0.0, 0.125, 0.0, -0.375, 0.0]), atol=1e-6)


def test_rloo_leave_one_out():
    adv, _ = get_advantage_fn("rloo")(inputs(), None)
    expected = torch.tensor([1 - 0.5 / 3, 0 - 1.5 / 3, 0.0, 0.5 - 1.0 / 3, 0.0, 0 - 1.5 / 3, 0.0])
    assert torch.allclose(adv, expected, atol=1e-6)


def test_baselines_match_per_group_loop_on_random_batches():
    gen = torch.Generator().manual_seed(0)
    group_index = torch.randint(0, 30, (200,), generator=gen)
    rewards = torch.rand(200, generator=gen).round(decimals=1)
    batch = AdvantageInputs(group_index=group_index, rewards=rewards)
    results = {name: get_advantage_fn(name)(batch, None)[0] for name in ("grpo", "dr_grpo", "rloo")}
    for g in group_index.unique().tolist():
        rows = (group_index == g).nonzero().flatten().tolist()
        r = [float(rewards[i]) for i in rows]
        n, m = len(r), sum(r) / len(r)
        std = math.sqrt(sum((x - m) ** 2 for x in r) / (n - 1)) if n > 1 else 0.0
        for i, x in zip(rows, r):
            assert results["grpo"][i].item() == pytest.approx((x - m) / (std + 1e-6) if n > 1 else 0.0, abs=1e-5)
            assert results["dr_grpo"][i].item() == pytest.approx(x - m, abs=1e-6)
            assert results["rloo"][i].item() == pytest.approx(x - (sum(r) - x) / (n - 1) if n > 1 else 0.0, abs=1e-6)


def test_care_through_the_registry_equals_direct_call():
    g = group([1.0, 0.0, 0.1, 0.0, 1.0], [True, False, False, False, True], think=[3, 1, 1, 1, 2])
    batch = AdvantageInputs(group_index=g["group_index"], rewards=g["rewards"], correct=g["correct"],
                            think_lengths=g["think_lengths"], answer_lengths=g["answer_lengths"],
                            think_embeddings=g["think_embeddings"], sequence_logprobs=g["sequence_logprobs"])
    adv, info = get_advantage_fn("care")(batch, CareConfig(k=2))
    direct, _ = care_advantages(**g, config=CareConfig(k=2))
    assert torch.equal(adv, direct) and info["anchor_index"].tolist() == [4]
    with pytest.raises(ValueError, match="think_embeddings"):
        get_advantage_fn("care")(AdvantageInputs(group_index=g["group_index"], rewards=g["rewards"]), None)


def test_registry_errors_and_edge_cases():
    assert advantage_names() == sorted(["care", "dapo", "dr_grpo", "grpo", "gspo", "rloo"])
    with pytest.raises(ValueError, match="valid: care, dapo, dr_grpo, grpo, gspo, rloo"):
        get_advantage_fn("ppo")
    with pytest.raises(ValueError, match="already registered"):
        register_advantage("grpo")(lambda batch, config: None)
    for name in ("grpo", "dr_grpo", "rloo"):
        empty, _ = get_advantage_fn(name)(AdvantageInputs(group_index=torch.zeros(0, dtype=torch.long),
                                                          rewards=torch.zeros(0)), None)
        assert empty.shape == (0,)
        with pytest.raises(ValueError, match="finite"):
            get_advantage_fn(name)(AdvantageInputs(group_index=torch.zeros(2, dtype=torch.long),
                                                   rewards=torch.tensor([1.0, float("nan")])), None)
    with pytest.raises(ValueError, match="group_index"):
        AdvantageInputs(group_index=torch.zeros(3, dtype=torch.long), rewards=torch.zeros(2))
