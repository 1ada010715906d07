"""care_megatron.rollout."""
