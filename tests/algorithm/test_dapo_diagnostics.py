"""DAPO dynamic sampling / overlong penalty and the section-8 diagnostics."""
import math

import pytest
import torch

from care_megatron.algorithm.care import CareConfig, care_advantages
from care_megatron.algorithm.dapo import dynamic_sampling_filter, soft_overlong_penalty
from care_megatron.algorithm.diagnostics import advantage_diagnostics, clip_fractions
from _algorithm_helpers import concat, group


def test_dynamic_sampling_drops_zero_variance_groups():
    group_index = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 4, 4])
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.1, 0.5, 0.0, 0.1])
    keep, info = dynamic_sampling_filter(group_index, rewards)
    assert keep.tolist() == [False] * 5 + [True] * 3 + [False] + [True] * 2
    assert (info["num_groups"], info["num_kept_groups"], info["num_dropped_groups"]) == (5, 2, 3)
    assert info["dropped_group_ids"].tolist() == [0, 1, 3]
    with pytest.raises(ValueError, match="finite"):
        dynamic_sampling_filter(group_index, rewards.clone().index_fill_(0, torch.tensor([2]), float("nan")))


def test_soft_overlong_penalty_ramp():
    lengths = torch.tensor([10, 15, 16, 18, 20, 21, 0])
    out = soft_overlong_penalty(lengths, max_length=20, buffer=5, penalty=1.0)
    assert torch.allclose(out, torch.tensor([0.0, 0.0, -0.2, -0.6, -1.0, -1.0, 0.0]))
    assert torch.allclose(soft_overlong_penalty(lengths, 20, 5, penalty=0.5), out * 0.5)
    assert torch.allclose(soft_overlong_penalty(lengths, 20, 0), torch.tensor([0.0, 0, 0, 0, 0, -1, 0]))
    with pytest.raises(ValueError, match="buffer"):
        soft_overlong_penalty(lengths, 20, 30)


def _binary(kprime, gid, extra=0):
    n = 1 + extra + kprime
    correct = [True] * (1 + extra) + [False] * kprime
    return group([1.0 if c else 0.0 for c in correct], correct, emb=torch.randn(n, 6), gid=gid,
                 think=[5] * n, answer=[2] * n)


