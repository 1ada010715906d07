"""The fp32-output addmm of the chunked log-prob backward: out of memory is raised, never taken for
"unsupported" (which would switch to the hungrier fallback for the rest of the run)."""
import pytest
import torch

from care_megatron.kernels import logprobs as lp


@pytest.fixture(autouse=True)
def _fresh_flag(monkeypatch):
    monkeypatch.setattr(lp, "FP32_OUTPUT_ADDMM", None)


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.zeros(5, 3), torch.randn(5, 4, generator=g).to(torch.bfloat16), torch.randn(4, 3, generator=g).to(torch.bfloat16)


def test_out_of_memory_propagates_and_keeps_the_fast_path(monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch, "addmm", oom)
    acc, left, right = _inputs()
    with pytest.raises(torch.OutOfMemoryError):
        lp._addmm_into_fp32(acc, left, right, try_fp32_output=True)
    assert lp.FP32_OUTPUT_ADDMM is None  # still to be tried next time
    assert torch.equal(acc, torch.zeros(5, 3))


def test_unsupported_falls_back_once_with_the_same_sum(monkeypatch):
    calls = []

    def unsupported(*args, **kwargs):
        calls.append(kwargs.get("out_dtype"))
        raise RuntimeError("out_dtype is not supported for this device")

    monkeypatch.setattr(torch, "addmm", unsupported)
    acc, left, right = _inputs()
    lp._addmm_into_fp32(acc, left, right, try_fp32_output=True)
    assert lp.FP32_OUTPUT_ADDMM is False and calls == [torch.float32]
    assert torch.equal(acc, (left @ right).float())
    lp._addmm_into_fp32(acc, left, right, try_fp32_output=True)  # not tried again
    assert calls == [torch.float32]
    assert torch.equal(acc, 2 * (left @ right).float())
