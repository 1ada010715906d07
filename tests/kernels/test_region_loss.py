"""CARE section-6 loss: closed forms on hand-built batches, micro-batching invariance, NaN
hygiene, and Triton-vs-reference parity (interpreter on CPU) of loss, stats and gradient.

Tolerances: fp32 loss / gradient 1e-5 relative (1e-7 absolute), token counts exact; bf16
log-prob inputs are loaded as fp32 by both paths, so the same tolerances hold for the loss and the
gradient is compared after its bf16 rounding (2^-8 relative).
"""
import math

import pytest
import torch

from _kernel_helpers import assert_close_finite
from care_megatron.kernels import (
    RegionLossConfig,
    force_kernel_backend,
    region_policy_loss,
    region_token_weights,
    sequence_weight_sums,
)
from care_megatron.kernels.region_loss import STAT_NAMES
from care_megatron.rewards.regions import Region

O, T_, A = int(Region.OTHER), int(Region.THINK), int(Region.ANSWER)


def _batch(sequences, pad: int = 0):
    """Per-token tensors from [(regions, loss_mask, advantage, is_positive), ...] + padding."""
    regions, masks, advantages, positives, has_answer, lengths = [], [], [], [], [], []
    for region_list, mask_list, advantage, positive in sequences:
        regions += region_list
        masks += mask_list
        advantages += [advantage] * len(region_list)
        positives += [positive] * len(region_list)
        answer_present = any(r == A and m for r, m in zip(region_list, mask_list))
        has_answer += [answer_present] * len(region_list)
        lengths.append(len(region_list))
    regions += [O] * pad
    masks += [False] * pad
    advantages += [0.0] * pad
    positives += [False] * pad
    has_answer += [False] * pad
    batch = dict(
        region_ids=torch.tensor(regions),
        loss_mask=torch.tensor(masks),
        advantages=torch.tensor(advantages),
        is_positive=torch.tensor(positives),
        has_answer=torch.tensor(has_answer),
    )
    cu_seqlens = torch.tensor([0] + lengths).cumsum(0).int()
    weights = region_token_weights(batch["region_ids"], batch["is_positive"], batch["has_answer"], batch["loss_mask"], 0.005)
    batch["weight_sums"] = sequence_weight_sums(weights, cu_seqlens)
    return batch, cu_seqlens, weights


HAND_BATCH = [
    # prompt, think x2, answer x2, eos; positive
    ([O, T_, T_, A, A, O], [False, True, True, True, True, True], 1.5, True),
    # prompt, think, answer x3; negative
    ([O, T_, A, A, A], [False, True, True, True, True], -0.75, False),
    # no answer span: every response token weighs 1; negative
    ([O, O, T_, T_], [False, True, True, True], -0.5, False),
]


