"""Experience: what one RL step collects, from generated tokens to the per-token tensors of training.

One :class:`Rollout` per generated response: its prompt (group), the completion, its reward, and the
region of every response token. Reflection-Guided Resampling samples (docs/algorithm.md section 5) are rollouts
too: their ``prefix_ids`` (the failed rationale with the repair cue) are trained as prompt, only the
continuation carries loss, and ``reflected_from`` names the hard negative they replace.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from care_megatron.data.batch import Sequence
from care_megatron.data.prompting import PromptInputs, build_sequence
from care_megatron.rewards.parsing import regions_from_token_ids
from care_megatron.rewards.regions import Region
from care_megatron.rewards.registry import reward_tags
from care_megatron.rollout.base import Completion
from care_megatron.rollout.base import strip_stop_token as _strip_stop


@dataclass
class Rollout:
    group: int
    """Index of the prompt (group) inside the step."""
    record: object
    """The data record (``care_megatron.data.schema.Record``)."""
    prompt: PromptInputs
    completion: Completion
    reward: float
    accuracy: float
    format: float
    reason: str
    response_regions: torch.Tensor
    """LongTensor[len(completion.token_ids)]: Region code of each generated token."""
    response_text: str
    """The response the verifier read (RGR: rationale prefix + continuation), stop token excluded."""
    prefix_ids: list[int] = field(default_factory=list)
    reflected_from: int = -1
    """For an RGR sample: index (in the step's rollout list) of the hard negative it was resampled from."""

    @property
    def correct(self) -> bool:
        return self.accuracy >= 1.0

    @property
    def think_length(self) -> int:
        return int((self.response_regions == int(Region.THINK)).sum())

    @property
    def answer_length(self) -> int:
        return int((self.response_regions == int(Region.ANSWER)).sum())


def make_rollout(group: int, record, prompt: PromptInputs, completion: Completion, tokenizer,
                 reward_fn: Callable, stop_ids: set[int], prefix_ids: list[int] | None = None,
                 reflected_from: int = -1) -> Rollout:
    """Score one completion with ``reward_fn`` and find the region of each of its tokens.

    The response text is decoded from the token ids (prefix + continuation, stop token excluded) so
    character offsets and regions refer to exactly the tokens that were generated.
    """
    prefix_ids = list(prefix_ids or [])
    body = prefix_ids + _strip_stop(list(completion.token_ids), stop_ids)
    all_regions, parsed = regions_from_token_ids(body, tokenizer, reward_tags(reward_fn))  # data.think_tag
    text = parsed.text
    regions = all_regions[len(prefix_ids):]
    pad = len(completion.token_ids) - regions.numel()
    if pad:
        regions = torch.cat([regions, torch.full((pad,), int(Region.OTHER), dtype=torch.long)])
    score = reward_fn(text, record.answer, answer_type=record.answer_type, choices=record.choices)
    return Rollout(group=group, record=record, prompt=prompt, completion=completion, reward=float(score.overall),
                   accuracy=float(score.accuracy), format=float(score.format), reason=score.reason or "",
                   response_regions=regions, response_text=text, prefix_ids=prefix_ids,
                   reflected_from=reflected_from)


def to_sequence(rollout: Rollout, index: int) -> Sequence:
    """Prompt (+ RGR prefix, no loss) + completion, with the behaviour log-probs as a token field."""
    prompt = rollout.prompt
    if rollout.prefix_ids:
        prompt = replace(prompt, prompt_ids=list(prompt.prompt_ids) + rollout.prefix_ids)
    behaviour = torch.tensor(rollout.completion.logprobs, dtype=torch.float32)
    return build_sequence(prompt, rollout.completion.token_ids, rollout.response_regions,
                          token_fields={"rollout_logprobs": behaviour}, sequence_id=index)


def advantage_inputs(rollouts: list[Rollout], think_embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
    """The per-rollout tensors every advantage estimator takes (docs/algorithm.md sections 2-5, 7)."""
    return dict(
        group_index=torch.tensor([r.group for r in rollouts], dtype=torch.long),
        rewards=torch.tensor([r.reward for r in rollouts], dtype=torch.float32),
        correct=torch.tensor([r.correct for r in rollouts], dtype=torch.bool),
        think_lengths=torch.tensor([r.think_length for r in rollouts], dtype=torch.long),
        answer_lengths=torch.tensor([r.answer_length for r in rollouts], dtype=torch.long),
        think_embeddings=think_embeddings.float(),
        sequence_logprobs=torch.tensor([float(sum(r.completion.logprobs)) for r in rollouts], dtype=torch.float32),
        reflected_from=torch.tensor([r.reflected_from for r in rollouts], dtype=torch.long),
        response_lengths=torch.tensor([len(r.completion.token_ids) for r in rollouts], dtype=torch.long),
    )


def prompt_request(prompt: PromptInputs, request_id: str):
    from care_megatron.rollout.base import GenerationRequest

    return GenerationRequest(request_id=request_id, prompt_ids=list(prompt.prompt_ids), prompt_text=prompt.prompt_text,
                             images=list(prompt.images), pixel_values=prompt.pixel_values,
                             image_grid_thw=prompt.image_grid_thw)


def generate_rollouts(engine, records: list, prompts: list[PromptInputs], group_size: int, sampling, tokenizer,
                      reward_fn: Callable, step: int, group_offset: int = 0) -> list[Rollout]:
    """G completions per prompt, scored: rollouts of prompt i get group ``group_offset + i``."""
    requests = [prompt_request(p, f"s{step}/g{group_offset + i}/r{j}")
                for i, p in enumerate(prompts) for j in range(group_size)]
    completions = engine.generate(requests, sampling)
    stop_ids = set(sampling.stop_token_ids) | set(getattr(engine, "stop_token_ids", []))
    return [make_rollout(group_offset + k // group_size, records[k // group_size], prompts[k // group_size], c,
                         tokenizer, reward_fn, stop_ids) for k, c in enumerate(completions)]


def reflect_hard_negatives(engine, rollouts: list[Rollout], targets: list[int], sampling, tokenizer,
                           reward_fn: Callable, step: int, mode: str = "repair") -> list[Rollout]:
    """Reflection-Guided Resampling (docs/algorithm.md section 5): one repair-cue continuation per target row
    (``mode`` ``resample`` / ``fresh``: the paper's cue-free controls), decoded with the same
    sampling parameters and scored by the same verifier."""
    from care_megatron.rollout.reflection import build_rgr_request

    if not targets:
        return []
    requests = [build_rgr_request(prompt_request(rollouts[t].prompt, f"s{step}/rgr{t}"),
                                  rollouts[t].response_text, tokenizer, mode, tags=reward_tags(reward_fn))
                for t in targets]
    completions = engine.generate(requests, sampling)
    stop_ids = set(sampling.stop_token_ids) | set(getattr(engine, "stop_token_ids", []))
    return [make_rollout(rollouts[t].group, rollouts[t].record, rollouts[t].prompt, c, tokenizer, reward_fn,
                         stop_ids, prefix_ids=req.prefix_ids, reflected_from=t)
            for t, req, c in zip(targets, requests, completions)]


def dapo_dynamic_sampling(rollouts: list[Rollout], more_rollouts: Callable[[int, int], list[Rollout]], target_groups: int,
                          max_new_tokens: int, overlong_buffer: int, overlong_penalty: float,
                          max_rounds: int = 2) -> tuple[list[Rollout], dict[str, float]]:
    """DAPO (docs/algorithm.md section 7): soft overlong penalty on the reward, drop groups whose rewards have zero
    variance, refill with ``more_rollouts(num_prompts, group_offset)`` (at most ``max_rounds`` extra
    generations) up to ``target_groups`` groups. Never returns an empty step."""
    from care_megatron.algorithm.dapo import dynamic_sampling_filter, soft_overlong_penalty

    kept, dropped, rounds, fresh = [], 0, 0, rollouts
    while True:
        lengths = torch.tensor([len(r.completion.token_ids) for r in fresh])
        for r, p in zip(fresh, soft_overlong_penalty(lengths, max_new_tokens, overlong_buffer, overlong_penalty).tolist()):
            r.reward += p
        keep, info = dynamic_sampling_filter(torch.tensor([r.group for r in fresh]), torch.tensor([r.reward for r in fresh]))
        kept += [r for r, k in zip(fresh, keep.tolist()) if k]
        dropped += info["num_dropped_groups"]
        missing = target_groups - len({r.group for r in kept})
        if missing <= 0 or rounds == max_rounds:
            break
        rounds += 1
        fresh = more_rollouts(missing, 1 + max(r.group for r in rollouts + kept))
    groups = set(sorted({r.group for r in kept})[:target_groups])
    kept = [r for r in kept if r.group in groups] or rollouts
    return kept, {"dapo/dropped_groups": float(dropped), "dapo/kept_groups": float(len(groups)),
                  "dapo/refill_rounds": float(rounds)}
