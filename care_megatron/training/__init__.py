"""care_megatron.training."""
