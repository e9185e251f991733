"""Run megatron-core (0.16.1 to 0.19.x) on CPU (gloo) when CUDA is absent; process-group set-up for CPU and GPU.

megatron-core assumes CUDA in a handful of places that our own layer specs cannot reach (see
`/work/shared/notes/megatron-core-on-cpu.md` and issue 3). This module is the one place that deals with them:

* `apply()` installs the fixes of `FIXES`, each only on the megatron-core releases it states (`Fix.versions`, read
  off each release's source), the CPU stand-ins only when `torch.cuda.is_available()` is false, after checking
  that the installed release is in the supported range (`mcore_compat.SUPPORTED_MCORE`; set the environment
  variable `MEGATRON_TASKMOE_ALLOW_UNVERIFIED_MCORE=1` to run another release at your own risk), and only once
  (idempotent). `APPLIED` lists the fixes installed, `PATCHES` every patch they made, `describe_patches()` both.
  On a CUDA machine it changes nothing but plain megatron-core bug fixes: on 0.16, `moe_utils.te_general_gemm`
  is defined as `None` when Transformer Engine is absent, because megatron's `router_gating_linear` tests that
  name for `None` but never binds it without TE (`NameError` on CPU and GPU; 0.17 binds it itself); and, only
  without Apex/TE (torch's Adam), on every supported release, the distributed optimizer's checkpoint paths:
  Adam's `step` on load, and the state of an expert optimizer that holds no parameters on a pipeline stage
  without MoE layers.
* What we can do through specs we do there instead (`model/specs.py`): an SDPA core attention (no global memory
  buffer, no CUDA causal mask), a LayerNorm/RMSNorm that supports sequence parallelism.
* `init_distributed`, `initialize_model_parallel`, `model_parallel_manual_seed` and `destroy` set up and tear
  down process groups (gloo on CPU, nccl on GPU) and the tensor-parallel RNG tracker the same way on both.

How the CPU patches work: megatron modules that hard-code CUDA *devices* (`torch.cuda.current_device()`,
`device="cuda"`, `torch.cuda.synchronize()`, CUDA streams) get a module-local stand-in for their `torch` global,
`_CpuTorch`, which forwards everything to the real torch except device selection (CUDA devices map to the CPU)
and the CUDA stream/sync/RNG API (no-ops or CPU equivalents). Torch itself and every other module are untouched.
A few functions are replaced outright because their logic, not just their device, is CUDA-specific: RNG state
get/set (and the tracker's fork), the all-to-all dispatcher's device-to-host step (split sizes must reach gloo as
host arrays), and the first-dim gather/reduce-scatter with uneven splits (gloo has none; padded to even ones).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import importlib
import logging
import os
import socket
import types
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from megatron_taskmoe.mcore_compat import (  # noqa: F401 (the version gate, re-exported)
    ALLOW_UNVERIFIED_ENV,
    SUPPORTED_MCORE,
    TESTED_MCORE,
    VersionRange,
    check_mcore_version,
    mcore_version,
)

logger = logging.getLogger(__name__)


# megatron-core modules whose `torch` global is replaced by `_CpuTorch` on CPU, with what each needs it for.
PROXIED_MODULES: dict[str, str] = {
    "megatron.core.tensor_parallel.mappings": "all-gather/reduce-scatter/all-to-all buffers on current_device()",
    "megatron.core.tensor_parallel.layers": "linear-layer gather buffers on current_device()",
    "megatron.core.tensor_parallel.utils": "split/gather buffers on current_device()",
    "megatron.core.tensor_parallel.random": "RNG tracker reads/seeds the CUDA generator",
    "megatron.core.utils": "GlobalMemoryBuffer.get_tensor allocates on current_device()",
    "megatron.core.transformer.utils": "get_default_causal_mask allocates on 'cuda'",
    "megatron.core.transformer.moe.router": "Router.gating moves weights to current_device(); buffers",
    "megatron.core.transformer.moe.moe_utils": "aux-loss tracker allocates on 'cuda'",
    "megatron.core.transformer.moe.token_dispatcher": "all-to-all dispatcher creates a CUDA stream",
    "megatron.core.transformer.moe.experts": "expert buffers on current_device()",
    "megatron.core.pipeline_parallel.schedules": "token counter allocated on 'cuda'",
    "megatron.core.pipeline_parallel.p2p_communication": "shape buffers, torch.cuda.synchronize()",
    "megatron.core.parallel_state": "torch.cuda.synchronize() in barriers/timeouts",
    "megatron.core.distributed.distributed_data_parallel": "communication stream on current_device()",
    "megatron.core.distributed.param_and_grad_buffer": "grad buffers on current_device(); CUDA streams",
}

# Every patch, in one place: (name, where, why). Filled by the installers below; `describe_patches()` prints it.
PATCHES: list[tuple[str, str, str]] = []

_STATE = {"applied": False, "cpu": None}


# ---------------------------------------------------------------------------------------------------------------
# The CPU stand-in for `torch` inside selected megatron modules.
# ---------------------------------------------------------------------------------------------------------------
def _is_cuda_device(device: Any) -> bool:
    if device is None:
        return False
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    # A bare int means a CUDA ordinal in torch's factory functions.
    return isinstance(device, int)


def _cpu_factory(fn: Callable) -> Callable:
    def factory(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    factory.__name__ = getattr(fn, "__name__", "factory")
    factory.__doc__ = f"CPU stand-in for torch.{factory.__name__}: CUDA devices map to the CPU."
    return factory


_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "as_tensor", "arange", "rand", "randn", "randint", "randperm",
    "empty_like", "zeros_like", "ones_like", "full_like", "eye", "linspace", "empty_strided",
)


class _NoStream:
    """Stands in for a CUDA stream or event on CPU: work is synchronous, so every wait is already satisfied."""

    def wait_stream(self, other: Any) -> None:
        return None

    def wait_event(self, event: Any) -> None:
        return None

    def record_event(self, event: Any = None) -> "_NoStream":
        return self

    def record(self, stream: Any = None) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _NoStream)

    def __hash__(self) -> int:
        return 0


class _CpuCuda:
    """Stands in for `torch.cuda` inside proxied megatron modules: the CPU is the current device."""

    def __init__(self) -> None:
        self.random = types.SimpleNamespace(  # stands in for torch.cuda.random
            get_rng_state=lambda device=None: torch.get_rng_state(),
            set_rng_state=lambda state, device=None: torch.set_rng_state(state),
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(device: Any = None) -> None:
        return None

    @staticmethod
    def Stream(*args: Any, **kwargs: Any) -> _NoStream:  # noqa: N802 (mirrors torch.cuda.Stream)
        return _NoStream()

    @staticmethod
    def Event(*args: Any, **kwargs: Any) -> _NoStream:  # noqa: N802 (mirrors torch.cuda.Event)
        return _NoStream()

    @staticmethod
    def current_stream(device: Any = None) -> _NoStream:
        return _NoStream()

    @staticmethod
    def default_stream(device: Any = None) -> _NoStream:
        return _NoStream()

    @staticmethod
    def stream(stream: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def manual_seed_all(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def empty_cache() -> None:
        return None


class _CpuTorch(types.ModuleType):
    """Module-local stand-in for `torch`: forwards everything, maps CUDA devices to the CPU."""

    def __init__(self) -> None:
        super().__init__("torch", "CPU stand-in for torch inside selected megatron-core modules")
        self.cuda = _CpuCuda()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


# ---------------------------------------------------------------------------------------------------------------
# Replaced functions (logic, not just the device, is CUDA-specific).
# ---------------------------------------------------------------------------------------------------------------
def _cpu_get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _cpu_set_rng_state(new_state: torch.Tensor, device: int = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _cpu_maybe_dtoh_and_synchronize(self, point: str, tokens_per_expert: Optional[torch.Tensor] = None):
    """CPU version of `MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize`.

    On GPU this copies the split sizes to host memory as numpy arrays on a side stream (megatron later calls
    `.tolist()` on them and hands them to `all_to_all_single`). megatron's helper skips tensors already on the host,
    so on CPU they would stay tensors, which gloo's `all_to_all_single` rejects: convert them the same way here."""
    if self.drop_and_pad or point != self.cuda_dtoh_point:
        return tokens_per_expert

    def as_numpy(x):
        return x.numpy() if torch.is_tensor(x) else x

    self.input_splits = as_numpy(self.input_splits)
    self.output_splits = as_numpy(self.output_splits)
    self.output_splits_tp = as_numpy(self.output_splits_tp)
    return tokens_per_expert


