"""Region weights, token advantages and every policy loss (spec sections 6-7)."""
import math

import pytest
import torch

from care_megatron.algorithm.kl import kl_k1, kl_k2, kl_k3, kl_penalty
from care_megatron.algorithm.policy_losses import (
    METHOD_DEFAULTS,
    PolicyLossConfig,
    build_token_advantages,
    compute_normalisers,
    get_policy_loss,
    policy_loss_names,
    region_weights,
    token_advantages,
)
from care_megatron.rewards.regions import Region

O, T, A = int(Region.OTHER), int(Region.THINK), int(Region.ANSWER)


# ------------------------------------------------------------------ region weights / token advantages

def test_region_weights_and_token_advantages_hand_example():
    # seq 0 (positive): prompt, think x3, answer x2, eos;  seq 1 (negative): prompt, think x2, answer, eos
    # seq 2 (negative, no answer span): prompt, think x2, eos;  then one padding token
    regions = torch.tensor([O, T, T, T, A, A, O, O, T, T, A, O, O, T, T, O, O])
    mask = torch.tensor([0, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    seq = torch.tensor([0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, -1])
    w = region_weights(regions, mask, seq, torch.tensor([True, False, False]), think_weight_pos=0.005)
    expected = [0, .005, .005, .005, 1, 1, 0, 0, 0, 0, 1, 0, 0, 1, 1, 1, 0]
    assert torch.allclose(w, torch.tensor(expected))
    adv = token_advantages(torch.tensor([2.0, -1.0, -0.5]), seq, w, eps=1e-6)
    s0 = 2 + 3 * 0.005
    assert adv[1].item() == pytest.approx(2.0 * 0.005 / (s0 + 1e-6))
    assert adv[4].item() == pytest.approx(2.0 / (s0 + 1e-6))
    assert adv[8].item() == 0.0 and adv[10].item() == pytest.approx(-1.0 / (1 + 1e-6))
    assert adv[13].item() == pytest.approx(-0.5 / (3 + 1e-6))
    assert adv[16].item() == 0.0
    # per sequence the token advantages sum to A_i (up to eps)
    sums = torch.zeros(3).index_add_(0, seq[:-1], adv[:-1])
    assert torch.allclose(sums, torch.tensor([2.0, -1.0, -0.5]), atol=1e-5)
    # baselines: A_i broadcast on response tokens
    weights, uniform = build_token_advantages("grpo", torch.tensor([2.0, -1.0, -0.5]), seq, mask)
    assert torch.equal(weights, mask.float())
    assert torch.allclose(uniform, torch.tensor([0, 2, 2, 2, 2, 2, 2, 0, -1, -1, -1, -1, 0, -.5, -.5, -.5, 0]))
    with pytest.raises(ValueError, match="region_ids"):
        build_token_advantages("care", torch.tensor([1.0]), seq, mask)


# ------------------------------------------------------------------ synthetic packed batches

def make_sequences(seed, n=7):
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n):
        prompt = int(torch.randint(2, 5, (1,), generator=gen))
        think = int(torch.randint(0, 5, (1,), generator=gen))
        answer = 0 if i == 3 else int(torch.randint(1, 4, (1,), generator=gen))  # seq 3 has no answer span
        length = prompt + think + answer + 1
        regions = torch.tensor([O] * prompt + [T] * think + [A] * answer + [O])
        mask = torch.tensor([False] * prompt + [True] * (length - prompt))
        logp = -torch.rand(length, generator=gen) * 3
        seqs.append(dict(
            logprobs=logp,
            old_logprobs=logp + (torch.rand(length, generator=gen) - 0.5) * 0.8,
            ref_logprobs=logp + (torch.rand(length, generator=gen) - 0.5) * 2,
            entropy=torch.rand(length, generator=gen) * 2,
            region_ids=regions,
            response_mask=mask,
            advantage=float(torch.randn(1, generator=gen)),
            positive=bool(i % 2 == 0),
        ))
    return seqs


def pack(seqs, leaves, pad=0):
    """Flat tensors of one micro-batch; ``leaves`` are the per-sequence logprob leaves (gradients)."""
    seq_ids = torch.cat([torch.full((len(s["logprobs"]),), j) for j, s in enumerate(seqs)])
    out = {key: torch.cat([s[key] for s in seqs]) for key in ("old_logprobs", "ref_logprobs", "entropy",
                                                               "region_ids", "response_mask")}
    out["logprobs"] = torch.cat(leaves)
    out["token_sequence_ids"] = seq_ids
    if pad:
        out = {k: torch.cat([v, v.new_zeros(pad)]) for k, v in out.items() if k != "token_sequence_ids"} | {
            "token_sequence_ids": torch.cat([seq_ids, torch.full((pad,), -1)])}
    return out


def micro_batch_loss(name, seqs, leaves, normalisers, config, pad=0):
    mb = pack(seqs, leaves, pad)
    _, tok_adv = build_token_advantages(
        name, torch.tensor([s["advantage"] for s in seqs]), mb["token_sequence_ids"], mb["response_mask"],
        region_ids=mb["region_ids"], positive=torch.tensor([s["positive"] for s in seqs]))
    return get_policy_loss(name)(mb["logprobs"], mb["old_logprobs"], tok_adv, mb["response_mask"],
                                 mb["token_sequence_ids"], normalisers, config, ref_logprobs=mb["ref_logprobs"],
                                 entropy=mb["entropy"], region_ids=mb["region_ids"])


@pytest.mark.parametrize("name", sorted(METHOD_DEFAULTS))
def test_micro_batch_invariance(name):
    seqs = make_sequences(0)
    config = PolicyLossConfig.for_method(name, kl_coef=0.05, entropy_coef=0.01,
                                         clip_low=0.2 if name == "gspo" else None,
                                         clip_high=0.25 if name == "gspo" else None)
    splits = [[list(range(7))], [[0, 1, 2], [3, 4, 5, 6]], [[i] for i in range(7)], [[6, 0], [3], [1, 5, 2, 4]]]
    results = []
    for split in splits:
        leaves = [s["logprobs"].clone().requires_grad_(True) for s in seqs]
        per_mb = [[leaves[i] for i in part] for part in split]
        packed = [pack([seqs[i] for i in part], per_mb[k], pad=k % 2 * 3) for k, part in enumerate(split)]
        normalisers = compute_normalisers([p["response_mask"] for p in packed], [p["token_sequence_ids"] for p in packed],
                                          max_response_length=12)
        total = 0.0
        metrics_sum = {}
        for k, part in enumerate(split):
            loss, metrics = micro_batch_loss(name, [seqs[i] for i in part], per_mb[k], normalisers, config, pad=k % 2 * 3)
            loss.backward()
            total += float(loss.detach())
            for key, value in metrics.items():
                metrics_sum[key] = metrics_sum.get(key, 0.0) + value
        results.append((total, torch.cat([l.grad for l in leaves]), normalisers, metrics_sum))
    base_loss, base_grad, base_norm, base_metrics = results[0]
    assert base_grad.abs().sum() > 0
    for total, grad, normalisers, metrics_sum in results[1:]:
        assert normalisers == base_norm
        assert total == pytest.approx(base_loss, rel=1e-5, abs=1e-7)
        assert torch.allclose(grad, base_grad, atol=1e-7, rtol=1e-5)
        for key in ("kl", "entropy", "pg_loss", "kl_loss", "count/tokens/all", "count/clipped/all"):
            assert metrics_sum[key] == pytest.approx(base_metrics[key], rel=1e-5, abs=1e-7)


def test_normalisers_flat_equals_micro_batches_and_counts_weights():
    mask = torch.tensor([0, 1, 1, 0, 1, 1, 1, 0, 0], dtype=torch.bool)
    seq = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, -1])  # sequence 2 has no response token
    weights = torch.tensor([0, 0.0, 0.0, 0, 1, 0.005, 1, 0, 0])
    n = compute_normalisers(mask, seq)
    assert n == {"num_sequences": 2.0, "num_advantaged_sequences": 2.0, "num_tokens": 5.0, "max_response_length": 3.0}
    assert compute_normalisers(mask, seq, weights, max_response_length=64)["num_sequences"] == 1.0
    split = compute_normalisers([mask[:3], mask[3:]], [seq[:3], torch.tensor([0, 0, 0, 0, 1, -1])])
    assert split == n


