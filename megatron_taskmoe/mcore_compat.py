"""The megatron-core releases this project supports, and the APIs that differ between them, in one place.

Supported: 0.16.1 <= version < 0.20 (`SUPPORTED_MCORE`). 0.16.1 is the last release for Python 3.10/3.11; 0.17
onwards need Python 3.12. Tested: 0.16.1 (Python 3.11, `make test`) and 0.19.2 (Python 3.12, `make test-py312`).
`check_mcore_version()` refuses any other release unless `MEGATRON_TASKMOE_ALLOW_UNVERIFIED_MCORE=1`.

What differs, and how this module hides it:

* The version string: from 0.17 megatron appends `+<git hash>` of the repository its files lie in (a virtual
  environment inside a git work tree gives "0.19.2+9f78e8f"); `mcore_version()` is the release alone.
* The MoE aux-loss tracker: a dict of dicts in `moe_utils` up to 0.17 (`get_moe_layer_wise_logging_tracker`,
  `save_to_aux_losses_tracker`, ...); from 0.18 a `MoEMetricsTracker` (`moe_logging.get_moe_metrics_tracker()`)
  whose old functions are deprecated wrappers that return a *copy* of the entries. `record_aux_loss`,
  `aux_loss_entries`, `set_aux_loss_entries`, `reduce_aux_losses`, `clear_aux_losses` and `reset_aux_losses` use the
  tracker this release has, with one meaning everywhere: an entry is summed over the pipeline group and its reduce
  group, averaged over its average group, and averaged over data parallelism when `needs_dp_avg` (0.16.1's rule:
  entries with a reduce group that does not span the data-parallel ranks).
* `moe_utils.permute`: 3 results up to 0.16, 5 from 0.17 (plus pad offsets and tokens per expert for the fused
  permute-and-pad); `mcore_permute` returns the first 3 on every release.
* Shared experts under the all-to-all dispatcher: megatron moved their fc1 into `token_dispatch` and their fc2 into
  `token_combine` in 0.18 (`shared_experts_run_in_token_comm()`).
* Inference contexts (the decoder's key/value cache is one): `BaseInferenceContext.__init__` takes the
  `materialize_only_last_token_logits` flag in 0.16, an `InferenceConfig` carrying it from 0.17
  (`init_inference_context`).
* The fused permutation on GPU (`moe_permute_fusion`): megatron's own, through Transformer Engine's kernels, in every
  supported release; from 0.17 megatron also uses TE's fused permute-and-pad where FP8/FP4 padding asks for it.
  `megatron_permute_fusion_available()` says whether this machine has it.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)

ALLOW_UNVERIFIED_ENV = "MEGATRON_TASKMOE_ALLOW_UNVERIFIED_MCORE"


# ---------------------------------------------------------------------------------------------------------------
# Versions.
# ---------------------------------------------------------------------------------------------------------------
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
        "megatron_taskmoe/platform.py may then miss or break things)."
    )


# ---------------------------------------------------------------------------------------------------------------
# The MoE aux-loss tracker.
# ---------------------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class AuxLossEntry:
    """One tracked aux loss: a value per layer and how it is reduced over ranks."""

    values: torch.Tensor
    """[num_layers] sums of what each layer recorded (the tracker's own tensor, not a copy)."""
    reduce_group: Any = None
    """Process group the values are summed over (e.g. the tensor-parallel ranks sharing a sequence), or None."""
    avg_group: Any = None
    """Process group the values are averaged over, or None."""
    needs_dp_avg: bool = False
    """Whether the values are averaged over the data-parallel ranks after the other reductions."""


@functools.lru_cache(maxsize=None)
def _moe_logging_module():
    """megatron's `moe_logging` module (0.18 and later), else None (looked up once: the router logs often)."""
    try:
        return importlib.import_module("megatron.core.transformer.moe.moe_logging")
    except ImportError:
        return None


def _metrics_tracker():
    """megatron's `MoEMetricsTracker` (0.18 and later), else None."""
    module = _moe_logging_module()
    return None if module is None else module.get_moe_metrics_tracker()


def _legacy_tracker() -> dict:
    from megatron.core.transformer.moe import moe_utils

    return moe_utils.get_moe_layer_wise_logging_tracker()


def record_aux_loss(name: str, value: torch.Tensor, layer_number: Optional[int], num_layers: int,
                    reduce_group=None) -> None:
    """Add `value` to aux loss `name` of layer `layer_number` (1-based; None records nothing).

    `reduce_group` (e.g. the tensor-parallel group under sequence parallelism, where `value` is this rank's
    share) is summed over when reducing; such an entry is then averaged over data parallelism (as megatron-core
    0.16.1 does), an entry without one is not."""
    if layer_number is None:
        return
    tracker = _metrics_tracker()
    if tracker is not None:
        tracker.record(name, value, layer_number, num_layers, reduce_group=reduce_group,
                       needs_dp_avg=reduce_group is not None)
        return
    from megatron.core.transformer.moe import moe_utils

    moe_utils.save_to_aux_losses_tracker(name, value, layer_number, num_layers, reduce_group=reduce_group)


def aux_loss_entries() -> dict[str, AuxLossEntry]:
    """The tracked aux losses by name, in the tracker's order (their `values` are the tracker's tensors)."""
    tracker = _metrics_tracker()
    if tracker is not None:
        return {name: AuxLossEntry(values=e.values, reduce_group=e.reduce_group, avg_group=e.avg_group,
                                   needs_dp_avg=e.needs_dp_avg) for name, e in tracker.metrics.items()}
    return {name: AuxLossEntry(values=e["values"], reduce_group=e.get("reduce_group"), avg_group=e.get("avg_group"),
                               needs_dp_avg=e.get("reduce_group") is not None and not e.get("reduce_group_has_dp"))
            for name, e in _legacy_tracker().items()}


def set_aux_loss_entries(entries: dict[str, AuxLossEntry]) -> None:
    """Replace the tracked aux losses by `entries`, in their order."""
    tracker = _metrics_tracker()
    if tracker is not None:
        from megatron.core.transformer.moe.moe_logging import MetricEntry

        tracker.metrics.clear()
        for name, e in entries.items():
            tracker.metrics[name] = MetricEntry(values=e.values, reduce_group=e.reduce_group, avg_group=e.avg_group,
                                                needs_dp_avg=e.needs_dp_avg)
        return
    for entry in entries.values():
        if entry.needs_dp_avg and entry.reduce_group is None:
            raise ValueError("set_aux_loss_entries: megatron-core < 0.18 averages over data parallelism only "
                             "entries that have a reduce group")
    legacy = _legacy_tracker()
    legacy.clear()
    for name, e in entries.items():
        legacy[name] = {"values": e.values, "reduce_group": e.reduce_group, "avg_group": e.avg_group,
                        "reduce_group_has_dp": not e.needs_dp_avg}


def reduce_aux_losses(pg_collection=None) -> None:
    """Reduce every tracked aux loss over the ranks, in place (megatron's own reduction of this release)."""
    tracker = _metrics_tracker()
    if tracker is not None:
        tracker._sync_metrics(list(tracker.metrics), pg_collection)
        return
    from megatron.core.transformer.moe import moe_utils

    moe_utils.reduce_aux_losses_tracker_across_ranks(pg_collection=pg_collection)


def clear_aux_losses() -> None:
    """Zero every tracked aux loss (the entries and their sizes stay)."""
    tracker = _metrics_tracker()
    if tracker is not None:
        tracker.clear()
        return
    for entry in _legacy_tracker().values():
        entry["values"].zero_()


def reset_aux_losses() -> None:
    """Forget every tracked aux loss (the next record sizes its entry afresh)."""
    tracker = _metrics_tracker()
    if tracker is not None:
        tracker.metrics.clear()
        return
    _legacy_tracker().clear()


# ---------------------------------------------------------------------------------------------------------------
# Permutation.
# ---------------------------------------------------------------------------------------------------------------
def mcore_permute(tokens: torch.Tensor, routing_map: torch.Tensor, **kwargs):
    """megatron's `moe_utils.permute`: (permuted tokens, permuted probs or None, sorted indices) on every release.

    Without `num_out_tokens` megatron permutes every routed pair (its drop-and-pad path needs the count), which
    0.19's argsort-based permute does only when given that count: it is passed explicitly."""
    from megatron.core.transformer.moe import moe_utils

    if kwargs.get("num_out_tokens") is None:
        kwargs.update(num_out_tokens=int(routing_map.sum()), drop_and_pad=False)
    return tuple(moe_utils.permute(tokens, routing_map, **kwargs)[:3])


def shared_experts_run_in_token_comm() -> bool:
    """Whether megatron's all-to-all dispatcher runs the overlapped shared experts' fc1 in `token_dispatch` and their
    fc2 in `token_combine` (0.18 and later) rather than in `dispatch_postprocess` / `combine_postprocess`."""
    return mcore_at_least("0.18.0")


def megatron_permute_fusion_available() -> bool:
    """Whether megatron's fused permutation (`moe_permute_fusion`, Transformer Engine's kernels) can run here:
    CUDA, and a Transformer Engine that provides the fused permute, unpermute and chunk-sort kernels."""
    if not torch.cuda.is_available():
        return False
    from megatron.core.transformer.moe import moe_utils

    needed = ("fused_permute", "fused_permute_with_probs", "fused_sort_chunks_by_index",
              "fused_sort_chunks_by_index_with_probs", "fused_unpermute")
    return all(getattr(moe_utils, name, None) is not None for name in needed)


def use_megatron_permute_fusion(permute_backend: str) -> bool:
    """Whether MoE layers with `MoEConfig.permute_backend` take megatron's own dispatcher with its fused
    permutation (`moe_permute_fusion`) instead of ours: for "auto" where `megatron_permute_fusion_available()`.
    "extension" and "torch" always mean our dispatcher and megatron's unfused dispatcher."""
    return permute_backend == "auto" and megatron_permute_fusion_available()


# ---------------------------------------------------------------------------------------------------------------
# Inference contexts.
# ---------------------------------------------------------------------------------------------------------------
def init_inference_context(context, *, materialize_only_last_token_logits: bool = True) -> None:
    """Run `BaseInferenceContext.__init__` on `context`: in 0.16 it takes the `materialize_only_last_token_logits`
    flag itself, from 0.17 an `InferenceConfig` that carries it (read as `context.config.<flag>`)."""
    from megatron.core.inference.contexts.base_context import BaseInferenceContext

    if mcore_at_least("0.17.0"):
        from megatron.core.inference.config import InferenceConfig

        config = InferenceConfig(materialize_only_last_token_logits=materialize_only_last_token_logits)
        BaseInferenceContext.__init__(context, config)
    else:
        BaseInferenceContext.__init__(
            context, materialize_only_last_token_logits=materialize_only_last_token_logits)
