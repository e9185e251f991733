"""Logits of trainer checkpoints on the tools' fixed batch, computed with the megatron-core of the interpreter that
runs this script (test_checkpoint_cross_version.py runs it with two).

Usage (from the repository root): python -m tests.helpers.cross_version_logits OUT_DIR CHECKPOINT_OR_RUN_DIR...
writes OUT_DIR/0.npy, OUT_DIR/1.npy, ... (one per checkpoint, [B, T, V]) and prints the megatron-core release.
"""

import sys
from pathlib import Path

import numpy as np

from megatron_taskmoe import compat
from megatron_taskmoe.checkpoint_tools.reading import read_checkpoint
from megatron_taskmoe.checkpoint_tools.verify import checkpoint_logits, fixed_batch
from megatron_taskmoe.compat.versions import mcore_version
from megatron_taskmoe.inference import find_checkpoint


def main(argv: list[str]) -> int:
    compat.apply()
    out_dir, checkpoints = Path(argv[0]), argv[1:]
    out_dir.mkdir(parents=True, exist_ok=True)
    for i, checkpoint in enumerate(checkpoints):
        ckpt = read_checkpoint(find_checkpoint(checkpoint).path)
        logits_BTV = checkpoint_logits(ckpt, fixed_batch(ckpt.model_config()))
        np.save(out_dir / f"{i}.npy", logits_BTV.numpy())
    print(mcore_version())
    return 0


if __name__ == "__main__":  # dist_checkpointing spawns helper processes
    sys.exit(main(sys.argv[1:]))
