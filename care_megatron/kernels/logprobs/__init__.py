"""Fused LM-head log-probs: ``log p(label | hidden)`` without fp32 ``[T, V]`` logits.

The naive path (full logits -> fp32 -> log-softmax -> gather) holds several fp32 copies of a
``[T, 152k]`` tensor, which dominates memory and a large share of the step time (issue #6). This
op walks the tokens in chunks of ``chunk_size``: each chunk's logits are produced by one matmul in
the input dtype, reduced to four fp32 numbers per token by a fused kernel (online logsumexp,
entropy term, target logit) and dropped. The backward recomputes each chunk's logits, turns them
in place into ``d loss / d logits = (onehot - softmax) * g / temperature`` (plus the entropy term)
and feeds two matmuls for the gradients of ``hidden`` and ``weight``. Peak extra memory is one
``[chunk_size, V]`` buffer in the input dtype (plus an fp32 ``[V, H]`` gradient accumulator when
``weight`` needs a gradient and is low precision).

Dispatch (see :mod:`care_megatron.kernels._dispatch`): the per-chunk arithmetic is Triton on CUDA
when triton imports, otherwise :mod:`.inplace` (the torch reference's operations, bit for bit, with
buffers reused); ``force_kernel_backend`` pins any of them, ``"reference"`` the textbook twin.

Vocabulary-parallel building blocks: :func:`linear_logprob_partials` returns the per-shard partials
(max, sumexp, weighted shift sum, target logit) of a vocabulary slice, and
:func:`combine_vocab_parallel_partials` documents and implements the exact combine a tensor-
parallel group performs with all-reduces; :func:`vocab_parallel_linear_logprobs` is the
differentiable op doing both over a ``torch.distributed`` group.
"""
from __future__ import annotations

import torch

from care_megatron.kernels._dispatch import resolve_backend
from care_megatron.kernels.logprobs import inplace, reference
from care_megatron.kernels.logprobs.reference import (
    IGNORE_INDEX,
    combine_vocab_parallel_partials,
    naive_linear_logprobs,
)

DEFAULT_CHUNK_SIZE = 4096
"""Tokens per chunk: 4096 x 151936 bf16 logits is 1.2 GB, large enough for full-speed matmuls."""

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "IGNORE_INDEX",
    "combine_vocab_parallel_partials",
    "linear_logprob_partials",
    "linear_logprobs",
    "naive_linear_logprobs",
    "vocab_parallel_linear_logprobs",
]


def _chunk_ops(backend: str):
    if backend == "triton":
        from care_megatron.kernels.logprobs import triton as triton_ops

        return triton_ops
    return inplace if backend == "torch" else reference


def _local_labels(labels: torch.Tensor, vocab_start: int, vocab_size: int, ignore_index: int) -> torch.Tensor:
    """Labels as indices into the slice [vocab_start, vocab_start + vocab_size), -1 outside it."""
    local = labels.long() - vocab_start
    outside = (local < 0) | (local >= vocab_size) | (labels == ignore_index)
    return local.masked_fill(outside, -1)


