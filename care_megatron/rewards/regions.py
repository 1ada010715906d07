"""Token regions of a response: the vocabulary shared by parsing, packing, losses and backends.

Every per-token tensor in the system that says "which part of the response is this token" uses
these integer codes, so a region id survives packing, micro-batching and distributed gathers as a
plain integer tensor.
"""
from enum import IntEnum


class Region(IntEnum):
    """Region of one token.

    OTHER covers prompt tokens, chat-template tokens and end-of-sequence tokens; THINK the rationale
    span, ``<think>...</think>`` or, with ``data.think_tag: reasoning``, ``<reasoning>...</reasoning>``
    (tags included; :func:`care_megatron.rewards.parsing.tags_for`); ANSWER the ``<answer>...</answer>``
    span (tags included).
    """

    OTHER = 0
    THINK = 1
    ANSWER = 2
