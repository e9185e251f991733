"""What `compat.apply()` installs: a `Fix` (one change to megatron-core, for the releases it names) made of
`Patch`es (each attribute it replaced, where, and why)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

from megatron_taskmoe.compat.versions import VersionRange


class Patch(NamedTuple):
    """One attribute of megatron-core that a fix replaced."""

    name: str
    """The attribute (or a short description of the replacement), e.g. "te_general_gemm=None"."""
    where: str
    """The megatron-core module that holds it."""
    why: str
    """What megatron-core does there that needs the change."""


@dataclass(frozen=True, kw_only=True)
class Fix:
    """One change `compat.apply()` makes to megatron-core, and the releases it applies to."""

    name: str
    """What it is, as `compat.describe()` lists it."""
    versions: VersionRange
    """The megatron-core releases whose code needs it (read in each release's source; run on `TESTED_MCORE`)."""
    cpu_only: bool
    """True: a CPU stand-in, installed only without CUDA. False: a bug fix, on CPU and GPU."""
    install: Callable[[], list[Patch]]
    """Installs it; returns the patches it made (none where the installed release turns out not to need it)."""
