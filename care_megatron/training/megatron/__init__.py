"""care_megatron.training.megatron."""
