"""Reward functions by name, so a task-specific verifier plugs in without touching the trainer.

A reward function has the signature of :func:`care_megatron.rewards.verifier.score`::

    fn(response: str, ground_truth, answer_type=None, choices=None, *, config=None) -> RewardScore

Register one with :func:`register_reward` (a decorator), or name it by dotted path in the config
(``my_pkg.my_module.my_reward`` or ``my_pkg.my_module:my_reward``); :func:`get_reward_fn` resolves
both. Built-ins: ``verifier`` (alias ``default``, the spec section 1 verifier) and one per answer
type (``multiple_choice``, ``integer``, ``float``, ``text``, ``latex``) that forces that type.
"""
from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, Optional

from care_megatron.rewards.parsing import DEFAULT_TAGS, TagConfig
from care_megatron.rewards.verifier import ANSWER_TYPES, RewardScore, VerifierConfig, score

RewardFn = Callable[..., RewardScore]

REWARD_REGISTRY: dict[str, RewardFn] = {}
"""Registered reward functions by name."""


def register_reward(name: str, fn: Optional[RewardFn] = None):
    """Register ``fn`` under ``name`` (usable as ``@register_reward("name")``). Re-registering a name
    with a different function raises ``ValueError``, so two plugins cannot silently shadow each other."""

    def add(f: RewardFn) -> RewardFn:
        if not callable(f):
            raise ValueError(f"reward {name!r} must be callable, got {type(f).__name__}")
        existing = REWARD_REGISTRY.get(name)
        if existing is not None and existing is not f:
            raise ValueError(f"reward name {name!r} is already registered to {existing!r}")
        REWARD_REGISTRY[name] = f
        return f

    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")
    return add(fn) if fn is not None else add


def _typed_score(answer_type: str) -> RewardFn:
    def fixed(response: str, ground_truth: Any, answer_type_ignored: Optional[str] = None, choices=None, *, config: Optional[VerifierConfig] = None, **_: Any) -> RewardScore:
        return score(response, ground_truth, answer_type, choices, config=config)

    fixed.__name__ = f"score_{answer_type}"
    fixed.__doc__ = f"The verifier with answer_type={answer_type!r} whatever the record says."
    return fixed


def _verifier(response: str, ground_truth: Any, answer_type: Optional[str] = None, choices=None, *, config: Optional[VerifierConfig] = None, **_: Any) -> RewardScore:
    return score(response, ground_truth, answer_type, choices, config=config)


register_reward("verifier", _verifier)
register_reward("default", _verifier)
for _t in ANSWER_TYPES:
    register_reward(_t, _typed_score(_t))


@functools.lru_cache(maxsize=64)
def _import_dotted(path: str) -> RewardFn:
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"reward {path!r} is not a registered name nor a dotted path 'module.function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward {path!r}: cannot import module {module_name!r} ({exc})") from exc
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"reward {path!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"reward {path!r} resolves to a non-callable {type(fn).__name__}")
    return fn


def get_reward_fn(name: str) -> RewardFn:
    """The reward function registered as ``name``, or imported from the dotted path ``name``.

    Raises ``ValueError`` listing the registered names when neither works.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")
    if name in REWARD_REGISTRY:
        return REWARD_REGISTRY[name]
    if "." in name or ":" in name:
        return _import_dotted(name)
    raise ValueError(f"unknown reward {name!r}; registered: {', '.join(sorted(REWARD_REGISTRY))}; or give a dotted path 'package.module.function'")


def reward_tags(reward_fn: RewardFn) -> TagConfig:
    """The tags ``reward_fn`` checks the format with, so that whoever reads the token regions of the same
    responses (rollouts, held-out evaluation) reads them with the same tags and the format reward, the
    think region and the think length can never disagree.

    ``reward_fn.tags`` when it has that attribute (a TagConfig); else the ``tags`` of the VerifierConfig
    bound as its ``config`` keyword, as the trainer and ``care-eval`` build it
    (``functools.partial(get_reward_fn(name), config=VerifierConfig(..., tags=config.data.tag_config))``);
    else the default ``<think>`` / ``<answer>`` tags.
    """
    tags = getattr(reward_fn, "tags", None)
    if isinstance(tags, TagConfig):
        return tags
    config = (getattr(reward_fn, "keywords", None) or {}).get("config")
    if isinstance(config, VerifierConfig):
        return config.tags
    return DEFAULT_TAGS