def _padded_uneven_collectives(gather_fn: Callable, reduce_scatter_fn: Callable) -> tuple[Callable, Callable]:
    """Wrap megatron's first-dim gather / reduce-scatter so uneven splits work on gloo.

    With split sizes (the MoE dispatchers under tensor x expert parallelism) megatron calls `all_gather` /
    `reduce_scatter` on lists of tensors of different sizes, which NCCL accepts and gloo does not. Pad every
    split to the largest, run the even collective, and cut the padding off; even splits go to megatron."""

    def gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        sizes = None if output_split_sizes is None else [int(n) for n in output_split_sizes]
        if sizes is None or group.size() == 1 or len(set(sizes)) == 1:
            return gather_fn(input_, group, output_split_sizes, use_global_buffer)
        longest = max(sizes)
        padded = torch.zeros((longest,) + tuple(input_.shape[1:]), dtype=input_.dtype, device=input_.device)
        padded[: input_.shape[0]] = input_
        gathered = torch.empty((longest * group.size(),) + tuple(input_.shape[1:]), dtype=input_.dtype,
                               device=input_.device)
        torch.distributed.all_gather_into_tensor(gathered, padded, group=group)
        return torch.cat([gathered[r * longest : r * longest + n] for r, n in enumerate(sizes)], dim=0)

    def reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        sizes = None if input_split_sizes is None else [int(n) for n in input_split_sizes]
        if sizes is None or group.size() == 1 or len(set(sizes)) == 1:
            return reduce_scatter_fn(input_, group, input_split_sizes, use_global_buffer)
        longest = max(sizes)
        padded = torch.zeros((longest * group.size(),) + tuple(input_.shape[1:]), dtype=input_.dtype,
                             device=input_.device)
        for r, chunk in enumerate(torch.split(input_, sizes, dim=0)):
            padded[r * longest : r * longest + chunk.shape[0]] = chunk
        output = torch.empty((longest,) + tuple(input_.shape[1:]), dtype=input_.dtype, device=input_.device)
        torch.distributed.reduce_scatter_tensor(output, padded, group=group)
        return output[: sizes[group.rank()]].contiguous()

    return gather_along_first_dim, reduce_scatter_along_first_dim


