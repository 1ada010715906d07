"""The ``torch`` kernel backend of the LM-head log-probs (kernels/logprobs/inplace.py) computes the
reference's floating-point operations in the same order with buffers reused: the same bits, not just
close values. And an entropy that no loss term reads costs no backward pass."""
import pytest
import torch

from _kernel_helpers import random_logprob_problem
from care_megatron.kernels import force_kernel_backend, linear_logprobs
from care_megatron.kernels.logprobs import inplace, reference


def _chunk(num_rows, vocab, dtype, seed, with_inf=True):
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(num_rows, vocab, generator=generator) * 4).to(dtype)
    if with_inf:  # masked vocabulary entries (exp -> 0, the entropy term's 0 * -inf case)
        logits[0, :5] = float("-inf")
        logits[3, 7] = float("-inf")
    labels = torch.randint(0, vocab, (num_rows,), generator=generator)
    labels[1] = -1  # label outside this vocabulary slice / ignored
    return logits, labels, generator


def _same_bits(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert torch.equal(a, b) or torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), what


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunk_partials_same_bits_as_reference(dtype, temperature):
    logits, labels, _ = _chunk(37, 211, dtype, seed=1)
    want = reference.chunk_partials(logits.clone(), labels, temperature)
    got = inplace.chunk_partials(logits.clone(), labels, temperature)
    for name, a, b in zip(("max", "sumexp", "weighted", "target"), got, want):
        _same_bits(a, b, name)
    assert torch.isfinite(got[2]).all()  # the masked entries contribute 0, not nan


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_entropy", [True, False])
def test_chunk_grad_logits_same_bits_as_reference(dtype, temperature, with_entropy):
    logits, labels, generator = _chunk(29, 173, dtype, seed=2, with_inf=False)
    z = logits.float() / temperature
    logsumexp = torch.logsumexp(z, -1)
    mean_logit = (z.softmax(-1) * z).sum(-1)
    grad_logprobs = torch.randn(29, generator=generator)
    grad_entropy = torch.randn(29, generator=generator) if with_entropy else None
    args = (labels, logsumexp, mean_logit if with_entropy else None, grad_logprobs, grad_entropy, temperature)
    want_buffer, got_buffer = logits.clone(), logits.clone()
    want = reference.chunk_grad_logits(want_buffer, *args)
    got = inplace.chunk_grad_logits(got_buffer, *args)
    assert got.data_ptr() == got_buffer.data_ptr()  # written over logits, as the reference does
    _same_bits(got, want, "grad_logits")


def _step(backend, hidden, weight, labels, entropy_weight):
    hidden = hidden.detach().clone().requires_grad_()
    weight = weight.detach().clone().requires_grad_()
    upstream = torch.randn(hidden.shape[0], generator=torch.Generator().manual_seed(7))
    with force_kernel_backend(backend):
        logprobs, entropy = linear_logprobs(hidden, weight, labels, with_entropy=True, chunk_size=16)
        # entropy_weight None: the entropy is a metric only (detached, as the policy losses do without a bonus)
        bonus = entropy.detach().sum() * 0 if entropy_weight is None else entropy_weight * (entropy * upstream.flip(0)).sum()
        ((logprobs * upstream).sum() + bonus).backward()
    return logprobs.detach(), entropy.detach(), hidden.grad, weight.grad


@pytest.mark.parametrize("entropy_weight", [None, 0.3])
def test_linear_logprobs_torch_backend_same_bits_as_reference(entropy_weight):
    hidden, weight, labels = random_logprob_problem(53, 24, 301, torch.float32, seed=3)
    got = _step("torch", hidden, weight, labels, entropy_weight)
    want = _step("reference", hidden, weight, labels, entropy_weight)
    for name, a, b in zip(("logprobs", "entropy", "grad_hidden", "grad_weight"), got, want):
        _same_bits(a, b, name)


def test_unread_entropy_skips_its_backward(monkeypatch):
    """Without an entropy term in the loss the torch backend's backward gets no entropy gradient (the
    reference materialises a zero one and computes through it) and the gradients are those of the
    op called without entropy at all."""
    seen = []
    for module in (inplace, reference):
        original = module.chunk_grad_logits
        monkeypatch.setattr(module, "chunk_grad_logits",
                            lambda *a, _f=original, _m=module.__name__: seen.append((_m, a[5] is None)) or _f(*a))
    hidden, weight, labels = random_logprob_problem(20, 16, 97, torch.float32, seed=4)
    got = _step("torch", hidden, weight, labels, None)
    _step("reference", hidden, weight, labels, None)
    assert {s for s in seen if s[0].endswith("inplace")} == {("care_megatron.kernels.logprobs.inplace", True)}
    assert {s for s in seen if s[0].endswith("reference")} == {("care_megatron.kernels.logprobs.reference", False)}
    plain_hidden = hidden.detach().clone().requires_grad_()
    plain_weight = weight.detach().clone().requires_grad_()
    with force_kernel_backend("torch"):
        logprobs, _ = linear_logprobs(plain_hidden, plain_weight, labels, chunk_size=16)
    upstream = torch.randn(20, generator=torch.Generator().manual_seed(7))
    (logprobs * upstream).sum().backward()
    assert torch.equal(got[2], plain_hidden.grad) and torch.equal(got[3], plain_weight.grad)


def test_cpu_default_is_the_torch_backend():
    from care_megatron.kernels._dispatch import get_kernel_backend, resolve_backend

    if get_kernel_backend() == "auto":
        assert resolve_backend(torch.device("cpu")) == "torch"
