"""Fused LM-head log-probs: chunked op vs the naive full-logits path (values and gradients),
vocab-parallel partials combined over 2 and 4 shards, and the Triton kernels under the interpreter.

Tolerances: fp32 1e-5 abs/rel (same math, different summation order); bf16 inputs: values 2e-3
abs (both paths round the same bf16 logits, then reduce in fp32), bf16 gradients 2e-2 abs/rel
(the gradient outputs themselves are bf16, 2^-8 relative precision).
"""
import pytest
import torch

from _kernel_helpers import assert_close_finite, random_logprob_problem
from care_megatron.kernels import (
    combine_vocab_parallel_partials,
    force_kernel_backend,
    linear_logprob_partials,
    linear_logprobs,
    naive_linear_logprobs,
)
from care_megatron.kernels.logprobs import reference as logprob_reference


def _run_with_grads(fn, hidden, weight, labels, entropy_coef=0.0, **kwargs):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    generator = torch.Generator().manual_seed(123)
    upstream = torch.randn(hidden.shape[0], generator=generator)
    logprobs, entropy = fn(hidden, weight, labels, with_entropy=entropy_coef != 0.0, **kwargs)
    objective = (logprobs * upstream).sum()
    if entropy is not None:
        objective = objective + entropy_coef * (entropy * upstream.flip(0)).sum()
    objective.backward()
    return logprobs.detach(), None if entropy is None else entropy.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("num_tokens,vocab_size,chunk_size,temperature", [(53, 301, 16, 1.0), (40, 1000, 7, 0.6), (9, 77, 64, 1.3)])
def test_reference_chunked_matches_naive_fp32(num_tokens, vocab_size, chunk_size, temperature):
    hidden, weight, labels = random_logprob_problem(num_tokens, 24, vocab_size, torch.float32, seed=num_tokens)
    with force_kernel_backend("reference"):
        fused = _run_with_grads(linear_logprobs, hidden, weight, labels, entropy_coef=0.3, chunk_size=chunk_size, temperature=temperature)
    naive = _run_with_grads(naive_linear_logprobs, hidden, weight, labels, entropy_coef=0.3, temperature=temperature)
    for name, got, want in zip(("logprobs", "entropy", "grad_hidden", "grad_weight"), fused, naive):
        assert_close_finite(got, want, atol=1e-5, rtol=1e-5, what=name)
    ignored = labels == -100
    assert (fused[0][ignored] == 0).all() and (fused[1][ignored] == 0).all()
    assert (fused[2][ignored] == 0).all(), "ignored tokens must get no gradient"
    assert (fused[0][~ignored] < 0).all()


def test_reference_bf16_matches_naive_and_keeps_dtypes():
    hidden, weight, labels = random_logprob_problem(45, 32, 513, torch.bfloat16, seed=5)
    with force_kernel_backend("reference"):
        fused = _run_with_grads(linear_logprobs, hidden, weight, labels, entropy_coef=0.5, chunk_size=20)
    naive = _run_with_grads(naive_linear_logprobs, hidden, weight, labels, entropy_coef=0.5)
    assert fused[0].dtype == torch.float32 and fused[1].dtype == torch.float32
    assert fused[2].dtype == torch.bfloat16 and fused[3].dtype == torch.bfloat16
    assert_close_finite(fused[0], naive[0], atol=2e-3, rtol=0, what="logprobs")
    assert_close_finite(fused[1], naive[1], atol=2e-3, rtol=0, what="entropy")
    assert_close_finite(fused[2], naive[2], atol=2e-2, rtol=2e-2, what="grad_hidden")
    assert_close_finite(fused[3], naive[3], atol=2e-2, rtol=2e-2, what="grad_weight")


def test_entropy_closed_form_uniform_logits():
    # zero weight -> uniform softmax: log p = -log V and H = log V for every token
    vocab_size = 37
    hidden = torch.randn(5, 8)
    weight = torch.zeros(vocab_size, 8)
    labels = torch.tensor([0, 3, 36, -100, 11])
    with force_kernel_backend("reference"):
        logprobs, entropy = linear_logprobs(hidden, weight, labels, with_entropy=True, chunk_size=2)
    expected = torch.log(torch.tensor(float(vocab_size)))
    assert torch.allclose(logprobs[[0, 1, 2, 4]], -expected.expand(4), atol=1e-6)
    assert torch.allclose(entropy[[0, 1, 2, 4]], expected.expand(4), atol=1e-6)
    assert logprobs[3] == 0 and entropy[3] == 0


