"""``data.think_tag``: one switch for the rationale tag (``<think>`` or ``<reasoning>``, the CARE paper's
appendix 8.2 for Qwen3-VL-8B) through parsing, token regions, the verifier, the RGR prefix, the
instruction, the SFT targets and the benchmark scorer. End to end: ``tests/e2e/test_reasoning_tag_run.py``."""
import functools

import pytest

from care_megatron.data.prompting import SYSTEM_PROMPT, resolve_system_prompt, system_prompt_for
from care_megatron.models.tokenizer import load_tokenizer
from care_megatron.rewards.parsing import (
    DEFAULT_TAGS, REASONING_TAGS, THINK_TAGS, TagConfig, parse_response, regions_from_token_ids, tags_for,
)
from care_megatron.rewards.regions import Region
from care_megatron.rewards.registry import get_reward_fn, reward_tags
from care_megatron.rewards.verifier import VerifierConfig, score
from care_megatron.rollout.reflection import reflection_prefix_text

O, T, A = int(Region.OTHER), int(Region.THINK), int(Region.ANSWER)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def test_tags_for_maps_the_config_values_and_refuses_others():
    assert tags_for("think") is DEFAULT_TAGS and tags_for("reasoning") is REASONING_TAGS
    assert set(THINK_TAGS) == {"think", "reasoning"}
    assert REASONING_TAGS.all_tags == ("<reasoning>", "</reasoning>", "<answer>", "</answer>")
    for bad in ("cot", "Think", "", None):
        with pytest.raises(ValueError, match="think_tag must be one of think, reasoning"):
            tags_for(bad)


def _pieces(tokenizer, *parts):
    """Token ids of each text part encoded on its own, and their concatenation."""
    encoded = [tokenizer.encode(p, add_special_tokens=False) for p in parts]
    return encoded, [i for e in encoded for i in e]


def test_regions_of_a_hand_built_reasoning_sequence_are_exact(tokenizer):
    parts = ("<reasoning>", "two plus two", "</reasoning>", "<answer>", "4", "</answer>")
    encoded, ids = _pieces(tokenizer, *parts)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = ids + [im_end]
    assert len(encoded[0]) > 1  # <reasoning> is plain text in the tiny vocabulary (several tokens), <think> is one
    n_think = sum(len(e) for e in encoded[:3])
    n_answer = sum(len(e) for e in encoded[3:])
    regions, parsed = regions_from_token_ids(ids, tokenizer, REASONING_TAGS)
    assert regions.tolist() == [T] * n_think + [A] * n_answer + [O]
    assert parsed.think == "two plus two" and parsed.answer == "4"
    assert regions_from_token_ids(ids[:-1], tokenizer, REASONING_TAGS)[1].format_ok  # the stop token stripped, as callers do
    # the same tokens read with the default tags: no rationale span, so no THINK token, and bad format
    regions, parsed = regions_from_token_ids(ids, tokenizer, DEFAULT_TAGS)
    assert regions.tolist() == [O] * n_think + [A] * n_answer + [O]
    assert not parsed.format_ok and parsed.think_span is None


def test_regions_of_a_think_sequence_under_reasoning_tags_have_no_think_token(tokenizer):
    encoded, ids = _pieces(tokenizer, "<think>", "a b", "</think>", "<answer>", "4", "</answer>")
    n_think = sum(len(e) for e in encoded[:3])
    regions, _ = regions_from_token_ids(ids, tokenizer, REASONING_TAGS)
    assert regions.tolist() == [O] * n_think + [A] * (len(ids) - n_think)
    regions, _ = regions_from_token_ids(ids, tokenizer, DEFAULT_TAGS)
    assert regions.tolist() == [T] * n_think + [A] * (len(ids) - n_think)
    assert n_think == 1 + len(encoded[1]) + 1  # one token per <think> tag in the tiny vocabulary


def test_unclosed_reasoning_runs_to_the_answer_and_truncated_runs_to_the_end(tokenizer):
    encoded, ids = _pieces(tokenizer, "<reasoning>", "a b", "<answer>", "4", "</answer>")
    regions, parsed = regions_from_token_ids(ids, tokenizer, REASONING_TAGS)
    n_think = len(encoded[0]) + len(encoded[1])
    assert regions.tolist() == [T] * n_think + [A] * (len(ids) - n_think)
    assert not parsed.format_ok and not parsed.think_closed
    _, ids = _pieces(tokenizer, "<reasoning>", "a b")
    assert regions_from_token_ids(ids, tokenizer, REASONING_TAGS)[0].tolist() == [T] * len(ids)


