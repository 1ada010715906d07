"""The reference's per-chunk arithmetic with fewer ``[C, V]`` passes: the ``torch`` kernel backend.

:mod:`.reference` spells the chunk arithmetic out one expression at a time, which allocates a fresh
``[C, V]`` fp32 tensor for almost every operator (about five in the forward, seven in the
backward). On a CPU those passes, and the first touch of each fresh allocation, are most of the
LM-head cost of a small model. The functions here compute *the same floating-point operations in
the same order* (so the same bits: ``tests/kernels/test_logprobs.py`` asserts ``torch.equal``), but
reuse buffers in place:

* ``x / 1.0`` is ``x``: the temperature division is skipped at temperature 1;
* ``-p * g`` is ``p * (-g)`` and ``a * b`` is ``b * a`` (IEEE products are exact under sign and
  operand swaps), so products can be formed into a buffer that is no longer needed;
* ``where(e > 0, e * s, 0)`` is ``(s *= e).masked_fill_(~(e > 0), 0)``.

Both functions may overwrite ``logits`` (every caller passes a per-chunk temporary). This is the
default on CPU (and on CUDA without Triton); ``force_kernel_backend("reference")`` selects the
textbook twin, e.g. for ``tools/bench_throughput.py --compare-kernel-backend reference``.
"""
from __future__ import annotations

import torch


def chunk_partials(
    logits: torch.Tensor, local_labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`care_megatron.kernels.logprobs.reference.chunk_partials`, bit for bit; overwrites fp32 ``logits``."""
    z = logits.float()  # fp32 logits: the same tensor (then overwritten below)
    if temperature != 1.0:
        z = z / temperature
    in_slice = local_labels >= 0
    target = z.gather(-1, local_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    target = torch.where(in_slice, target, torch.zeros_like(target))
    row_max = z.max(dim=-1).values
    shifted = z.sub_(row_max.unsqueeze(-1))
    exp_shifted = shifted.exp()
    sumexp = exp_shifted.sum(-1)
    # exp(-inf) * (-inf) is nan: masked-out vocabulary entries contribute 0 to the entropy term
    weighted_shift_sum = shifted.mul_(exp_shifted).masked_fill_(~(exp_shifted > 0), 0.0).sum(-1)
    return row_max, sumexp, weighted_shift_sum, target


def chunk_grad_logits(
    logits: torch.Tensor,
    local_labels: torch.Tensor,
    logsumexp: torch.Tensor,
    mean_logit: torch.Tensor | None,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """:func:`care_megatron.kernels.logprobs.reference.chunk_grad_logits`, bit for bit: d loss / d logits
    written over ``logits`` and returned."""
    fp32 = logits.dtype == torch.float32
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    probs = torch.sub(z, logsumexp.unsqueeze(-1)).exp_()
    centred = None if grad_entropy is None else torch.sub(z, mean_logit.unsqueeze(-1))
    # z is not read again: the gradient goes straight into logits when they are fp32
    grad_z = logits if fp32 else torch.empty_like(probs)
    torch.mul(probs, grad_logprobs.neg().unsqueeze(-1), out=grad_z)
    in_slice = local_labels >= 0
    rows = torch.arange(grad_z.shape[0], device=grad_z.device)[in_slice]
    grad_z[rows, local_labels[in_slice]] += grad_logprobs[in_slice]
    if grad_entropy is not None:
        grad_z.sub_(probs.mul_(grad_entropy.unsqueeze(-1)).mul_(centred))
    if temperature != 1.0:
        grad_z.div_(temperature)
    if not fp32:
        logits.copy_(grad_z)
    return logits
