"""Shared helpers for the permutation tests: inputs, and the check of ours against megatron-core's moe_utils.

Legend: T tokens, H hidden size, E experts, K experts per token, N permuted rows.
"""

from typing import Optional

import torch

from megatron.core.transformer.moe import moe_utils

from megatron_taskmoe.compat.moe import mcore_permute
from megatron_taskmoe.ops import permute, unpermute


def topk_routing(num_tokens: int, num_experts: int, topk: int, seed: int):
    """(routing_map_TE bool, probs_TE fp32): softmax top-k routing, probs zero off the map (as megatron's router)."""
    gen = torch.Generator().manual_seed(seed)
    logits_TE = torch.randn(num_tokens, num_experts, generator=gen)
    top_probs_TK, top_TK = torch.softmax(logits_TE, -1).topk(topk, dim=-1)
    routing_map_TE = torch.zeros(num_tokens, num_experts, dtype=torch.bool).scatter_(1, top_TK, True)
    probs_TE = torch.zeros(num_tokens, num_experts).scatter_(1, top_TK, top_probs_TK)
    return routing_map_TE, probs_TE


def tolerances(dtype: torch.dtype) -> dict:
    # megatron sums bf16/fp16 in bf16/fp16 (scatter_add / index_add without probs); ours in fp32.
    if dtype == torch.bfloat16:
        return dict(atol=6e-2, rtol=2e-2)
    if dtype == torch.float16:
        return dict(atol=1e-2, rtol=5e-3)
    return dict(atol=1e-5, rtol=1e-5)


def check_against_megatron(
    tokens_TH: torch.Tensor,
    routing_map_TE: torch.Tensor,
    probs_TE: Optional[torch.Tensor],
    *,
    num_out_tokens: Optional[int] = None,
    drop_and_pad: bool = False,
    backend: str = "auto",
    fast_path: bool = True,
    merge_with_probs: bool = True,
    seed: int = 0,
) -> None:
    """Permute then unpermute with both implementations: permute bitwise, unpermute and all gradients allclose."""
    dtype = tokens_TH.dtype
    gen = torch.Generator().manual_seed(seed)
    results = []
    for impl in ("megatron", "ours"):
        x_TH = tokens_TH.clone().requires_grad_()
        p_TE = None if probs_TE is None else probs_TE.clone().requires_grad_()
        kwargs = dict(probs=p_TE, num_out_tokens=num_out_tokens, drop_and_pad=drop_and_pad)
        if impl == "megatron":
            y_NH, py_N, idx_N = mcore_permute(x_TH, routing_map_TE, **kwargs)
        else:
            y_NH, py_N, idx_N = permute(x_TH, routing_map_TE, backend=backend, fast_path=fast_path, **kwargs)
        # Stand-in for the experts: a fixed elementwise scale, so gradients differ per slot.
        scale_NH = torch.randn(y_NH.shape, generator=torch.Generator().manual_seed(seed + 1)).to(y_NH.device, dtype)
        z_NH = y_NH * scale_NH
        merge = dict(probs=p_TE, routing_map=routing_map_TE) if (merge_with_probs and p_TE is not None) else {}
        if impl == "megatron":
            out_TH = moe_utils.unpermute(z_NH, idx_N, x_TH.shape, drop_and_pad=drop_and_pad, **merge)
        else:
            out_TH = unpermute(
                z_NH, idx_N, x_TH.shape, drop_and_pad=drop_and_pad, backend=backend, fast_path=fast_path, **merge
            )
        gen.manual_seed(seed + 2)
        grad_TH = torch.randn(out_TH.shape, generator=gen).to(out_TH.device, dtype)
        loss = (out_TH.float() * grad_TH.float()).sum()
        if py_N is not None:
            ramp_N = torch.arange(py_N.numel(), dtype=torch.float32, device=py_N.device)
            loss = loss + (py_N.float() * ramp_N).sum() * 1e-3
        loss.backward()
        results.append(
            dict(y=y_NH.detach(), py=None if py_N is None else py_N.detach(), idx=idx_N, out=out_TH.detach(),
                 gx=x_TH.grad, gp=None if p_TE is None else p_TE.grad)
        )
    ref, ours = results
    assert torch.equal(ref["idx"], ours["idx"]), "sorted_indices differ"
    assert ours["y"].dtype == ref["y"].dtype and torch.equal(ref["y"], ours["y"]), "permuted tokens differ"
    if ref["py"] is None:
        assert ours["py"] is None
    else:
        assert torch.equal(ref["py"], ours["py"]), "permuted probs differ"
    tol = tolerances(dtype)
    assert ours["out"].dtype == ref["out"].dtype
    torch.testing.assert_close(ours["out"], ref["out"], **tol)
    if ref["gx"] is None:
        assert ours["gx"] is None or not ours["gx"].any()
    else:
        torch.testing.assert_close(ours["gx"], ref["gx"], **tol)
    if ref["gp"] is not None:
        torch.testing.assert_close(ours["gp"], ref["gp"], **tol)
