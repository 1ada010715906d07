"""Fused kernels: one folder per op, each with ``reference.py`` (torch), ``triton.py`` and a
dispatching ``__init__.py``; ``graphs.py`` captures an op in a CUDA graph for static shapes.

* :func:`linear_logprobs` - LM-head log-probs / entropy without fp32 ``[T, V]`` logits (issue #6);
  :func:`vocab_parallel_linear_logprobs` the same over a tensor-parallel vocabulary shard.
* :func:`region_policy_loss` - CARE's region-weighted clipped surrogate + k3 KL (CARE_SPEC s.6),
  forward and backward each one kernel.
* :func:`force_kernel_backend` - pin "reference" or "triton" (tests, debugging).
"""
from care_megatron.kernels._dispatch import (
    force_kernel_backend,
    get_kernel_backend,
    interpreter_active,
    set_kernel_backend,
)
from care_megatron.kernels.logprobs import (
    combine_vocab_parallel_partials,
    linear_logprob_partials,
    linear_logprobs,
    naive_linear_logprobs,
    vocab_parallel_linear_logprobs,
)
from care_megatron.kernels.region_loss import (
    RegionLossConfig,
    RegionLossStats,
    region_policy_loss,
    region_token_weights,
    sequence_weight_sums,
)

__all__ = [
    "combine_vocab_parallel_partials",
    "force_kernel_backend",
    "get_kernel_backend",
    "interpreter_active",
    "linear_logprob_partials",
    "linear_logprobs",
    "naive_linear_logprobs",
    "region_policy_loss",
    "region_token_weights",
    "RegionLossConfig",
    "RegionLossStats",
    "sequence_weight_sums",
    "set_kernel_backend",
    "vocab_parallel_linear_logprobs",
]
