"""care_megatron.evaluation."""
