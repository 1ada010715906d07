"""CUDA-graph helper: eager fallback on CPU, bucketing, and (gpu) replay == eager for the fused ops."""
import pytest
import torch

from _kernel_helpers import assert_close_finite, random_logprob_problem
from care_megatron.kernels import force_kernel_backend, linear_logprobs, region_policy_loss
from care_megatron.kernels.graphs import GraphedRegionLoss, StaticShapeGraph
from test_region_loss import _random_batch


def test_bucket_choice_and_argument_checks():
    graph = StaticShapeGraph(lambda x: x * 2, pad_values=(0.0,), bucket_sizes=(512, 128, 2048))
    assert graph.bucket_sizes == (128, 512, 2048)
    assert graph.bucket_for(1) == 128 and graph.bucket_for(128) == 128 and graph.bucket_for(129) == 512
    assert graph.bucket_for(2049) is None
    with pytest.raises(ValueError, match="inputs"):
        graph(torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="bucket_sizes"):
        StaticShapeGraph(lambda x: x, pad_values=(0,), bucket_sizes=(0,))


def test_cpu_falls_back_to_eager():
    calls = []

    def fn(x, y, scale):
        calls.append(x.shape[0])
        return (x * y).sum() * scale, x + y

    graph = StaticShapeGraph(fn, pad_values=(0.0, 0.0, 1.0), bucket_sizes=(64,))
    x, y = torch.randn(37), torch.randn(37)
    total, added = graph(x, y, torch.tensor(3.0))
    assert calls == [37], "CPU inputs must run unpadded and uncaptured"
    assert graph.captures == 0
    assert torch.equal(added, x + y) and torch.allclose(total, (x * y).sum() * 3)


def test_graphed_region_loss_on_cpu_is_the_plain_op():
    batch, _, logprobs, old, ref = _random_batch(3, seed=2)
    kwargs = dict(seq_normaliser=3.0, token_normaliser=float(batch["loss_mask"].sum()))
    with force_kernel_backend("reference"):
        a = logprobs.clone().requires_grad_()
        loss_a, stats_a = GraphedRegionLoss()(a, old, ref_logprobs=ref, **batch, **kwargs)
        loss_a.backward()
        b = logprobs.clone().requires_grad_()
        loss_b, stats_b = region_policy_loss(b, old, ref_logprobs=ref, **batch, **kwargs)
        loss_b.backward()
    assert torch.equal(loss_a, loss_b) and torch.equal(stats_a, stats_b.values) and torch.equal(a.grad, b.grad)


@pytest.mark.gpu
def test_graphed_region_loss_replays_match_eager():
    graphed = GraphedRegionLoss(bucket_sizes=(2048, 8192))
    for seed, num_sequences in ((1, 4), (2, 5), (3, 12)):  # two lengths in one bucket, then another bucket
        batch, _, logprobs, old, ref = _random_batch(num_sequences, seed=seed)
        batch = {k: v.cuda() for k, v in batch.items()}
        logprobs, old, ref = logprobs.cuda(), old.cuda(), ref.cuda()
        kwargs = dict(seq_normaliser=float(num_sequences), token_normaliser=float(batch["loss_mask"].sum()))
        replayed = logprobs.clone().requires_grad_()
        loss_g, stats_g = graphed(replayed, old, ref_logprobs=ref, **batch, **kwargs)
        (2.5 * loss_g).backward()
        eager = logprobs.clone().requires_grad_()
        loss_e, stats_e = region_policy_loss(eager, old, ref_logprobs=ref, **batch, **kwargs)
        (2.5 * loss_e).backward()
        assert_close_finite(loss_g, loss_e, atol=1e-6, rtol=1e-5, what="loss")
        assert torch.equal(stats_g[2:], stats_e.values[2:])
        assert_close_finite(replayed.grad, eager.grad, atol=1e-9, rtol=1e-5, what="grad")
    assert graphed._with_ref.captures == 2


@pytest.mark.gpu
def test_graphed_logprob_forward_matches_eager():
    hidden, weight, _ = random_logprob_problem(3000, 256, 32000, torch.bfloat16, seed=0)
    hidden, weight = hidden.cuda(), weight.cuda()

    def forward(hidden_states, labels):
        with torch.no_grad():
            return linear_logprobs(hidden_states, weight, labels, with_entropy=True, chunk_size=1024)

    graph = StaticShapeGraph(forward, pad_values=(0.0, -100), bucket_sizes=(4096,))
    for num_tokens in (3000, 4000):
        labels = torch.randint(0, 32000, (num_tokens,), device="cuda")
        h = hidden[:num_tokens] if num_tokens <= 3000 else torch.randn(num_tokens, 256, device="cuda", dtype=torch.bfloat16)
        replay_lp, replay_ent = graph(h, labels)
        eager_lp, eager_ent = forward(h, labels)
        assert replay_lp.shape == (num_tokens,)
        assert_close_finite(replay_lp, eager_lp, atol=1e-5, rtol=1e-5, what="logprobs")
        assert_close_finite(replay_ent, eager_ent, atol=1e-5, rtol=1e-5, what="entropy")
    assert graph.captures == 1