@pytest.mark.parametrize("num_shards", [2, 4])
def test_vocab_parallel_partials_combine_to_full_vocab(num_shards):
    hidden, weight, labels = random_logprob_problem(31, 16, 203, torch.float32, seed=num_shards)
    bounds = torch.linspace(0, 203, num_shards + 1).round().long().tolist()  # uneven shards
    with force_kernel_backend("reference"):
        partials = [linear_logprob_partials(hidden, weight[lo:hi], labels, vocab_start=lo, temperature=0.8, chunk_size=8)
                    for lo, hi in zip(bounds[:-1], bounds[1:])]
    stacked = [torch.stack([p[i] for p in partials]) for i in range(4)]
    logprobs, entropy, logsumexp = combine_vocab_parallel_partials(*stacked)
    naive_logprobs, naive_entropy = naive_linear_logprobs(hidden, weight, labels, temperature=0.8, with_entropy=True)
    kept = labels != -100
    assert_close_finite(logprobs[kept], naive_logprobs[kept], atol=1e-5, rtol=1e-5, what="logprobs")
    assert_close_finite(entropy, naive_entropy.where(kept, entropy), atol=1e-5, rtol=1e-5, what="entropy")
    assert_close_finite(logsumexp, torch.logsumexp(hidden @ weight.t() / 0.8, -1), atol=1e-5, rtol=1e-5, what="lse")
    # exactly one shard owns each label
    owners = (torch.stack([((labels >= lo) & (labels < hi)) for lo, hi in zip(bounds[:-1], bounds[1:])])).sum(0)
    assert (owners[kept] == 1).all()


def test_input_validation_names_the_problem():
    hidden, weight, labels = random_logprob_problem(4, 8, 10, torch.float32, seed=0)
    with pytest.raises(ValueError, match="share a dtype"):
        linear_logprobs(hidden, weight.bfloat16(), labels)
    with pytest.raises(ValueError, match="labels"):
        linear_logprobs(hidden, weight, labels[:3])
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs(hidden, weight, labels, temperature=0.0)
    with pytest.raises(ValueError, match="hidden size"):
        linear_logprobs(hidden, weight[:, :4], labels)


# --- Triton kernels under the interpreter (CPU) -------------------------------------------------


@pytest.mark.parametrize("dtype,seed", [(torch.float32, 1), (torch.bfloat16, 2)])
def test_triton_chunk_kernels_match_reference(triton_interpreter, dtype, seed):
    from care_megatron.kernels.logprobs import triton as triton_ops

    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(13, 777, generator=generator) * 4).to(dtype)  # 777: not a power of two
    labels = torch.randint(-1, 777, (13,), generator=generator)
    want = logprob_reference.chunk_partials(logits, labels, 0.9)
    got = triton_ops.chunk_partials(logits, labels, 0.9)
    for name, g, w in zip(("max", "sumexp", "weighted", "target"), got, want):
        assert_close_finite(g, w, atol=1e-5, rtol=1e-5, what=name)
    lse = want[0] + want[1].log()
    mean_logit = lse - (want[1].log() - want[2] / want[1])
    grad_lp, grad_ent = torch.randn(13, generator=generator), torch.randn(13, generator=generator)
    expected = logprob_reference.chunk_grad_logits(logits.clone(), labels, lse, mean_logit, grad_lp, grad_ent, 0.9)
    buffer = logits.clone()
    result = triton_ops.chunk_grad_logits(buffer, labels, lse, mean_logit, grad_lp, grad_ent, 0.9)
    assert result.data_ptr() == buffer.data_ptr(), "the gradient must overwrite the logits buffer"
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    assert_close_finite(result, expected, atol=tolerance, rtol=tolerance, what="grad_logits")


