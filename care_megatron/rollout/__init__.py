"""care_megatron.rollout: rollout engines (transformers, SGLang), RGR requests, the colocated RL
step schedule and the train / rollout mismatch metric.

Importing this package never imports SGLang; ``get_rollout_engine("sglang", ...)`` does.
"""
from care_megatron.rollout.base import Completion, GenerationRequest, RolloutEngine, SamplingParams
from care_megatron.rollout.colocate import PHASES, PhaseTimer, StepSchedule, sync_weights
from care_megatron.rollout.mismatch import logprob_temperature, rollout_mismatch, truncated_importance_weights
from care_megatron.rollout.reflection import REPAIR_CUE, build_reflection_request, build_rgr_request, reflection_prefix_text
from care_megatron.rollout.registry import ROLLOUT_ENGINES, get_rollout_engine, get_rollout_engine_class

__all__ = [
    "Completion", "GenerationRequest", "RolloutEngine", "SamplingParams",
    "PHASES", "PhaseTimer", "StepSchedule", "sync_weights",
    "logprob_temperature", "rollout_mismatch", "truncated_importance_weights",
    "REPAIR_CUE", "build_reflection_request", "build_rgr_request", "reflection_prefix_text",
    "ROLLOUT_ENGINES", "get_rollout_engine", "get_rollout_engine_class",
]
