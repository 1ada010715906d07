"""Compiled Triton kernels on a GPU at realistic sizes (marked gpu; skipped on CPU).

Tolerances: bf16 LM heads at V = 151936 round logits to bf16 (the naive path does too, but cuBLAS
may round a chunk's matmul differently from the full one), so log-probs are compared at 5e-2 abs
max and 2e-3 mean abs, gradients by relative Frobenius error < 2e-2; fp32 heads at 1e-4.
"""
import pytest
import torch

from _kernel_helpers import assert_close_finite
from care_megatron.kernels import force_kernel_backend, linear_logprobs, naive_linear_logprobs, region_policy_loss
from test_region_loss import _random_batch

pytestmark = pytest.mark.gpu


def _grads(fn, hidden, weight, labels, **kwargs):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    logprobs, entropy = fn(hidden, weight, labels, **kwargs)
    objective = logprobs.sum() + (0.1 * entropy.sum() if entropy is not None else 0.0)
    objective.backward()
    return logprobs.detach(), None if entropy is None else entropy.detach(), hidden.grad, weight.grad


def _relative_error(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def test_bf16_qwen_vocab_matches_naive():
    torch.manual_seed(0)
    num_tokens, hidden_size, vocab_size = 3001, 2048, 151936  # 3001: not a multiple of the chunk
    hidden = torch.randn(num_tokens, hidden_size, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(vocab_size, hidden_size, device="cuda") * 0.04).bfloat16()
    labels = torch.randint(0, vocab_size, (num_tokens,), device="cuda")
    labels[::13] = -100
    with force_kernel_backend("triton"):
        fused = _grads(linear_logprobs, hidden, weight, labels, with_entropy=True, chunk_size=1024)
    naive = _grads(naive_linear_logprobs, hidden, weight, labels, with_entropy=True)
    for name, got, want in zip(("logprobs", "entropy"), fused[:2], naive[:2]):
        assert_close_finite(got, want, atol=5e-2, rtol=0, what=name)
        assert (got - want).abs().mean() < 2e-3, name
    for name, got, want in zip(("grad_hidden", "grad_weight"), fused[2:], naive[2:]):
        assert torch.isfinite(got).all(), name
        assert _relative_error(got, want) < 2e-2, name


def test_fp32_matches_naive():
    torch.manual_seed(1)
    hidden = torch.randn(1500, 256, device="cuda")
    weight = torch.randn(10007, 256, device="cuda") * 0.1
    labels = torch.randint(0, 10007, (1500,), device="cuda")
    with force_kernel_backend("triton"):
        fused = _grads(linear_logprobs, hidden, weight, labels, with_entropy=True, chunk_size=512, temperature=0.8)
    naive = _grads(naive_linear_logprobs, hidden, weight, labels, with_entropy=True, temperature=0.8)
    for name, got, want in zip(("logprobs", "entropy", "grad_hidden", "grad_weight"), fused, naive):
        assert_close_finite(got, want, atol=1e-4, rtol=1e-4, what=name)


def test_fused_logprob_memory_is_bounded():
    torch.manual_seed(2)
    num_tokens, hidden_size, vocab_size = 8192, 1024, 151936
    hidden = torch.randn(num_tokens, hidden_size, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(vocab_size, hidden_size, device="cuda") * 0.04).bfloat16()
    labels = torch.randint(0, vocab_size, (num_tokens,), device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad(), force_kernel_backend("triton"):
        linear_logprobs(hidden, weight, labels, chunk_size=2048)
    extra = torch.cuda.max_memory_allocated() - base
    # one bf16 [2048, V] chunk is 622 MB; full fp32 logits would be 4.98 GB
    assert extra < 1.2 * 2048 * vocab_size * 2, extra


@pytest.mark.parametrize("logprob_dtype", [torch.float32, torch.bfloat16])
def test_region_loss_large_matches_reference(logprob_dtype):
    batch, _, logprobs, old, ref = _random_batch(330, seed=5, pad=77, logprob_dtype=logprob_dtype)  # ~66k tokens
    batch = {k: v.cuda() for k, v in batch.items()}
    logprobs, old, ref = logprobs.cuda(), old.cuda(), ref.cuda()
    kwargs = dict(seq_normaliser=330.0, token_normaliser=float(batch["loss_mask"].sum()), ref_logprobs=ref)
    results = {}
    for backend in ("reference", "triton"):
        x = logprobs.clone().requires_grad_()
        with force_kernel_backend(backend):
            loss, stats = region_policy_loss(x, old, **batch, **kwargs)
            loss.backward()
        results[backend] = (loss.detach(), stats.values, x.grad)
    (rl, rs, rg), (tl_, ts, tg) = results["reference"], results["triton"]
    assert_close_finite(tl_, rl, atol=1e-6, rtol=1e-4, what="loss")
    assert torch.equal(ts[2:], rs[2:])
    grad_tol = 1e-5 if logprob_dtype == torch.float32 else 8e-3
    assert_close_finite(tg.float(), rg.float(), atol=1e-9, rtol=grad_tol, what="grad")
