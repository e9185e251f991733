// CUDA kernels of the token permutation (see permute_cuda.h for the contracts). No torch headers: this file
// compiles with `nvcc -c` alone.
//
// Legend: T tokens, H hidden size, N permuted rows, V elements per 16-byte vector.
//
// Each kernel gives a whole row to one thread block (grid-stride over rows), and the block's threads walk the
// row in 16-byte vectors when every pointer and row stride allows it, else element by element. Reductions (the
// sum over a token's slots, the dot product for the probability gradient) run in a fixed order with fp32
// accumulators and no atomics, so results are bitwise reproducible. Row offsets are int64.
//
// Index checks run inside the kernels, as device-side asserts (what torch's own index kernels do): a bad index
// stops the kernel with a message naming the check instead of reading or writing out of bounds, and the host
// never waits for the device to validate indices (a host-side check would cost a synchronisation per call).

// The asserts stay on in release builds (the extension may be compiled with -DNDEBUG).
#ifdef NDEBUG
#undef NDEBUG
#endif
#include <cassert>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "permute_cuda.h"

namespace taskmoe_cuda {
namespace {

constexpr int kVecBytes = 16;
constexpr int kMaxThreads = 256;
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid-stride beyond this

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// V elements moved as one 16-byte load/store when kVec, else one element.
template <typename T, bool kVec>
struct Pack {
  static constexpr int V = kVec ? kVecBytes / static_cast<int>(sizeof(T)) : 1;
  struct alignas(kVec ? kVecBytes : alignof(T)) Type {
    T v[V];
  };
};

template <typename T, bool kVec, bool kWeighted>
__global__ void gather_rows_kernel(const T* __restrict__ src, int64_t src_rows, int64_t src_stride,
                                   T* __restrict__ dst, int64_t dst_stride, const int64_t* __restrict__ indices,
                                   const float* __restrict__ weights, int64_t N, int64_t H) {
  using P = typename Pack<T, kVec>::Type;
  constexpr int V = Pack<T, kVec>::V;
  const int64_t HV = H / V;
  for (int64_t j = blockIdx.x; j < N; j += gridDim.x) {
    const int64_t row = indices[j];
    assert(row >= 0 && row < src_rows && "taskmoe gather_rows: index out of range");
    const P* s = reinterpret_cast<const P*>(src + row * src_stride);
    P* d = reinterpret_cast<P*>(dst + j * dst_stride);
    const float w = kWeighted ? weights[j] : 1.0f;
    for (int64_t c = threadIdx.x; c < HV; c += blockDim.x) {
      P x = s[c];
      if (kWeighted) {
#pragma unroll
        for (int i = 0; i < V; ++i) {
          x.v[i] = from_float<T>(to_float(x.v[i]) * w);
        }
      }
      d[c] = x;
    }
  }
}

template <typename T, bool kVec, bool kWeighted>
__global__ void gather_sum_kernel(const T* __restrict__ src, int64_t src_rows, int64_t src_stride,
                                  T* __restrict__ dst, int64_t dst_stride, const int64_t* __restrict__ row_ptr,
                                  const int64_t* __restrict__ slots, int64_t num_slots,
                                  const float* __restrict__ weights, int64_t T_, int64_t H) {
  using P = typename Pack<T, kVec>::Type;
  constexpr int V = Pack<T, kVec>::V;
  const int64_t HV = H / V;
  // row_ptr covers every slot exactly when it runs from 0 to num_slots (an inverse index built from entries
  // outside [0, T) does not: see inverse_index_cuda).
  assert((blockIdx.x != 0 || threadIdx.x != 0 || (row_ptr[0] == 0 && row_ptr[T_] == num_slots)) &&
         "taskmoe gather_sum: row_ptr must run from 0 to the number of slots (index out of range)");
  for (int64_t t = blockIdx.x; t < T_; t += gridDim.x) {
    const int64_t begin = row_ptr[t];
    const int64_t end = row_ptr[t + 1];
    P* d = reinterpret_cast<P*>(dst + t * dst_stride);
    for (int64_t c = threadIdx.x; c < HV; c += blockDim.x) {
      float acc[V];
#pragma unroll
      for (int i = 0; i < V; ++i) {
        acc[i] = 0.0f;
      }
      for (int64_t k = begin; k < end; ++k) {
        const int64_t slot = slots[k];
        assert(slot >= 0 && slot < src_rows && "taskmoe gather_sum: slot out of range");
        const float w = kWeighted ? weights[slot] : 1.0f;
        const P x = reinterpret_cast<const P*>(src + slot * src_stride)[c];
#pragma unroll
        for (int i = 0; i < V; ++i) {
          acc[i] += to_float(x.v[i]) * w;
        }
      }
      P out;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        out.v[i] = from_float<T>(acc[i]);
      }
      d[c] = out;
    }
  }
}

// Block-wide sum in a fixed order: warp shuffles, then warp 0 over the per-warp partials. Result valid in thread 0.
__device__ __forceinline__ float block_sum(float v, float* shared_warp) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  if (lane == 0) {
    shared_warp[warp] = v;
  }
  __syncthreads();
  const int num_warps = (blockDim.x + 31) >> 5;
  v = (threadIdx.x < num_warps) ? shared_warp[threadIdx.x] : 0.0f;
  if (warp == 0) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      v += __shfl_down_sync(0xffffffffu, v, offset);
    }
  }
  __syncthreads();  // shared_warp is reused by the next row
  return v;
}