def test_weights_follow_section_6():
    batch, cu_seqlens, weights = _batch(HAND_BATCH, pad=2)
    expected = [0, 0.005, 0.005, 1, 1, 0] + [0, 0, 1, 1, 1] + [0, 1, 1, 1] + [0, 0]
    assert weights.tolist() == pytest.approx(expected)
    sums = [2.01] * 6 + [3.0] * 5 + [3.0] * 4 + [0.0, 0.0]
    assert batch["weight_sums"].tolist() == pytest.approx(sums)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_on_policy_closed_form(backend, request):
    """rho = 1, ref = logp: loss = -sum_i A_i sum_t w / (sum_t w + eps) / N_seq, KL 0, grad -A_hat / N_seq."""
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")
    batch, _, weights = _batch(HAND_BATCH, pad=2)
    logprobs = -torch.rand(weights.numel()) - 0.1
    logprobs.requires_grad_()
    config = RegionLossConfig(weight_eps=1e-6)
    with force_kernel_backend(backend):
        loss, stats = region_policy_loss(logprobs, logprobs.detach(), seq_normaliser=3.0, token_normaliser=11.0,
                                         ref_logprobs=logprobs.detach(), config=config, **batch)
        loss.backward()
    per_sequence = [1.5 * 2.01 / (2.01 + 1e-6), -0.75 * 3 / (3 + 1e-6), -0.5 * 3 / (3 + 1e-6)]
    assert loss.item() == pytest.approx(-sum(per_sequence) / 3.0, rel=1e-6)
    a_hat = batch["advantages"] * weights / (batch["weight_sums"] + 1e-6)
    assert_close_finite(logprobs.grad, -a_hat / 3.0, atol=1e-7, rtol=1e-5, what="grad")
    metrics = stats.to_metrics()
    assert metrics["kl_sum"] == 0.0
    assert metrics["active/positive_think"] == 2 and metrics["active/positive_answer"] == 2
    # negative: 3 answer tokens (think weighs 0); no-answer sequence: its OTHER token counts as
    # "answer", its two think tokens as think
    assert metrics["active/negative_answer"] == 4 and metrics["active/negative_think"] == 2
    assert sum(v for k, v in metrics.items() if k.startswith("clipped")) == 0


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_clipping_and_kl_closed_form(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")
    # four single-answer-token sequences (A_hat = A / (1 + eps)), ratios 2, 0.5, 1.1, 0.5
    sequences = [([A], [True], 1.0, True), ([A], [True], -1.0, False), ([A], [True], 1.0, True), ([A], [True], 1.0, True)]
    batch, _, _ = _batch(sequences)
    old = torch.tensor([-2.0, -1.0, -1.5, -0.7])
    ratios = torch.tensor([2.0, 0.5, 1.1, 0.5])
    logprobs = (old + ratios.log()).requires_grad_()
    ref_minus_logp = torch.tensor([0.3, -0.2, 0.0, 1.0])
    ref = logprobs.detach() + ref_minus_logp
    config = RegionLossConfig(clip_low=0.2, clip_high=0.28, kl_coef=0.02, weight_eps=1e-6)
    with force_kernel_backend(backend):
        loss, stats = region_policy_loss(logprobs, old, seq_normaliser=4.0, token_normaliser=4.0, ref_logprobs=ref,
                                         config=config, **batch)
        loss.backward()
    scale = 1 / (1 + 1e-6)
    # token 0: A>0, rho 2 -> clipped at 1.28; token 1: A<0, rho .5 -> clipped at .8; token 2: inside;
    # token 3: A>0, rho .5 -> min picks rho (unclipped side)
    surrogate = [-1.28 * scale, 0.8 * scale, -1.1 * scale, -0.5 * scale]
    k3 = [math.exp(d) - d - 1 for d in ref_minus_logp.tolist()]
    expected_loss = sum(surrogate) / 4 + 0.02 * sum(k3) / 4
    assert loss.item() == pytest.approx(expected_loss, rel=1e-5)
    grad_kl = [0.02 * (1 - math.exp(d)) / 4 for d in ref_minus_logp.tolist()]
    grad_pg = [0.0, 0.0, -1.1 * scale / 4, -0.5 * scale / 4]
    assert_close_finite(logprobs.grad, torch.tensor([a + b for a, b in zip(grad_pg, grad_kl)]), atol=1e-7, rtol=1e-5, what="grad")
    metrics = stats.to_metrics()
    assert metrics["clipped_high/positive_answer"] == 1 and metrics["clipped_low/negative_answer"] == 1
    assert metrics["kl_sum"] == pytest.approx(sum(k3), rel=1e-5)
    assert metrics["kl"] == pytest.approx(sum(k3) / 4, rel=1e-5)


def _random_batch(num_sequences: int, seed: int, pad: int = 0, logprob_dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    sequences = []
    for _ in range(num_sequences):
        length = int(torch.randint(3, 400, (1,), generator=generator))
        regions = torch.randint(0, 3, (length,), generator=generator).tolist()
        if torch.rand(1, generator=generator) < 0.2:
            regions = [r if r != A else T_ for r in regions]  # some sequences have no answer span
        mask = (torch.rand(length, generator=generator) > 0.15).tolist()
        advantage = float(torch.randn(1, generator=generator))
        sequences.append((regions, mask, advantage, advantage > 0))
    batch, cu_seqlens, weights = _batch(sequences, pad=pad)
    n = weights.numel()
    logprobs = (-torch.rand(n, generator=generator) * 3).to(logprob_dtype)
    old = logprobs.float() + torch.randn(n, generator=generator) * 0.3
    ref = logprobs.float() + torch.randn(n, generator=generator) * 0.3
    return batch, cu_seqlens, logprobs, old, ref


def test_micro_batching_does_not_change_loss_or_gradient():
    batch, cu_seqlens, logprobs, old, ref = _random_batch(6, seed=4)
    normalisers = dict(seq_normaliser=6.0, token_normaliser=float(batch["loss_mask"].sum()))

    def run(lo, hi, x):
        part = {k: v[lo:hi] for k, v in batch.items()}
        return region_policy_loss(x[lo:hi], old[lo:hi], ref_logprobs=ref[lo:hi], **part, **normalisers)[0]

    whole = logprobs.clone().requires_grad_()
    with force_kernel_backend("reference"):
        run(0, whole.numel(), whole).backward()
        split = logprobs.clone().requires_grad_()
        cut = int(cu_seqlens[2]) + 17  # inside the third sequence
        total = run(0, cut, split) + run(cut, split.numel(), split)
        total.backward()
        full_loss = run(0, whole.numel(), whole.detach())
    assert total.item() == pytest.approx(full_loss.item(), rel=1e-5, abs=1e-7)
    assert_close_finite(split.grad, whole.grad, atol=1e-8, rtol=1e-6, what="grad")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_garbage_on_masked_tokens_never_leaks(backend, request):
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")
    batch, _, logprobs, old, ref = _random_batch(3, seed=8, pad=5)
    masked = ~batch["loss_mask"]
    dirty_logprobs, dirty_old, dirty_ref = logprobs.clone(), old.clone(), ref.clone()
    dirty_logprobs[masked] = float("nan")
    dirty_old[masked] = float("-inf")
    dirty_ref[masked] = float("inf")
    kwargs = dict(seq_normaliser=3.0, token_normaliser=100.0)
    with force_kernel_backend(backend):
        clean = logprobs.clone().requires_grad_()
        clean_loss, _ = region_policy_loss(clean, old, ref_logprobs=ref, **batch, **kwargs)
        clean_loss.backward()
        dirty = dirty_logprobs.clone().requires_grad_()
        dirty_loss, dirty_stats = region_policy_loss(dirty, dirty_old, ref_logprobs=dirty_ref, **batch, **kwargs)
        dirty_loss.backward()
    assert torch.isfinite(dirty_stats.values).all()
    assert_close_finite(dirty_loss, clean_loss, atol=1e-7, rtol=1e-6, what="loss")
    assert_close_finite(dirty.grad, clean.grad, atol=1e-9, rtol=1e-6, what="grad")
    assert (dirty.grad[masked] == 0).all()


@pytest.mark.parametrize(
    "num_sequences,pad,seed,logprob_dtype,with_ref",
    [(5, 3, 21, torch.float32, True), (4, 0, 22, torch.bfloat16, True), (7, 11, 23, torch.float32, False)],
)
def test_triton_matches_reference(triton_interpreter, num_sequences, pad, seed, logprob_dtype, with_ref):
    batch, _, logprobs, old, ref = _random_batch(num_sequences, seed=seed, pad=pad, logprob_dtype=logprob_dtype)
    assert logprobs.numel() % 1024 != 0  # exercise the partial last block
    kwargs = dict(seq_normaliser=float(num_sequences), token_normaliser=float(batch["loss_mask"].sum()),
                  ref_logprobs=ref if with_ref else None, config=RegionLossConfig(gamma_pos=0.05))
    results = {}
    for backend in ("reference", "triton"):
        x = logprobs.clone().requires_grad_()
        with force_kernel_backend(backend):
            loss, stats = region_policy_loss(x, old, **batch, **kwargs)
            loss.backward(torch.tensor(1.7))
        results[backend] = (loss.detach(), stats.values, x.grad)
    (ref_loss, ref_stats, ref_grad), (tri_loss, tri_stats, tri_grad) = results["reference"], results["triton"]
    assert tri_grad.dtype == logprob_dtype
    assert_close_finite(tri_loss, ref_loss, atol=1e-6, rtol=1e-5, what="loss")
    assert_close_finite(tri_stats[:2], ref_stats[:2], atol=1e-5, rtol=1e-5, what="pg/kl sums")
    assert torch.equal(tri_stats[2:], ref_stats[2:]), dict(zip(STAT_NAMES[2:], (tri_stats[2:] - ref_stats[2:]).tolist()))
    grad_tol = 1e-5 if logprob_dtype == torch.float32 else 8e-3
    assert_close_finite(tri_grad.float(), ref_grad.float(), atol=1e-8, rtol=grad_tol, what="grad")
    assert ref_stats[2:].sum() > 0, "the random batch should clip some tokens"


def test_validation():
    with pytest.raises(ValueError, match="clip_low"):
        RegionLossConfig(clip_low=1.0)
    with pytest.raises(ValueError, match="weight_eps"):
        RegionLossConfig(weight_eps=0.0)
    batch, _, logprobs, old, _ = _random_batch(2, seed=1)
    with pytest.raises(ValueError, match="old_logprobs"):
        region_policy_loss(logprobs, old[:-1], **batch, seq_normaliser=1.0, token_normaliser=1.0)
    with pytest.raises(ValueError, match="seq_normaliser"):
        region_policy_loss(logprobs, old, **batch, seq_normaliser=0.0, token_normaliser=1.0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_dual_clip_and_kl_clamp_hand_values(backend, request):
    """Same hand case as the ``care`` policy loss: rho 50 on A < 0 costs 3 |A_hat| and no gradient;
    ref - logp = 25 adds k3 = 10 and no KL gradient."""
    if backend == "triton":
        request.getfixturevalue("triton_interpreter")
    sequences = [([A], [True], -1.0, False), ([A], [True], 1.0, True), ([A], [True], -1.0, False)]
    batch, _, _ = _batch(sequences)
    old = torch.tensor([-6.0, -1.0, -2.0])
    logprobs = (old + torch.tensor([50.0, 1.0, 2.0]).log()).requires_grad_()
    ref = logprobs.detach() + torch.tensor([25.0, 0.0, -0.5])
    config = RegionLossConfig(kl_coef=0.1, dual_clip=3.0, kl_clamp=10.0, weight_eps=1e-6)
    with force_kernel_backend(backend):
        loss, stats = region_policy_loss(logprobs, old, seq_normaliser=3.0, token_normaliser=3.0, ref_logprobs=ref,
                                         config=config, **batch)
        loss.backward()
    scale = 1 / (1 + 1e-6)
    k3_t2 = math.exp(-0.5) + 0.5 - 1
    assert loss.item() == pytest.approx((3.0 - 1.0 + 2.0) * scale / 3.0 + 0.1 * (10.0 + k3_t2) / 3.0, rel=1e-5)
    expected = torch.tensor([0.0, -scale / 3.0, 2.0 * scale / 3.0 + 0.1 * (1 - math.exp(-0.5)) / 3.0])
    assert_close_finite(logprobs.grad, expected, atol=1e-7, rtol=1e-5, what="grad")
    metrics = stats.to_metrics()
    assert metrics["dual_clipped/negative_answer"] == 1.0 and metrics["kl_sum"] == pytest.approx(10.0 + k3_t2, rel=1e-5)


@pytest.mark.parametrize("dual_clip,kl_clamp,gamma_neg", [(3.0, 10.0, 0.0), (0.0, None, 0.005), (1.5, 0.05, 0.0)])
def test_triton_matches_reference_with_safety_limits(triton_interpreter, dual_clip, kl_clamp, gamma_neg):
    """Parity with the limits active on many tokens: log-ratios wide enough that the dual clip
    (c = 1.5) and the KL clamp (0.05) both bite, and with failed-think weights unmasked."""
    batch, _, logprobs, old, ref = _random_batch(5, seed=31, pad=4)
    generator = torch.Generator().manual_seed(5)
    old = logprobs + torch.randn(logprobs.numel(), generator=generator) * 1.5
    ref = logprobs + torch.randn(logprobs.numel(), generator=generator) * 1.5
    config = RegionLossConfig(gamma_pos=0.05, dual_clip=dual_clip, kl_clamp=kl_clamp, gamma_neg=gamma_neg)
    weights = region_token_weights(batch["region_ids"], batch["is_positive"], batch["has_answer"], batch["loss_mask"],
                                   0.05, gamma_neg)
    results = {}
    for backend in ("reference", "triton"):
        x = logprobs.clone().requires_grad_()
        with force_kernel_backend(backend):
            loss, stats = region_policy_loss(x, old, **batch, seq_normaliser=5.0,
                                             token_normaliser=float(batch["loss_mask"].sum()), ref_logprobs=ref,
                                             config=config)
            loss.backward()
        results[backend] = (loss.detach(), stats.values, x.grad)
    (ref_loss, ref_stats, ref_grad), (tri_loss, tri_stats, tri_grad) = results["reference"], results["triton"]
    assert_close_finite(tri_loss, ref_loss, atol=1e-6, rtol=1e-5, what="loss")
    assert torch.equal(tri_stats[2:], ref_stats[2:])
    assert_close_finite(tri_grad, ref_grad, atol=1e-8, rtol=1e-5, what="grad")
    names = dict(zip(STAT_NAMES, ref_stats.tolist()))
    dual = sum(v for k, v in names.items() if k.startswith("dual_clipped/"))
    assert (dual > 0) == (dual_clip > 0)
    if gamma_neg:
        think_neg = (batch["region_ids"] == T_) & ~batch["is_positive"] & batch["has_answer"] & batch["loss_mask"]
        assert torch.all(weights[think_neg] == gamma_neg) and think_neg.any()