def _validate(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, temperature: float, chunk_size: int):
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"hidden must be [T, H] and weight [V, H]; got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden size mismatch: hidden {tuple(hidden.shape)} vs weight {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"labels must be [T]={hidden.shape[0]}; got {tuple(labels.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive; got {chunk_size}")


def _all_reduce_partials(row_max, sumexp, weighted, target, group):
    """The vocab-parallel combine of :func:`combine_vocab_parallel_partials`, with all-reduces."""
    import torch.distributed as dist

    global_max = row_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    shift = row_max - global_max
    rescale = shift.exp()
    packed = torch.stack([sumexp * rescale, rescale * (weighted + shift * sumexp), target])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    total_sumexp, total_weighted, total_target = packed.unbind(0)
    logsumexp = global_max + total_sumexp.log()
    return total_target - logsumexp, total_sumexp.log() - total_weighted / total_sumexp, logsumexp


FP32_OUTPUT_ADDMM: bool | None = None
"""Whether ``torch.addmm(..., out_dtype=torch.float32)`` (bf16 inputs, fp32 accumulator, CUDA only)
worked here; None until first tried. When it does not, the product is formed in the input dtype
and added (one extra [V, H] temporary per chunk)."""


def _addmm_into_fp32(accumulator: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                     try_fp32_output: bool | None = None) -> None:
    """accumulator (fp32) += left @ right (low precision), without a low-precision [V, H] temporary
    where torch supports a fp32-output matmul (tried on CUDA unless ``try_fp32_output`` says).

    Out of memory is raised, not taken for "unsupported": the fallback needs more memory, and
    switching to it for good would hide a transient peak."""
    global FP32_OUTPUT_ADDMM
    if try_fp32_output is None:
        try_fp32_output = accumulator.is_cuda
    if try_fp32_output and FP32_OUTPUT_ADDMM is not False:
        try:
            torch.addmm(accumulator, left, right, out_dtype=torch.float32, out=accumulator)
            FP32_OUTPUT_ADDMM = True
            return
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError, NotImplementedError):
            FP32_OUTPUT_ADDMM = False
    accumulator += left @ right


class _ChunkedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk_size, with_entropy, backend, ignore_index, vocab_start, group,
                reduce_grad_input=True):
        ops = _chunk_ops(backend)
        # An output no loss term reads (the entropy when the entropy bonus is off) then reaches backward
        # as None, and its [T, V] term is skipped. The textbook reference keeps autograd's default
        # (a zero gradient, computed through), which is what tools/bench_throughput compares against.
        ctx.set_materialize_grads(backend == "reference")
        num_tokens, vocab_size = hidden.shape[0], weight.shape[0]
        local_labels = _local_labels(labels, vocab_start, vocab_size, ignore_index)
        partials = [torch.empty(num_tokens, dtype=torch.float32, device=hidden.device) for _ in range(4)]
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            logits = hidden[start:end] @ weight.t()
            for output, value in zip(partials, ops.chunk_partials(logits, local_labels[start:end], temperature)):
                output[start:end] = value
            del logits
        if group is None:
            logprobs, entropy, logsumexp = combine_vocab_parallel_partials(*(p.unsqueeze(0) for p in partials))
            # labels outside [0, V) count as ignored: checking them here would cost a host sync
            ignored = local_labels < 0
        else:
            logprobs, entropy, logsumexp = _all_reduce_partials(*partials, group)
            ignored = (labels == ignore_index) | (labels < 0)
        logprobs.masked_fill_(ignored, 0.0)
        # E[z] = logsumexp - H is what the entropy gradient needs; keep it instead of H
        mean_logit = logsumexp - entropy
        entropy = entropy.masked_fill_(ignored, 0.0) if with_entropy else None
        ctx.save_for_backward(hidden, weight, local_labels, ignored, logsumexp, mean_logit)
        ctx.temperature, ctx.chunk_size, ctx.with_entropy, ctx.backend, ctx.group = temperature, chunk_size, with_entropy, backend, group
        ctx.reduce_grad_input = reduce_grad_input
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, local_labels, ignored, logsumexp, mean_logit = ctx.saved_tensors
        ops = _chunk_ops(ctx.backend)
        num_tokens = hidden.shape[0]
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if grad_logprobs is None:
            grad_logprobs = torch.zeros_like(logsumexp)
        # ignored tokens carry no gradient (their outputs are constant 0)
        grad_logprobs = grad_logprobs.float().masked_fill(ignored, 0.0)
        if not ctx.with_entropy or grad_entropy is None:
            grad_entropy, mean_logit = None, None
        else:
            grad_entropy = grad_entropy.float().masked_fill(ignored, 0.0)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        accumulate_fp32 = need_weight and weight.dtype != torch.float32
        grad_weight = None
        if need_weight:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32 if accumulate_fp32 else weight.dtype, device=weight.device)
        for start in range(0, num_tokens, ctx.chunk_size):
            end = min(start + ctx.chunk_size, num_tokens)
            hidden_chunk = hidden[start:end]
            logits = hidden_chunk @ weight.t()
            grad_logits = ops.chunk_grad_logits(
                logits,
                local_labels[start:end],
                logsumexp[start:end],
                None if mean_logit is None else mean_logit[start:end],
                grad_logprobs[start:end].contiguous(),
                None if grad_entropy is None else grad_entropy[start:end].contiguous(),
                ctx.temperature,
            )
            if need_hidden:
                torch.mm(grad_logits, weight, out=grad_hidden[start:end])
            if need_weight:
                if accumulate_fp32:
                    _addmm_into_fp32(grad_weight, grad_logits.t(), hidden_chunk)
                else:
                    grad_weight.addmm_(grad_logits.t(), hidden_chunk)
            del logits, grad_logits
        if accumulate_fp32:
            grad_weight = grad_weight.to(weight.dtype)
        if need_hidden and ctx.group is not None and ctx.reduce_grad_input:
            import torch.distributed as dist

            # each shard saw only its vocabulary rows: the hidden gradient is the sum over shards
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None, None


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = False,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token ``log softmax(hidden @ weight.T / temperature)[label]`` and entropy, chunked.

    hidden [T, H] and weight [V, H] (same dtype, bf16 or fp32), labels [T] int (``ignore_index``,
    or any id outside [0, V), -> log-prob 0, entropy 0, no gradient). Returns (logprobs [T] fp32, entropy [T] fp32 or None).
    Differentiable wrt hidden and weight (and through entropy). The caller shifts: to score
    ``input_ids[t]`` pass the hidden state of position t - 1 (data/batch.py alignment).
    """
    _validate(hidden, weight, labels, temperature, chunk_size)
    backend = resolve_backend(hidden.device)
    return _ChunkedLinearLogprobs.apply(
        hidden, weight, labels, float(temperature), int(chunk_size), bool(with_entropy), backend, int(ignore_index), 0, None
    )


def vocab_parallel_linear_logprobs(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    vocab_start: int,
    process_group,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    with_entropy: bool = False,
    ignore_index: int = IGNORE_INDEX,
    vocab_size: int | None = None,
    reduce_grad_input: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`linear_logprobs` for a vocabulary sharded over a tensor-parallel group.

    Every rank passes the same (replicated) ``hidden`` [T, H] and labels [T] (global ids) and its
    own ``weight_shard`` [V_s, H] = rows [vocab_start, vocab_start + V_s) of the LM head. Forward:
    local chunked partials, then one MAX and one SUM all-reduce of [T]-sized tensors (never a
    gathered vocabulary). Backward: the local logits gradient uses the global logsumexp, the
    weight-shard gradient stays local. Returns the same values on every rank: (logprobs [T] fp32,
    entropy [T] fp32 or None); labels < 0 are ignored.

    ``vocab_size``: the real (unpadded) vocabulary; rows at global index >= ``vocab_size`` are
    Megatron's padding and stay out of the softmax (their gradient is zero). None: every row counts.
    ``reduce_grad_input``: all-reduce (SUM) the hidden gradient over the group, as Megatron's
    column-parallel output layer does without sequence parallelism. False under sequence
    parallelism, where the caller's gather of ``hidden`` reduce-scatters its gradient itself
    (reducing here too would count it TP times).
    """
    _validate(hidden, weight_shard, labels, temperature, chunk_size)
    if vocab_size is not None:
        valid_rows = min(weight_shard.shape[0], vocab_size - vocab_start)
        if valid_rows <= 0:
            raise ValueError(f"vocab_parallel_linear_logprobs: shard at vocab_start={vocab_start} holds only padding "
                             f"(vocab_size={vocab_size}); use care_megatron.training.megatron.logprobs")
        weight_shard = weight_shard[:valid_rows]  # the slice's backward gives the padding rows zero gradient
    backend = resolve_backend(hidden.device)
    return _ChunkedLinearLogprobs.apply(
        hidden, weight_shard, labels, float(temperature), int(chunk_size), bool(with_entropy), backend,
        int(ignore_index), int(vocab_start), process_group, bool(reduce_grad_input),
    )


