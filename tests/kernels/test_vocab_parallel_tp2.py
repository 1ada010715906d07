"""The fused (Triton) vocabulary-parallel log-prob op equals the Megatron path's torch implementation
(``training/megatron/logprobs.py``) at TP=2, with and without sequence parallelism: values, entropy,
weight-shard gradients, and the hidden gradient (all-reduced without SP; each rank's partial, summed
by the caller's reduce-scatter, with SP). Padded vocabulary rows stay out of the softmax. Runs the
Triton kernels in the interpreter, in two spawned gloo processes."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import _vocab_parallel_worker as w

pytest.importorskip("megatron.core")


def _full_reference():
    """Single process, full unpadded vocabulary, autograd through log_softmax."""
    hidden, weight, targets, grad_logprobs, grad_entropy = w.problem()
    hidden = hidden.clone().requires_grad_(True)
    logits = (hidden @ weight[:w.VOCAB].t()) / w.TEMPERATURE
    logp = torch.log_softmax(logits, -1)
    logprobs = logp.gather(1, targets[:, None]).squeeze(1)
    entropy = -(logp.exp() * logp).sum(-1)
    (logprobs * grad_logprobs + entropy * grad_entropy).sum().backward()
    return logprobs.detach(), entropy.detach(), hidden.grad


@pytest.mark.distributed
@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU present: the gpu-marked tests cover the compiled kernels")
def test_fused_vocab_parallel_logprobs_match_torch_path_tp2(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the spawned workers import triton fresh, interpreted
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(w.worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    saved = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(2)]
    assert all(r["interpreter"] for r in saved)
    for sequence_parallel in (False, True):
        ranks = [{impl: r[sequence_parallel, impl] for impl in ("torch", "fused")} for r in saved]
        _check(ranks, sequence_parallel)


def _check(ranks, sequence_parallel):
    expected_lp, expected_entropy, expected_grad_hidden = _full_reference()
    for rank, result in enumerate(ranks):
        fused, reference = result["fused"], result["torch"]
        for key in ("logprobs", "entropy", "grad_hidden", "grad_weight"):
            torch.testing.assert_close(fused[key], reference[key], atol=2e-5, rtol=2e-5, msg=lambda m: f"{key} rank {rank} SP={sequence_parallel}: {m}")
        torch.testing.assert_close(fused["logprobs"], expected_lp, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(fused["entropy"], expected_entropy, atol=2e-5, rtol=2e-5)
    padding_rows = ranks[1]["fused"]["grad_weight"][w.VOCAB - w.PADDED_VOCAB // 2:]
    assert padding_rows.shape[0] == 14 and not padding_rows.any()
    if sequence_parallel:  # each rank holds its vocabulary shard's part; the caller's reduce-scatter sums them
        summed = ranks[0]["fused"]["grad_hidden"] + ranks[1]["fused"]["grad_hidden"]
        torch.testing.assert_close(summed, expected_grad_hidden, atol=2e-5, rtol=2e-5)
        assert not torch.allclose(ranks[0]["fused"]["grad_hidden"], expected_grad_hidden, atol=1e-3)
    else:
        for result in ranks:
            torch.testing.assert_close(result["fused"]["grad_hidden"], expected_grad_hidden, atol=2e-5, rtol=2e-5)
