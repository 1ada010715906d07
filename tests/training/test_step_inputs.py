"""Loss inputs of an RL step: the fused CARE kernel path equals the plain ``care`` policy loss."""
import pytest
import torch

from care_megatron.algorithm.policy_losses import PolicyLossConfig, get_policy_loss
from care_megatron.data.batch import Sequence
from care_megatron.data.packing import pack_sequences
from care_megatron.rewards.regions import Region
from care_megatron.training.base import ForwardOutputs
from care_megatron.training.step_inputs import (attach_loss_inputs, fused_region_loss_applies, loss_normalisers,
                                                 make_loss_fn)


def _sequences(n=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n):
        prompt, response = 4 + i % 3, 6 + (i * 5) % 11
        L = prompt + response
        regions = torch.zeros(L, dtype=torch.long)
        cut = prompt + response // 2
        regions[prompt:cut] = int(Region.THINK)
        if i % 4 != 3:  # every fourth response has no answer span (weight 1 on all its tokens)
            regions[cut:] = int(Region.ANSWER)
        mask = torch.zeros(L, dtype=torch.bool)
        mask[prompt:] = True
        old = -torch.rand(L, generator=g) * 3
        seqs.append(Sequence(input_ids=torch.randint(5, 50, (L,), generator=g), loss_mask=mask, region_ids=regions,
                             position_ids=torch.arange(L).expand(3, L).clone(),
                             token_fields={"old_logprobs": old * mask}))
    return seqs


@pytest.mark.parametrize("kl_coef", [0.0, 0.02])
def test_fused_care_loss_matches_plain_loss_values_and_gradients(kl_coef):
    torch.manual_seed(0)
    seqs = _sequences()
    packed = pack_sequences(seqs, token_budget=40, pad_multiple=4)
    assert len(packed) >= 3
    n = len(seqs)
    advantages = torch.randn(n)
    positive = torch.rand(n) > 0.5
    attach_loss_inputs(packed, "care", advantages, positive, 0.005, max_response_length=16)
    normalisers = loss_normalisers(packed, max_response_length=16)
    config = PolicyLossConfig.for_method("care", kl_coef=kl_coef)
    plain = make_loss_fn(get_policy_loss("care"), config, "care", 0.005, fused=False)
    fused = make_loss_fn(get_policy_loss("care"), config, "care", 0.005, fused=True)
    total = {"plain": 0.0, "fused": 0.0}
    for mb in packed:
        assert fused_region_loss_applies("care", config, mb)
        mb.token_fields["ref_logprobs"] = mb.token_fields["old_logprobs"] - 0.1 * torch.rand(mb.num_tokens)
        # a policy that moved: ratios far enough from 1 to hit both clip bounds
        logp = (mb.token_fields["old_logprobs"] + 0.6 * torch.randn(mb.num_tokens)).requires_grad_()
        grads = {}
        for name, fn in (("plain", plain), ("fused", fused)):
            logp.grad = None
            loss, metrics = fn(ForwardOutputs(logprobs=logp), mb, normalisers)
            loss.backward()
            grads[name] = logp.grad.clone()
            total[name] += float(loss.detach())
        torch.testing.assert_close(grads["fused"], grads["plain"], atol=1e-6, rtol=1e-5)
        assert metrics["loss"] == pytest.approx(float(loss))
    assert total["fused"] == pytest.approx(total["plain"], rel=1e-5, abs=1e-7)
    assert total["plain"] != 0.0


def test_fused_path_steps_aside_when_it_would_compute_something_else():
    seqs = _sequences(4)
    for tis, entropy, estimator, method in ((2.0, 0.0, "k3", "care"), (None, 0.01, "k3", "care"),
                                            (None, 0.0, "k2", "care"), (None, 0.0, "k3", "grpo")):
        packed = pack_sequences(seqs, token_budget=64)
        for mb in packed:
            mb.token_fields["rollout_logprobs"] = mb.token_fields["old_logprobs"]
        attach_loss_inputs(packed, method, torch.ones(4), torch.ones(4, dtype=torch.bool), 0.005, 16, tis_cap=tis)
        config = PolicyLossConfig.for_method(method, kl_estimator=estimator, entropy_coef=entropy)
        assert not fused_region_loss_applies(method, config, packed[0])


def test_mismatch_and_tis_metrics_are_token_weighted_over_micro_batches():
    """The step's mismatch / TIS means are over all response tokens, whatever the micro-batching
    (so summing the per-rank sums over data parallelism gives the batch value)."""
    seqs = _sequences()
    g = torch.Generator().manual_seed(3)
    for s in seqs:
        s.token_fields["rollout_logprobs"] = s.token_fields["old_logprobs"] + 0.3 * torch.randn(len(s), generator=g) * s.loss_mask
    n = len(seqs)
    mask = torch.cat([s.loss_mask for s in seqs])
    old = torch.cat([s.token_fields["old_logprobs"] for s in seqs])[mask]
    rollout = torch.cat([s.token_fields["rollout_logprobs"] for s in seqs])[mask]
    expected_gap = float((old - rollout).abs().mean())
    expected_tis = float(torch.exp(old - rollout).clamp(max=2.0).mean())
    for budget in (40, 400):  # many small micro-batches / one
        packed = pack_sequences(seqs, token_budget=budget, pad_multiple=4)
        metrics = attach_loss_inputs(packed, "grpo", torch.randn(n), torch.rand(n) > 0.5, 0.005, 16, tis_cap=2.0)
        assert metrics["rollout/mismatch_abs_mean"] == pytest.approx(expected_gap, rel=1e-5)
        assert metrics["rollout/tis_weight_mean"] == pytest.approx(expected_tis, rel=1e-5)