template <typename T, bool kVec>
__global__ void unpermute_backward_kernel(const T* __restrict__ grad_out, int64_t grad_out_rows,
                                          int64_t grad_out_stride,
                                          const T* __restrict__ permuted, int64_t permuted_stride,
                                          T* __restrict__ grad_permuted, int64_t grad_permuted_stride,
                                          float* __restrict__ grad_weights, const int64_t* __restrict__ indices,
                                          const float* __restrict__ weights, int64_t N, int64_t H) {
  using P = typename Pack<T, kVec>::Type;
  constexpr int V = Pack<T, kVec>::V;
  __shared__ float shared_warp[kMaxThreads / 32];
  const int64_t HV = H / V;
  for (int64_t j = blockIdx.x; j < N; j += gridDim.x) {
    const int64_t row = indices[j];
    assert(row >= 0 && row < grad_out_rows && "taskmoe unpermute_backward: index out of range");
    const P* g = reinterpret_cast<const P*>(grad_out + row * grad_out_stride);
    const P* x = reinterpret_cast<const P*>(permuted + j * permuted_stride);
    P* d = reinterpret_cast<P*>(grad_permuted + j * grad_permuted_stride);
    const float w = weights[j];
    float dot = 0.0f;
    for (int64_t c = threadIdx.x; c < HV; c += blockDim.x) {
      const P gv = g[c];
      const P xv = x[c];
      P out;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float gf = to_float(gv.v[i]);
        out.v[i] = from_float<T>(gf * w);
        dot += gf * to_float(xv.v[i]);
      }
      d[c] = out;
    }
    dot = block_sum(dot, shared_warp);
    if (threadIdx.x == 0) {
      grad_weights[j] = dot;
    }
  }
}

// Threads per block: enough 32-wide warps to cover the row's vectors once, at most kMaxThreads.
int threads_for(int64_t row_units) {
  const int64_t warps = std::max<int64_t>(1, std::min<int64_t>((row_units + 31) / 32, kMaxThreads / 32));
  return static_cast<int>(warps * 32);
}

int blocks_for(int64_t rows) { return static_cast<int>(std::min<int64_t>(rows, kMaxBlocks)); }

// The launchers pick one of the kernel's instantiations (vector or scalar path, weighted or not) and launch it.
template <typename T>
cudaError_t gather_rows_typed(const void* src, int64_t src_rows, int64_t src_stride, void* dst,
                              int64_t dst_stride, const int64_t* indices, const float* weights, int64_t N, int64_t H,
                              cudaStream_t stream) {
  const void* ptrs[2] = {src, dst};
  const int64_t strides[2] = {src_stride, dst_stride};
  const bool vec = can_vectorize(sizeof(T), H, ptrs, strides, 2);
  const int64_t units = vec ? H / (kVecBytes / static_cast<int64_t>(sizeof(T))) : H;
  const auto kernel = vec ? (weights ? gather_rows_kernel<T, true, true> : gather_rows_kernel<T, true, false>)
                          : (weights ? gather_rows_kernel<T, false, true> : gather_rows_kernel<T, false, false>);
  kernel<<<blocks_for(N), threads_for(units), 0, stream>>>(static_cast<const T*>(src), src_rows, src_stride,
                                                           static_cast<T*>(dst), dst_stride, indices, weights, N, H);
  return cudaGetLastError();
}

template <typename T>
cudaError_t gather_sum_typed(const void* src, int64_t src_rows, int64_t src_stride, void* dst, int64_t dst_stride,
                             const int64_t* row_ptr, const int64_t* slots, int64_t num_slots, const float* weights,
                             int64_t T_, int64_t H, cudaStream_t stream) {
  const void* ptrs[2] = {src, dst};
  const int64_t strides[2] = {src_stride, dst_stride};
  const bool vec = can_vectorize(sizeof(T), H, ptrs, strides, 2);
  const int64_t units = vec ? H / (kVecBytes / static_cast<int64_t>(sizeof(T))) : H;
  const auto kernel = vec ? (weights ? gather_sum_kernel<T, true, true> : gather_sum_kernel<T, true, false>)
                          : (weights ? gather_sum_kernel<T, false, true> : gather_sum_kernel<T, false, false>);
  kernel<<<blocks_for(T_), threads_for(units), 0, stream>>>(static_cast<const T*>(src), src_rows, src_stride,
                                                            static_cast<T*>(dst), dst_stride, row_ptr, slots,
                                                            num_slots, weights, T_, H);
  return cudaGetLastError();
}

