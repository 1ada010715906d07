"""Reflection-Guided Resampling (RGR): the reflection request built from a hard negative
(``docs/algorithm.md``, section 5).

Given the original prompt and the response of h (the nearest hard negative), the reflection prompt
is: the original prompt, then h's rationale (its response cut before ``<answer>``), with the repair
cue inserted inside the rationale, i.e. just before where ``</think>`` stood. The rationale's
``</think>`` and everything after it are dropped, so the engine continues *inside* the think span:
the continuation re-derives what the cue asks for, closes ``</think>`` itself and writes the answer
(the layout of the paper's section 3.6 template).

Edge cases, decided here because the spec is silent on them:

* no ``</think>`` before ``<answer>``: the cue is appended at the end of the rationale and no tag
  is closed or opened (h's text is kept verbatim, never repaired);
* no ``<answer>`` at all: the whole response is the rationale;
* the tags are the run's (``data.think_tag``; ``tags`` below): with ``reasoning`` read ``</reasoning>``
  for ``</think>`` throughout. The cue itself names no tag;
* the prefix is re-tokenised from text (h's token ids cannot be cut at a character position in
  general, since ``<answer>`` may span several tokens). The prefix is context only: it carries no
  loss and needs no behaviour log-prob, so re-tokenisation changes nothing the loss sees.

The request's ``prefix_ids`` hold the rationale + cue; engines return only the continuation, so only
generated tokens carry loss (the trainer builds the sequence as prompt + prefix + continuation, loss
mask on the continuation). ``reflected_response_text`` rebuilds the full response the verifier scores.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from care_megatron.rewards.parsing import DEFAULT_TAGS, TagConfig
from care_megatron.rollout.base import GenerationRequest

REPAIR_CUE = (
    "Your previous reasoning was incorrect. Identify the failing operation, correct it, and "
    "re-derive the necessary quantities. Keep this section concise. Do not restate the question."
)
"""The repair cue of docs/algorithm.md section 5, verbatim."""


def reflection_prefix_text(response_text: str, cue: str = REPAIR_CUE, tags: TagConfig = DEFAULT_TAGS) -> str:
    """h's rationale with the cue inserted where its ``</think>`` was (see the module docstring).

    >>> reflection_prefix_text("<think>2+2=5</think><answer>5</answer>", cue="FIX")
    '<think>2+2=5\\nFIX\\n'

    An empty ``cue`` gives the bare truncated rationale (the ``resample`` control): ``'<think>2+2=5\\n'``.
    ``tags``: the run's tags (``data.think_tag``), whose answer-open and think-close tags are cut at.
    """
    answer_at = response_text.find(tags.answer_open)
    rationale = response_text if answer_at < 0 else response_text[:answer_at]
    close_at = rationale.rfind(tags.think_close)
    if close_at >= 0:
        rationale = rationale[:close_at]
    rationale = rationale.rstrip()
    if not cue:
        return f"{rationale}\n" if rationale else ""
    separator = "\n" if rationale else ""
    return f"{rationale}{separator}{cue}\n"


def build_reflection_request(
    original: GenerationRequest,
    negative_response_text: str,
    tokenizer: Any,
    *,
    request_id: str | None = None,
    cue: str = REPAIR_CUE,
    tags: TagConfig = DEFAULT_TAGS,
) -> GenerationRequest:
    """The RGR request: ``original``'s prompt (ids, text and images unchanged) with ``prefix_ids`` =
    the tokenised reflection prefix.

    Args:
        original: the prompt's request as given to the first round of rollouts (its own
            ``prefix_ids`` must be empty: reflections are not nested).
        negative_response_text: decoded response of the hard negative h (special tokens kept).
        tokenizer: the policy tokenizer (``encode(text, add_special_tokens=False)``).
        request_id: id of the new request; default ``original.request_id + "/rgr"``.
        cue: the repair cue (default: the spec's cue; the ablation swaps it).
        tags: the run's tags (``data.think_tag``).
    """
    if original.prefix_ids:
        raise ValueError(f"build_reflection_request: request {original.request_id!r} already has a prefix")
    prefix_text = reflection_prefix_text(negative_response_text, cue, tags)
    prefix_ids = list(tokenizer.encode(prefix_text, add_special_tokens=False))
    return replace(
        original,
        request_id=request_id if request_id is not None else f"{original.request_id}/rgr",
        prefix_ids=prefix_ids,
        images=list(original.images),
    )


def reflected_response_text(prefix_text: str, continuation_text: str) -> str:
    """The full reflected response the verifier scores: reflection prefix + generated continuation
    (its ``<think>`` opens in the prefix, its ``</think>`` / answer come from the continuation)."""
    return prefix_text + continuation_text


RGR_MODES = ("repair", "resample", "fresh")
"""What RGR decodes (``algorithm.rgr_mode``): the paper's method and its two controls (section 4.3)."""


def build_rgr_request(original: GenerationRequest, negative_response_text: str, tokenizer: Any, mode: str = "repair",
                      *, request_id: str | None = None, tags: TagConfig = DEFAULT_TAGS) -> GenerationRequest:
    """The request RGR decodes for hard negative h, by ``mode``:

    * ``repair``: h's rationale with the repair cue (:func:`build_reflection_request`), the method;
    * ``resample``: h's same truncated rationale continued with no cue (does the cue matter?);
    * ``fresh``: a new rollout of the prompt, no prefix (does conditioning on h matter at all?).

    Whatever the mode, the result takes h's place exactly as a reflection does (docs/algorithm.md section 5).
    ``tags``: the run's tags (``data.think_tag``), where h's rationale is cut.
    """
    if mode == "repair":
        return build_reflection_request(original, negative_response_text, tokenizer, request_id=request_id, tags=tags)
    if mode == "resample":
        return build_reflection_request(original, negative_response_text, tokenizer, request_id=request_id, cue="",
                                        tags=tags)
    if mode == "fresh":
        if original.prefix_ids:
            raise ValueError(f"build_rgr_request: request {original.request_id!r} already has a prefix")
        return replace(original, request_id=request_id if request_id is not None else f"{original.request_id}/rgr",
                       images=list(original.images))
    raise ValueError(f"unknown RGR mode {mode!r}; valid: {', '.join(RGR_MODES)}")
