"""Helpers shared by the kernel tests (unique module name: tests have no packages)."""
import torch


def assert_close_finite(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float, what: str = ""):
    """assert_close that can never pass on NaN / inf (in either tensor)."""
    assert torch.isfinite(actual).all(), f"{what}: non-finite values in the tested output"
    assert torch.isfinite(expected).all(), f"{what}: non-finite values in the expected output"
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def random_logprob_problem(num_tokens: int, hidden_size: int, vocab_size: int, dtype: torch.dtype, seed: int, ignore_every: int = 7):
    """Fresh random (hidden, weight, labels) with some ignored labels (-100) and logits of O(1-10)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=generator)
    weight = torch.randn(vocab_size, hidden_size, generator=generator) * (2.0 / hidden_size**0.5)
    labels = torch.randint(0, vocab_size, (num_tokens,), generator=generator)
    labels[::ignore_every] = -100
    return hidden.to(dtype), weight.to(dtype), labels
