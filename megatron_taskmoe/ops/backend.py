"""Which implementation of the permutation primitives runs: the compiled extension or the pure-torch fallback.

The extension (`megatron_taskmoe/ops/_permute_ext*.so`, built by setup.py) registers `torch.ops.taskmoe.*` with
CPU kernels, plus CUDA kernels when built against a CUDA torch. `backend="auto"` takes it when it is loadable
and has a kernel for the tensor's device and dtype, else the fallback; the first time the extension cannot be
loaded, one warning says so. `backend="extension"` insists (a clear error when it is missing), `"torch"` never
uses it.

The CPU kernels allocate their [*, H] outputs from a bounded cache of recycled huge-page blocks (see
csrc/output_cache_cpu.h: it spares each call the page faults and zeroing of freshly mapped memory);
`output_cache_stats()` reports it and `empty_output_cache()` releases it.
"""

import importlib
import logging
from typing import Dict, Literal, Optional, Union

import torch

from megatron_taskmoe.ops import fallback

logger = logging.getLogger(__name__)

PermuteBackend = Literal["auto", "extension", "torch"]
BACKENDS = ("auto", "extension", "torch")
EXTENSION_MODULE = "megatron_taskmoe.ops._permute_ext"
_OPS = ("permute_index", "inverse_index", "gather_rows", "gather_sum", "unpermute_backward")
_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CPU_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

_load_error: Optional[str] = None
_loaded: Optional[bool] = None


def _load_extension() -> bool:
    """Import the extension once; on failure remember why and log it once."""
    global _loaded, _load_error
    if _loaded is None:
        try:
            importlib.import_module(EXTENSION_MODULE)
            missing = [name for name in _OPS if not hasattr(torch.ops.taskmoe, name)]
            if missing:
                raise ImportError(f"operators missing from torch.ops.taskmoe: {missing}")
            _loaded = True
        except (ImportError, OSError, RuntimeError) as error:
            _loaded = False
            _load_error = f"{type(error).__name__}: {error}"
            logger.warning(
                "megatron_taskmoe.ops: permutation extension %s not loadable (%s); using the pure-torch fallback. "
                "Build it with `pip install --no-build-isolation -e .`.",
                EXTENSION_MODULE,
                _load_error,
            )
    return _loaded


def extension_available() -> bool:
    """Whether the compiled extension loads (CPU kernels at least)."""
    return _load_extension()


def extension_has_cuda() -> bool:
    """Whether the loaded extension was built with its CUDA kernels."""
    return _load_extension() and torch._C._dispatch_has_kernel_for_dispatch_key("taskmoe::gather_rows", "CUDA")


def _extension_supports(tensor: torch.Tensor) -> bool:
    if tensor.device.type == "cpu":
        return tensor.dtype in _CPU_DTYPES
    if tensor.device.type == "cuda":
        return tensor.dtype in _CUDA_DTYPES and extension_has_cuda()
    return False


class _ExtensionPrims:
    """The primitives as the extension's operators (device dispatch by torch's dispatcher)."""

    name = "extension"

    @staticmethod
    def permute_index(routing_map_TE, capacity):
        return torch.ops.taskmoe.permute_index(routing_map_TE, capacity)

    @staticmethod
    def inverse_index(sorted_indices_N, num_tokens):
        return torch.ops.taskmoe.inverse_index(sorted_indices_N, num_tokens)

    @staticmethod
    def gather_rows(src_MH, indices_N, weights_N):
        return torch.ops.taskmoe.gather_rows(src_MH, indices_N, weights_N)

    @staticmethod
    def gather_sum(src_NH, row_ptr_T1, slots_N, weights_N, num_tokens):
        return torch.ops.taskmoe.gather_sum(src_NH, row_ptr_T1, slots_N, weights_N, num_tokens)

    @staticmethod
    def unpermute_backward(grad_out_TH, permuted_NH, indices_N, weights_N):
        return torch.ops.taskmoe.unpermute_backward(grad_out_TH, permuted_NH, indices_N, weights_N)


class _TorchPrims:
    """The primitives in pure torch (megatron_taskmoe.ops.fallback)."""

    name = "torch"
    permute_index = staticmethod(fallback.permute_index)
    inverse_index = staticmethod(fallback.inverse_index)
    gather_rows = staticmethod(fallback.gather_rows)
    gather_sum = staticmethod(fallback.gather_sum)
    unpermute_backward = staticmethod(fallback.unpermute_backward)


Prims = Union[type[_ExtensionPrims], type[_TorchPrims]]


def select_prims(backend: str, tensor: torch.Tensor) -> Prims:
    """The primitives that run for `tensor` (the [*, H] data) under `backend`."""
    if backend not in BACKENDS:
        raise ValueError(f"permute backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return _TorchPrims
    if backend == "extension":
        if not _load_extension():
            raise RuntimeError(
                f"permute backend 'extension' requested but {EXTENSION_MODULE} is not loadable ({_load_error}); "
                "build it with `pip install --no-build-isolation -e .` or use backend='auto'/'torch'"
            )
        if not _extension_supports(tensor):
            raise RuntimeError(
                f"permute backend 'extension' has no kernel for {tensor.device.type} tensors of {tensor.dtype}"
                + ("" if tensor.device.type != "cuda" or extension_has_cuda() else " (built without CUDA)")
            )
        return _ExtensionPrims
    return _ExtensionPrims if _load_extension() and _extension_supports(tensor) else _TorchPrims


def output_cache_stats() -> Dict[str, int]:
    """The CPU kernels' cache of recycled output blocks (csrc/output_cache_cpu.h): bytes held now, allocations
    served from it (hits) and newly mapped (misses), and its limit (TASKMOE_OPS_CACHE_MB). Zeros without the
    extension."""
    if not _load_extension():
        return dict(cached_bytes=0, hits=0, misses=0, limit_bytes=0)
    cached, hits, misses, limit = torch.ops.taskmoe.output_cache_stats()
    return dict(cached_bytes=cached, hits=hits, misses=misses, limit_bytes=limit)


def empty_output_cache() -> int:
    """Unmap the CPU kernels' cached free output blocks (live tensors are untouched); returns the bytes freed."""
    return int(torch.ops.taskmoe.empty_output_cache()) if _load_extension() else 0


def set_output_cache_limit(limit_bytes: int) -> None:
    """Bound the CPU kernels' output cache to `limit_bytes` (0: no caching), evicting down to it. The first
    value comes from TASKMOE_OPS_CACHE_MB (MiB, default 1024)."""
    if limit_bytes < 0:
        raise ValueError(f"output cache limit must be >= 0 bytes, got {limit_bytes}")
    if _load_extension():
        torch.ops.taskmoe.set_output_cache_limit(int(limit_bytes))


def resolved_backend(backend: str, tensor: torch.Tensor) -> str:
    """'extension' or 'torch': what `backend` runs for `tensor` (for logs and benchmarks)."""
    return select_prims(backend, tensor).name
