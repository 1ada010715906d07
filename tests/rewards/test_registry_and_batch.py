"""Reward registry (names, dotted paths, errors) and score_batch (sequential and process pool)."""
import random

import pytest

from care_megatron.rewards import batch_scoring, registry, verifier
from care_megatron.rewards.batch_scoring import score_batch
from care_megatron.rewards.registry import get_reward_fn, register_reward
from care_megatron.rewards.verifier import RewardScore, score


def wrap(answer):
    return f"<think>r</think><answer>{answer}</answer>"


def test_builtin_names():
    assert get_reward_fn("verifier")(wrap("4"), "4").overall == 1.0
    assert get_reward_fn("default")(wrap("4"), "4").overall == 1.0
    # the typed rewards force their type: "4.00004" is a float match but not an integer match
    assert get_reward_fn("float")(wrap("4.00004"), "4").accuracy == 1.0
    assert get_reward_fn("integer")(wrap("4.00004"), "4").accuracy == 0.0
    assert get_reward_fn("text")(wrap("B"), "b").accuracy == 1.0
    assert get_reward_fn("multiple_choice")(wrap("b"), "B", choices=["x", "y"]).accuracy == 1.0


def test_dotted_paths():
    for name in ("plugin_reward.exact_string_reward", "plugin_reward:exact_string_reward"):
        fn = get_reward_fn(name)
        assert fn(wrap("Paris"), "Paris").accuracy == 1.0
        assert fn(wrap("paris"), "Paris").accuracy == 0.0
    assert get_reward_fn("care_megatron.rewards.verifier.score") is score


def test_register_decorator_and_conflicts():
    @register_reward("test_always_one")
    def always_one(response, ground_truth, answer_type=None, choices=None, *, config=None):
        return RewardScore(1.0, 1.0, 1.0, None, "always")

    try:
        assert get_reward_fn("test_always_one") is always_one
        register_reward("test_always_one", always_one)  # same function again: fine
        with pytest.raises(ValueError, match="already registered"):
            register_reward("test_always_one", lambda *a, **k: None)
    finally:
        registry.REWARD_REGISTRY.pop("test_always_one", None)


@pytest.mark.parametrize(
    "name,match",
    [("nope", "unknown reward 'nope'; registered: .*verifier"), ("no_such_module.fn", "cannot import"),
     ("care_megatron.rewards.verifier.nope", "no attribute"), ("care_megatron.rewards.verifier.ANSWER_TYPES", "non-callable"), ("", "non-empty")],
)
def test_bad_names(name, match):
    with pytest.raises(ValueError, match=match):
        get_reward_fn(name)


def make_batch(n, seed=0):
    rng = random.Random(seed)
    responses, truths, types, choices = [], [], [], []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            k = rng.randrange(4)
            truths.append("ABCD"[k]); choices.append(["1", "2", "3", "4"]); types.append(None)
            responses.append(wrap(rng.choice(["A", "(B)", "Option C", "4", "D."])))
        elif kind == 1:
            v = rng.randrange(100)
            truths.append(str(v)); choices.append(None); types.append("integer")
            responses.append(wrap(f"{v + rng.choice([0, 0, 1])} apples"))
        elif kind == 2:
            truths.append("0.5"); choices.append(None); types.append("float")
            responses.append(wrap(rng.choice(["1/2", "\\frac{1}{2}", "0.50", "0.6"])))
        elif kind == 3:
            truths.append("Paris"); choices.append(None); types.append("text")
            responses.append(rng.choice([wrap("paris."), wrap("Lyon"), "Paris", "<answer>PARIS</answer>"]))
        else:
            truths.append("\\frac{\\sqrt{2}}{2}"); choices.append(None); types.append("latex")
            responses.append(wrap(rng.choice(["\\frac{1}{\\sqrt{2}}", "\\sqrt{2}", "0.7071068"])))
    return responses, truths, types, choices


def test_score_batch_sequential_matches_score():
    responses, truths, types, choices = make_batch(60)
    batch = score_batch(responses, truths, types, choices, num_workers=1)
    assert batch == [score(r, t, a, c) for r, t, a, c in zip(responses, truths, types, choices)]
    assert {s.accuracy for s in batch} == {0.0, 1.0}


def test_score_batch_process_pool_matches_sequential(capsys):
    responses, truths, types, choices = make_batch(300, seed=1)
    assert len(responses) >= batch_scoring.SEQUENTIAL_BELOW
    pooled = score_batch(responses, truths, types, choices, num_workers=2, progress=True, chunk_size=32)
    sequential = score_batch(responses, truths, types, choices, num_workers=1)
    assert pooled == sequential
    assert "300/300" in capsys.readouterr().err  # the progress bar reached the end


def test_score_batch_with_dotted_reward_in_pool():
    responses = [wrap("Paris"), wrap("paris")] * 150
    out = score_batch(responses, ["Paris"] * 300, num_workers=2, reward_fn="care_megatron.rewards.verifier.score")
    assert [s.accuracy for s in out] == [1.0] * 300


def test_score_batch_validates_lengths():
    with pytest.raises(ValueError, match="ground_truths"):
        score_batch([wrap("1")], ["1", "2"])
    with pytest.raises(ValueError, match="answer_types"):
        score_batch([wrap("1")], ["1"], answer_types="integer")
    with pytest.raises(ValueError, match="unknown reward"):
        score_batch([wrap("1")], ["1"], reward_fn="nope")
    assert score_batch([], []) == []
