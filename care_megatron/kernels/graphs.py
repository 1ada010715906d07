"""CUDA-graph capture of fused ops for static, bucketed token counts.

A packed micro-batch has a different token count every step, and a CUDA graph replays fixed
shapes. :class:`StaticShapeGraph` rounds the token count up to the next bucket, copies the inputs
into that bucket's static buffers (padding the tail with per-argument pad values chosen so padded
tokens contribute nothing, e.g. ``loss_mask = False``, ``label = -100``), replays the graph captured
for the bucket and returns the outputs cut back to the real length. Graphs are captured lazily,
once per (bucket, input dtypes) and share one memory pool. Off CUDA it calls the function eagerly on
the unpadded inputs, so the same code runs on CPU.

Parameters (LM-head weight...) are not inputs: close over them in the captured function; an
optimizer updating them in place is seen by every replay.

:class:`GraphedRegionLoss` applies this to :func:`care_megatron.kernels.region_policy_loss`: one
graph runs the forward *and* the backward kernel (for a unit output gradient), and an autograd
function hands the stored gradient, scaled, to ``loss.backward()``.
"""
from __future__ import annotations

import bisect
from typing import Callable, Sequence

import torch

DEFAULT_TOKEN_BUCKETS = tuple(1 << k for k in range(10, 18))
"""1k .. 128k tokens: powers of two waste at most half a bucket, and eight graphs cover a run."""


