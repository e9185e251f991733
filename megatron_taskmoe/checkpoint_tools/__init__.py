"""Offline checkpoint utilities: reshard (convert), merge task-MoE models, extract per-task sub-networks, export.

Every tool works on one parallelism-free representation, `full.FullCheckpoint` (full tensors under the names of the
single-process `EncoderDecoderModel`, plus the `checkpoint.json` record and the tokenizer), read from and written
to trainer checkpoints (megatron-core dist_checkpointing, any TP/EP layout) or one safetensors file.
"""