def _make_cpu_rng_tracker_class(base: type) -> type:
    class CpuRNGStatesTracker(base):  # type: ignore[misc, valid-type]
        """megatron's RNG tracker over the CPU generator (names and seeds as on GPU).

        Identical to the base class except that `fork` does not warn that the CPU state changed: on CPU the
        tracked generator *is* the CPU generator, so it always does."""

        @contextlib.contextmanager
        def fork(self, name: str = "model-parallel-rng"):
            if name not in self.states_:
                raise RuntimeError(f"RNG state {name!r} is not added; call model_parallel_manual_seed first")
            orig_state = torch.get_rng_state()
            orig_name = self._current_state_name
            if orig_name != "default-rng":
                self.states_[orig_name] = orig_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if orig_name != "default-rng":
                    orig_state = self.states_[orig_name]
                torch.set_rng_state(orig_state)
                self._current_state_name = orig_name

    return CpuRNGStatesTracker


# ---------------------------------------------------------------------------------------------------------------
# Installing.
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Fix:
    """One change `apply()` makes to megatron-core, and the releases it applies to."""

    name: str
    """What it is, as `describe_patches()` lists it."""
    versions: VersionRange
    """The megatron-core releases whose code needs it (read in each release's source; run on `TESTED_MCORE`)."""
    cpu_only: bool
    """True: a CPU stand-in, installed only without CUDA. False: a bug fix, on CPU and GPU."""
    install: Callable[[], None]
    """Installs it (and records each patch in `PATCHES`)."""


