"""Beam-search decoding attention: self-attention over a key/value cache that beam reordering never moves, and
cross-attention of a sentence's hypotheses to its one copy of the encoder keys/values.

A reordered cache (row n continues former row parent[n]: copy every cached key/value to its new row) reads and
writes the whole cache at every step of a beam search, and attention then reads it again. Here the cache keeps
each hypothesis' positions where they were written and an ancestry table says where to find them:

* key_cache / value_cache [B, Hkv, T, K, Dh]: sentence slot, key/value head, position, beam index, head dim. A step
  writes position p of hypothesis k of a sentence at [slot, :, p, k];
* ancestry [N, >= t] (int64): ancestry[n, p] is the beam index holding row n's position p. A beam reorder is a
  gather of this [N, t] table of integers instead of the [N, Hkv, t, Dh] keys and values;
* slots [L]: the cache slot of each live sentence (rows l*K .. l*K + K - 1 are its hypotheses), so that finished
  sentences leave without moving the others.

`beam_decode_attention` runs the C++ kernel (csrc/beam_attention_cpu.cpp: each cached key/value read once, by
the K hypotheses of a sentence together, position by position) on CPU tensors of float32/float16/bfloat16, and the
pure-torch path otherwise (other devices or dtypes, an extension built before this operator, `backend="torch"`):
gather each row's keys/values (one `index_select` per tensor) and call `scaled_dot_product_attention`. Both
compute softmax(q k^T * scale) v over positions 0..t-1 in fp32 accumulation; they agree to rounding.

`beam_cross_attention` is the decoding step's cross-attention: the X = K*Q query rows of a sentence against its
encoder keys/values [L, Hkv, S, Dh] at its real source positions. A decoding step's few queries per sentence make
it a batch of tiny products, where torch's CPU attention and batched matmuls spend more on dispatch and blocking
than on arithmetic; the kernel (same file) does each (sentence, head) in one pass. The torch path is SDPA with the
source mask.

Legend: B cache slots, L live sentences, K beam, N = L*K rows, H query heads, Hkv key/value heads, Q query
positions of a step, T cache capacity, t attended positions, Dh head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_taskmoe.ops import backend as _backend

BACKENDS = _backend.BACKENDS
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def kernel_available() -> bool:
    """Whether the compiled extension loads and has the beam attention operators (an older build has not)."""
    return (_backend.extension_available() and hasattr(torch.ops.taskmoe, "beam_decode_attention")
            and hasattr(torch.ops.taskmoe, "beam_cross_attention"))


def resolved_backend(backend: str, query: torch.Tensor) -> str:
    """'extension' or 'torch': what `beam_decode_attention` / `beam_cross_attention(..., backend=backend)` run for
    `query`."""
    if backend not in BACKENDS:
        raise ValueError(f"beam attention backend must be one of {BACKENDS}, got {backend!r}")
    supported = query.device.type == "cpu" and query.dtype in _KERNEL_DTYPES
    if backend == "extension":
        if not kernel_available():
            raise RuntimeError("beam attention backend 'extension' requested but the compiled operators "
                               "torch.ops.taskmoe.beam_decode_attention / beam_cross_attention are not loadable; "
                               "rebuild the extension with `pip install --no-build-isolation -e .` or use "
                               "backend='auto'/'torch'")
        if not supported:
            raise RuntimeError(f"beam attention backend 'extension' has no kernel for {query.device.type} tensors "
                               f"of {query.dtype} (CPU float32/float16/bfloat16)")
        return "extension"
    return "extension" if backend == "auto" and supported and kernel_available() else "torch"


def gather_history(cache: torch.Tensor, slots_L: torch.Tensor, ancestry_Nt: torch.Tensor) -> torch.Tensor:
    """Each row's cached keys (or values) in position order [N, Hkv, t, Dh], from a cache [B, Hkv, T, K, Dh]:
    what a reordered cache would hold (one `index_select` over the flattened cache)."""
    B, Hkv, T, K, Dh = cache.shape
    N, t = ancestry_Nt.shape
    dev = cache.device
    slot_N = slots_L.repeat_interleave(N // slots_L.shape[0])
    head_H = torch.arange(Hkv, device=dev)
    pos_t = torch.arange(t, device=dev)
    index_NHt = ((slot_N.view(N, 1, 1) * Hkv + head_H.view(1, Hkv, 1)) * T + pos_t.view(1, 1, t)) * K \
        + ancestry_Nt.view(N, 1, t)
    return cache.reshape(B * Hkv * T * K, Dh).index_select(0, index_NHt.reshape(-1)).view(N, Hkv, t, Dh)


def beam_decode_attention_torch(query_NHQD: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                slots_L: torch.Tensor, ancestry_NT: torch.Tensor, length: int,
                                scale: float) -> torch.Tensor:
    """The pure-torch path of `beam_decode_attention`."""
    ancestry_Nt = ancestry_NT[:, :length]
    key_NHtD = gather_history(key_cache, slots_L, ancestry_Nt)
    value_NHtD = gather_history(value_cache, slots_L, ancestry_Nt)
    heads, kv_heads = query_NHQD.shape[1], key_cache.shape[1]
    if heads != kv_heads:  # grouped-query attention: key/value heads repeated to the query heads
        key_NHtD = key_NHtD.repeat_interleave(heads // kv_heads, dim=1)
        value_NHtD = value_NHtD.repeat_interleave(heads // kv_heads, dim=1)
    return F.scaled_dot_product_attention(query_NHQD, key_NHtD, value_NHtD, scale=scale)


def beam_decode_attention(query_NHQD: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                          slots_L: torch.Tensor, ancestry_NT: torch.Tensor, length: int, scale: float, *,
                          backend: str = "auto") -> torch.Tensor:
    """Attention of the queries [N, H, Q, Dh] (N = L*K hypothesis rows, Q positions each) over the first `length`
    cached positions of their hypotheses -> [N, H, Q, Dh] (module docstring for the cache layout).

    backend: "auto" (the kernel where it has one, else torch), "extension" (the kernel or an error), "torch"."""
    if resolved_backend(backend, query_NHQD) == "extension":
        return torch.ops.taskmoe.beam_decode_attention(query_NHQD, key_cache, value_cache, slots_L, ancestry_NT,
                                                       int(length), float(scale))
    return beam_decode_attention_torch(query_NHQD, key_cache, value_cache, slots_L, ancestry_NT, length, scale)


def beam_cross_attention_torch(query_LHXD: torch.Tensor, key_LHSD: torch.Tensor, value_LHSD: torch.Tensor,
                               allowed_LS: torch.Tensor, scale: float) -> torch.Tensor:
    """The pure-torch path of `beam_cross_attention`."""
    heads, kv_heads = query_LHXD.shape[1], key_LHSD.shape[1]
    if heads != kv_heads:
        key_LHSD = key_LHSD.repeat_interleave(heads // kv_heads, dim=1)
        value_LHSD = value_LHSD.repeat_interleave(heads // kv_heads, dim=1)
    return F.scaled_dot_product_attention(query_LHXD, key_LHSD, value_LHSD, attn_mask=allowed_LS[:, None, None, :],
                                          scale=scale)


def beam_cross_attention(query_LHXD: torch.Tensor, key_LHSD: torch.Tensor, value_LHSD: torch.Tensor,
                         allowed_LS: torch.Tensor, scale: float, *, backend: str = "auto") -> torch.Tensor:
    """Attention of each sentence's X query rows [L, H, X, Dh] over its encoder keys/values [L, Hkv, S, Dh] at the
    source positions `allowed_LS` [L, S] (bool, at least one per sentence) -> [L, H, X, Dh].

    backend: "auto" (the kernel where it has one, else torch), "extension" (the kernel or an error), "torch"."""
    if resolved_backend(backend, query_LHXD) == "extension":
        return torch.ops.taskmoe.beam_cross_attention(query_LHXD, key_LHSD, value_LHSD, allowed_LS, float(scale))
    return beam_cross_attention_torch(query_LHXD, key_LHSD, value_LHSD, allowed_LS, scale)
