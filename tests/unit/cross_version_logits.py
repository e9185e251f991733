"""Logits of a trainer checkpoint on the tools' fixed batch, computed with the megatron-core of the interpreter
that runs this script (test_checkpoint_cross_version.py runs it with two).

Usage: python cross_version_logits.py CHECKPOINT_OR_RUN_DIR OUT.npy   (prints the megatron-core release)
"""

import sys

import numpy as np

from megatron_taskmoe.checkpoint_tools.io import read_checkpoint
from megatron_taskmoe.checkpoint_tools.verify import checkpoint_logits, fixed_batch
from megatron_taskmoe.inference import find_checkpoint
from megatron_taskmoe.mcore_compat import mcore_version


def main(argv: list[str]) -> int:
    checkpoint, out = argv
    ckpt = read_checkpoint(find_checkpoint(checkpoint).path)
    logits_BTV = checkpoint_logits(ckpt, fixed_batch(ckpt.model_config()))
    np.save(out, logits_BTV.numpy())
    print(mcore_version())
    return 0


if __name__ == "__main__":  # dist_checkpointing spawns helper processes
    sys.exit(main(sys.argv[1:]))