def test_care_sequence_normaliser_counts_non_zero_advantages():
    """Spec section 6: CARE's N_seq counts the sequences with a non-zero sequence-level advantage
    (a non-zero token advantage on a response token), not every sequence with a weight."""
    mask = torch.tensor([0, 1, 1, 0, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    seq = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, -1])
    # sequence 0: A = 0 (outside the subgroup); 1: A > 0; 2: A < 0 only on its answer token
    adv = torch.tensor([0, 0.0, 0.0, 0, 0.5, 0.5, 0, 0.0, -0.25, 0])
    n = compute_normalisers(mask, seq, token_advantages=adv)
    assert n["num_advantaged_sequences"] == 2.0 and n["num_sequences"] == 3.0
    split = compute_normalisers([mask[:3], mask[3:]], [seq[:3], seq[3:] - 1 + (seq[3:] < 0).long()],
                                token_advantages=[adv[:3], adv[3:]])
    assert split["num_advantaged_sequences"] == 2.0
    # the care loss divides by it; grpo's token mean does not read it
    logp = torch.zeros(10, requires_grad=True)
    loss, _ = get_policy_loss("care")(logp, logp.detach(), adv, mask, seq, n, PolicyLossConfig.for_method("care", kl_coef=0.0))
    assert loss.item() == pytest.approx(-(0.5 + 0.5 - 0.25) / 2.0)


