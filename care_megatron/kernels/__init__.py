"""care_megatron.kernels."""
