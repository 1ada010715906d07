"""Triton kernels for the chunked LM-head log-prob (same contract as ``reference.py``).

The matmul of a chunk (``hidden_chunk @ weight.T``) stays in cuBLAS, in the input dtype (bf16 on
GPU, fp32 accumulation inside cuBLAS). These kernels replace everything that would otherwise
materialise fp32 ``[C, V]`` tensors: one program per token row streams the row's logits in
vocabulary tiles, keeping an online (max, sumexp, weighted-shift-sum) in fp32 registers, and the
backward kernel overwrites the logits buffer in place with d loss / d logits.

Kernels are plain functions, turned into Triton kernels per device by
:func:`care_megatron.kernels._dispatch.jit_for_device` (interpreted on CPU tensors).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from care_megatron.kernels._dispatch import jit_for_device


def _logprob_partials_kernel(
    logits_ptr,
    logits_row_stride,
    local_labels_ptr,
    row_max_ptr,
    sumexp_ptr,
    weighted_ptr,
    target_ptr,
    vocab_size,
    inv_temperature,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    label = tl.load(local_labels_ptr + row)
    lane = tl.arange(0, BLOCK_V)
    # scalar running state, built from reductions so its type is fixed across loop iterations
    running_max = tl.max(tl.full([BLOCK_V], float("-inf"), tl.float32), axis=0)
    running_sum = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
    running_weighted = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
    target = tl.sum(tl.zeros([BLOCK_V], tl.float32), axis=0)
    for start in range(0, vocab_size, BLOCK_V):
        cols = start + lane
        valid = cols < vocab_size
        z = tl.load(row_ptr + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_temperature
        new_max = tl.maximum(running_max, tl.max(z, axis=0))
        # before the first finite value running_max is -inf and the old sums are 0: shift 0
        old_shift = tl.where(running_max == float("-inf"), 0.0, running_max - new_max)
        rescale = tl.exp(old_shift)
        alive = z > float("-inf")
        # masked lanes (and -inf logits) get shift 0 and weight 0 instead of -inf - -inf = nan
        shifted = tl.where(alive, z - new_max, 0.0)
        exp_shifted = tl.where(alive, tl.exp(shifted), 0.0)
        running_weighted = rescale * (running_weighted + old_shift * running_sum) + tl.sum(
            exp_shifted * shifted, axis=0
        )
        running_sum = running_sum * rescale + tl.sum(exp_shifted, axis=0)
        target += tl.sum(tl.where(cols == label, z, 0.0), axis=0)
        running_max = new_max
    tl.store(row_max_ptr + row, running_max)
    tl.store(sumexp_ptr + row, running_sum)
    tl.store(weighted_ptr + row, running_weighted)
    tl.store(target_ptr + row, target)


def _logprob_grad_kernel(
    logits_ptr,
    logits_row_stride,
    local_labels_ptr,
    logsumexp_ptr,
    mean_logit_ptr,
    grad_logprobs_ptr,
    grad_entropy_ptr,
    vocab_size,
    inv_temperature,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    label = tl.load(local_labels_ptr + row)
    logsumexp = tl.load(logsumexp_ptr + row)
    grad_logprob = tl.load(grad_logprobs_ptr + row)
    if WITH_ENTROPY:
        mean_logit = tl.load(mean_logit_ptr + row)
        grad_entropy = tl.load(grad_entropy_ptr + row)
    lane = tl.arange(0, BLOCK_V)
    for start in range(0, vocab_size, BLOCK_V):
        cols = start + lane
        valid = cols < vocab_size
        z = tl.load(row_ptr + cols, mask=valid, other=0.0).to(tl.float32) * inv_temperature
        probs = tl.exp(z - logsumexp)
        grad_z = tl.where(cols == label, grad_logprob, 0.0) - probs * grad_logprob
        if WITH_ENTROPY:
            grad_z -= grad_entropy * probs * (z - mean_logit)
        grad_logits = grad_z * inv_temperature
        tl.store(row_ptr + cols, grad_logits.to(logits_ptr.dtype.element_ty), mask=valid)


def _block_v(vocab_size: int, device: torch.device) -> int:
    # interpreter: one big tile is fastest (numpy vectorises it); GPU: 4096 fp32 values per tile
    # keeps registers bounded (16 per thread at 8 warps) while amortising the loop overhead.
    if device.type != "cuda":
        return min(triton.next_power_of_2(vocab_size), 1 << 16)
    return min(triton.next_power_of_2(vocab_size), 4096)


def chunk_partials(
    logits: torch.Tensor, local_labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`care_megatron.kernels.logprobs.reference.chunk_partials`."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    rows, vocab_size = logits.shape
    outputs = [torch.empty(rows, dtype=torch.float32, device=logits.device) for _ in range(4)]
    if rows == 0:
        return tuple(outputs)
    row_max, sumexp, weighted, target = outputs
    kernel = jit_for_device(_logprob_partials_kernel, logits.device)
    kernel[(rows,)](
        logits,
        logits.stride(0),
        local_labels.contiguous(),
        row_max,
        sumexp,
        weighted,
        target,
        vocab_size,
        1.0 / temperature,
        BLOCK_V=_block_v(vocab_size, logits.device),
        **({"num_warps": 8} if logits.device.type == "cuda" else {}),
    )
    return row_max, sumexp, weighted, target


def chunk_grad_logits(
    logits: torch.Tensor,
    local_labels: torch.Tensor,
    logsumexp: torch.Tensor,
    mean_logit: torch.Tensor | None,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """Triton twin of :func:`care_megatron.kernels.logprobs.reference.chunk_grad_logits` (in place)."""
    if logits.stride(-1) != 1:
        raise ValueError("logits: the in-place gradient kernel needs a unit stride on the vocabulary axis")
    rows, vocab_size = logits.shape
    if rows == 0:
        return logits
    with_entropy = grad_entropy is not None
    kernel = jit_for_device(_logprob_grad_kernel, logits.device)
    kernel[(rows,)](
        logits,
        logits.stride(0),
        local_labels.contiguous(),
        logsumexp.contiguous(),
        mean_logit.contiguous() if with_entropy else logsumexp,
        grad_logprobs.contiguous(),
        grad_entropy.contiguous() if with_entropy else grad_logprobs,
        vocab_size,
        1.0 / temperature,
        WITH_ENTROPY=with_entropy,
        BLOCK_V=_block_v(vocab_size, logits.device),
        **({"num_warps": 8} if logits.device.type == "cuda" else {}),
    )
    return logits
