"""The CUDA sources compile, and the host-side logic of the kernels' launchers is right, without a GPU.

- permute_cuda_kernels.cu compiles with `nvcc -c` alone (it has no torch headers by design);
- a small host program linked with it checks `can_vectorize` (16-byte alignment of every pointer, row strides and
  H in whole vectors) and that empty launches return cudaSuccess without touching a device;
- the ATen-facing glue (permute_cuda.cpp) passes a syntax check with the host compiler against torch's headers.
Skipped when nvcc (or, for the glue, g++) is absent. The GPU tier (tests/gpu/test_permute_cuda.py) runs them.
"""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from torch.utils import cpp_extension

CSRC = Path(__file__).resolve().parents[2] / "megatron_taskmoe" / "ops" / "csrc"
CUDA_HOME = cpp_extension.CUDA_HOME or "/usr/local/cuda"
NVCC = shutil.which("nvcc") or os.path.join(CUDA_HOME, "bin", "nvcc")
# The CUDA headers: under CUDA_HOME, beside the real nvcc, or in /usr/local/cuda (torch 2.14 takes
# CUDA_HOME=/usr/local from an nvcc in /usr/local/bin whose toolkit lies in /usr/local/cuda).
CUDA_INCLUDE = next((d for d in (os.path.join(CUDA_HOME, "include"),
                                 os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(NVCC))), "include"),
                                 "/usr/local/cuda/include")
                     if os.path.exists(os.path.join(d, "cuda_runtime_api.h"))), os.path.join(CUDA_HOME, "include"))
needs_nvcc = pytest.mark.skipif(not os.path.exists(NVCC), reason="nvcc not found")

HOST_CHECK = r"""
#include <cstdio>
#include <cstdint>
#include "permute_cuda.h"
using namespace taskmoe_cuda;
static int failures = 0;
#define EXPECT(c) do { if (!(c)) { std::printf("FAILED: %s\n", #c); ++failures; } } while (0)
int main() {
  alignas(16) static char buf[4096];
  const void* aligned[2] = {buf, buf + 256};
  const void* misaligned[2] = {buf, buf + 4};
  const int64_t strides_ok[2] = {64, 128};
  const int64_t strides_odd[2] = {64, 66};
  // fp32 (4 bytes, 4 per vector), bf16 (2 bytes, 8 per vector)
  EXPECT(can_vectorize(4, 64, aligned, strides_ok, 2));
  EXPECT(!can_vectorize(4, 64, misaligned, strides_ok, 2));
  EXPECT(!can_vectorize(4, 64, aligned, strides_odd, 2));
  EXPECT(!can_vectorize(4, 62, aligned, strides_ok, 2));
  EXPECT(can_vectorize(2, 64, aligned, strides_ok, 2));
  EXPECT(!can_vectorize(2, 60, aligned, strides_ok, 2));
  const int64_t strides_bf16[2] = {64, 68};
  EXPECT(!can_vectorize(2, 64, aligned, strides_bf16, 2));
  EXPECT(can_vectorize(4, 64, aligned, strides_bf16, 2));
  // Large rows and strides: 64-bit arithmetic, no overflow in the checks.
  const int64_t big[2] = {int64_t(1) << 40, (int64_t(1) << 40) + 4};
  EXPECT(can_vectorize(4, int64_t(1) << 33, aligned, big, 2));
  // Nothing to do: success without a device.
  EXPECT(gather_rows(DType::kFloat32, buf, 1, 4, buf, 4, nullptr, nullptr, 0, 4, nullptr) == cudaSuccess);
  EXPECT(gather_sum(DType::kBFloat16, buf, 1, 4, buf, 4, nullptr, nullptr, 0, nullptr, 0, 4, nullptr)
         == cudaSuccess);
  EXPECT(unpermute_backward(DType::kFloat16, buf, 1, 4, buf, 4, buf, 4, nullptr, nullptr, nullptr, 0, 4, nullptr)
         == cudaSuccess);
  if (failures == 0) std::printf("host checks passed\n");
  return failures;
}
"""


def run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@needs_nvcc
def test_kernels_compile_and_host_logic(tmp_path):
    obj = tmp_path / "permute_cuda_kernels.o"
    run([NVCC, "-c", "-O3", "-std=c++17", "-arch=sm_80", "-Werror", "all-warnings", "-o", obj,
         CSRC / "permute_cuda_kernels.cu"], tmp_path)
    (tmp_path / "host_check.cpp").write_text(HOST_CHECK)
    exe = tmp_path / "host_check"
    run([NVCC, "-std=c++17", f"-I{CSRC}", "-o", exe, tmp_path / "host_check.cpp", obj], tmp_path)
    assert "host checks passed" in run([exe], tmp_path)


@needs_nvcc
@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_aten_glue_compiles(tmp_path):
    # A CPU build of torch ships c10/cuda headers but not the generated cuda_cmake_macros.h: provide it.
    macros = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    macros.parent.mkdir(parents=True)
    macros.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{CUDA_INCLUDE}", f"-I{tmp_path}"]
    run(["g++", "-std=c++20", "-fsyntax-only", "-Wall", *includes, CSRC / "permute_cuda.cpp"], tmp_path)