class StaticShapeGraph:
    """Capture ``fn(*tensors) -> tensor | tuple[tensor, ...]`` per token-count bucket and replay it.

    Every non-scalar input has the token axis first, all of the same length T; 0-dim inputs
    (normalisers...) are copied as they are. Outputs whose first dimension is the bucket size are
    cut to T; others (scalars, stats) are returned whole. Outputs are clones unless
    ``clone_outputs=False`` (then they are the graph's buffers, overwritten by the next replay).
    """

    def __init__(
        self,
        fn: Callable,
        pad_values: Sequence[float | int | bool],
        bucket_sizes: Sequence[int] = DEFAULT_TOKEN_BUCKETS,
        warmup_iterations: int = 2,
        clone_outputs: bool = True,
    ):
        if not bucket_sizes or any(size <= 0 for size in bucket_sizes):
            raise ValueError(f"bucket_sizes must be positive token counts; got {bucket_sizes}")
        if warmup_iterations < 1:
            raise ValueError(f"warmup_iterations must be >= 1 (capture needs warmed-up kernels); got {warmup_iterations}")
        self.fn = fn
        self.pad_values = tuple(pad_values)
        self.bucket_sizes = tuple(sorted(set(int(size) for size in bucket_sizes)))
        self.warmup_iterations = warmup_iterations
        self.clone_outputs = clone_outputs
        self._graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], tuple, bool]] = {}
        self._pool = None
        self.captures = 0
        """How many graphs were captured (tests and logs: one per bucket and dtype signature)."""

    def bucket_for(self, num_tokens: int) -> int | None:
        """Smallest bucket holding ``num_tokens`` tokens, None when it exceeds the largest."""
        index = bisect.bisect_left(self.bucket_sizes, num_tokens)
        return self.bucket_sizes[index] if index < len(self.bucket_sizes) else None

    def __call__(self, *tensors: torch.Tensor):
        if len(tensors) != len(self.pad_values):
            raise ValueError(f"expected {len(self.pad_values)} inputs (one pad value each); got {len(tensors)}")
        token_inputs = [tensor for tensor in tensors if tensor.dim() > 0]
        if not token_inputs:
            raise ValueError("at least one input must have a token axis")
        num_tokens = token_inputs[0].shape[0]
        if any(tensor.shape[0] != num_tokens for tensor in token_inputs):
            raise ValueError(f"all token-axis inputs must share length {num_tokens}; got {[t.shape[0] for t in token_inputs]}")
        bucket = self.bucket_for(num_tokens)
        if not token_inputs[0].is_cuda or bucket is None or torch.cuda.is_current_stream_capturing():
            # CPU, or longer than every bucket: eager, still correct, just not replayed
            return self.fn(*tensors)
        signature = (bucket,) + tuple((t.dtype, tuple(t.shape[1:]), t.dim()) for t in tensors)
        if signature not in self._graphs:
            self._graphs[signature] = self._capture(bucket, tensors)
        graph, static_inputs, static_outputs, single = self._graphs[signature]
        with torch.no_grad():  # the static buffers must never join an autograd graph
            for static, tensor, pad in zip(static_inputs, tensors, self.pad_values):
                if tensor.dim() == 0:
                    static.copy_(tensor)
                else:
                    static[:num_tokens].copy_(tensor)
                    static[num_tokens:].fill_(pad)
        graph.replay()
        outputs = tuple(
            (out[:num_tokens] if out.dim() > 0 and out.shape[0] == bucket else out) for out in static_outputs
        )
        if self.clone_outputs:
            outputs = tuple(out.clone() for out in outputs)
        return outputs[0] if single else outputs

    def _capture(self, bucket: int, tensors: Sequence[torch.Tensor]):
        static_inputs = []
        tensors = [tensor.detach() for tensor in tensors]
        for tensor, pad in zip(tensors, self.pad_values):
            if tensor.dim() == 0:
                static_inputs.append(tensor.detach().clone())
            else:
                static = torch.full((bucket, *tensor.shape[1:]), pad, dtype=tensor.dtype, device=tensor.device)
                static[: tensor.shape[0]].copy_(tensor)
                static_inputs.append(static)
        # warm up on a side stream (Triton compiles, cuBLAS picks algorithms) before capturing
        side_stream = torch.cuda.Stream()
        side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side_stream):
            for _ in range(self.warmup_iterations):
                self.fn(*static_inputs)
        torch.cuda.current_stream().wait_stream(side_stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            outputs = self.fn(*static_inputs)
        single = isinstance(outputs, torch.Tensor)
        static_outputs = (outputs,) if single else tuple(outputs)
        self.captures += 1
        return graph, static_inputs, static_outputs, single


class _ReplayedLoss(torch.autograd.Function):
    """Loss computed by a graph replay; its gradient was computed in the same replay."""

    @staticmethod
    def forward(ctx, logprobs, loss, grad_logprobs):
        ctx.save_for_backward(grad_logprobs)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        (grad_logprobs,) = ctx.saved_tensors
        return grad_logprobs * grad_output.to(grad_logprobs.dtype), None, None


class GraphedRegionLoss:
    """:func:`region_policy_loss` with forward + backward kernels replayed from one CUDA graph.

    Call it like ``region_policy_loss`` (same per-token inputs, normalisers as floats or 0-dim
    tensors). Returns (loss with a grad_fn into ``logprobs``, stats values [NUM_STATS]). Off CUDA it
    is ``region_policy_loss`` itself.
    """

    def __init__(self, config=None, bucket_sizes: Sequence[int] = DEFAULT_TOKEN_BUCKETS):
        from care_megatron.kernels.region_loss import RegionLossConfig

        self.config = config or RegionLossConfig()
        # pad: logp 0, old 0, ref 0, A 0, region OTHER, flags False, weight sum 0, normalisers as given
        pads = (0.0, 0.0, 0.0, 0.0, 0, False, False, False, 0.0, 1.0, 1.0)
        self._with_ref = StaticShapeGraph(self._forward_backward_with_ref, pads, bucket_sizes)
        self._without_ref = StaticShapeGraph(self._forward_backward_without_ref, pads[:2] + pads[3:], bucket_sizes)

    def _forward_backward(self, logprobs, old, ref, advantages, regions, positive, has_answer, mask, sums, seq_norm, tok_norm):
        from care_megatron.kernels.region_loss import triton as triton_ops

        inputs = dict(logprobs=logprobs, old_logprobs=old, ref_logprobs=ref, advantages=advantages, region_ids=regions,
                      is_positive=positive, has_answer=has_answer, loss_mask=mask, weight_sums=sums)
        config = self.config
        stats = triton_ops.region_loss_forward(inputs, config)
        loss = stats[0] / seq_norm
        if ref is not None:
            loss = loss + config.kl_coef * stats[1] / tok_norm
        unit = torch.ones((), dtype=torch.float32, device=logprobs.device)
        grad = triton_ops.region_loss_backward(inputs, unit, seq_norm, tok_norm, config)
        return loss, stats, grad

    def _forward_backward_with_ref(self, logprobs, old, ref, *rest):
        return self._forward_backward(logprobs, old, ref, *rest)

    def _forward_backward_without_ref(self, logprobs, old, *rest):
        return self._forward_backward(logprobs, old, None, *rest)

    def __call__(self, logprobs, old_logprobs, advantages, region_ids, is_positive, has_answer, loss_mask, weight_sums,
                 seq_normaliser, token_normaliser, ref_logprobs=None):
        from care_megatron.kernels.region_loss import region_policy_loss

        if not logprobs.is_cuda:
            loss, stats = region_policy_loss(logprobs, old_logprobs, advantages, region_ids, is_positive, has_answer,
                                             loss_mask, weight_sums, seq_normaliser, token_normaliser, ref_logprobs, self.config)
            return loss, stats.values
        device = logprobs.device
        seq_norm = torch.as_tensor(seq_normaliser, dtype=torch.float32, device=device).reshape(())
        tok_norm = torch.as_tensor(token_normaliser, dtype=torch.float32, device=device).reshape(())
        use_ref = ref_logprobs is not None and self.config.kl_coef > 0
        common = (advantages, region_ids, is_positive, has_answer, loss_mask, weight_sums, seq_norm, tok_norm)
        detached = logprobs.detach()
        if use_ref:
            loss, stats, grad = self._with_ref(detached, old_logprobs, ref_logprobs, *common)
        else:
            loss, stats, grad = self._without_ref(detached, old_logprobs, *common)
        return _ReplayedLoss.apply(logprobs, loss, grad), stats