@torch.no_grad()
def linear_logprob_partials(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    labels: torch.Tensor,
    vocab_start: int,
    temperature: float = 1.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax partials of one vocabulary shard, for a vocab-parallel (tensor-parallel) LM head.

    weight_shard [V_s, H] holds vocabulary rows [vocab_start, vocab_start + V_s); labels are global
    ids. Returns fp32 [T] tensors (row_max, sumexp, weighted_shift_sum, target_logit), target_logit
    being 0 where the label is not in this shard. A TP group combines them with
    all_reduce(MAX) on row_max, then all_reduce(SUM) of ``sumexp * exp(row_max - M)``,
    ``exp(row_max - M) * (weighted + (row_max - M) * sumexp)`` and target_logit; the formula is
    :func:`combine_vocab_parallel_partials`. No gradient; :func:`vocab_parallel_linear_logprobs`
    is the differentiable op that performs the combine itself.
    """
    _validate(hidden, weight_shard, labels, temperature, chunk_size)
    ops = _chunk_ops(resolve_backend(hidden.device))
    local_labels = _local_labels(labels, vocab_start, weight_shard.shape[0], ignore_index)
    outputs = [torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device) for _ in range(4)]
    for start in range(0, hidden.shape[0], chunk_size):
        end = min(start + chunk_size, hidden.shape[0])
        logits = hidden[start:end] @ weight_shard.t()
        for output, value in zip(outputs, ops.chunk_partials(logits, local_labels[start:end], temperature)):
            output[start:end] = value
    return tuple(outputs)
