"""Held-out evaluation reports the mean ``<think>`` length the way training counts it (``Rollout.think_length``):
hand-counted tokens of fixed responses, and parity with the training path on the same completions."""
import pytest

from care_megatron.data.prompting import build_image_processor
from care_megatron.data.synthetic import generate
from care_megatron.evaluation.scoring import evaluate
from care_megatron.experience import make_rollout
from care_megatron.models import load_tokenizer
from care_megatron.rewards.registry import get_reward_fn
from care_megatron.rollout.base import Completion, SamplingParams

STOP = 2  # <|im_end|> of the tiny tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


def completion(request_id, ids):
    return Completion(request_id=request_id, token_ids=list(ids), text="", logprobs=[0.0] * len(ids),
                      finish_reason="stop")


class FixedEngine:
    """Answers request ``eval-i`` with the i-th fixed token list, as a rollout engine returns them."""

    def __init__(self, responses):
        self.responses = responses

    def generate(self, requests, sampling):
        return [completion(r.request_id, self.responses[int(r.request_id.split("-")[-1])]) for r in requests]


def test_eval_think_length_is_the_training_count(tokenizer):
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    # the tiny tokenizer has one token per tag: <think> a b c </think> = 5 think tokens (tags count to the span)
    assert encode("<think>a b c</think>") == [1020, 71, 296, 280, 1021]
    responses = [encode("<think>a b c</think> <answer>2</answer>") + [STOP],  # 5 think tokens, stop dropped
                 encode("<think>a</think><answer>1</answer>") + [STOP],  # 3
                 encode("<answer>1</answer>") + [STOP],  # no rationale: 0
                 encode("<think>a b")]  # truncated, unclosed: <think> a b = 3
    records = (generate("compare_lengths", 2, seed=0) + generate("count_shapes", 2, seed=0))
    processor = build_image_processor("qwen2_5_vl", min_pixels=56 * 56, max_pixels=56 * 56)
    reward_fn = get_reward_fn("verifier")
    sampling = SamplingParams(temperature=0.0, max_new_tokens=16, stop_token_ids=[STOP])
    report = evaluate(FixedEngine(responses), records, tokenizer, processor, reward_fn, sampling, batch_size=3)
    assert report.think_length == pytest.approx((5 + 3 + 0 + 3) / 4)
    assert report.per_source["compare_lengths"]["think_length"] == pytest.approx(4.0)
    assert report.per_source["count_shapes"]["think_length"] == pytest.approx(1.5)
    assert report.format_rate == pytest.approx(0.5)  # the first two are well formed
    metrics = report.as_metrics(prefix="eval_sampled/")
    assert metrics["eval_sampled/think_length"] == report.think_length
    assert metrics["eval_sampled/format"] == report.format_rate
    assert report.as_metrics()["eval/think_length"] == report.think_length
    assert "think" in report.to_table().splitlines()[0]

    # the training path on the same completions counts the same tokens
    training = [make_rollout(0, record, None, completion(f"train-{i}", ids), tokenizer, reward_fn, {STOP}).think_length
                for i, (record, ids) in enumerate(zip(records, responses))]
    assert training == [5, 3, 0, 3]


def test_eval_think_length_counts_reasoning_tokens_with_reasoning_tags(tokenizer):
    """``data.think_tag=reasoning``: the reward function's tags decide the think region of held-out
    responses too, and <reasoning> is several tokens in the tiny vocabulary."""
    import functools

    from care_megatron.rewards.parsing import REASONING_TAGS
    from care_megatron.rewards.verifier import VerifierConfig

    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    rationale = encode("<reasoning>a b c</reasoning>")
    assert len(rationale) > 5
    responses = [rationale + encode("<answer>2</answer>") + [STOP],
                 encode("<think>a</think><answer>1</answer>") + [STOP],  # the other tag: no rationale, bad format
                 encode("<answer>1</answer>") + [STOP],
                 encode("<reasoning>a b")]  # truncated, unclosed
    records = (generate("compare_lengths", 2, seed=0) + generate("count_shapes", 2, seed=0))
    processor = build_image_processor("qwen2_5_vl", min_pixels=56 * 56, max_pixels=56 * 56)
    reward_fn = functools.partial(get_reward_fn("verifier"), config=VerifierConfig(tags=REASONING_TAGS))
    sampling = SamplingParams(temperature=0.0, max_new_tokens=16, stop_token_ids=[STOP])
    report = evaluate(FixedEngine(responses), records, tokenizer, processor, reward_fn, sampling, batch_size=3)
    counts = [len(rationale), 0, 0, len(encode("<reasoning>a b"))]
    assert report.think_length == pytest.approx(sum(counts) / 4)
    assert report.format_rate == pytest.approx(0.25)  # only the first
    training = [make_rollout(0, record, None, completion(f"train-{i}", ids), tokenizer, reward_fn, {STOP}).think_length
                for i, (record, ids) in enumerate(zip(records, responses))]
    assert training == counts
