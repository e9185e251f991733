"""CUDA tier of the permutation kernels: the unit tier's checks against megatron-core on CUDA tensors, plus the
vector/scalar paths, determinism and 64-bit offsets. Needs a GPU and the extension built with CUDA.

Legend: T tokens, H hidden size, E experts, K experts per token, N permuted rows.
"""

import subprocess
import sys

import pytest
import torch

from megatron.core.transformer.moe import moe_utils

from megatron_taskmoe.ops import extension_has_cuda, permute, resolved_backend, unpermute
from tests.helpers.permute_reference import check_against_megatron, topk_routing

pytestmark = pytest.mark.gpu
DEVICE = "cuda"


@pytest.fixture(scope="module", autouse=True)
def _require_cuda_extension():
    assert extension_has_cuda(), "the extension was built without CUDA kernels (torch with CUDA + nvcc needed)"


@pytest.mark.parametrize("backend", ["extension", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("topk", [1, 2, 4])
@pytest.mark.parametrize("capacity_factor", [None, 1.0, 0.5], ids=["dropless", "cap1.0", "cap0.5"])
@pytest.mark.parametrize("hidden", [64, 36, 1027], ids=["vec", "vec-fp32-only", "scalar"])
def test_matches_megatron_on_cuda(backend, dtype, topk, capacity_factor, hidden):
    num_tokens, num_experts = 301, 8
    routing_map_TE, probs_TE = topk_routing(num_tokens, num_experts, topk, seed=topk)
    routing_map_TE, probs_TE = routing_map_TE.to(DEVICE), probs_TE.to(DEVICE)
    tokens_TH = torch.randn(num_tokens, hidden, device=DEVICE).to(dtype)
    assert resolved_backend(backend, tokens_TH) == backend
    if capacity_factor is None:
        check_against_megatron(tokens_TH, routing_map_TE, probs_TE, backend=backend)
        check_against_megatron(tokens_TH, routing_map_TE, probs_TE, backend=backend, merge_with_probs=False)
    else:
        capacity = moe_utils.get_capacity(num_tokens * topk, num_experts, capacity_factor)
        check_against_megatron(
            tokens_TH, routing_map_TE, probs_TE, num_out_tokens=capacity * num_experts, drop_and_pad=True,
            backend=backend,
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_equals_cpu_extension_and_misaligned_inputs(dtype):
    num_tokens, hidden, num_experts = 257, 128, 16
    routing_map_TE, probs_TE = topk_routing(num_tokens, num_experts, 2, seed=9)
    base_cpu = torch.randn(num_tokens, hidden + 1).to(dtype)
    base_gpu = base_cpu.to(DEVICE)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    # Aligned rows (16-byte vector path), then rows offset by one element with an odd stride (scalar path).
    for cut in (slice(0, hidden), slice(1, hidden + 1)):
        tokens_cpu, tokens_gpu = base_cpu[:, cut], base_gpu[:, cut]
        if cut.start == 0:
            tokens_cpu, tokens_gpu = tokens_cpu.contiguous(), tokens_gpu.contiguous()
        else:
            assert tokens_gpu.data_ptr() % 16 != 0 and tokens_gpu.stride(0) == hidden + 1
        cpu = permute(tokens_cpu, routing_map_TE, probs=probs_TE, backend="extension")
        gpu = permute(tokens_gpu, routing_map_TE.to(DEVICE), probs=probs_TE.to(DEVICE), backend="extension")
        for a, b in zip(cpu, gpu):
            assert torch.equal(a, b.cpu())
        out_cpu = unpermute(cpu[0], cpu[2], tokens_cpu.shape, probs=probs_TE, routing_map=routing_map_TE,
                            backend="extension")
        out_gpu = unpermute(gpu[0], gpu[2], tokens_gpu.shape, probs=probs_TE.to(DEVICE),
                            routing_map=routing_map_TE.to(DEVICE), backend="extension")
        torch.testing.assert_close(out_gpu.cpu(), out_cpu, **tol)


def test_deterministic_unpermute_and_gradients():
    routing_map_TE, probs_TE = topk_routing(4096, 64, 4, seed=2)
    routing_map_TE, probs_TE = routing_map_TE.to(DEVICE), probs_TE.to(DEVICE)
    tokens_TH = torch.randn(4096, 512, device=DEVICE)
    results = []
    for _ in range(3):
        x_TH = tokens_TH.clone().requires_grad_()
        p_TE = probs_TE.clone().requires_grad_()
        y_NH, _, idx_N = permute(x_TH, routing_map_TE, probs=p_TE, backend="extension")
        out_TH = unpermute(y_NH * 1.5, idx_N, x_TH.shape, probs=p_TE, routing_map=routing_map_TE,
                           backend="extension")
        out_TH.backward(torch.ones_like(out_TH))
        results.append((out_TH.detach(), x_TH.grad, p_TE.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_64bit_offsets():
    # More than 2**31 elements in the token tensor: row offsets must be 64-bit.
    num_tokens, hidden = (1 << 31) // 8192 + 64, 8192
    need = 3 * num_tokens * hidden * 2
    if torch.cuda.mem_get_info()[0] < need + (1 << 30):
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory")
    tokens_TH = torch.zeros(num_tokens, hidden, dtype=torch.bfloat16, device=DEVICE)
    tokens_TH[-1] = 3.0
    routing_map_TE = torch.zeros(num_tokens, 2, dtype=torch.bool, device=DEVICE)
    routing_map_TE[: num_tokens // 2, 1] = True
    routing_map_TE[num_tokens // 2 :, 0] = True
    permuted_NH, _, sorted_indices_N = permute(tokens_TH, routing_map_TE, backend="extension")
    assert torch.all(permuted_NH[num_tokens - num_tokens // 2 - 1] == 3.0)  # last token, first in expert 0's block
    del permuted_NH
    restored_TH = unpermute(tokens_TH, torch.arange(num_tokens, device=DEVICE).flip(0), tokens_TH.shape,
                            backend="extension")
    assert torch.all(restored_TH[0] == 3.0)


def test_inverse_index_equals_cpu_kernel():
    ops = torch.ops.taskmoe
    for num_tokens, topk, num_experts in ((1, 1, 1), (301, 2, 8), (4096, 4, 64)):
        routing_map_TE, _ = topk_routing(num_tokens, num_experts, topk, seed=num_tokens)
        sorted_indices_N, _ = ops.permute_index(routing_map_TE, -1)
        row_ptr_cpu, slots_cpu = ops.inverse_index(sorted_indices_N, num_tokens + 3)  # tokens without slots too
        row_ptr_gpu, slots_gpu = ops.inverse_index(sorted_indices_N.to(DEVICE), num_tokens + 3)
        assert torch.equal(row_ptr_gpu.cpu(), row_ptr_cpu) and torch.equal(slots_gpu.cpu(), slots_cpu)


@pytest.mark.parametrize("case", ["gather_rows", "gather_sum", "unpermute_backward"])
def test_out_of_range_index_is_a_device_side_assert(case):
    # A device-side assert leaves the CUDA context unusable, so each case runs in its own interpreter.
    code = f"""
import torch
from megatron_taskmoe.ops import extension_has_cuda, unpermute
assert extension_has_cuda()  # also loads the extension, so torch.ops.taskmoe.* exist
bad = torch.tensor([0, 9, 1], device="cuda")
if {case!r} == "gather_rows":
    torch.ops.taskmoe.gather_rows(torch.randn(6, 8, device="cuda"), bad, None)
elif {case!r} == "gather_sum":
    unpermute(torch.randn(3, 8, device="cuda"), bad, (6, 8), backend="extension")
else:
    torch.ops.taskmoe.unpermute_backward(torch.randn(6, 8, device="cuda"), torch.randn(3, 8, device="cuda"), bad,
                                         torch.rand(3, device="cuda"))
torch.cuda.synchronize()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "out of range" in proc.stdout + proc.stderr or "device-side assert" in proc.stderr, proc.stderr[-2000:]
