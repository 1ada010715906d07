"""A task-specific reward loaded by dotted path in the registry tests (not registered by name)."""
from care_megatron.rewards.verifier import RewardScore, combine, score


def exact_string_reward(response, ground_truth, answer_type=None, choices=None, *, config=None):
    """Accuracy 1 only for a byte-identical answer span; format from the standard verifier."""
    base = score(response, ground_truth, "text", config=config)
    from care_megatron.rewards.parsing import parse_response

    answer = parse_response(response).answer
    acc = 1.0 if answer is not None and answer == str(ground_truth) else 0.0
    return RewardScore(acc, base.format, combine(acc, base.format, 0.1), answer, "byte-identical" if acc else "differs", "text")
