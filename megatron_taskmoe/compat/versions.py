"""The megatron-core releases this project supports, and how a release is read and compared.

Supported: 0.16.1 <= version < 0.20 (`SUPPORTED_MCORE`). 0.16.1 is the last release for Python 3.10/3.11; 0.17
onwards need Python 3.12. Tested: 0.16.1 (Python 3.11, `make test`) and 0.19.2 (Python 3.12, `make test-py312`).
`check_mcore_version()` refuses any other release unless `MEGATRON_TASKMOE_ALLOW_UNVERIFIED_MCORE=1`.

The version string: from 0.17 megatron appends `+<git hash>` of the repository its files lie in (a virtual
environment inside a git work tree gives "0.19.2+9f78e8f"); `mcore_version()` is the release alone.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from typing import Optional

logger = logging.getLogger(__name__)

ALLOW_UNVERIFIED_ENV = "MEGATRON_TASKMOE_ALLOW_UNVERIFIED_MCORE"


def version_key(text: str, *, floor: bool = False) -> tuple[int, int, int, int]:
    """Sort key of a megatron-core version: (major, minor, patch, 1 for a final release / 0 for a pre-release).

    "+local" suffixes are ignored; a missing patch is 0. `floor=True` reads the text as a bound below every
    release of that number, pre-releases included (the end of a half-open range: "0.20" excludes 0.20.0rc1)."""
    match = re.fullmatch(r"(\d+)\.(\d+)(?:\.(\d+))?(.*)", text.strip().split("+")[0])
    if match is None:
        raise ValueError(f"not a megatron-core version: {text!r}")
    major, minor, patch, rest = match.groups()
    final = 0 if floor or rest else 1
    return int(major), int(minor), int(patch or 0), final


@dataclass(frozen=True, kw_only=True)
class VersionRange:
    """The megatron-core releases `first` <= version < `end` (`end` None: no upper bound)."""

    first: str
    """The first release in the range, e.g. "0.16.1"."""
    end: Optional[str] = None
    """The first release number past the range, e.g. "0.20" (its pre-releases are past it too)."""

    def __post_init__(self) -> None:
        version_key(self.first)
        if self.end is not None and version_key(self.end, floor=True) <= version_key(self.first):
            raise ValueError(f"VersionRange: end {self.end!r} is not after first {self.first!r}")

    def __contains__(self, version: str) -> bool:
        key = version_key(version)
        return key >= version_key(self.first) and (self.end is None or key < version_key(self.end, floor=True))

    def __str__(self) -> str:
        return f">={self.first}" + ("" if self.end is None else f",<{self.end}")


SUPPORTED_MCORE = VersionRange(first="0.16.1", end="0.20")
TESTED_MCORE = ("0.16.1", "0.19.2")


def mcore_version() -> str:
    """The installed megatron-core release, e.g. "0.19.2" (without the "+git hash" megatron may append)."""
    # read when asked: this module imports without megatron-core, so the version check can run (and fail clearly)
    # before megatron-core's own import
    from megatron.core import package_info

    return package_info.__version__.split("+")[0]


def mcore_at_least(version: str) -> bool:
    """Whether the installed megatron-core is `version` or later."""
    return version_key(mcore_version()) >= version_key(version)


def check_mcore_version(version: Optional[str] = None) -> None:
    """Refuse megatron-core releases outside `SUPPORTED_MCORE`, unless the user opts in explicitly."""
    version = mcore_version() if version is None else version
    if version in SUPPORTED_MCORE:
        return
    if os.environ.get(ALLOW_UNVERIFIED_ENV, "") == "1":
        logger.warning("megatron-core %s is outside the supported range %s; running anyway because %s=1",
                       version, SUPPORTED_MCORE, ALLOW_UNVERIFIED_ENV)
        return
    raise RuntimeError(
        f"megatron_taskmoe supports megatron-core {SUPPORTED_MCORE} (tested: {', '.join(TESTED_MCORE)}), found "
        f"{version}. Install a supported release (pip install 'megatron-core{SUPPORTED_MCORE}'; 0.17 and later need "
        f"Python 3.12), or set {ALLOW_UNVERIFIED_ENV}=1 to run anyway (the CPU patches and fixes in "
        "megatron_taskmoe/compat/ may then miss or break things)."
    )

