"""care_megatron.models."""
