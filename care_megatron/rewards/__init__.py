"""care_megatron.rewards."""
