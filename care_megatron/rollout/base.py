"""The ``RolloutEngine`` protocol and the request / completion records it exchanges.

Implementations: ``hf_engine.HFRolloutEngine`` (transformers ``generate``; CPU and small GPUs) and
``sglang_engine.SGLangRolloutEngine`` (SGLang offline engine, colocated on the training GPUs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol, Sequence, runtime_checkable

import torch


@dataclass
class SamplingParams:
    """Decoding parameters shared by every engine.

    ``max_new_tokens`` bounds the response length in tokens; ``temperature`` 0 means greedy;
    ``top_k`` -1 disables top-k; ``stop_token_ids`` end a response (the tokenizer's eos / im_end);
    ``seed`` makes sampling reproducible where the engine supports it.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass
class GenerationRequest:
    """One prompt to continue.

    ``prompt_ids``: the chat-templated prompt with image placeholders already expanded to the right
    number of ``<|image_pad|>`` tokens; ``prompt_text``: the same prompt as text (SGLang expands image
    placeholders itself and takes text + ``image_data``); ``images``: the prompt's PIL images, in order;
    ``pixel_values`` / ``image_grid_thw``: the processor's outputs for those images (engines running
    the HF model use them directly); ``prefix_ids``: tokens appended after the prompt that the engine
    must continue from (Reflection-Guided Resampling), not part of the returned completion.
    """

    request_id: str
    prompt_ids: list[int]
    prompt_text: str = ""
    images: list[Any] = field(default_factory=list)
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    prefix_ids: list[int] = field(default_factory=list)


@dataclass
class Completion:
    """One generated continuation: ``token_ids`` and per-token behaviour ``logprobs`` (same length),
    its decoded ``text``, and ``finish_reason`` in {"stop", "length"}."""

    request_id: str
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str


MEMORY_TAGS: tuple[str, ...] = ("weights", "kv_cache")
"""What an engine's ``sleep`` / ``wake`` can release separately: the model weights and the KV cache
(SGLang's ``release_memory_occupation`` tags of the same names; CUDA-graph memory goes with the KV cache)."""


def memory_tags(tags: Sequence[str] | None) -> tuple[str, ...]:
    """``tags`` checked against ``MEMORY_TAGS``, in ``MEMORY_TAGS`` order; None or empty means all."""
    if tags is None or len(tags) == 0:
        return MEMORY_TAGS
    if isinstance(tags, str):
        raise TypeError(f"memory tags must be a sequence of names, got the string {tags!r}")
    unknown = sorted(set(tags) - set(MEMORY_TAGS))
    if unknown:
        raise ValueError(f"unknown memory tag(s) {unknown}; valid: {', '.join(MEMORY_TAGS)}")
    return tuple(t for t in MEMORY_TAGS if t in tags)


@runtime_checkable
class RolloutEngine(Protocol):
    def generate(self, requests: list[GenerationRequest], sampling: SamplingParams) -> list[Completion]:
        """One completion per request, in request order."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load Hugging-Face-named full tensors into the engine's model (any subset, any order)."""
        ...

    def sleep(self, tags: Sequence[str] | None = None) -> None:
        """Release the memory named by ``tags`` (``MEMORY_TAGS``; None: all of it) so colocated
        training can use it. Released weights may be lost: send ``update_weights`` after waking them."""
        ...

    def wake(self, tags: Sequence[str] | None = None) -> None:
        """Re-allocate the memory named by ``tags`` (None: all). The colocated step wakes
        ``("weights",)``, syncs the weights, then wakes ``("kv_cache",)``, so the KV cache is not
        allocated while the weight buckets are in flight."""
        ...

    def shutdown(self) -> None: ...


def bucket_named_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]],
                         bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a (name, tensor) stream into buckets of at most ``bucket_bytes`` and one dtype each (a
    flattened bucket is one tensor); a tensor larger than the limit travels alone."""
    if bucket_bytes < 1:
        raise ValueError(f"bucket_bytes must be >= 1, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and (size + nbytes > bucket_bytes or tensor.dtype != bucket[0][1].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def strip_stop_token(token_ids: list[int], stop_ids: set[int]) -> list[int]:
    """Generated ids without the terminal stop token (it is chat template, not response text).

    Shared by the RL experience builder and evaluation, so both read the same response text.
    """
    return token_ids[:-1] if token_ids and token_ids[-1] in stop_ids else token_ids
