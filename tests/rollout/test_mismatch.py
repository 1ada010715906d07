"""Train / rollout mismatch metric and truncated importance sampling weights, against closed forms."""
import math

import pytest
import torch

from care_megatron.rollout.mismatch import logprob_temperature, rollout_mismatch, truncated_importance_weights


def test_logprob_temperature():
    assert logprob_temperature(0.0) == 1.0
    assert logprob_temperature(0.7) == 0.7
    with pytest.raises(ValueError):
        logprob_temperature(-1.0)


def test_mismatch_closed_form_over_masked_tokens():
    train = torch.tensor([[-1.0, -2.0, -0.5, 9.0]])
    rollout = torch.tensor([[-1.5, -1.0, -0.5, -9.0]])
    mask = torch.tensor([[True, True, True, False]])  # the last token is prompt: ignored
    value, metrics = rollout_mismatch(train, rollout, mask)
    assert float(value) == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert metrics["rollout/mismatch_abs_max"] == pytest.approx(1.0)
    assert metrics["rollout/mismatch_mean"] == pytest.approx((0.5 - 1.0 + 0.0) / 3)
    k3 = [math.exp(d) - d - 1 for d in (0.5, -1.0, 0.0)]
    assert metrics["rollout/mismatch_k3_kl"] == pytest.approx(sum(k3) / 3)


def test_mismatch_empty_mask_and_shape_check():
    value, metrics = rollout_mismatch(torch.zeros(3), torch.ones(3), torch.zeros(3, dtype=torch.bool))
    assert float(value) == 0.0 and metrics["rollout/mismatch_abs_mean"] == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        rollout_mismatch(torch.zeros(3), torch.zeros(4), torch.ones(3, dtype=torch.bool))


def test_truncated_importance_weights_closed_form():
    old = torch.tensor([-1.0, -1.0, -3.0, 0.0, 50.0])
    rollout = torch.tensor([-1.0, -2.0, -1.0, -5.0, 0.0])
    mask = torch.tensor([True, True, True, True, False])
    weights, metrics = truncated_importance_weights(old, rollout, mask, cap=2.0)
    expected = torch.tensor([1.0, min(math.e, 2.0), math.exp(-2.0), 2.0, 0.0])
    torch.testing.assert_close(weights, expected)
    assert metrics["rollout/tis_clip_frac"] == pytest.approx(2 / 4)
    assert metrics["rollout/tis_weight_mean"] == pytest.approx(float(expected[:4].mean()))
    assert not weights.requires_grad
    with pytest.raises(ValueError, match="cap"):
        truncated_importance_weights(old, rollout, mask, cap=0.5)
