"""Rollout engines by name, imported lazily so the CPU path never imports SGLang."""
from __future__ import annotations

import importlib
from typing import Any

from care_megatron.rollout.base import RolloutEngine

ROLLOUT_ENGINES: dict[str, str] = {
    "hf": "care_megatron.rollout.hf_engine:HFRolloutEngine",
    "sglang": "care_megatron.rollout.sglang_engine:SGLangRolloutEngine",
}
"""Engine name -> ``module:class``; the module is imported only when its engine is asked for."""


def get_rollout_engine_class(name: str) -> type:
    """The engine class registered under ``name`` (``RolloutConfig.engine``)."""
    if name not in ROLLOUT_ENGINES:
        raise ValueError(f"unknown rollout engine {name!r}; valid: {', '.join(sorted(ROLLOUT_ENGINES))}")
    module_name, class_name = ROLLOUT_ENGINES[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def get_rollout_engine(name: str, *args: Any, **kwargs: Any) -> RolloutEngine:
    """Build the engine registered under ``name`` with the engine's own constructor arguments:

    * ``hf``: ``HFRolloutEngine(model, tokenizer, batch_size=..., ...)``;
    * ``sglang``: ``SGLangRolloutEngine(SGLangEngineConfig(...), tokenizer=...)`` (needs the
      ``[sglang]`` extra; a missing install raises ImportError naming it).
    """
    return get_rollout_engine_class(name)(*args, **kwargs)
