"""care_megatron.rewards: response parsing, token regions, the verifier and the reward registry.

Spec: CARE_SPEC.md sections 1 (rewards) and 6 (token regions).
"""
from care_megatron.rewards.parsing import (
    DEFAULT_TAGS,
    REASONING_TAGS,
    THINK_TAGS,
    ParsedResponse,
    TagConfig,
    parse_response,
    regions_from_token_ids,
    token_char_offsets,
    tags_for,
    token_regions,
)
from care_megatron.rewards.batch_scoring import score_batch
from care_megatron.rewards.regions import Region
from care_megatron.rewards.registry import REWARD_REGISTRY, get_reward_fn, register_reward
from care_megatron.rewards.verifier import (
    ANSWER_TYPES,
    RewardScore,
    VerifierConfig,
    infer_answer_type,
    score,
)

__all__ = [
    "ANSWER_TYPES",
    "DEFAULT_TAGS",
    "REASONING_TAGS",
    "REWARD_REGISTRY",
    "THINK_TAGS",
    "ParsedResponse",
    "Region",
    "RewardScore",
    "TagConfig",
    "VerifierConfig",
    "get_reward_fn",
    "infer_answer_type",
    "parse_response",
    "regions_from_token_ids",
    "register_reward",
    "score",
    "score_batch",
    "tags_for",
    "token_char_offsets",
    "token_regions",
]
