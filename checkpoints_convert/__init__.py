"""Command-line Hugging Face <-> Megatron-Core checkpoint converters (``hf_to_megatron.py``,
``megatron_to_hf.py``, ``verify.py``) and one adapter module per architecture (:mod:`.qwen2`,
:mod:`.qwen3`, :mod:`.qwen2_5_vl`, :mod:`.qwen3_vl`: ``SPEC``, ``hf_to_megatron``, ``megatron_to_hf``).

The names and layouts they use are the library's (:mod:`care_megatron.models.weight_mapping`, the
single source of truth the Megatron backend and the rollout weight export also use); this package
only adds file I/O and command lines on top, and nothing in ``care_megatron`` imports it.
"""
