"""megatron-core (0.16.1 to 0.19.x) made usable here: CPU stand-ins, fixes to its bugs, and the APIs that differ
between its releases.

One entry point changes megatron-core, `apply()`, called once at the start of every process that uses it (the
trainer `pretrain_mt.py`, the tools' and benchmarks' mains, the test suite's conftest and its spawned workers).
Importing this package or any module of the project changes nothing; building a model or process groups does not
apply it either (`parallel.groups` refuses to run before it, `require_applied()`).

* `apply()` checks that the installed release is in the supported range (`versions.SUPPORTED_MCORE`; set the
  environment variable `MEGATRON_TASKMOE_ALLOW_UNVERIFIED_MCORE=1` to run another release at your own risk), then
  installs the fixes of `FIXES`, each only on the megatron-core releases it states (`Fix.versions`, read off each
  release's source), the CPU stand-ins (`cpu.py`) only when `torch.cuda.is_available()` is false. It is idempotent.
  `APPLIED` lists the fixes installed, `PATCHES` every patch they made, `describe()` both.
  On a CUDA machine it changes nothing but megatron-core bug fixes (`fixes.py`): on 0.16, `moe_utils.
  te_general_gemm` bound to None without Transformer Engine; without Apex/TE (torch's Adam), on every supported
  release, the distributed optimizer's checkpoint paths; on 0.19, optimizer checkpoints that load under other
  LR/WD settings and the `common.pt` that earlier releases read.
* The API shims, imported where used: `versions` (the supported range, `mcore_version`, `mcore_at_least`),
  `aux_losses` (the MoE aux-loss tracker), `moe` (permute, shared experts in the dispatcher, fused permutation),
  `inference_context` (`BaseInferenceContext` initialisation).
"""

from __future__ import annotations

import torch

from megatron_taskmoe.compat import cpu, fixes
from megatron_taskmoe.compat.fix import Fix, Patch
from megatron_taskmoe.compat.versions import VersionRange, check_mcore_version, mcore_version

_FROM_0_16_1 = VersionRange(first="0.16.1")

# Every fix, in the order apply() installs them. `versions` were read off each release's source (0.16.1, 0.17.0,
# 0.17.1, 0.18.0, 0.18.2, 0.19.0, 0.19.2); a range without an end still holds in 0.19.2.
FIXES: tuple[Fix, ...] = (
    Fix(name="te_general_gemm bound to None without Transformer Engine", cpu_only=False,
        install=fixes.install_te_name_fix, versions=VersionRange(first="0.16.1", end="0.17")),
    Fix(name="torch Adam `step` in distributed-optimizer checkpoints", cpu_only=False,
        install=fixes.install_torch_adam_step_fix, versions=_FROM_0_16_1),
    Fix(name="optimizer checkpoints load under other LR/WD schedule settings", cpu_only=False,
        install=fixes.install_param_group_schedule_fix, versions=VersionRange(first="0.19.0")),
    Fix(name="checkpoints keep common.pt for megatron-core 0.16-0.18", cpu_only=False,
        install=fixes.install_legacy_common_state_file, versions=VersionRange(first="0.19.0")),
    Fix(name="CUDA devices, streams and sync map to the CPU (_CpuTorch)", cpu_only=True,
        install=cpu.install_torch_proxies, versions=_FROM_0_16_1),
    Fix(name="RNG tracker over the CPU generator", cpu_only=True, install=cpu.install_cpu_rng, versions=_FROM_0_16_1),
    Fix(name="uneven first-dim gather / reduce-scatter on gloo", cpu_only=True,
        install=cpu.install_gloo_uneven_collectives, versions=_FROM_0_16_1),
    Fix(name="all-to-all split sizes as host arrays for gloo", cpu_only=True,
        install=cpu.install_alltoall_host_splits, versions=_FROM_0_16_1),
    Fix(name="optimizer parameter-type checks accept CPU tensors", cpu_only=True,
        install=cpu.install_optimizer_type_checks, versions=_FROM_0_16_1),
)

APPLIED: list[Fix] = []
"""The fixes `apply()` installed, in order."""

PATCHES: list[Patch] = []
"""Every patch the installed fixes made, in order."""

_STATE = {"applied": False}


def apply() -> tuple[Fix, ...]:
    """Make megatron-core usable in this process; returns the fixes installed (`APPLIED`).

    Call once at process start; later calls change nothing and return the same fixes."""
    if _STATE["applied"]:
        return tuple(APPLIED)
    check_mcore_version()
    version = mcore_version()
    cpu_only_too = not torch.cuda.is_available()
    for fix in FIXES:
        if version in fix.versions and (cpu_only_too or not fix.cpu_only):
            PATCHES.extend(fix.install())
            APPLIED.append(fix)
    _STATE["applied"] = True
    return tuple(APPLIED)


def is_applied() -> bool:
    """Whether `apply()` has run in this process."""
    return _STATE["applied"]


def require_applied(what: str) -> None:
    """Raise a RuntimeError naming `what` unless `apply()` has run in this process."""
    if not _STATE["applied"]:
        raise RuntimeError(
            f"{what}: megatron_taskmoe.compat.apply() has not run in this process; call it once at process start "
            "(before building process groups or models)"
        )


def describe() -> str:
    """The fixes `apply()` installed for this megatron-core release (with the releases each applies to), then one
    line per installed patch."""
    lines = [f"megatron-core {mcore_version()}; fixes applied:"]
    lines += [f"  {fix.name} (megatron-core {fix.versions}{', CPU only' if fix.cpu_only else ''})" for fix in APPLIED]
    lines += [f"{name:55s} {where:50s} {why}" for name, where, why in PATCHES]
    return "\n".join(lines)
