"""care_megatron.algorithm."""
