"""The ``TrainingBackend`` protocol: everything the RL loop asks of a model trainer.

Two implementations: ``torch_backend.TorchBackend`` (plain PyTorch + transformers, CPU or one GPU)
and ``megatron.backend.MegatronBackend`` (Megatron-Core, TP/PP/DP/CP). ``trainer.py`` only talks to
this protocol, so the RL loop is identical on both.

Loss contract
-------------
``train_step`` calls ``loss_fn(outputs, micro_batch, normalisers)`` once per micro-batch, where
``outputs`` is a :class:`ForwardOutputs` for that micro-batch (with gradients). ``loss_fn`` returns
``(loss, metrics)`` where ``loss`` is already divided by the *global* normalisers (token / sequence
counts of the whole step across every data-parallel rank), so the backend **sums** gradients over
micro-batches and data-parallel ranks and never divides by their number. That makes the update
independent of micro-batching, data parallelism and packing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, runtime_checkable

import torch

from care_megatron.data.batch import PackedMicroBatch


@dataclass
class ForwardOutputs:
    """Per-token results of one forward pass over one packed micro-batch.

    ``logprobs`` FloatTensor[T] aligned with ``input_ids`` (0 at the first token of each sequence and
    on padding); ``entropy`` FloatTensor[T] or None (entropy of the predictive distribution for the
    token at t, same alignment); ``think_embeddings`` FloatTensor[n, D] or None: final-layer hidden
    states mean-pooled over each sequence's response tokens whose region is THINK (all response
    tokens when a sequence has none), not normalised, no gradient.
    """

    logprobs: torch.Tensor
    entropy: torch.Tensor | None = None
    think_embeddings: torch.Tensor | None = None


LossFn = Callable[[ForwardOutputs, PackedMicroBatch, dict], "tuple[torch.Tensor, dict[str, float]]"]


@dataclass
class StepResult:
    """What one optimizer step reports."""

    loss: float
    grad_norm: float
    learning_rate: float
    skipped: bool = False
    metrics: dict[str, float] = field(default_factory=dict)


@runtime_checkable
class TrainingBackend(Protocol):
    """A trainable policy plus its frozen reference."""

    def forward_logprobs(
        self,
        micro_batches: list[PackedMicroBatch],
        *,
        model: str = "policy",
        with_entropy: bool = False,
        with_think_embeddings: bool = False,
    ) -> list[ForwardOutputs]:
        """No-grad pass of ``model`` ("policy" or "reference") over each micro-batch."""
        ...

    def train_step(self, micro_batches: list[PackedMicroBatch], loss_fn: LossFn, normalisers: dict) -> StepResult:
        """Forward + backward over every micro-batch (summing gradients), clip, optimizer step."""
        ...

    def export_weights(self, bucket_bytes: int = 512 << 20) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """Full, Hugging-Face-named tensors in buckets of at most ``bucket_bytes`` (one oversized tensor alone)."""
        ...

    def state_dict_for_checkpoint(self) -> dict:
        """Model, optimizer, scheduler and step state, for ``save_checkpoint``."""
        ...

    def save_checkpoint(self, path: str) -> None: ...

    def load_checkpoint(self, path: str) -> None: ...

    def sleep(self) -> None:
        """Free accelerator memory (weights, grads, optimizer state) for colocated rollouts."""
        ...

    def wake(self) -> None: ...
