// Launchers of the CUDA permutation kernels (permute_cuda_kernels.cu). Plain C++ types only, so the kernels
// compile with nvcc alone (no torch headers) and the ATen-facing glue (permute_cuda.cpp) with the host compiler.
//
// Legend: T tokens, H hidden size, N permuted rows. Row strides are in elements; the last dimension is dense.
// Every launcher returns the launch's cudaError_t (cudaSuccess when there is nothing to do). Indices are checked
// on the device (a device-side assert names the failed check) against the `*_rows` arguments.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace taskmoe_cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// dst[j, :] = src[indices[j], :] (* weights[j] in fp32 when weights is not null), j < N.
cudaError_t gather_rows(DType dtype, const void* src, int64_t src_rows, int64_t src_stride, void* dst,
                        int64_t dst_stride, const int64_t* indices, const float* weights, int64_t N, int64_t H,
                        cudaStream_t stream);

// dst[t, :] = sum over k in [row_ptr[t], row_ptr[t + 1]) of src[slots[k], :] (* weights[slots[k]]), in that order,
// fp32 accumulation; t < T. No atomics: one thread block owns each output row. row_ptr must run from 0 to
// num_slots (the length of slots).
cudaError_t gather_sum(DType dtype, const void* src, int64_t src_rows, int64_t src_stride, void* dst,
                       int64_t dst_stride, const int64_t* row_ptr, const int64_t* slots, int64_t num_slots,
                       const float* weights, int64_t T, int64_t H, cudaStream_t stream);

// For each j < N with g = grad_out[indices[j], :]: grad_permuted[j, :] = g * weights[j] and
// grad_weights[j] = dot(g, permuted[j, :]) in fp32, reduced in a fixed order (deterministic).
cudaError_t unpermute_backward(DType dtype, const void* grad_out, int64_t grad_out_rows, int64_t grad_out_stride,
                               const void* permuted, int64_t permuted_stride, void* grad_permuted,
                               int64_t grad_permuted_stride, float* grad_weights, const int64_t* indices,
                               const float* weights, int64_t N, int64_t H, cudaStream_t stream);

// Whether the 16-byte vector path applies: every base pointer 16-byte aligned, every row stride and H a whole
// number of 16-byte vectors. Exposed for the compile-and-logic check in the tests.
bool can_vectorize(int64_t elem_size, int64_t H, const void* const* ptrs, const int64_t* strides, int num);

}  // namespace taskmoe_cuda