def test_token_mean_hand_value_and_gradient_at_ratio_one():
    logp = torch.tensor([-1.0, -2.0, -0.5, -1.5, -3.0], requires_grad=True)
    mask = torch.tensor([False, True, True, True, True])
    seq = torch.tensor([0, 0, 0, 1, 1])
    adv = torch.tensor([0.0, 2.0, 2.0, -1.0, -1.0])
    normalisers = {"num_sequences": 2.0, "num_advantaged_sequences": 2.0, "num_tokens": 8.0, "max_response_length": 10.0}
    for name, divisor in (("grpo", 8.0), ("rloo", 8.0), ("dapo", 8.0), ("care", 2.0), ("dr_grpo", 20.0)):
        logp.grad = None
        cfg = PolicyLossConfig.for_method(name, kl_coef=0.0)
        loss, metrics = get_policy_loss(name)(logp, logp.detach(), adv, mask, seq, normalisers, cfg)
        loss.backward()
        assert loss.item() == pytest.approx(-(2 + 2 - 1 - 1) / divisor)
        assert torch.allclose(logp.grad, -adv * mask / divisor)
        assert metrics["clip_frac/all"] == 0.0 and metrics["count/ratio_sum"] == pytest.approx(4.0)
        assert metrics["min/ratio"] == metrics["max/ratio"] == 1.0 and metrics["count/log_ratio_sum"] == 0.0