def _record(name: str, where: str, why: str) -> None:
    PATCHES.append((name, where, why))


def _install_te_name_fix() -> None:
    """Bug fix, CPU and GPU: megatron-core 0.16's `router_gating_linear` tests `te_general_gemm` for None, but the
    name is bound only when Transformer Engine imports (0.17 binds it to None without TE)."""
    moe_utils = importlib.import_module("megatron.core.transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
        _record(
            "te_general_gemm=None", "megatron.core.transformer.moe.moe_utils",
            "router_gating_linear tests the name for None but it is unbound without Transformer Engine",
        )


def _install_torch_proxies() -> None:
    proxy = _CpuTorch()
    for module_name, why in {**PROXIED_MODULES, **TRAINING_PROXIED_MODULES}.items():
        module = importlib.import_module(module_name)
        if getattr(module, "torch", None) is not torch:
            raise RuntimeError(f"{module_name}.torch is not torch; refusing to patch an unexpected layout")
        module.torch = proxy
        _record("torch -> _CpuTorch", module_name, why)


def _install_cpu_rng() -> None:
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random._get_cuda_rng_state = _cpu_get_rng_state
    random._set_cuda_rng_state = _cpu_set_rng_state
    _record("_get/_set_cuda_rng_state", random.__name__, "read/write the CPU generator state")
    random.CudaRNGStatesTracker = _make_cpu_rng_tracker_class(random.CudaRNGStatesTracker)
    # A tracker built before apply() would still be the CUDA one.
    random.initialize_rng_tracker(force_reset=True)
    _record("CudaRNGStatesTracker", random.__name__, "fork over the CPU generator without a spurious warning")


def _install_gloo_uneven_collectives() -> None:
    mappings = importlib.import_module("megatron.core.tensor_parallel.mappings")
    mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim = _padded_uneven_collectives(
        mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim
    )
    _record(
        "_gather/_reduce_scatter_along_first_dim", mappings.__name__,
        "uneven splits (MoE under TP x EP) padded to even ones: gloo has no uneven all-gather/reduce-scatter",
    )


def _install_alltoall_host_splits() -> None:
    dispatcher = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
    cls = dispatcher.MoEAlltoAllTokenDispatcher
    cls._maybe_dtoh_and_synchronize = _cpu_maybe_dtoh_and_synchronize
    _record(
        "MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize", dispatcher.__name__,
        "split sizes as host numpy arrays (as on GPU) for gloo all_to_all_single; no CUDA side stream",
    )


# megatron-core's optimizers check parameter types with `tensor.type() == 'torch.cuda.FloatTensor'` (and Half/
# BFloat16), which no module-level stand-in can reach. These entry points run with `Tensor.type()` answering the CUDA
# name for CPU tensors; nothing else sees the change, and it is undone when they return.
OPTIMIZER_TYPE_CHECKS: dict[str, tuple[str, ...]] = {
    "megatron.core.optimizer.distrib_optimizer": ("DistributedOptimizer.__init__",),
    "megatron.core.optimizer.optimizer": ("Float16OptimizerWithFloat16Params.__init__",),
    "megatron.core.optimizer.clip_grads": ("clip_grad_by_total_norm_fp32",),
}
TRAINING_PROXIED_MODULES: dict[str, str] = {
    "megatron.core.optimizer.optimizer": "overflow buffer allocated on 'cuda'",
    "megatron.core.optimizer.distrib_optimizer": "gather buffers on current_device()",
    "megatron.core.optimizer.clip_grads": "norm buffers allocated on 'cuda'",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "torch.cuda.synchronize() before writing",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "failure flag all-reduced on current_device()",
    "megatron.core.dist_checkpointing.strategies.async_utils": "liveness flags on current_device()",
}


@contextlib.contextmanager
def _cuda_type_names():
    original = torch.Tensor.type

    def type_(self, *args, **kwargs):
        if not args and not kwargs and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, *args, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _with_cuda_type_names(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _cuda_type_names():
            return fn(*args, **kwargs)

    return wrapper


def _install_torch_adam_step_fix() -> None:
    """Bug fixes, CPU and GPU: without Apex/TE, megatron-core 0.16.1 restores torch Adam's per-parameter `step` from
    the param groups as one tensor shared by all parameters, then copies every state key, `step` included, from the
    checkpoint's parameter state, which has no `step`: loading a "fully_reshardable" distributed-optimizer
    checkpoint raises KeyError('step'), and once that is mended the shared tensor breaks exact resume."""
    module = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    if getattr(module, "HAVE_APEX_OR_TE", True):
        return
    cls = module.DistributedOptimizer
    original = cls._set_main_param_and_optimizer_states

    @functools.wraps(original)
    def set_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state[main_param].get("step")
            if step is not None:  # already restored from the checkpoint's param groups
                tensors = {**tensors, "step": step}
        return original(self, model_param, tensors)

    cls._set_main_param_and_optimizer_states = set_states
    _record("DistributedOptimizer._set_main_param_and_optimizer_states", module.__name__,
            "keep torch Adam's `step` (restored from param groups) when loading fully-reshardable state")

    original_load = cls.load_state_dict

    @functools.wraps(original_load)
    def load_state_dict(self, state_dict):
        result = original_load(self, state_dict)
        # The restore put ONE `step` tensor into every parameter's state; torch Adam increments it in place per
        # parameter, so shared it would advance once per parameter per step (wrong bias correction).
        for state in self.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        return result

    cls.load_state_dict = load_state_dict
    _record("DistributedOptimizer.load_state_dict", module.__name__,
            "give every parameter its own torch Adam `step` tensor after a restore")

    # A rank can hold an optimizer without parameters: megatron aligns param groups over all ranks, so a pipeline
    # stage without MoE layers gets an empty expert optimizer (the trainer always chains one, see
    # training/setup.py: mark_expert_parameters). Its state_dict asserts that its (absent) parameter states share
    # one `step`. It takes the step of its chained siblings instead (they step together), so the param groups
    # saved from whichever rank writes the common state carry the real step.
    original_state_dict = cls.state_dict

    @functools.wraps(original_state_dict)
    def state_dict(self):
        if self.optimizer.state or any(len(g["params"]) for g in self.optimizer.param_groups):
            return original_state_dict(self)
        inner = self.optimizer.state_dict()
        out = {"optimizer": {k: v for k, v in inner.items() if k != "state"}}
        for group in out["optimizer"]["param_groups"]:
            del group["params"]
            group["step"] = getattr(self, "_sibling_step", None)
        if self.grad_scaler:
            out["grad_scaler"] = self.grad_scaler.state_dict()
        return out

    cls.state_dict = state_dict
    _record("DistributedOptimizer.state_dict", module.__name__,
            "an optimizer without parameters on this rank (e.g. the expert optimizer of a stage without MoE "
            "layers) saves its chained siblings' step instead of failing")

    chained = importlib.import_module("megatron.core.optimizer.optimizer").ChainedOptimizer
    original_chained_sd = chained.sharded_state_dict

    @functools.wraps(original_chained_sd)
    def chained_sharded_state_dict(self, *args, **kwargs):
        steps = {float(state["step"]) for opt in self.chained_optimizers if isinstance(opt, cls)
                 for state in opt.optimizer.state.values() if "step" in state}
        for opt in self.chained_optimizers:
            if isinstance(opt, cls):
                opt._sibling_step = next(iter(steps)) if len(steps) == 1 else None
        return original_chained_sd(self, *args, **kwargs)

    chained.sharded_state_dict = chained_sharded_state_dict
    _record("ChainedOptimizer.sharded_state_dict", "megatron.core.optimizer.optimizer",
            "tell each chained distributed optimizer the chain's Adam step (for one without parameters here)")


# How megatron-core < 0.19 matched a checkpoint's optimizer param groups to the optimizer's own when loading.
_STRUCTURAL_GROUP_KEYS = ("wd_mult", "lr_mult", "is_expert_parallel", "is_decoupled_lr")


def _install_param_group_schedule_fix() -> None:
    """Compatibility fix, CPU and GPU, megatron-core 0.19+: `DistributedOptimizer.load_state_dict` pairs the
    checkpoint's param groups with the optimizer's by their schedule values too (`max_lr`, `min_lr`, `start_wd`,
    `end_wd`, ...: `param_group_identifier_keys`), so a checkpoint no longer loads into an optimizer built with
    another learning rate (KeyError) - a resume with a changed `optim.lr`, or the checkpoint tools, which rebuild
    the optimizer from default settings and load the state into it. Before 0.19 the groups were paired by
    structure (`_STRUCTURAL_GROUP_KEYS`) and took the checkpoint's schedule values; this restores that: each of
    the optimizer's groups takes the schedule values of the one checkpoint group with its structure, then megatron
    pairs them as usual (several checkpoint groups of one structure, e.g. per-group LR overrides, stay megatron's
    business)."""
    module = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    schedule_keys = [k for k in module.param_group_identifier_keys if k not in _STRUCTURAL_GROUP_KEYS]
    cls = module.DistributedOptimizer
    original_load = cls.load_state_dict

    def structure(group: dict) -> tuple:
        return tuple(group.get(k) for k in _STRUCTURAL_GROUP_KEYS)

    @functools.wraps(original_load)
    def load_state_dict(self, state_dict):
        saved: dict[tuple, list[dict]] = {}
        for group in state_dict["optimizer"]["param_groups"]:
            saved.setdefault(structure(group), []).append(group)
        for group in self.optimizer.param_groups:
            matches = saved.get(structure(group), [])
            if len(matches) == 1:
                for key in schedule_keys:
                    if key in matches[0]:
                        group[key] = matches[0][key]
                    else:
                        group.pop(key, None)
        return original_load(self, state_dict)

    cls.load_state_dict = load_state_dict
    _record("DistributedOptimizer.load_state_dict", module.__name__,
            "pair checkpoint param groups by structure and take their LR/WD schedule values (as before 0.19)")


def _install_legacy_common_state_file() -> None:
    """Compatibility fix, CPU and GPU, megatron-core 0.19+: a torch_dist checkpoint keeps its common (non-tensor)
    state - scheduler, counters, optimizer param groups - inside its DCP files, where releases before 0.19 look for
    a `common.pt` beside them (and fail without it). After every synchronous `dist_checkpointing.save`, rank 0 also
    writes that `common.pt` (the same state, read back from the checkpoint), so a checkpoint written here loads on
    every supported release; 0.19 itself reads `common.pt` first when it is there. `dist_checkpointing.save` (the
    name the project saves through) is wrapped as it is at `apply()`, wrappers of its callers included."""
    package = importlib.import_module("megatron.core.dist_checkpointing")
    serialization = importlib.import_module("megatron.core.dist_checkpointing.serialization")
    common = importlib.import_module("megatron.core.dist_checkpointing.strategies.common")
    original_save = package.save  # what `dist_checkpointing.save` is now (a caller may have wrapped it already)

    @functools.wraps(original_save)
    def save(sharded_state_dict, checkpoint_dir, *args, **kwargs):
        result = original_save(sharded_state_dict, checkpoint_dir, *args, **kwargs)
        if result is None:  # saved (an async save returns its request; this project saves synchronously)
            if torch.distributed.get_rank() == 0:
                state = serialization.load_common_state_dict(str(checkpoint_dir))
                path = os.path.join(str(checkpoint_dir), common.COMMON_STATE_FNAME)
                torch.save(state, path + ".partial")
                os.replace(path + ".partial", path)
            torch.distributed.barrier()
        return result

    package.save = save
    _record("dist_checkpointing.save", package.__name__,
            "also write common.pt, the common state as megatron-core 0.16-0.18 read it")


def _install_optimizer_type_checks() -> None:
    for module_name, targets in OPTIMIZER_TYPE_CHECKS.items():
        module = importlib.import_module(module_name)
        for target in targets:
            owner_name, _, attr = target.rpartition(".")
            owner = getattr(module, owner_name) if owner_name else module
            setattr(owner, attr, _with_cuda_type_names(getattr(owner, attr)))
            _record(f"{target} under CUDA type names", module_name,
                    "parameter type checks compare tensor.type() with 'torch.cuda.*Tensor'")
    # optimizer.py imported clip_grad_by_total_norm_fp32 by name: point it at the wrapped function.
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
    optimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32


# Every fix, in the order apply() installs them. `versions` were read off each release's source (0.16.1, 0.17.0,
# 0.17.1, 0.18.0, 0.18.2, 0.19.0, 0.19.2); a range without an end still holds in 0.19.2.
_FROM_0_16_1 = VersionRange(first="0.16.1")
FIXES: tuple[Fix, ...] = (
    Fix(name="te_general_gemm bound to None without Transformer Engine", cpu_only=False, install=_install_te_name_fix,
        versions=VersionRange(first="0.16.1", end="0.17")),
    Fix(name="torch Adam `step` in distributed-optimizer checkpoints", cpu_only=False,
        install=_install_torch_adam_step_fix, versions=_FROM_0_16_1),
    Fix(name="optimizer checkpoints load under other LR/WD schedule settings", cpu_only=False,
        install=_install_param_group_schedule_fix, versions=VersionRange(first="0.19.0")),
    Fix(name="checkpoints keep common.pt for megatron-core 0.16-0.18", cpu_only=False,
        install=_install_legacy_common_state_file, versions=VersionRange(first="0.19.0")),
    Fix(name="CUDA devices, streams and sync map to the CPU (_CpuTorch)", cpu_only=True,
        install=_install_torch_proxies, versions=_FROM_0_16_1),
    Fix(name="RNG tracker over the CPU generator", cpu_only=True, install=_install_cpu_rng, versions=_FROM_0_16_1),
    Fix(name="uneven first-dim gather / reduce-scatter on gloo", cpu_only=True,
        install=_install_gloo_uneven_collectives, versions=_FROM_0_16_1),
    Fix(name="all-to-all split sizes as host arrays for gloo", cpu_only=True, install=_install_alltoall_host_splits,
        versions=_FROM_0_16_1),
    Fix(name="optimizer parameter-type checks accept CPU tensors", cpu_only=True,
        install=_install_optimizer_type_checks, versions=_FROM_0_16_1),
)

# The fixes apply() installed, in order.
APPLIED: list[Fix] = []


def apply() -> bool:
    """Make megatron-core usable on this machine. Returns True when CPU patches are (or already were) active.

    Safe to call any number of times, from any entry point (model construction, `init_distributed`, tests)."""
    if _STATE["applied"]:
        return bool(_STATE["cpu"])
    check_mcore_version()
    version = mcore_version()
    cpu = not torch.cuda.is_available()
    for fix in FIXES:
        if version in fix.versions and (cpu or not fix.cpu_only):
            fix.install()
            APPLIED.append(fix)
    _STATE["applied"], _STATE["cpu"] = True, cpu
    return cpu


def is_cpu() -> bool:
    """True when megatron-core runs on the CPU here (CUDA absent)."""
    return not torch.cuda.is_available()


def device() -> torch.device:
    """The device tensors of this process live on: the current CUDA device, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def describe_patches() -> str:
    """The fixes `apply()` installed for this megatron-core release (with the releases each applies to), then one
    line per installed patch."""
    lines = [f"megatron-core {mcore_version()}; fixes applied:"]
    lines += [f"  {fix.name} (megatron-core {fix.versions}{', CPU only' if fix.cpu_only else ''})" for fix in APPLIED]
    lines += [f"{name:55s} {where:50s} {why}" for name, where, why in PATCHES]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Process groups.
# ---------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port free on this host right now (for single-host gloo tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(
    *,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    master_addr: Optional[str] = None,
    master_port: Optional[int] = None,
    backend: Optional[str] = None,
    timeout_minutes: float = 10.0,
) -> None:
    """Initialize torch.distributed's default group: gloo on CPU, nccl on GPU.

    Rank and world size come from the arguments, else from torchrun's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/
    MASTER_PORT, else a single process. Applies the platform layer first. Does nothing if already initialized."""
    apply()
    if torch.distributed.is_initialized():
        return
    env = os.environ
    rank = int(env.get("RANK", 0)) if rank is None else rank
    world_size = int(env.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"init_distributed: rank {rank} is outside world size {world_size}")
    master_addr = master_addr or env.get("MASTER_ADDR", "127.0.0.1")
    if master_port is None:
        if "MASTER_PORT" not in env and world_size > 1:
            raise ValueError("init_distributed: world_size > 1 needs master_port= or the MASTER_PORT variable")
        master_port = int(env.get("MASTER_PORT", 0)) or free_port()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(env.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count()))))
    torch.distributed.init_process_group(
        backend=backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )


@dataclass(kw_only=True)
class ParallelSizes:
    """Model-parallel sizes; data parallelism is what remains of the world size."""

    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    expert_tensor: Optional[int] = None  # None: same as `tensor` (megatron's default)

    def validate(self, world_size: int) -> None:
        for name in ("tensor", "pipeline", "expert"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel size {name}={getattr(self, name)} must be >= 1")
        model = self.tensor * self.pipeline
        if world_size % model:
            raise ValueError(
                f"world size {world_size} is not divisible by tensor x pipeline = {self.tensor} x {self.pipeline}"
            )
        dp = world_size // model
        etp = self.tensor if self.expert_tensor is None else self.expert_tensor
        if (dp * self.tensor) % (self.expert * etp):
            raise ValueError(
                f"expert x expert-tensor = {self.expert} x {etp} must divide data x tensor = {dp} x {self.tensor} "
                f"(world size {world_size})"
            )


def initialize_model_parallel(
    *,
    tensor: int = 1,
    pipeline: int = 1,
    expert: int = 1,
    expert_tensor: Optional[int] = None,
    **megatron_kwargs: Any,
):
    """megatron's `initialize_model_parallel` with validated sizes; returns its `ProcessGroupCollection`.

    Extra keyword arguments go to megatron's function unchanged (e.g. `get_embedding_ranks` for pipelining)."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    apply()
    if not torch.distributed.is_initialized():
        raise RuntimeError("initialize_model_parallel: call init_distributed() first")
    sizes = ParallelSizes(tensor=tensor, pipeline=pipeline, expert=expert, expert_tensor=expert_tensor)
    sizes.validate(torch.distributed.get_world_size())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor,
        pipeline_model_parallel_size=pipeline,
        expert_model_parallel_size=expert,
        expert_tensor_parallel_size=expert_tensor,
        **megatron_kwargs,
    )
    return ProcessGroupCollection.use_mpu_process_groups()


def model_parallel_manual_seed(seed: int) -> None:
    """Seed torch and megatron's RNG tracker (data-, tensor- and expert-parallel streams), on CPU or GPU.

    The CPU generator gets `seed` on every rank, so `use_cpu_initialization` builds identical full weights
    everywhere before megatron slices them; dropout streams differ per TP/EP rank as megatron intends."""
    from megatron.core.tensor_parallel import random as mp_random

    apply()
    torch.manual_seed(seed)
    mp_random.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    # The tracker's "add" seeds the default generator as a side effect on CPU; restore the plain seed.
    torch.manual_seed(seed)


def destroy() -> None:
    """Destroy megatron's model-parallel state, its global buffers and torch.distributed's default group."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import random as mp_random

    parallel_state.destroy_model_parallel()
    mp_random.initialize_rng_tracker(force_reset=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
