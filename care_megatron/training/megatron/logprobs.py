"""Vocab-parallel per-token log-probs and entropy, chunked over tokens, fused with the output layer.

Each tensor-parallel rank holds rows ``[vocab_start, vocab_start + V_local)`` of the output matrix.
For a chunk of tokens the rank forms only its [chunk, V_local] logits (fp32), and three small
all-reduces over the TP group (max; then sum-exp, target logit and sum p*z together) give

    log p(y) = z_y - logZ,     H = logZ - sum_v p_v z_v,     logZ = m + log sum_v exp(z_v - m)

No rank ever sees the full vocabulary and fp32 logits exist for one chunk at a time: the backward
recomputes each chunk's logits instead of storing them (memory O(chunk * V_local), not O(T * V)).

Gradients (per token, ``g`` = incoming grads of log p and of H):

    dL/dz_v = g_lp * (1[v = y] - p_v) - g_H * p_v * (log p_v + H)

then dL/dh = sum over ranks of dL/dz @ W_local (all-reduced here unless the caller's sequence-parallel
gather already reduces it) and dL/dW_local = dL/dz^T @ h.

On CUDA :func:`vocab_parallel_logprobs` runs the fused Triton op instead
(``care_megatron.kernels.vocab_parallel_linear_logprobs``: logits only in the parameter dtype, one
chunk at a time, no fp32 [chunk, V_local] temporaries); this module's torch implementation is the
CPU path and the reference it is tested against.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _VocabParallelLogprobEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_start, valid_rows, group, chunk_size, with_entropy, reduce_grad_input,
                inv_temperature):
        n = hidden.shape[0]
        w = weight[:valid_rows]
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        log_norm = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            z = (hidden[start:end] @ w.t()).float() * inv_temperature     # [c, V_local]
            if valid_rows > 0:
                chunk_max = z.max(dim=-1).values
            else:
                chunk_max = torch.full((end - start,), float("-inf"), device=z.device)
            _all_reduce(chunk_max, dist.ReduceOp.MAX, group)
            e = torch.exp(z - chunk_max[:, None])
            local = targets[start:end] - vocab_start
            in_range = (local >= 0) & (local < valid_rows)
            target_logit = torch.where(in_range, z.gather(1, local.clamp(0, max(valid_rows - 1, 0))[:, None]).squeeze(1)
                                       if valid_rows > 0 else torch.zeros_like(chunk_max), torch.zeros_like(chunk_max))
            sums = torch.stack([e.sum(-1), target_logit, (e * z).sum(-1) if with_entropy else torch.zeros_like(chunk_max)])
            _all_reduce(sums, dist.ReduceOp.SUM, group)
            lz = chunk_max + torch.log(sums[0])
            log_norm[start:end] = lz
            logprobs[start:end] = sums[1] - lz
            if with_entropy:
                entropy[start:end] = lz - sums[2] / sums[0]
        ctx.save_for_backward(hidden, weight, targets, log_norm, entropy)
        ctx.config = (vocab_start, valid_rows, group, chunk_size, with_entropy, reduce_grad_input, inv_temperature)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, log_norm, entropy = ctx.saved_tensors
        vocab_start, valid_rows, group, chunk_size, with_entropy, reduce_grad_input, inv_temperature = ctx.config
        n = hidden.shape[0]
        w = weight[:valid_rows]
        grad_hidden = torch.zeros_like(hidden, dtype=torch.float32)
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        use_entropy = with_entropy and grad_entropy is not None and grad_entropy.numel() > 0
        if valid_rows > 0:
            for start in range(0, n, chunk_size):
                end = min(start + chunk_size, n)
                h = hidden[start:end]
                z = (h @ w.t()).float() * inv_temperature
                logp = z - log_norm[start:end, None]
                p = torch.exp(logp)
                g_lp = grad_logprobs[start:end] if grad_logprobs is not None else torch.zeros(end - start, device=z.device)
                grad_z = -g_lp[:, None] * p
                local = targets[start:end] - vocab_start
                in_range = (local >= 0) & (local < valid_rows)
                rows = in_range.nonzero(as_tuple=True)[0]
                grad_z[rows, local[rows]] += g_lp[rows]
                if use_entropy:
                    grad_z -= grad_entropy[start:end, None] * p * (logp + entropy[start:end, None])
                if inv_temperature != 1.0:
                    grad_z = grad_z * inv_temperature  # chain rule through z = (h W^T) / temperature
                grad_z = grad_z.to(w.dtype)  # matmuls in the parameter dtype (bf16 tensor cores on GPU)
                grad_hidden[start:end] = grad_z @ w
                grad_w += grad_z.t() @ h
        if reduce_grad_input:
            _all_reduce(grad_hidden, dist.ReduceOp.SUM, group)
        full_grad_w = torch.zeros_like(weight)
        full_grad_w[:valid_rows] = grad_w.to(weight.dtype)
        return grad_hidden.to(hidden.dtype), full_grad_w, None, None, None, None, None, None, None, None


def vocab_parallel_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                            vocab_start: int, vocab_size: int, group=None, chunk_size: int = 2048,
                            with_entropy: bool = False, reduce_grad_input: bool = True, temperature: float = 1.0,
                            implementation: str | None = None):
    """Log-prob of ``targets`` and (optionally) entropy under ``softmax(hidden @ W^T / temperature)`` over the full vocab.

    hidden [N, H] (identical on every TP rank); weight [V_local, H] this rank's rows starting at
    global row ``vocab_start``; rows at global index >= ``vocab_size`` are padding and excluded;
    targets [N] global ids. Returns (logprobs [N] fp32, entropy [N] fp32 or None), differentiable in
    hidden and weight. ``reduce_grad_input=False`` when the caller's op already sums the hidden
    gradient over TP (sequence-parallel gather). ``implementation``: ``fused`` (the Triton op; the
    default on CUDA) or ``torch`` (this module; the default elsewhere).
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V_local, H] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    valid_rows = max(0, min(weight.shape[0], vocab_size - vocab_start))
    implementation = implementation or ("fused" if hidden.is_cuda else "torch")
    if implementation not in ("fused", "torch"):
        raise ValueError(f"implementation must be 'fused' or 'torch', got {implementation!r}")
    if implementation == "fused" and valid_rows > 0:  # a shard of padding only (toy vocabularies) takes the torch path
        from care_megatron.kernels import vocab_parallel_linear_logprobs

        return vocab_parallel_linear_logprobs(hidden, weight, targets, vocab_start, group, temperature=temperature,
                                              chunk_size=chunk_size, with_entropy=with_entropy, vocab_size=vocab_size,
                                              reduce_grad_input=reduce_grad_input)
    logprobs, entropy = _VocabParallelLogprobEntropy.apply(hidden, weight, targets, vocab_start, valid_rows, group,
                                                           chunk_size, with_entropy, reduce_grad_input, 1.0 / float(temperature))
    return logprobs, (entropy if with_entropy else None)


def reference_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                       temperature: float = 1.0):
    """Full-vocabulary reference: (log_softmax(h W^T / temperature)[y], entropy), fp32, for tests."""
    logits = (hidden @ weight[:vocab_size].t()).float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(1, targets[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)