def test_asymmetric_clipping_and_clip_metrics():
    # ratios 1.25 (A > 0), 1.5 (A > 0), 0.5 (A > 0), 0.7 (A < 0), 0.9 (A < 0)
    ratios = torch.tensor([1.25, 1.5, 0.5, 0.7, 0.9])
    old = torch.full((5,), -1.0)
    logp = (old + ratios.log()).requires_grad_(True)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0])
    mask = torch.ones(5, dtype=torch.bool)
    seq = torch.tensor([0, 0, 0, 1, 1])
    regions = torch.tensor([A, T, A, A, T])
    normalisers = {"num_sequences": 2.0, "num_advantaged_sequences": 2.0, "num_tokens": 5.0, "max_response_length": 3.0}
    care_cfg = PolicyLossConfig.for_method("care", kl_coef=0.0)  # 0.2 / 0.28
    loss, metrics = get_policy_loss("care")(logp, old, adv, mask, seq, normalisers, care_cfg, region_ids=regions)
    loss.backward()
    # token 0: 1.25 < 1.28 -> unclipped; token 1: clipped at 1.28 (no grad); token 2: min picks 0.5;
    # token 3: 0.7 < 0.8 with A < 0 -> clipped at 0.8 (no grad); token 4: unclipped
    expected = -(1.25 + 1.28 + 0.5 - 0.8 - 0.9) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(logp.grad, torch.tensor([-1.25, 0.0, -0.5, 0.0, 0.9]) / 2, atol=1e-6)
    assert metrics["count/clipped/all"] == 2 and metrics["clip_frac/all"] == pytest.approx(0.4)
    assert metrics["clip_frac/pos_adv"] == pytest.approx(1 / 3) and metrics["clip_frac/neg_adv"] == pytest.approx(0.5)
    assert metrics["clip_frac/think"] == pytest.approx(0.5) and metrics["clip_frac/answer"] == pytest.approx(1 / 3)
    # the paper's Fig. 6 quantity: the one negative-advantage answer token (0.7) is clipped
    assert metrics["count/tokens/neg_adv_answer"] == 1 and metrics["clip_frac/neg_adv_answer"] == 1.0
    assert metrics["min/ratio"] == pytest.approx(0.5) and metrics["max/ratio"] == pytest.approx(1.5)
    assert metrics["count/ratio_sum"] == pytest.approx(1.25 + 1.5 + 0.5 + 0.7 + 0.9, rel=1e-6)
    assert metrics["count/log_ratio_sum"] == pytest.approx(float(ratios.log().sum()), rel=1e-5)
    # symmetric GRPO clip (0.2 / 0.2) clips the 1.25 token too
    _, grpo_metrics = get_policy_loss("grpo")(logp, old, adv, mask, seq, normalisers,
                                              PolicyLossConfig.for_method("grpo", kl_coef=0.0))
    assert grpo_metrics["count/clipped/all"] == 3


def test_gspo_sequence_ratio():
    old = torch.tensor([-1.0, -1.0, -2.0, -2.0, -2.0, 0.0])
    log_ratios = torch.tensor([0.1, 0.3, 1e-4, -1e-4, 3e-4, 0.0])
    logp = (old + log_ratios).requires_grad_(True)
    mask = torch.tensor([True, True, True, True, True, False])
    seq = torch.tensor([0, 0, 1, 1, 1, -1])
    adv = torch.tensor([2.0, 2.0, -1.0, -1.0, -1.0, 0.0])
    normalisers = {"num_sequences": 2.0, "num_tokens": 5.0, "max_response_length": 3.0}
    cfg = PolicyLossConfig.for_method("gspo")
    assert (cfg.clip_low, cfg.clip_high, cfg.kl_coef) == (3e-4, 4e-4, 0.0)
    loss, metrics = get_policy_loss("gspo")(logp, old, adv, mask, seq, normalisers, cfg)
    loss.backward()
    s0 = math.exp(0.2)  # exp(mean(0.1, 0.3)): clipped at 1 + 4e-4 for A > 0
    s1 = math.exp(1e-4)  # exp(mean(1e-4, -1e-4, 3e-4)), inside the clip range
    assert s0 > 1 + 4e-4
    assert loss.item() == pytest.approx(-(2.0 * (1 + 4e-4) + (-1.0) * s1) / 2, rel=1e-6)
    # gradient of the unclipped sequence: d/dlogp_t of -A s / N = -A s / (n_i N)
    assert torch.allclose(logp.grad[:2], torch.zeros(2))
    assert torch.allclose(logp.grad[2:5], torch.full((3,), 1.0 * s1 / (3 * 2)), rtol=1e-5)
    assert metrics["count/clipped/all"] == 1 and metrics["count/tokens/all"] == 2
    # ratio statistics are per token for every loss (ppo/ratio_*), not the sequence ratio
    assert metrics["count/ratio_sum"] == pytest.approx(sum(math.exp(x) for x in log_ratios[:5].tolist()), rel=1e-6)
    assert metrics["max/ratio"] == pytest.approx(math.exp(0.3), rel=1e-6)


