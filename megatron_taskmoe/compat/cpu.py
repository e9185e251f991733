"""CPU stand-ins for the CUDA that megatron-core (0.16.1 to 0.19.x) assumes: installed by `compat.apply()` only when
`torch.cuda.is_available()` is false (the `Fix`es with `cpu_only=True` in `compat.FIXES`).

What our own layer specs can do we do there instead (`model/specs.py`: an SDPA core attention without a global
memory buffer or CUDA causal mask, a LayerNorm/RMSNorm that supports sequence parallelism); this module holds what
specs cannot reach.

How the patches work: megatron modules that hard-code CUDA *devices* (`torch.cuda.current_device()`,
`device="cuda"`, `torch.cuda.synchronize()`, CUDA streams) get a module-local stand-in for their `torch` global,
`_CpuTorch`, which forwards everything to the real torch except device selection (CUDA devices map to the CPU)
and the CUDA stream/sync/RNG API (no-ops or CPU equivalents). Torch itself and every other module are untouched.
A few functions are replaced outright because their logic, not just their device, is CUDA-specific: RNG state
get/set (and the tracker's fork), the all-to-all dispatcher's device-to-host step (split sizes must reach gloo as
host arrays), the first-dim gather/reduce-scatter with uneven splits (gloo has none; padded to even ones), and the
optimizers' parameter-type checks (`tensor.type() == 'torch.cuda.FloatTensor'`).

megatron-core modules are imported by the installers (`importlib`), so importing this module imports none of them.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import types
from typing import Any, Callable, Optional

import torch

from megatron_taskmoe.compat.fix import Patch

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

TRAINING_PROXIED_MODULES: dict[str, str] = {
    "megatron.core.optimizer.optimizer": "overflow buffer allocated on 'cuda'",
    "megatron.core.optimizer.distrib_optimizer": "gather buffers on current_device()",
    "megatron.core.optimizer.clip_grads": "norm buffers allocated on 'cuda'",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "torch.cuda.synchronize() before writing",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "failure flag all-reduced on current_device()",
    "megatron.core.dist_checkpointing.strategies.async_utils": "liveness flags on current_device()",
}


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
# Installers (each returns the patches it made).
# ---------------------------------------------------------------------------------------------------------------
def install_torch_proxies() -> list[Patch]:
    """Every module of `PROXIED_MODULES` and `TRAINING_PROXIED_MODULES` gets `_CpuTorch` for its `torch`."""
    patches = []
    proxy = _CpuTorch()
    for module_name, why in {**PROXIED_MODULES, **TRAINING_PROXIED_MODULES}.items():
        module = importlib.import_module(module_name)
        if getattr(module, "torch", None) is not torch:
            raise RuntimeError(f"{module_name}.torch is not torch; refusing to patch an unexpected layout")
        module.torch = proxy
        patches.append(Patch("torch -> _CpuTorch", module_name, why))
    return patches


def install_cpu_rng() -> list[Patch]:
    """megatron's RNG state get/set and its tracker over the CPU generator."""
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random._get_cuda_rng_state = _cpu_get_rng_state
    random._set_cuda_rng_state = _cpu_set_rng_state
    random.CudaRNGStatesTracker = _make_cpu_rng_tracker_class(random.CudaRNGStatesTracker)
    # A tracker built before apply() would still be the CUDA one.
    random.initialize_rng_tracker(force_reset=True)
    return [Patch("_get/_set_cuda_rng_state", random.__name__, "read/write the CPU generator state"),
            Patch("CudaRNGStatesTracker", random.__name__, "fork over the CPU generator without a spurious warning")]


def install_gloo_uneven_collectives() -> list[Patch]:
    """First-dim gather / reduce-scatter with uneven splits padded to even ones (`_padded_uneven_collectives`)."""
    mappings = importlib.import_module("megatron.core.tensor_parallel.mappings")
    mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim = _padded_uneven_collectives(
        mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim
    )
    return [Patch(
        "_gather/_reduce_scatter_along_first_dim", mappings.__name__,
        "uneven splits (MoE under TP x EP) padded to even ones: gloo has no uneven all-gather/reduce-scatter",
    )]


def install_alltoall_host_splits() -> list[Patch]:
    """The all-to-all dispatcher's device-to-host step keeps split sizes as host arrays for gloo."""
    dispatcher = importlib.import_module("megatron.core.transformer.moe.token_dispatcher")
    cls = dispatcher.MoEAlltoAllTokenDispatcher
    cls._maybe_dtoh_and_synchronize = _cpu_maybe_dtoh_and_synchronize
    return [Patch(
        "MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize", dispatcher.__name__,
        "split sizes as host numpy arrays (as on GPU) for gloo all_to_all_single; no CUDA side stream",
    )]


# megatron-core's optimizers check parameter types with `tensor.type() == 'torch.cuda.FloatTensor'` (and Half/
# BFloat16), which no module-level stand-in can reach. These entry points run with `Tensor.type()` answering the CUDA
# name for CPU tensors; nothing else sees the change, and it is undone when they return.
OPTIMIZER_TYPE_CHECKS: dict[str, tuple[str, ...]] = {
    "megatron.core.optimizer.distrib_optimizer": ("DistributedOptimizer.__init__",),
    "megatron.core.optimizer.optimizer": ("Float16OptimizerWithFloat16Params.__init__",),
    "megatron.core.optimizer.clip_grads": ("clip_grad_by_total_norm_fp32",),
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


def install_optimizer_type_checks() -> list[Patch]:
    """The entry points of `OPTIMIZER_TYPE_CHECKS` run with CPU tensors answering CUDA type names."""
    patches = []
    for module_name, targets in OPTIMIZER_TYPE_CHECKS.items():
        module = importlib.import_module(module_name)
        for target in targets:
            owner_name, _, attr = target.rpartition(".")
            owner = getattr(module, owner_name) if owner_name else module
            setattr(owner, attr, _with_cuda_type_names(getattr(owner, attr)))
            patches.append(Patch(f"{target} under CUDA type names", module_name,
                                 "parameter type checks compare tensor.type() with 'torch.cuda.*Tensor'"))
    # optimizer.py imported clip_grad_by_total_norm_fp32 by name: point it at the wrapped function.
    optimizer = importlib.import_module("megatron.core.optimizer.optimizer")
    clip_grads = importlib.import_module("megatron.core.optimizer.clip_grads")
    optimizer.clip_grad_by_total_norm_fp32 = clip_grads.clip_grad_by_total_norm_fp32
    return patches
