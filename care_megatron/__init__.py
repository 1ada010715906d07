"""care_megatron: CARE RLVR for vision-language models, from a laptop CPU to Megatron-scale clusters."""

__version__ = "0.1.0"
