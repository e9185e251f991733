"""Parallel layouts that megatron-core does not provide for the encoder-decoder (pipeline parallelism)."""