def test_kl_estimators_closed_form():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -2.0])
    assert torch.allclose(kl_k1(logp, ref), torch.tensor([1.0, 0.0]))
    assert torch.allclose(kl_k2(logp, ref), torch.tensor([0.5, 0.0]))
    assert torch.allclose(kl_k3(logp, ref), torch.tensor([math.exp(-1) + 1 - 1, 0.0]))
    assert torch.isfinite(kl_k3(torch.tensor([0.0]), torch.tensor([-1e4]))).all()  # clamped, no inf
    with pytest.raises(ValueError, match="valid: k1, k2, k3"):
        kl_penalty(logp, ref, "k4")
    # in a loss: beta * token-mean KL over the global response tokens
    mask = torch.tensor([True, True])
    seq = torch.tensor([0, 0])
    zero_adv = torch.zeros(2)
    normalisers = {"num_sequences": 1.0, "num_tokens": 4.0, "max_response_length": 2.0}
    for est, per_token in (("k1", 1.0), ("k2", 0.5), ("k3", math.exp(-1))):
        cfg = PolicyLossConfig(kl_coef=0.1, kl_estimator=est)
        loss, metrics = get_policy_loss("grpo")(logp, logp, zero_adv, mask, seq, normalisers, cfg, ref_logprobs=ref)
        assert loss.item() == pytest.approx(0.1 * per_token / 4, rel=1e-6)
        assert metrics["kl"] == pytest.approx(per_token / 4, rel=1e-6)


def test_gradients_flow_only_through_logprobs():
    seqs = make_sequences(1, n=3)
    logp = torch.cat([s["logprobs"] for s in seqs]).requires_grad_(True)
    mb = pack(seqs, [s["logprobs"] for s in seqs])
    old = mb["old_logprobs"].clone().requires_grad_(True)
    ref = mb["ref_logprobs"].clone().requires_grad_(True)
    seq_adv = torch.tensor([s["advantage"] for s in seqs], requires_grad=True)
    _, tok_adv = build_token_advantages("care", seq_adv, mb["token_sequence_ids"], mb["response_mask"],
                                        mb["region_ids"], torch.tensor([True, False, True]))
    assert not tok_adv.requires_grad
    normalisers = compute_normalisers(mb["response_mask"], mb["token_sequence_ids"])
    for name in policy_loss_names():
        logp.grad = None
        cfg = PolicyLossConfig.for_method(name, kl_coef=0.1, clip_low=0.2, clip_high=0.3)
        loss, _ = get_policy_loss(name)(logp, old, tok_adv.clone().requires_grad_(True), mb["response_mask"],
                                        mb["token_sequence_ids"], normalisers, cfg, ref_logprobs=ref)
        loss.backward()
        assert logp.grad is not None and logp.grad.abs().sum() > 0, name
        assert old.grad is None and ref.grad is None and seq_adv.grad is None, name
        assert torch.all(logp.grad[~mb["response_mask"]] == 0), name  # prompt tokens get no gradient
    # the entropy bonus does differentiate through the entropy (it comes from the logits)
    entropy = mb["entropy"].clone().requires_grad_(True)
    loss, _ = get_policy_loss("grpo")(logp, old, tok_adv, mb["response_mask"], mb["token_sequence_ids"], normalisers,
                                      PolicyLossConfig(kl_coef=0.0, entropy_coef=0.01), entropy=entropy)
    loss.backward()
    assert entropy.grad is not None and torch.all(entropy.grad[mb["response_mask"]] < 0)


@pytest.mark.parametrize("name", sorted(METHOD_DEFAULTS))
def test_bf16_inputs_stay_finite(name):
    seqs = make_sequences(2)
    mb = pack(seqs, [s["logprobs"] for s in seqs], pad=4)
    logp = mb["logprobs"].clone()
    logp[3] = -60.0  # very unlikely token under the policy
    logp = logp.bfloat16().requires_grad_(True)
    old = mb["old_logprobs"].clone()
    old[5] = -80.0  # huge ratio
    ref = mb["ref_logprobs"].clone()
    ref[6] = -1e4  # reference finds the token impossible
    _, tok_adv = build_token_advantages(name, torch.randn(7) * 3, mb["token_sequence_ids"], mb["response_mask"],
                                        mb["region_ids"], torch.ones(7, dtype=torch.bool))
    normalisers = compute_normalisers(mb["response_mask"], mb["token_sequence_ids"])
    cfg = PolicyLossConfig.for_method(name, kl_coef=0.05, entropy_coef=0.01)
    loss, metrics = get_policy_loss(name)(logp, old.bfloat16(), tok_adv.bfloat16(), mb["response_mask"],
                                          mb["token_sequence_ids"], normalisers, cfg, ref_logprobs=ref.bfloat16(),
                                          entropy=mb["entropy"].bfloat16(), region_ids=mb["region_ids"])
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad.float()).all()
    assert all(math.isfinite(v) for v in metrics.values())


