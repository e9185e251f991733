"""Every RNG state a run draws from, captured into and restored from a checkpoint's per-rank state."""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch
from megatron.core import tensor_parallel

log = logging.getLogger(__name__)


def capture_rng_state() -> dict[str, Any]:
    """Python's, numpy's, torch's (and CUDA's) RNG states, and megatron's tracker states when it has any."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        state["megatron_tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    except Exception as e:  # the tracker is optional (not initialised in some tools)
        log.debug("no megatron RNG tracker state saved: %s", e)
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the RNG states `capture_rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "megatron_tracker" in state:
        tensor_parallel.get_cuda_rng_tracker().set_states(state["megatron_tracker"])
