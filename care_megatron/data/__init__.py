"""care_megatron.data."""
