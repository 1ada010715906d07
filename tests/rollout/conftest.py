"""Fixtures of the rollout tests; the helpers live in _rollout_helpers (importable by name)."""
from _rollout_helpers import image_processor, model, tokenizer  # noqa: F401  (pytest fixtures)
