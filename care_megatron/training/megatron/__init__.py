"""Megatron-Core training backend for Qwen2.5-VL / Qwen3-VL (see ``backend.MegatronBackend``).

Modules (megatron-core is imported lazily inside functions, so importing this package is cheap):

* ``backend``         ``MegatronBackend`` (the ``TrainingBackend`` protocol), ``from_run_config``
* ``model_provider``  TransformerConfig / ModuleSpec / ``QwenVLMegatronModel`` from an HF config; name helpers
* ``attention``       local-spec core attention: SDPA, flash varlen, flex_attention, per-document loop
* ``packed_forward``  THD packed forward: embeddings + vision scatter, M-RoPE, DeepStack hook, log-probs
* ``logprobs``        fused, chunked, vocab-parallel log-probs / entropy (autograd)
* ``vision``          replicated HF vision tower and its TP gradient sync
* ``optimizer``       Megatron (distributed) optimizer on GPU, AdamW + explicit all-reduce on CPU
* ``checkpoint``      ``dist_checkpointing`` save / load with TP resharding
* ``parallel_state``  process groups, layout validation, pure layer-placement / CP-split arithmetic
* ``cpu_compat``      the CPU (gloo) adjustments Megatron needs; ``te``: the only Transformer Engine import
"""