def test_empty_micro_batch_and_errors():
    empty = torch.zeros(0)
    seq = torch.zeros(0, dtype=torch.long)
    mask = torch.zeros(0, dtype=torch.bool)
    normalisers = compute_normalisers(mask, seq)
    for name in policy_loss_names():
        logp = empty.clone().requires_grad_(True)
        loss, _ = get_policy_loss(name)(logp, empty, empty, mask, seq, normalisers,
                                        PolicyLossConfig(kl_coef=0.0))
        assert loss.item() == 0.0
    with pytest.raises(ValueError, match="valid: care, dapo, dr_grpo, grpo, gspo, rloo"):
        get_policy_loss("ppo")
    logp = torch.zeros(3)
    with pytest.raises(ValueError, match="ref_logprobs"):
        get_policy_loss("care")(logp, logp, logp, torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.long),
                                {"num_advantaged_sequences": 1, "num_tokens": 3}, PolicyLossConfig(kl_coef=0.1))
    with pytest.raises(ValueError, match="num_advantaged_sequences"):
        get_policy_loss("care")(logp, logp, logp, torch.ones(3, dtype=torch.bool), torch.zeros(3, dtype=torch.long),
                                {"num_tokens": 3}, PolicyLossConfig(kl_coef=0.0))
    with pytest.raises(ValueError, match="shape"):
        get_policy_loss("grpo")(logp, torch.zeros(2), logp, torch.ones(3, dtype=torch.bool),
                                torch.zeros(3, dtype=torch.long), {"num_tokens": 3}, PolicyLossConfig(kl_coef=0.0))
    for field, value in (("clip_low", -0.1), ("clip_low", 1.0), ("kl_estimator", "k9"), ("entropy_coef", -1.0)):
        with pytest.raises(ValueError, match=field):
            PolicyLossConfig(**{field: value})


# ------------------------------------------------------------------ safety limits (spec section 6)

def _three_token_case():
    """t0: A=-1, rho=50, ref-logp=25; t1: A=+1, rho=1, ref=logp; t2: A=-1, rho=2, ref-logp=-0.5."""
    old = torch.tensor([-6.0, -1.0, -2.0])
    logprobs = (old + torch.tensor([50.0, 1.0, 2.0]).log()).requires_grad_()
    ref = logprobs.detach() + torch.tensor([25.0, 0.0, -0.5])
    adv = torch.tensor([-1.0, 1.0, -1.0])
    mask = torch.ones(3, dtype=torch.bool)
    seq = torch.tensor([0, 1, 2])
    return logprobs, old, ref, adv, mask, seq