def test_care_diagnostics_closed_forms():
    groups = [_binary(1, 0, extra=2), _binary(2, 1), _binary(4, 2, extra=1), _binary(4, 3),
              group([0.0, 0.1, 0.0], [False] * 3, gid=4), group([1.0, 1.0], [True, True], gid=5)]
    batch = concat(*groups)
    adv, info = care_advantages(**batch, config=CareConfig(k=4))
    accuracy = batch["correct"].float()
    out = advantage_diagnostics(batch["rewards"], accuracy, adv, format_scores=torch.ones_like(accuracy),
                                think_lengths=batch["think_lengths"], answer_lengths=batch["answer_lengths"], info=info)
    for kp in (1, 2, 4):
        assert out[f"signature/anchor_z/k{kp}"] == pytest.approx(math.sqrt(kp), abs=1e-5)
        assert out[f"signature/neg_z/k{kp}"] == pytest.approx(-1 / math.sqrt(kp), abs=1e-5)
        assert out[f"signature/anchor_theory/k{kp}"] == pytest.approx(math.sqrt(kp))
    assert out["signature/pearson"] == pytest.approx(1.0, abs=1e-6)
    assert out["signature/anchor_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert out["signature/neg_ratio"] == pytest.approx(1.0, abs=1e-5)
    # K' histogram over the 5 groups in play (4 anchored + 1 rescued with K' = 2)
    assert out["kprime/hist/1"] == pytest.approx(0.2) and out["kprime/hist/2"] == pytest.approx(0.4)
    assert out["kprime/hist/4"] == pytest.approx(0.4)
    assert out["rescue/rate"] == pytest.approx(1 / 6) and out["groups/saturated_rate"] == pytest.approx(1 / 6)
    assert out["rgr/eligible_rate"] == pytest.approx(4 / 6) and out["rgr/trigger_rate"] == 0.0
    assert out["reward/mean"] == pytest.approx(float(batch["rewards"].mean()))
    assert out["format/mean"] == 1.0 and out["length/think_mean"] == pytest.approx((18 * 5 + 5 * 10) / 23)
    # failure share without the rescue group: each anchored group gives s / (1 + s) = 1/3 of its |A|
    only_anchored = advantage_diagnostics(batch["rewards"][:-5], accuracy[:-5], adv[:-5])
    assert only_anchored["signal/failure_share"] == pytest.approx(1 / 3, abs=1e-5)
    # with the rescue group every subgroup member there is a failure
    anchored_mag = adv[:-5].abs().sum()
    rescue_mag = adv[-5:].abs().sum()
    expected = (anchored_mag / 3 + rescue_mag) / (anchored_mag + rescue_mag)
    assert out["signal/failure_share"] == pytest.approx(float(expected), abs=1e-5)
    members = info["in_subgroup"]
    failed = accuracy < 1
    ratio = adv[members & failed].double().var(unbiased=False) / adv[members].double().var(unbiased=False)
    assert out["adv/neg_var_ratio"] == pytest.approx(float(ratio), rel=1e-6)


def test_rgr_rates_and_baseline_diagnostics():
    base = group([1.0, 0.0, 0.0, 0.0], [True, False, False, False], emb=torch.randn(4, 6))
    _, info0 = care_advantages(**base)
    target = int(info0["rgr_target"])
    refl = {k: v[target:target + 1].clone() for k, v in base.items()}
    refl["rewards"], refl["correct"] = torch.tensor([1.0]), torch.tensor([True])
    batch = concat(base, refl)
    reflected_from = torch.tensor([-1, -1, -1, -1, target])
    adv, info = care_advantages(**batch, reflected_from=reflected_from)
    out = advantage_diagnostics(batch["rewards"], batch["correct"].float(), adv, info=info)
    assert out["rgr/trigger_rate"] == 1.0 and out["rgr/success_rate"] == 1.0
    # a baseline without CARE info: only the generic keys, no crash on all-zero advantages
    zeros = advantage_diagnostics(torch.ones(4), torch.ones(4), torch.zeros(4))
    assert zeros["signal/failure_share"] == 0.0 and "adv/neg_var_ratio" not in zeros
    assert "signature/pearson" not in zeros


def test_clip_fractions_from_summed_counts():
    summed = {"count/tokens/all": 10.0, "count/clipped/all": 3.0, "count/tokens/think": 0.0,
              "count/clipped/think": 0.0, "kl": 0.1}
    # a part with no tokens this step has no fraction (a 0 would pull means over steps down)
    assert clip_fractions(summed) == {"clip_frac/all": 0.3}
    summed.update({"count/tokens/neg_adv": 4.0, "count/dual_clipped": 1.0})
    assert clip_fractions(summed) == {"clip_frac/all": 0.3, "clip_frac/neg_adv": 0.0, "clip_frac/dual": 0.25}


def test_step_metrics_over_data_parallel_ranks_equal_one_batch():
    """Each DP rank computes CARE advantages on its own groups (numbered from 0); the merged payload
    gives exactly the metrics of all groups in one batch (what a single-process run reports)."""
    from types import SimpleNamespace

    from care_megatron.metrics import diagnostic_payload, group_records, merge_diagnostic_payloads, rl_step_metrics
    from care_megatron.training.base import StepResult

    torch.manual_seed(0)
    groups = [_binary(1, 0, extra=2), _binary(2, 1), group([0.0, 0.1, 0.0], [False] * 3, gid=2),
              _binary(4, 3), _binary(3, 4, extra=1), group([1.0, 1.0], [True, True], gid=5)]

    def rollouts_of(batch, offset=0):
        return [SimpleNamespace(reward=float(r), accuracy=float(c), format=1.0, think_length=int(t),
                                answer_length=int(a), completion=SimpleNamespace(token_ids=[0] * (int(t) + int(a))),
                                group=int(g), reflected_from=-1, record=SimpleNamespace(id=f"p{int(g) + offset}"))
                for r, c, t, a, g in zip(batch["rewards"], batch["correct"], batch["think_lengths"],
                                         batch["answer_lengths"], batch["group_index"])]

    config = CareConfig(k=4)
    whole = concat(*groups)
    adv, info = care_advantages(**whole, config=config)
    result = StepResult(loss=0.5, grad_norm=1.0, learning_rate=1e-3, metrics={"micro_batches": 2.0})
    expected = rl_step_metrics(rollouts_of(whole), adv, info, result)
    payloads = []
    for part in (groups[:3], groups[3:]):  # each rank renumbers its groups from 0
        renumbered = [dict(g, group_index=g["group_index"] - part[0]["group_index"][0]) for g in part]
        batch = concat(*renumbered)
        a, i = care_advantages(**batch, config=config)
        payloads.append(diagnostic_payload(rollouts_of(batch, offset=int(part[0]["group_index"][0])), a, i))
    merged = merge_diagnostic_payloads(payloads)
    # the per-group records (groups.jsonl) of the merged ranks are those of the whole batch, prompt ids included
    whole_records = group_records(diagnostic_payload(rollouts_of(whole), adv, info), 7, "care")
    assert group_records(merged, 7, "care") == whole_records
    assert [r["prompt_id"] for r in whole_records] == [f"p{g}" for g in range(6)]
    assert [r["all_negative"] for r in whole_records] == [False, False, True, False, False, False]
    baseline = group_records(merge_diagnostic_payloads([dict(p, info=None) for p in payloads]), 7, "grpo")
    assert [{k: r[k] for k in b if k != "method"} for r, b in zip(whole_records, baseline)] == \
        [{k: v for k, v in b.items() if k != "method"} for b in baseline]
    assert "anchor_z" not in baseline[0] and baseline[0]["method"] == "grpo"
    assert merged["info"]["group_of"].tolist() == info["group_of"].tolist()
    rows = merged["rows"]
    got = advantage_diagnostics(rows["reward"], rows["accuracy"], rows["advantage"], rows["format"],
                                rows["think_length"], rows["answer_length"], merged["info"])
    assert set(got) <= set(expected) and "rescue/rate" in got and "signature/pearson" in got
    for key, value in got.items():
        assert value == pytest.approx(expected[key], abs=1e-9), key
    # a single rank's payload alone does not give the batch's metrics (the check above is not vacuous)
    lone = payloads[0]
    lone_metrics = advantage_diagnostics(lone["rows"]["reward"], lone["rows"]["accuracy"], lone["rows"]["advantage"],
                                         info=lone["info"])
    assert lone_metrics["rescue/rate"] != pytest.approx(expected["rescue/rate"])