def test_triton_partials_survive_minus_inf_logits(triton_interpreter):
    from care_megatron.kernels.logprobs import triton as triton_ops

    logits = torch.randn(3, 50)
    logits[:, 10:20] = float("-inf")  # e.g. a masked vocabulary range
    labels = torch.tensor([0, 25, -1])
    got = triton_ops.chunk_partials(logits, labels, 1.0)
    want = logprob_reference.chunk_partials(logits, labels, 1.0)
    for name, g, w in zip(("max", "sumexp", "weighted", "target"), got, want):
        assert_close_finite(g, w, atol=1e-5, rtol=1e-5, what=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_end_to_end_matches_naive(triton_interpreter, dtype):
    hidden, weight, labels = random_logprob_problem(29, 16, 389, dtype, seed=11)
    with force_kernel_backend("triton"):
        fused = _run_with_grads(linear_logprobs, hidden, weight, labels, entropy_coef=0.2, chunk_size=12, temperature=0.7)
    naive = _run_with_grads(naive_linear_logprobs, hidden, weight, labels, entropy_coef=0.2, temperature=0.7)
    value_tol, grad_tol = (1e-5, 1e-5) if dtype == torch.float32 else (2e-3, 2e-2)
    assert_close_finite(fused[0], naive[0], atol=value_tol, rtol=value_tol, what="logprobs")
    assert_close_finite(fused[1], naive[1], atol=value_tol, rtol=value_tol, what="entropy")
    assert_close_finite(fused[2], naive[2], atol=grad_tol, rtol=grad_tol, what="grad_hidden")
    assert_close_finite(fused[3], naive[3], atol=grad_tol, rtol=grad_tol, what="grad_weight")


def test_triton_partials_match_reference_partials(triton_interpreter):
    hidden, weight, labels = random_logprob_problem(17, 8, 150, torch.float32, seed=3)
    with force_kernel_backend("reference"):
        want = linear_logprob_partials(hidden, weight[50:], labels, vocab_start=50, chunk_size=5)
    with force_kernel_backend("triton"):
        got = linear_logprob_partials(hidden, weight[50:], labels, vocab_start=50, chunk_size=5)
    for name, g, w in zip(("max", "sumexp", "weighted", "target"), got, want):
        assert_close_finite(g, w, atol=1e-5, rtol=1e-5, what=name)


# --- vocab-parallel op over a real process group (gloo, CPU) ------------------------------------


def _vocab_parallel_worker(rank, world_size, init_file, result_file):
    import torch.distributed as dist

    from care_megatron.kernels import vocab_parallel_linear_logprobs as vp_logprobs

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        hidden, weight, labels = random_logprob_problem(23, 12, 211, torch.float32, seed=99)
        bounds = [0, 100, 211] if world_size == 2 else [0, 50, 101, 160, 211]
        lo, hi = bounds[rank], bounds[rank + 1]
        h = hidden.clone().requires_grad_()
        shard = weight[lo:hi].clone().requires_grad_()
        with force_kernel_backend("reference"):
            logprobs, entropy = vp_logprobs(h, shard, labels, lo, dist.group.WORLD,
                                            temperature=0.9, chunk_size=10, with_entropy=True)
        upstream = torch.linspace(-1, 1, 23)
        ((logprobs * upstream).sum() + 0.4 * (entropy * upstream.flip(0)).sum()).backward()
        torch.save({"logprobs": logprobs.detach(), "entropy": entropy.detach(), "grad_hidden": h.grad,
                    "grad_shard": shard.grad, "lo": lo, "hi": hi}, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=[pytest.mark.slow, pytest.mark.extended])])
def test_vocab_parallel_op_matches_full_vocab(tmp_path, world_size):
    import torch.multiprocessing as mp

    result_file = str(tmp_path / "result")
    mp.spawn(_vocab_parallel_worker, args=(world_size, str(tmp_path / "init"), result_file), nprocs=world_size)
    hidden, weight, labels = random_logprob_problem(23, 12, 211, torch.float32, seed=99)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    lp, ent = naive_linear_logprobs(h, w, labels, temperature=0.9, with_entropy=True)
    upstream = torch.linspace(-1, 1, 23)
    ((lp * upstream).sum() + 0.4 * (ent * upstream.flip(0)).sum()).backward()
    for rank in range(world_size):
        got = torch.load(f"{result_file}.{rank}")
        assert_close_finite(got["logprobs"], lp.detach(), atol=1e-5, rtol=1e-5, what=f"rank {rank} logprobs")
        assert_close_finite(got["entropy"], ent.detach(), atol=1e-5, rtol=1e-5, what=f"rank {rank} entropy")
        assert_close_finite(got["grad_hidden"], h.grad, atol=1e-5, rtol=1e-5, what=f"rank {rank} grad_hidden")
        assert_close_finite(got["grad_shard"], w.grad[got["lo"]:got["hi"]], atol=1e-5, rtol=1e-5, what=f"rank {rank} grad_shard")
