"""Torch reference for the fused LM-head log-prob: readable, runs anywhere.

Two things live here:

* :func:`naive_linear_logprobs`, the textbook path (full ``[T, V]`` logits -> fp32 ->
  log-softmax -> gather). It is the ground truth of the parity tests and the baseline of
  ``tools/bench_kernels.py``; it materialises fp32 logits for the whole batch, which is exactly what
  the fused op avoids.
* :func:`chunk_partials` / :func:`chunk_grad_logits`, the per-chunk arithmetic of the chunked op in
  plain torch. The chunk loop (``care_megatron.kernels.logprobs``) calls either these or their
  Triton twins in ``triton.py``; both must agree to the tolerances of ``tests/kernels``.

Partials of one row of (scaled) logits ``z = logits / temperature`` over a vocabulary slice:
``m = max_j z_j``, ``s = sum_j exp(z_j - m)``, ``a = sum_j exp(z_j - m) (z_j - m)``,
``target = z_label`` (0 when the label lies outside the slice). Then
``logsumexp = m + log s``, ``log p(label) = target - logsumexp`` and the entropy
``H = log s - a / s``. Slices combine exactly (see :func:`combine_vocab_parallel_partials`).
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


def naive_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    with_entropy: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(label | hidden) through full fp32 logits (the memory-hungry baseline).

    hidden [T, H], weight [V, H], labels [T] (``ignore_index`` -> log-prob 0, entropy 0).
    Returns (logprobs [T] fp32, entropy [T] fp32 or None). Differentiable through torch autograd.
    """
    logits = (hidden @ weight.t()).float() / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    ignored = labels == ignore_index
    safe_labels = labels.masked_fill(ignored, 0)
    token_logprobs = log_probs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    token_logprobs = token_logprobs.masked_fill(ignored, 0.0)
    entropy = None
    if with_entropy:
        entropy = -(log_probs.exp() * log_probs).sum(-1).masked_fill(ignored, 0.0)
    return token_logprobs, entropy


def chunk_partials(
    logits: torch.Tensor, local_labels: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax partials of one chunk of logits over the (local) vocabulary.

    logits [C, V] any float dtype; local_labels [C] int64, an index into this vocabulary slice or
    -1 when the label is outside it (or ignored). Returns fp32 [C] tensors (max, sumexp,
    weighted_shift_sum, target_logit) as defined in the module docstring.
    """
    z = logits.float() / temperature
    row_max = z.max(dim=-1).values
    shifted = z - row_max.unsqueeze(-1)
    exp_shifted = shifted.exp()
    sumexp = exp_shifted.sum(-1)
    # exp(-inf) * (-inf) is nan: masked-out vocabulary entries contribute 0 to the entropy term
    weighted_shift_sum = torch.where(exp_shifted > 0, exp_shifted * shifted, torch.zeros_like(shifted)).sum(-1)
    in_slice = local_labels >= 0
    target = z.gather(-1, local_labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    target = torch.where(in_slice, target, torch.zeros_like(target))
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
    """d loss / d logits for one chunk, written over ``logits`` (same dtype) and returned.

    With p = softmax(z), z = logits / temperature, E[z] = ``mean_logit`` (= logsumexp - H):
    d logp_label / dz_j = 1[j = label] - p_j and d H / dz_j = -p_j (z_j - E[z]); the chain rule
    through the temperature divides by it. logsumexp, mean_logit, grad_* are fp32 [C].
    """
    z = logits.float() / temperature
    probs = (z - logsumexp.unsqueeze(-1)).exp()
    grad_z = -probs * grad_logprobs.unsqueeze(-1)
    in_slice = local_labels >= 0
    rows = torch.arange(z.shape[0], device=z.device)[in_slice]
    grad_z[rows, local_labels[in_slice]] += grad_logprobs[in_slice]
    if grad_entropy is not None:
        grad_z -= grad_entropy.unsqueeze(-1) * probs * (z - mean_logit.unsqueeze(-1))
    logits.copy_(grad_z / temperature)
    return logits


def combine_vocab_parallel_partials(
    row_max: torch.Tensor,
    sumexp: torch.Tensor,
    weighted_shift_sum: torch.Tensor,
    target_logit: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Combine per-shard softmax partials into log-probs, entropy and logsumexp.

    Inputs are stacked over shards: [S, T] each (shard s holds vocabulary slice s; ``target_logit``
    is 0 on every shard but the one owning the label). The combine, which is also what a tensor-
    parallel group does with all-reduces (MAX for the first line, SUM for the others):

        M = max_s m_s
        S = sum_s s_s exp(m_s - M)
        A = sum_s exp(m_s - M) (a_s + (m_s - M) s_s)
        logsumexp = M + log S;  log p = sum_s target_s - logsumexp;  H = log S - A / S

    Returns (logprobs [T], entropy [T], logsumexp [T]), all fp32.
    """
    global_max = row_max.max(dim=0).values
    shift = row_max - global_max.unsqueeze(0)
    rescale = shift.exp()
    total_sumexp = (sumexp * rescale).sum(0)
    total_weighted = (rescale * (weighted_shift_sum + shift * sumexp)).sum(0)
    logsumexp = global_max + total_sumexp.log()
    logprobs = target_logit.sum(0) - logsumexp
    entropy = total_sumexp.log() - total_weighted / total_sumexp
    return logprobs, entropy, logsumexp
