// CUDA implementations of the `taskmoe` operators (schema in permute_cpu.cpp): the [*, H] data movement runs in
// the kernels of permute_cuda_kernels.cu; the index work on [T, E] booleans uses ATen ops in megatron-core's order
// (masked_select / stable argsort), which is small next to the rows it places.
//
// Nothing here waits for the device: indices are range-checked inside the kernels (device-side asserts), and the
// inverse index is a sort and a binary search, so the only host synchronisation is nonzero's in a dropless
// permute_index (its output size depends on the routing map; megatron-core's masked_select has the same one).
//
// Legend: T tokens, H hidden size, E experts, N permuted rows.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "permute_cuda.h"

namespace taskmoe {
namespace {

using at::Tensor;

taskmoe_cuda::DType kernel_dtype(at::ScalarType t) {
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
              "taskmoe CUDA kernels support float32, float16 and bfloat16, got ", t);
  return t == at::kFloat ? taskmoe_cuda::DType::kFloat32
                         : (t == at::kHalf ? taskmoe_cuda::DType::kFloat16 : taskmoe_cuda::DType::kBFloat16);
}

// The kernels need a dense last dimension; any row stride is fine.
Tensor rows_dense(const Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

std::tuple<Tensor, Tensor> permute_index_cuda(const Tensor& routing_map, int64_t capacity) {
  TORCH_CHECK(routing_map.dim() == 2, "taskmoe: routing_map must be 2-D [tokens, experts], got shape ",
              routing_map.sizes());
  const c10::cuda::CUDAGuard guard(routing_map.device());
  const int64_t T = routing_map.size(0);
  const int64_t E = routing_map.size(1);
  const auto long_opts = routing_map.options().dtype(at::kLong);
  if (capacity < 0) {
    // nonzero lists the (expert, token) pairs of the [E, T] map in row-major order: expert-major, tokens
    // ascending, megatron's order. One pass and one host synchronisation (for N).
    const Tensor pairs_N2 = routing_map.to(at::kBool).t().nonzero();
    return {pairs_N2.select(1, 1).contiguous(), pairs_N2.select(1, 0).contiguous()};
  }
  const int64_t cap = std::min(capacity, T);
  const Tensor map_ET = routing_map.to(at::kChar).t().contiguous();
  const Tensor sorted = std::get<1>(map_ET.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true))
                            .narrow(1, 0, cap)
                            .contiguous()
                            .view(-1);
  const Tensor expert = at::arange(E, long_opts).repeat_interleave(cap);
  return {sorted, expert};
}

std::tuple<Tensor, Tensor> inverse_index_cuda(const Tensor& sorted_indices, int64_t num_tokens) {
  TORCH_CHECK(sorted_indices.dim() == 1 && sorted_indices.scalar_type() == at::kLong,
              "taskmoe: sorted_indices must be a 1-D int64 tensor");
  TORCH_CHECK(num_tokens >= 0, "taskmoe: num_tokens must be >= 0, got ", num_tokens);
  const c10::cuda::CUDAGuard guard(sorted_indices.device());
  // slots: the slot numbers ordered by token (stably, so each token's slots ascend); row_ptr[t]: the number of
  // entries < t. Entries outside [0, num_tokens) make row_ptr start above 0 or end below N, which gather_sum
  // asserts on (no host-side check: it would synchronise).
  const auto [tokens_sorted, slots] = sorted_indices.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
  const Tensor row_ptr = at::searchsorted(tokens_sorted, at::arange(num_tokens + 1, sorted_indices.options()));
  return {row_ptr, slots};
}

std::optional<Tensor> float_weights(const std::optional<Tensor>& weights, int64_t n) {
  if (!weights.has_value()) {
    return std::nullopt;
  }
  TORCH_CHECK(weights->dim() == 1 && weights->size(0) == n, "taskmoe: weights must have shape [", n, "]");
  return weights->to(at::kFloat).contiguous();
}

Tensor gather_rows_cuda(const Tensor& src, const Tensor& indices, const std::optional<Tensor>& weights) {
  TORCH_CHECK(src.dim() == 2, "taskmoe: src must be 2-D [rows, hidden], got shape ", src.sizes());
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == at::kLong, "taskmoe: indices must be 1-D int64");
  const c10::cuda::CUDAGuard guard(src.device());
  const Tensor s = rows_dense(src);
  const Tensor idx = indices.contiguous();
  const int64_t N = idx.size(0);
  const int64_t H = s.size(1);
  const auto w = float_weights(weights, N);
  Tensor out = at::empty({N, H}, s.options());
  C10_CUDA_CHECK(taskmoe_cuda::gather_rows(kernel_dtype(s.scalar_type()), s.data_ptr(), s.size(0), s.stride(0),
                                           out.data_ptr(), out.stride(0), idx.data_ptr<int64_t>(),
                                           w ? w->data_ptr<float>() : nullptr, N, H,
                                           c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

Tensor gather_sum_cuda(const Tensor& src, const Tensor& row_ptr, const Tensor& slots,
                       const std::optional<Tensor>& weights, int64_t num_tokens) {
  TORCH_CHECK(src.dim() == 2, "taskmoe: src must be 2-D [rows, hidden], got shape ", src.sizes());
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.size(0) == num_tokens + 1 && row_ptr.scalar_type() == at::kLong,
              "taskmoe: row_ptr must be 1-D int64 with num_tokens + 1 = ", num_tokens + 1, " entries");
  TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == at::kLong, "taskmoe: slots must be 1-D int64");
  const c10::cuda::CUDAGuard guard(src.device());
  const Tensor s = rows_dense(src);
  const Tensor ptr = row_ptr.contiguous();
  const Tensor sl = slots.contiguous();
  const int64_t H = s.size(1);
  const auto w = float_weights(weights, s.size(0));
  Tensor out = at::empty({num_tokens, H}, s.options());
  C10_CUDA_CHECK(taskmoe_cuda::gather_sum(kernel_dtype(s.scalar_type()), s.data_ptr(), s.size(0), s.stride(0),
                                          out.data_ptr(), out.stride(0), ptr.data_ptr<int64_t>(),
                                          sl.data_ptr<int64_t>(), sl.size(0), w ? w->data_ptr<float>() : nullptr,
                                          num_tokens, H, c10::cuda::getCurrentCUDAStream().stream()));
  return out;
}

std::tuple<Tensor, Tensor> unpermute_backward_cuda(const Tensor& grad_out, const Tensor& permuted,
                                                   const Tensor& indices, const Tensor& weights) {
  TORCH_CHECK(grad_out.dim() == 2 && permuted.dim() == 2 && grad_out.size(1) == permuted.size(1),
              "taskmoe: grad_out [T, H] and permuted [N, H] must be 2-D with the same H");
  TORCH_CHECK(grad_out.scalar_type() == permuted.scalar_type(), "taskmoe: grad_out and permuted dtypes differ");
  TORCH_CHECK(indices.dim() == 1 && indices.scalar_type() == at::kLong && indices.size(0) == permuted.size(0),
              "taskmoe: indices must be 1-D int64 with one entry per permuted row");
  const c10::cuda::CUDAGuard guard(permuted.device());
  const Tensor g = rows_dense(grad_out);
  const Tensor x = rows_dense(permuted);
  const Tensor idx = indices.contiguous();
  const int64_t N = x.size(0);
  const int64_t H = x.size(1);
  const auto w = float_weights(weights, N);
  Tensor grad_x = at::empty({N, H}, x.options());
  Tensor grad_w = at::empty({N}, x.options().dtype(at::kFloat));
  C10_CUDA_CHECK(taskmoe_cuda::unpermute_backward(
      kernel_dtype(x.scalar_type()), g.data_ptr(), g.size(0), g.stride(0), x.data_ptr(), x.stride(0),
      grad_x.data_ptr(), grad_x.stride(0), grad_w.data_ptr<float>(), idx.data_ptr<int64_t>(), w->data_ptr<float>(),
      N, H, c10::cuda::getCurrentCUDAStream().stream()));
  return {grad_x, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(taskmoe, CUDA, m) {
  m.impl("permute_index", &permute_index_cuda);
  m.impl("inverse_index", &inverse_index_cuda);
  m.impl("gather_rows", &gather_rows_cuda);
  m.impl("gather_sum", &gather_sum_cuda);
  m.impl("unpermute_backward", &unpermute_backward_cuda);
}

}  // namespace taskmoe
