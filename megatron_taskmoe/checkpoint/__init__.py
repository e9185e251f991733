"""The on-disk format of trainer checkpoints, owned in one place.

Layout of a checkpoint root (`RUN/checkpoints`):

    ROOT/latest                   name of the newest complete checkpoint (replaced atomically)
    ROOT/step_00000100/           a complete checkpoint:
        (megatron-core dist_checkpointing files: model and optimizer, sharded, reshardable on load)
        rank_state/rank_00003.pt  per-rank state that cannot be resharded (RNG states)
        tokenizer.model           the sentencepiece model the run trained with
        checkpoint.json           the `CheckpointRecord`: completion marker and summary, written last
    ROOT/.partial.step_00000200/  a save in progress (or one that crashed): never listed, removed by the next save

Modules: `format` (names and metadata constants), `record` (`CheckpointRecord`, reading and writing
`checkpoint.json`), `state` (the sharded state dict of model + optimizer, save and load through megatron-core),
`manager` (atomic saves, listing, retention, rank state), `rng` (RNG capture and restore), `process_groups`
(megatron's process groups for one-process models). The trainer, inference and the checkpoint tools read and write
checkpoints through these; this package imports nothing from `training`.
"""
