"""A scripted rollout engine: fixed completions per (prompt slot, rollout index), so one RL step
exercises CARE's whole anchored path on the real trainer (verifier, packing, backends, loss).

Script for a step of 4 prompts x G = 4 (``data.tasks=[count_shapes]``: integer answers; "wrong" is
the answer + 1):

=====  ==========================================================  =====================
slot   rollouts 0..3                                               RGR continuation
=====  ==========================================================  =====================
0      correct, no <think> (format 0), correct (think), wrong x 2  correct -> success
1      correct, wrong, wrong, wrong                                wrong   -> failure
2      wrong (well formatted), malformed x 3 (no tags)             (all-negative: rescue)
3      correct x 4                                                 (saturated)
=====  ==========================================================  =====================

The wrong rollouts of a group are identical, so their rationale embeddings are identical and the
spec's tie-break (lower index) names the RGR target: rollout 2 of slot 0, rollout 1 of slot 1.

``tags`` (the run's ``data.think_tag``, ``config.data.tag_config``) names the rationale tag the
scripted responses use: ``<think>`` by default, ``<reasoning>`` for the Qwen3-VL-8B variant.

It implements the ``RolloutEngine`` protocol (``care_megatron/rollout/base.py``): completions end
with a stop token like a real engine's; an RGR request (id ``.../rgr<row>/rgr``) is answered with
the continuation only; ``update_weights`` drains the weight stream (on Megatron the exporter's
collectives must run on every rank); ``wake`` / ``sleep`` take and ignore extra keyword arguments
(tagged wake / sleep).
"""
from __future__ import annotations

import hashlib
import re

from care_megatron.rewards.parsing import DEFAULT_TAGS
from care_megatron.rollout.base import Completion

SHORT, LONG, MID = "{a}", "I count them one at a time and get {a}", "so {a}"
ROLLOUT_SCRIPT = {
    0: [("bare", ""), ("ok", LONG), ("wrong", "count {w}"), ("wrong", "count {w}")],
    1: [("ok", MID), ("wrong", "count {w}"), ("wrong", "count {w}"), ("wrong", "count {w}")],
    2: [("wrong", "count {w}"), ("malformed", ""), ("malformed", ""), ("malformed", "")],
    3: [("ok", SHORT), ("ok", MID), ("ok", LONG), ("ok", SHORT)],
}
RGR_SUCCEEDS = {0: True, 1: False}
BEHAVIOUR_LOGPROB = -1.0
"""Behaviour log-prob of every scripted token (only the mismatch metric and the rescue tie-break read
it; the script makes the rescue pseudo-anchor unique by reward)."""


def rollout_text(kind: str, think: str, answer: str, tags=DEFAULT_TAGS) -> str:
    wrong = str(int(answer) + 1)
    if kind == "malformed":
        return f"the answer is {wrong}"
    if kind == "bare":  # a correct answer that dropped its rationale: accuracy 1, format 0
        return f"{tags.answer_open}{answer}{tags.answer_close}"
    value = answer if kind == "ok" else wrong
    return f"{tags.think_open}{think.format(a=value, w=value)}{tags.think_close}{tags.answer_open}{value}{tags.answer_close}"


def rgr_continuation(slot: int, answer: str, tags=DEFAULT_TAGS) -> str:
    value = answer if RGR_SUCCEEDS.get(slot, False) else str(int(answer) + 1)
    return f"recount {value}{tags.think_close}{tags.answer_open}{value}{tags.answer_close}"


def _image_digest(images) -> tuple:
    from PIL import Image

    out = []
    for image in images:
        image = image if isinstance(image, Image.Image) else Image.open(image)
        out.append(hashlib.sha1(image.convert("RGB").tobytes()).hexdigest())
    return tuple(out)


def _record_key(question: str, images) -> tuple:
    return question, _image_digest(images)


_ROLLOUT_ID = re.compile(r"^s(\d+)/g(\d+)/r(\d+)$")
_RGR_ID = re.compile(r"^s(\d+)/rgr(\d+)(/rgr)?$")


class ScriptedRolloutEngine:
    """Deterministic ``RolloutEngine`` answering from :data:`ROLLOUT_SCRIPT` (see the module doc)."""

    def __init__(self, tokenizer, records, group_size: int = 4, tags=DEFAULT_TAGS):
        self.tokenizer = tokenizer
        self.group_size = group_size
        self.tags = tags
        self.answers: dict[tuple, set] = {}
        for r in records:  # a question can repeat across records: the image tells them apart
            self.answers.setdefault(_record_key(r.question, r.images), set()).add(str(r.answer))
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.stop_token_ids = [int(im_end)]
        self.requests: list = []
        self.seeds: list[int | None] = []
        self.tensors_received = 0
        self.awake = True

    def _answer(self, request) -> str:
        found = {a for (question, images), answers in self.answers.items() for a in answers
                 if question in request.prompt_text and images == _image_digest(request.images)}
        if len(found) != 1:
            raise ValueError(f"scripted engine: no unique answer for request {request.request_id}: {found}")
        return found.pop()

    def _text(self, request) -> str:
        answer = self._answer(request)
        rollout = _ROLLOUT_ID.match(request.request_id)
        if rollout:
            group, index = int(rollout.group(2)), int(rollout.group(3))
            kind, think = ROLLOUT_SCRIPT[group % len(ROLLOUT_SCRIPT)][index % len(ROLLOUT_SCRIPT[0])]
            return rollout_text(kind, think, answer, self.tags)
        rgr = _RGR_ID.match(request.request_id)
        if rgr:
            slot = (int(rgr.group(2)) // self.group_size) % len(ROLLOUT_SCRIPT)
            return rgr_continuation(slot, answer, self.tags)
        raise ValueError(f"scripted engine: unexpected request id {request.request_id!r}")

    def generate(self, requests, sampling):
        if not self.awake:
            raise RuntimeError("scripted engine: generate while asleep")
        self.seeds.append(sampling.seed)
        out = []
        for request in requests:
            self.requests.append(request)
            text = self._text(request)
            ids = list(self.tokenizer.encode(text, add_special_tokens=False)) + self.stop_token_ids[:1]
            out.append(Completion(request_id=request.request_id, token_ids=ids, text=text,
                                  logprobs=[BEHAVIOUR_LOGPROB] * len(ids), finish_reason="stop"))
        return out

    def update_weights(self, named_tensors) -> None:
        for _name, _tensor in named_tensors:
            self.tensors_received += 1

    def sleep(self, **kwargs) -> None:
        self.awake = False

    def wake(self, **kwargs) -> None:
        self.awake = True

    def shutdown(self) -> None:
        self.awake = False


def build_scripted_engine(config, model, tokenizer) -> ScriptedRolloutEngine:
    """Stand-in for ``care_megatron.rollout.builder.build_rollout_engine``: the records come from the
    run's own data config, so the engine knows every prompt's answer."""
    from care_megatron.data.dataset import build_records

    data = build_records(config.data)
    return ScriptedRolloutEngine(tokenizer, data.train + data.eval, config.rollout.group_size, config.data.tag_config)


def install() -> None:
    """Make ``build_rollout_engine`` return a scripted engine (for runs started in a subprocess)."""
    import care_megatron.rollout.builder as builder

    builder.build_rollout_engine = build_scripted_engine
