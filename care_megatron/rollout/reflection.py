"""Reflection-Guided Resampling (RGR): the reflection request built from a hard negative (spec section 5).

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
* the prefix is re-tokenised from text (h's token ids cannot be cut at a character position in
  general, since ``<answer>`` may span several tokens). The prefix is context only: it carries no
  loss and needs no behaviour log-prob, so re-tokenisation changes nothing the loss sees.

The request's ``prefix_ids`` hold the rationale + cue; engines return only the continuation, so only
generated tokens carry loss (the trainer builds the sequence as prompt + prefix + continuation, loss
mask on the continuation). ``reflected_response_text`` rebuilds the full response the verifier scores.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from care_megatron.rollout.base import GenerationRequest

REPAIR_CUE = (
    "Your previous reasoning was incorrect. Identify the failing operation, correct it, and "
    "re-derive the necessary quantities. Keep this section concise. Do not restate the question."
)
"""The repair cue of spec section 5, verbatim."""

THINK_CLOSE = "</think>"
ANSWER_OPEN = "<answer>"


def reflection_prefix_text(response_text: str, cue: str = REPAIR_CUE) -> str:
    """h's rationale with the cue inserted where its ``</think>`` was (see the module docstring).

    >>> reflection_prefix_text("<think>2+2=5</think><answer>5</answer>", cue="FIX")
    '<think>2+2=5\\nFIX\\n'
    """
    answer_at = response_text.find(ANSWER_OPEN)
    rationale = response_text if answer_at < 0 else response_text[:answer_at]
    close_at = rationale.rfind(THINK_CLOSE)
    if close_at >= 0:
        rationale = rationale[:close_at]
    rationale = rationale.rstrip()
    separator = "\n" if rationale else ""
    return f"{rationale}{separator}{cue}\n"


def build_reflection_request(
    original: GenerationRequest,
    negative_response_text: str,
    tokenizer: Any,
    *,
    request_id: str | None = None,
    cue: str = REPAIR_CUE,
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
    """
    if original.prefix_ids:
        raise ValueError(f"build_reflection_request: request {original.request_id!r} already has a prefix")
    prefix_text = reflection_prefix_text(negative_response_text, cue)
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


@dataclass
class RGRStats:
    """Running RGR bookkeeping for one step (spec sections 5 and 8: trigger and success rates)."""

    eligible_groups: int = 0
    """Groups in which RGR could trigger (had a positive anchor and at least one hard negative)."""
    groups: int = 0
    """All groups seen (the trigger rate's denominator)."""
    triggered: int = 0
    """Reflection requests actually decoded."""
    succeeded: int = 0
    """Reflections the verifier scored correct (accuracy == 1)."""
    reasons: dict[str, int] = field(default_factory=dict)
    """Why a group did not trigger, counted by reason (``no_positive``, ``no_negative``, ``disabled``)."""

    def record_group(self, *, has_positive: bool, num_hard_negatives: int, enabled: bool = True) -> bool:
        """Count one group; return True when RGR should trigger in it (spec section 5)."""
        self.groups += 1
        if not enabled:
            reason = "disabled"
        elif not has_positive:
            reason = "no_positive"  # all-negative groups are handled by the rescue, never by RGR
        elif num_hard_negatives < 1:
            reason = "no_negative"
        else:
            self.eligible_groups += 1
            self.triggered += 1
            return True
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        return False

    def record_outcome(self, accuracy: float) -> None:
        """Count the verifier's verdict on one reflected continuation."""
        if accuracy >= 1.0:
            self.succeeded += 1

    def metrics(self) -> dict[str, float]:
        """``rgr/trigger_rate`` (triggered / groups), ``rgr/success_rate`` (succeeded / triggered;
        0 when nothing triggered), and the raw counts."""
        return {
            "rgr/trigger_rate": self.triggered / self.groups if self.groups else 0.0,
            "rgr/success_rate": self.succeeded / self.triggered if self.triggered else 0.0,
            "rgr/triggered": float(self.triggered),
            "rgr/succeeded": float(self.succeeded),
        }