template <typename T>
cudaError_t unpermute_backward_typed(const void* grad_out, int64_t grad_out_rows, int64_t grad_out_stride,
                                     const void* permuted, int64_t permuted_stride, void* grad_permuted,
                                     int64_t grad_permuted_stride, float* grad_weights, const int64_t* indices,
                                     const float* weights, int64_t N, int64_t H, cudaStream_t stream) {
  const void* ptrs[3] = {grad_out, permuted, grad_permuted};
  const int64_t strides[3] = {grad_out_stride, permuted_stride, grad_permuted_stride};
  const bool vec = can_vectorize(sizeof(T), H, ptrs, strides, 3);
  const int64_t units = vec ? H / (kVecBytes / static_cast<int64_t>(sizeof(T))) : H;
  const auto kernel = vec ? unpermute_backward_kernel<T, true> : unpermute_backward_kernel<T, false>;
  kernel<<<blocks_for(N), threads_for(units), 0, stream>>>(
      static_cast<const T*>(grad_out), grad_out_rows, grad_out_stride, static_cast<const T*>(permuted),
      permuted_stride, static_cast<T*>(grad_permuted), grad_permuted_stride, grad_weights, indices, weights, N, H);
  return cudaGetLastError();
}

}  // namespace

bool can_vectorize(int64_t elem_size, int64_t H, const void* const* ptrs, const int64_t* strides, int num) {
  if (elem_size <= 0 || kVecBytes % elem_size != 0) {
    return false;
  }
  const int64_t V = kVecBytes / elem_size;
  if (H % V != 0) {
    return false;
  }
  for (int i = 0; i < num; ++i) {
    if (reinterpret_cast<uintptr_t>(ptrs[i]) % kVecBytes != 0 || strides[i] % V != 0) {
      return false;
    }
  }
  return true;
}

cudaError_t gather_rows(DType dtype, const void* src, int64_t src_rows, int64_t src_stride, void* dst,
                        int64_t dst_stride, const int64_t* indices, const float* weights, int64_t N, int64_t H,
                        cudaStream_t stream) {
  if (N == 0 || H == 0) {
    return cudaSuccess;
  }
  switch (dtype) {
    case DType::kFloat32:
      return gather_rows_typed<float>(src, src_rows, src_stride, dst, dst_stride, indices, weights, N, H, stream);
    case DType::kFloat16:
      return gather_rows_typed<__half>(src, src_rows, src_stride, dst, dst_stride, indices, weights, N, H, stream);
    case DType::kBFloat16:
      return gather_rows_typed<__nv_bfloat16>(src, src_rows, src_stride, dst, dst_stride, indices, weights, N, H,
                                              stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t gather_sum(DType dtype, const void* src, int64_t src_rows, int64_t src_stride, void* dst,
                       int64_t dst_stride, const int64_t* row_ptr, const int64_t* slots, int64_t num_slots,
                       const float* weights, int64_t T, int64_t H, cudaStream_t stream) {
  if (T == 0 || H == 0) {
    return cudaSuccess;
  }
  switch (dtype) {
    case DType::kFloat32:
      return gather_sum_typed<float>(src, src_rows, src_stride, dst, dst_stride, row_ptr, slots, num_slots,
                                     weights, T, H, stream);
    case DType::kFloat16:
      return gather_sum_typed<__half>(src, src_rows, src_stride, dst, dst_stride, row_ptr, slots, num_slots,
                                      weights, T, H, stream);
    case DType::kBFloat16:
      return gather_sum_typed<__nv_bfloat16>(src, src_rows, src_stride, dst, dst_stride, row_ptr, slots,
                                             num_slots, weights, T, H, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t unpermute_backward(DType dtype, const void* grad_out, int64_t grad_out_rows, int64_t grad_out_stride,
                               const void* permuted, int64_t permuted_stride, void* grad_permuted,
                               int64_t grad_permuted_stride, float* grad_weights, const int64_t* indices,
                               const float* weights, int64_t N, int64_t H, cudaStream_t stream) {
  if (N == 0) {
    return cudaSuccess;
  }
  switch (dtype) {
    case DType::kFloat32:
      return unpermute_backward_typed<float>(grad_out, grad_out_rows, grad_out_stride, permuted, permuted_stride,
                                             grad_permuted, grad_permuted_stride, grad_weights, indices, weights, N,
                                             H, stream);
    case DType::kFloat16:
      return unpermute_backward_typed<__half>(grad_out, grad_out_rows, grad_out_stride, permuted, permuted_stride,
                                              grad_permuted, grad_permuted_stride, grad_weights, indices, weights,
                                              N, H, stream);
    case DType::kBFloat16:
      return unpermute_backward_typed<__nv_bfloat16>(grad_out, grad_out_rows, grad_out_stride, permuted,
                                                     permuted_stride, grad_permuted, grad_permuted_stride,
                                                     grad_weights, indices, weights, N, H, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace taskmoe_cuda