@pytest.mark.parametrize("think_tag, good, other", [
    ("reasoning", "<reasoning>two plus two</reasoning><answer>4</answer>", "<think>two plus two</think><answer>4</answer>"),
    ("think", "<think>two plus two</think><answer>4</answer>", "<reasoning>two plus two</reasoning><answer>4</answer>"),
])
def test_format_reward_is_earned_only_with_the_configured_tag(think_tag, good, other):
    config = VerifierConfig(format_weight=0.1, tags=tags_for(think_tag))
    s = score(good, "4", config=config)
    assert (s.accuracy, s.format, s.overall) == (1.0, 1.0, 1.0)
    s = score(other, "4", config=config)  # the answer span is the same, the rationale tag is not
    assert (s.accuracy, s.format) == (1.0, 0.0) and s.overall == pytest.approx(0.9)


def test_reward_tags_reads_the_bound_verifier_config():
    verifier = get_reward_fn("verifier")
    assert reward_tags(functools.partial(verifier, config=VerifierConfig(tags=REASONING_TAGS))) is REASONING_TAGS
    assert reward_tags(functools.partial(verifier, config=VerifierConfig())) is DEFAULT_TAGS
    assert reward_tags(verifier) is DEFAULT_TAGS  # nothing bound: the default tags

    def custom(response, ground_truth, **_):
        raise AssertionError("not called")

    custom.tags = TagConfig(think_tag="reasoning")
    assert reward_tags(custom) == REASONING_TAGS


def test_rgr_prefix_cuts_at_the_configured_tags():
    response = "<reasoning> 2 + 3 = 6 </reasoning> <answer> 6 </answer>"
    assert reflection_prefix_text(response, cue="CUE", tags=REASONING_TAGS) == "<reasoning> 2 + 3 = 6\nCUE\n"
    # read with the default tags the </reasoning> is not a closing tag: it would stay in the prefix
    assert reflection_prefix_text(response, cue="CUE") == "<reasoning> 2 + 3 = 6 </reasoning>\nCUE\n"
    assert reflection_prefix_text("<reasoning> a <answer> 1 </answer>", cue="", tags=REASONING_TAGS) == "<reasoning> a\n"


def test_instruction_asks_for_the_configured_tags():
    reasoning = system_prompt_for(REASONING_TAGS)
    assert "<reasoning>" in reasoning and "</reasoning>" in reasoning and "<answer>" in reasoning
    assert "<think>" not in reasoning and "</think>" not in reasoning
    assert reasoning == SYSTEM_PROMPT.replace("think>", "reasoning>")  # the same instruction, only the tag differs
    assert system_prompt_for() == SYSTEM_PROMPT == resolve_system_prompt(None)
    assert resolve_system_prompt(None, REASONING_TAGS) == reasoning
    assert resolve_system_prompt("Be brief.", REASONING_TAGS) == "Be brief."  # a given text is kept as is
    assert resolve_system_prompt("", REASONING_TAGS) is None


def test_sft_target_uses_the_configured_tags(tokenizer):
    from care_megatron.data.schema import Record
    from care_megatron.sft import sft_response_text

    record = Record(id="r", source="t", question="q", images=[], answer="4", answer_type="integer",
                    rationale="two plus two")
    assert sft_response_text(record, REASONING_TAGS) == "<reasoning>two plus two</reasoning><answer>4</answer>"
    assert sft_response_text(record) == "<think>two plus two</think><answer>4</answer>"


def test_benchmark_answer_span_follows_the_tags():
    from care_megatron.data.schema import Record
    from care_megatron.evaluation.benchmarks import score_benchmark_detail

    record = Record(id="m", source="mathverse", question="q", images=[], answer="B", answer_type="multiple_choice",
                    choices=["1", "2", "3"])
    # a rationale mentioning the answer tag: only the reasoning tags see where the rationale ends
    response = "<reasoning>I will put <answer> tags on it</reasoning><answer>B</answer>"
    assert score_benchmark_detail("mathverse", record, response, tags=REASONING_TAGS).score == 1.0
    assert score_benchmark_detail("mathverse", record, response).extracted != "B"


def test_token_regions_match_parse_spans_for_reasoning(tokenizer):
    """Every THINK token lies in the <reasoning> span and every character of it is covered."""
    text = "<reasoning>count: 3 + 4 = 7</reasoning>\n<answer>7</answer>"
    ids = tokenizer.encode(text, add_special_tokens=False)
    regions, parsed = regions_from_token_ids(ids, tokenizer, REASONING_TAGS)
    think_text = "".join(tokenizer.decode([i]) for i, r in zip(ids, regions.tolist()) if r == T)
    assert think_text == "<reasoning>count: 3 + 4 = 7</reasoning>"
    assert parsed.think_span == (0, len("<reasoning>count: 3 + 4 = 7</reasoning>"))
    answer_text = "".join(tokenizer.decode([i]) for i, r in zip(ids, regions.tolist()) if r == A)
    assert answer_text == "<answer>7</answer>"