@pytest.mark.parametrize("name", ["grpo", "dapo", "rloo", "care", "dr_grpo"])
def test_dual_clip_and_kl_clamp_hand_values(name):
    """Ratio 50 on a negative-advantage token costs c|A| = 3 (not 50) with no gradient; a token 25 nats
    below the reference adds k3 = 10 (not e^20 - 21) with no KL gradient; the other tokens are untouched."""
    logprobs, old, ref, adv, mask, seq = _three_token_case()
    normalisers = {"num_tokens": 3.0, "num_sequences": 3.0, "num_advantaged_sequences": 3.0, "max_response_length": 2.0}
    config = PolicyLossConfig(clip_low=0.2, clip_high=0.28, kl_coef=0.1, dual_clip=3.0, kl_clamp=10.0)
    loss, metrics = get_policy_loss(name)(logprobs, old, adv, mask, seq, normalisers, config, ref_logprobs=ref)
    loss.backward()
    divisor = 3.0 * (2.0 if name == "dr_grpo" else 1.0)
    k3_t2 = math.exp(-0.5) + 0.5 - 1
    # t0 capped at 3 * 1; t1: -1 (rho = 1); t2: rho 2 > 1.28 but A < 0 -> the unclipped rho|A| = 2 (< 3)
    pg = (3.0 - 1.0 + 2.0) / divisor
    kl = (10.0 + 0.0 + k3_t2) / 3.0
    assert metrics["pg_loss"] == pytest.approx(pg, rel=1e-6)
    assert metrics["kl"] == pytest.approx(kl, rel=1e-6)
    assert loss.item() == pytest.approx(pg + 0.1 * kl, rel=1e-6)
    assert metrics["count/dual_clipped"] == 1.0
    from care_megatron.algorithm.diagnostics import clip_fractions

    assert clip_fractions(metrics)["clip_frac/dual"] == 0.5  # one of the two negative-advantage tokens
    # d/dlogp: t0 nothing (both limits hold it constant); t1 -rho A; t2 -rho A plus the KL's (1 - e^d)
    expected = torch.tensor([0.0, -1.0 / divisor, 2.0 / divisor + 0.1 * (1 - math.exp(-0.5)) / 3.0])
    assert torch.allclose(logprobs.grad, expected, atol=1e-6), logprobs.grad


def test_dual_clip_and_kl_clamp_switch_off():
    logprobs, old, ref, adv, mask, seq = _three_token_case()
    normalisers = {"num_tokens": 3.0, "num_sequences": 3.0}
    config = PolicyLossConfig(clip_low=0.2, clip_high=0.28, kl_coef=0.1, dual_clip=0.0, kl_clamp=None)
    loss, metrics = get_policy_loss("grpo")(logprobs, old, adv, mask, seq, normalisers, config, ref_logprobs=ref)
    loss.backward()
    # without the limits t0 costs its whole ratio 50 and k3 of the log ratio clamped at 20: e^20 - 21
    assert metrics["pg_loss"] == pytest.approx((50.0 - 1.0 + 2.0) / 3.0, rel=1e-5)
    assert metrics["kl"] == pytest.approx((math.exp(20) - 21 + math.exp(-0.5) - 0.5) / 3.0, rel=1e-5)
    assert metrics["count/dual_clipped"] == 0.0
    assert logprobs.grad[0].item() == pytest.approx(50.0 / 3.0, rel=1e-5)  # -rho A / N, the KL clamp at 20 holds


def test_dual_clip_leaves_gspo_and_positive_advantages_alone():
    logprobs, old, ref, adv, mask, seq = _three_token_case()
    normalisers = {"num_tokens": 3.0, "num_sequences": 3.0}
    on, off = PolicyLossConfig(kl_coef=0.0, dual_clip=3.0), PolicyLossConfig(kl_coef=0.0, dual_clip=0.0)
    gspo = get_policy_loss("gspo")
    assert gspo(logprobs, old, adv, mask, seq, normalisers, on)[0].item() == gspo(logprobs, old, adv, mask, seq,
                                                                                  normalisers, off)[0].item()
    positive = adv.abs()  # rho 50 with A > 0 is the ordinary upper clip: 1.28 A
    loss, metrics = get_policy_loss("grpo")(logprobs, old, positive, mask, seq, normalisers, on)
    assert loss.item() == pytest.approx(-(1.28 + 1.0 + 1.28) / 3.0, rel=1e-6)
    assert metrics["count/dual_clipped"] == 0.0


def test_safety_limit_validation_and_defaults():
    config = PolicyLossConfig.for_method("care")
    assert (config.dual_clip, config.kl_clamp) == (3.0, 10.0)
    assert kl_k3(torch.tensor([0.0]), torch.tensor([25.0]), clamp=10.0).item() == 10.0
    assert kl_penalty(torch.tensor([0.0]), torch.tensor([25.0]), "k1", k3_clamp=10.0).item() == -20.0  # k1 unclamped
    with pytest.raises(ValueError, match="dual_clip"):
        PolicyLossConfig(dual_clip=1.0)
    with pytest.raises(ValueError, match="kl_clamp"):
        PolicyLossConfig(kl_clamp=0.0)
