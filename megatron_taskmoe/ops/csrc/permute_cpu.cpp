// Token permutation for MoE dispatch: schema of the `taskmoe` operator library and its CPU kernels.
//
// Legend: T tokens, H hidden size, E experts, N permuted rows (dropless: routed (token, expert) pairs;
// drop-and-pad: E * capacity).
//
// Why these five operators: megatron-core's permute/unpermute move N * H elements through index_select and
// scatter_add_. Here the index work (which token goes to which slot) is done once on [T, E] booleans, and the
// [*, H] data moves through row gathers only. The reduction in unpermute (and in permute's backward) is a gather
// and sum per output token over its slots in slot order, through the inverse mapping (CSR: row_ptr_T1, slots_N),
// so results do not depend on thread count or scheduling: no atomics, fixed summation order, fp32 (opmath)
// accumulation.
//
// The [*, H] outputs come from output_cache_cpu.h (recycled huge-page blocks): at these sizes the page faults and
// zeroing of freshly mapped memory cost more than the row copies. The build disables FMA contraction (setup.py),
// so a weighted merge in fp32 is bitwise torch's mul + scatter_add.
//
// The module is loaded as a Python extension (PyInit below) whose only job is to run the static registrations;
// the operators are then reached through torch.ops.taskmoe.*. The CUDA kernels register under the same schema
// in permute_cuda.cpp when the extension is built with CUDA.

#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "multiversion.h"
#include "output_cache_cpu.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace taskmoe {
namespace {

using at::Tensor;

// Rows per parallel task: a row is H elements (hundreds to thousands), so a few rows amortize the task cost.
constexpr int64_t kRowGrain = 8;
// Tokens per chunk of the index pass over the [T, E] routing map.
constexpr int64_t kTokenChunk = 2048;

// ---------------------------------------------------------------------------------------------------------------
// Row kernels: the hot loops over one row of H elements, as plain functions per dtype, each built for AVX2 and
// the baseline (TASKMOE_MULTIVERSION, multiversion.h).
// ---------------------------------------------------------------------------------------------------------------

constexpr int64_t kLanes = 8;  // fixed accumulation lanes of row_dot (vectorizable, fixed order)

#define TASKMOE_ROW_KERNELS(T, ACC)                                                                         \
  /* d = s * w */                                                                                           \
  TASKMOE_MULTIVERSION void row_scale(T* __restrict__ d, const T* __restrict__ s, ACC w, int64_t H) {       \
    for (int64_t h = 0; h < H; ++h) d[h] = static_cast<T>(static_cast<ACC>(s[h]) * w);                     \
  }                                                                                                         \
  /* acc = s * w */                                                                                         \
  TASKMOE_MULTIVERSION void row_acc_init(ACC* __restrict__ acc, const T* __restrict__ s, ACC w, int64_t H) { \
    for (int64_t h = 0; h < H; ++h) acc[h] = static_cast<ACC>(s[h]) * w;                                   \
  }                                                                                                         \
  /* acc += s * w */                                                                                        \
  TASKMOE_MULTIVERSION void row_acc_add(ACC* __restrict__ acc, const T* __restrict__ s, ACC w, int64_t H) {  \
    for (int64_t h = 0; h < H; ++h) acc[h] += static_cast<ACC>(s[h]) * w;                                  \
  }                                                                                                         \
  /* d = acc */                                                                                             \
  TASKMOE_MULTIVERSION void row_store(T* __restrict__ d, const ACC* __restrict__ acc, int64_t H) {          \
    for (int64_t h = 0; h < H; ++h) d[h] = static_cast<T>(acc[h]);                                         \
  }                                                                                                         \
  /* dot(g, x) in kLanes fixed lanes */                                                                     \
  TASKMOE_MULTIVERSION ACC row_dot(const T* __restrict__ g, const T* __restrict__ x, int64_t H) {            \
    ACC lane[kLanes] = {};                                                                                  \
    const int64_t H_main = H - H % kLanes;                                                                  \
    for (int64_t h = 0; h < H_main; h += kLanes) {                                                          \
      for (int64_t l = 0; l < kLanes; ++l) {                                                                \
        lane[l] += static_cast<ACC>(g[h + l]) * static_cast<ACC>(x[h + l]);                                 \
      }                                                                                                     \
    }                                                                                                       \
    for (int64_t h = H_main; h < H; ++h) {                                                                  \
      lane[h - H_main] += static_cast<ACC>(g[h]) * static_cast<ACC>(x[h]);                                  \
    }                                                                                                       \
    ACC dot = 0;                                                                                            \
    for (int64_t l = 0; l < kLanes; ++l) dot += lane[l];                                                    \
    return dot;                                                                                             \
  }

TASKMOE_ROW_KERNELS(float, float)
TASKMOE_ROW_KERNELS(double, double)
TASKMOE_ROW_KERNELS(c10::Half, float)
TASKMOE_ROW_KERNELS(c10::BFloat16, float)
#undef TASKMOE_ROW_KERNELS

void check_index_vector(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 1, "taskmoe: ", name, " must be 1-D, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kLong, "taskmoe: ", name, " must be int64, got ", t.scalar_type());
}

void check_range(const int64_t* idx, int64_t n, int64_t limit, const char* name) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < limit, "taskmoe: ", name, "[", i, "] = ", idx[i],
                " is out of range [0, ", limit, ")");
  }
}

Tensor as_float_weights(const std::optional<Tensor>& weights, int64_t n) {
  if (!weights.has_value()) {
    return Tensor();
  }
  TORCH_CHECK(weights->dim() == 1 && weights->size(0) == n, "taskmoe: weights must have shape [", n,
              "], got ", weights->sizes());
  return weights->to(at::kFloat).contiguous();
}

// Calls fn(e) for each nonzero byte row[e], e ascending. Top-k routing maps are sparse (K of E per row), so
// whole 8-byte words of zeros are skipped and the set bytes of a word are found with ctz.
template <typename F>
inline void for_each_routed(const uint8_t* row, int64_t E, F&& fn) {
  int64_t e = 0;
#if defined(__GNUC__) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  for (; e + 8 <= E; e += 8) {
    uint64_t word;
    std::memcpy(&word, row + e, sizeof(word));
    while (word != 0) {
      const int byte = __builtin_ctzll(word) >> 3;  // little-endian: the lowest address is the lowest byte
      fn(e + byte);
      word &= ~(uint64_t(0xff) << (8 * byte));
    }
  }
#endif
  for (; e < E; ++e) {
    if (row[e] != 0) {
      fn(e);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// permute_index: routing_map_TE -> (sorted_indices_N, slot_expert_N), megatron-core's order exactly.
//   dropless (capacity < 0): for each expert in order, the tokens routed to it in ascending order.
//   drop-and-pad (capacity >= 0): for each expert, its routed tokens ascending then its non-routed tokens
//   ascending, truncated to min(capacity, T) (what a stable descending argsort of the expert's column gives).
// Two passes over token chunks: count per (chunk, expert), exclusive prefix sums, then fill; both passes read
// the map row-major and are parallel over chunks.
// ---------------------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> permute_index_cpu(const Tensor& routing_map, int64_t capacity) {
  TORCH_CHECK(routing_map.dim() == 2, "taskmoe: routing_map must be 2-D [tokens, experts], got shape ",
              routing_map.sizes());
  const Tensor map_TE = routing_map.to(at::kBool).contiguous();
  const int64_t T = map_TE.size(0);
  const int64_t E = map_TE.size(1);
  const uint8_t* map = reinterpret_cast<const uint8_t*>(map_TE.data_ptr<bool>());
  const int64_t num_chunks = std::max<int64_t>(1, (T + kTokenChunk - 1) / kTokenChunk);

  // counts_CE[c * E + e]: routed tokens of expert e inside chunk c.
  std::vector<int64_t> counts_CE(num_chunks * E, 0);
  at::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      // Branch-free and vectorizable: a chunk has at most kTokenChunk tokens, so 32-bit counters suffice.
      std::vector<uint32_t> cnt(E, 0);
      const int64_t t_end = std::min(T, (c + 1) * kTokenChunk);
      for (int64_t t = c * kTokenChunk; t < t_end; ++t) {
        const uint8_t* row = map + t * E;
        for (int64_t e = 0; e < E; ++e) {
          cnt[e] += row[e] != 0 ? 1u : 0u;
        }
      }
      std::copy(cnt.begin(), cnt.end(), counts_CE.begin() + c * E);
    }
  });
  // routed_before_CE[c * E + e]: routed tokens of expert e in chunks before c; total_E: per expert.
  std::vector<int64_t> routed_before_CE(num_chunks * E, 0);
  std::vector<int64_t> total_E(E, 0);
  for (int64_t e = 0; e < E; ++e) {
    int64_t running = 0;
    for (int64_t c = 0; c < num_chunks; ++c) {
      routed_before_CE[c * E + e] = running;
      running += counts_CE[c * E + e];
    }
    total_E[e] = running;
  }

  const bool drop_and_pad = capacity >= 0;
  const int64_t cap = drop_and_pad ? std::min(capacity, T) : 0;
  // expert_start_E[e]: first output slot of expert e.
  std::vector<int64_t> expert_start_E(E, 0);
  int64_t num_out = 0;
  for (int64_t e = 0; e < E; ++e) {
    expert_start_E[e] = num_out;
    num_out += drop_and_pad ? cap : total_E[e];
  }

  Tensor sorted_indices = at::empty({num_out}, map_TE.options().dtype(at::kLong));
  Tensor slot_expert = at::empty({num_out}, map_TE.options().dtype(at::kLong));
  int64_t* out_idx = sorted_indices.data_ptr<int64_t>();
  int64_t* out_exp = slot_expert.data_ptr<int64_t>();

  at::parallel_for(0, num_chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<int64_t> routed_seen(E);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t t_begin = c * kTokenChunk;
      const int64_t t_end = std::min(T, t_begin + kTokenChunk);
      for (int64_t e = 0; e < E; ++e) {
        routed_seen[e] = routed_before_CE[c * E + e];
      }
      if (!drop_and_pad) {
        for (int64_t t = t_begin; t < t_end; ++t) {
          for_each_routed(map + t * E, E, [&](int64_t e) {
            const int64_t slot = expert_start_E[e] + routed_seen[e]++;
            out_idx[slot] = t;
            out_exp[slot] = e;
          });
        }
        continue;
      }
      for (int64_t t = t_begin; t < t_end; ++t) {
        const uint8_t* row = map + t * E;
        for (int64_t e = 0; e < E; ++e) {
          int64_t pos;
          if (row[e]) {
            pos = routed_seen[e]++;
          } else if (drop_and_pad) {
            // Non-routed tokens follow all routed ones: rank among non-routed = t - routed tokens before t.
            pos = total_E[e] + (t - routed_seen[e]);
          } else {
            continue;
          }
          if (drop_and_pad && pos >= cap) {
            continue;
          }
          out_idx[expert_start_E[e] + pos] = t;
          out_exp[expert_start_E[e] + pos] = e;
        }
      }
    }
  });
  return {sorted_indices, slot_expert};
}

// ---------------------------------------------------------------------------------------------------------------
// inverse_index: sorted_indices_N -> CSR (row_ptr_T1, slots_N): the slots of token t, ascending, are
// slots[row_ptr[t] : row_ptr[t + 1]]. A counting sort: O(N + T), serial (it touches only 8-byte indices).
// ---------------------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> inverse_index_cpu(const Tensor& sorted_indices, int64_t num_tokens) {
  check_index_vector(sorted_indices, "sorted_indices");
  TORCH_CHECK(num_tokens >= 0, "taskmoe: num_tokens must be >= 0, got ", num_tokens);
  const Tensor idx_N = sorted_indices.contiguous();
  const int64_t N = idx_N.size(0);
  const int64_t* idx = idx_N.data_ptr<int64_t>();
  check_range(idx, N, num_tokens, "sorted_indices");

  Tensor row_ptr = at::zeros({num_tokens + 1}, idx_N.options());
  Tensor slots = at::empty({N}, idx_N.options());
  int64_t* ptr = row_ptr.data_ptr<int64_t>();
  int64_t* out = slots.data_ptr<int64_t>();
  for (int64_t j = 0; j < N; ++j) {
    ++ptr[idx[j] + 1];
  }
  for (int64_t t = 0; t < num_tokens; ++t) {
    ptr[t + 1] += ptr[t];
  }
  std::vector<int64_t> cursor(ptr, ptr + num_tokens);
  for (int64_t j = 0; j < N; ++j) {
    out[cursor[idx[j]]++] = j;
  }
  return {row_ptr, slots};
}

// ---------------------------------------------------------------------------------------------------------------
// gather_rows: out[j] = src[indices[j]] (* weights[j], computed in fp32). Permute's forward, and the backward of
// unpermute without probabilities.
// ---------------------------------------------------------------------------------------------------------------
Tensor gather_rows_cpu(const Tensor& src, const Tensor& indices, const std::optional<Tensor>& weights) {
  TORCH_CHECK(src.dim() == 2, "taskmoe: src must be 2-D [rows, hidden], got shape ", src.sizes());
  check_index_vector(indices, "indices");
  const Tensor src_MH = src.contiguous();
  const Tensor idx_N = indices.contiguous();
  const int64_t M = src_MH.size(0);
  const int64_t H = src_MH.size(1);
  const int64_t N = idx_N.size(0);
  const int64_t* idx = idx_N.data_ptr<int64_t>();
  check_range(idx, N, M, "indices");
  const Tensor w_N = as_float_weights(weights, N);
  const float* w = w_N.defined() ? w_N.data_ptr<float>() : nullptr;

  Tensor out = empty_output({N, H}, src_MH.scalar_type());
  if (N == 0 || H == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src_MH.scalar_type(), "taskmoe_gather_rows", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* in = src_MH.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, kRowGrain, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const scalar_t* s = in + idx[j] * H;
        scalar_t* d = dst + j * H;
        if (w == nullptr) {
          std::memcpy(d, s, sizeof(scalar_t) * H);
        } else {
          row_scale(d, s, static_cast<opmath_t>(w[j]), H);
        }
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// gather_sum: out[t] = sum over s in slots[row_ptr[t]:row_ptr[t+1]] of src[s] (* weights[s]), in slot order,
// accumulated in opmath (fp32 for fp32/bf16/fp16). Unpermute's forward and permute's backward. Tokens with no
// slot get zeros.
// ---------------------------------------------------------------------------------------------------------------
Tensor gather_sum_cpu(const Tensor& src, const Tensor& row_ptr, const Tensor& slots,
                      const std::optional<Tensor>& weights, int64_t num_tokens) {
  TORCH_CHECK(src.dim() == 2, "taskmoe: src must be 2-D [rows, hidden], got shape ", src.sizes());
  check_index_vector(row_ptr, "row_ptr");
  check_index_vector(slots, "slots");
  TORCH_CHECK(row_ptr.size(0) == num_tokens + 1, "taskmoe: row_ptr must have num_tokens + 1 = ", num_tokens + 1,
              " entries, got ", row_ptr.size(0));
  const Tensor src_NH = src.contiguous();
  const Tensor ptr_T1 = row_ptr.contiguous();
  const Tensor slots_N = slots.contiguous();
  const int64_t N = src_NH.size(0);
  const int64_t H = src_NH.size(1);
  const int64_t* ptr = ptr_T1.data_ptr<int64_t>();
  const int64_t* slot = slots_N.data_ptr<int64_t>();
  TORCH_CHECK(ptr[0] == 0 && ptr[num_tokens] == slots_N.size(0), "taskmoe: row_ptr must run from 0 to ",
              slots_N.size(0));
  check_range(slot, slots_N.size(0), N, "slots");
  const Tensor w_N = as_float_weights(weights, N);
  const float* w = w_N.defined() ? w_N.data_ptr<float>() : nullptr;

  Tensor out = empty_output({num_tokens, H}, src_NH.scalar_type());
  if (num_tokens == 0 || H == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, src_NH.scalar_type(), "taskmoe_gather_sum", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* in = src_NH.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, num_tokens, kRowGrain, [&](int64_t t0, int64_t t1) {
      std::vector<opmath_t> acc(std::is_same_v<scalar_t, opmath_t> ? 0 : H);
      for (int64_t t = t0; t < t1; ++t) {
        scalar_t* d = dst + t * H;
        const int64_t begin = ptr[t];
        const int64_t end = ptr[t + 1];
        if (begin == end) {
          std::fill(d, d + H, static_cast<scalar_t>(0));
          continue;
        }
        const auto weight = [&](int64_t k) {
          return w == nullptr ? opmath_t(1) : static_cast<opmath_t>(w[slot[k]]);
        };
        if (end - begin == 1) {  // one pass, same arithmetic as init + store
          if (w == nullptr) {
            std::memcpy(d, in + slot[begin] * H, sizeof(scalar_t) * H);
          } else {
            row_scale(d, in + slot[begin] * H, weight(begin), H);
          }
          continue;
        }
        // fp32/fp64 accumulate in the output row itself (same operations and order as through acc).
        opmath_t* sum = std::is_same_v<scalar_t, opmath_t> ? reinterpret_cast<opmath_t*>(d) : acc.data();
        row_acc_init(sum, in + slot[begin] * H, weight(begin), H);
        for (int64_t k = begin + 1; k < end; ++k) {
          row_acc_add(sum, in + slot[k] * H, weight(k), H);
        }
        if constexpr (!std::is_same_v<scalar_t, opmath_t>) {
          row_store(d, acc.data(), H);
        }
      }
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// unpermute_backward (with probabilities): for each slot j, with g = grad_out[indices[j]],
//   grad_permuted[j] = g * weights[j]        and        grad_weights[j] = dot(g, permuted[j]) (fp32),
// one pass over the two [*, H] inputs.
// ---------------------------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> unpermute_backward_cpu(const Tensor& grad_out, const Tensor& permuted,
                                                  const Tensor& indices, const Tensor& weights) {
  TORCH_CHECK(grad_out.dim() == 2 && permuted.dim() == 2 && grad_out.size(1) == permuted.size(1),
              "taskmoe: grad_out [T, H] and permuted [N, H] must be 2-D with the same H, got ", grad_out.sizes(),
              " and ", permuted.sizes());
  TORCH_CHECK(grad_out.scalar_type() == permuted.scalar_type(), "taskmoe: grad_out and permuted dtypes differ: ",
              grad_out.scalar_type(), " vs ", permuted.scalar_type());
  check_index_vector(indices, "indices");
  const Tensor g_TH = grad_out.contiguous();
  const Tensor x_NH = permuted.contiguous();
  const Tensor idx_N = indices.contiguous();
  const int64_t T = g_TH.size(0);
  const int64_t N = x_NH.size(0);
  const int64_t H = x_NH.size(1);
  TORCH_CHECK(idx_N.size(0) == N, "taskmoe: indices must have ", N, " entries, got ", idx_N.size(0));
  const int64_t* idx = idx_N.data_ptr<int64_t>();
  check_range(idx, N, T, "indices");
  const Tensor w_N = as_float_weights(weights, N);
  const float* w = w_N.data_ptr<float>();

  Tensor grad_x = empty_output({N, H}, x_NH.scalar_type());
  Tensor grad_w = at::empty({N}, x_NH.options().dtype(at::kFloat));
  float* gw = grad_w.data_ptr<float>();
  if (N == 0) {
    return {grad_x, grad_w};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_NH.scalar_type(), "taskmoe_unpermute_bwd", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* g = g_TH.data_ptr<scalar_t>();
    const scalar_t* x = x_NH.data_ptr<scalar_t>();
    scalar_t* gx = grad_x.data_ptr<scalar_t>();
    at::parallel_for(0, N, kRowGrain, [&](int64_t j0, int64_t j1) {
      for (int64_t j = j0; j < j1; ++j) {
        const scalar_t* gj = g + idx[j] * H;
        row_scale(gx + j * H, gj, static_cast<opmath_t>(w[j]), H);
        gw[j] = static_cast<float>(row_dot(gj, x + j * H, H));  // gj is still in L1
      }
    });
  });
  return {grad_x, grad_w};
}

// The output cache (output_cache_cpu.h): [cached bytes, hits, misses, limit bytes]; and unmapping it.
std::vector<int64_t> output_cache_stats() {
  const auto stats = OutputAllocator::get().stats();
  return {stats.cached_bytes, stats.hits, stats.misses, OutputAllocator::get().limit_bytes()};
}

int64_t empty_output_cache() {
  return OutputAllocator::get().empty_cache();
}

void set_output_cache_limit(int64_t limit_bytes) {
  TORCH_CHECK(limit_bytes >= 0, "taskmoe: the output cache limit must be >= 0 bytes, got ", limit_bytes);
  OutputAllocator::get().set_limit(static_cast<size_t>(limit_bytes));
}

}  // namespace

TORCH_LIBRARY(taskmoe, m) {
  m.def("permute_index(Tensor routing_map, int capacity) -> (Tensor, Tensor)");
  m.def("inverse_index(Tensor sorted_indices, int num_tokens) -> (Tensor, Tensor)");
  m.def("gather_rows(Tensor src, Tensor indices, Tensor? weights) -> Tensor");
  m.def("gather_sum(Tensor src, Tensor row_ptr, Tensor slots, Tensor? weights, int num_tokens) -> Tensor");
  m.def("unpermute_backward(Tensor grad_out, Tensor permuted, Tensor indices, Tensor weights) -> (Tensor, Tensor)");
  // No tensor arguments: registered as catch-all kernels here rather than per device below.
  m.def("output_cache_stats() -> int[]", &output_cache_stats);
  m.def("empty_output_cache() -> int", &empty_output_cache);
  m.def("set_output_cache_limit(int limit_bytes) -> ()", &set_output_cache_limit);
}

TORCH_LIBRARY_IMPL(taskmoe, CPU, m) {
  m.impl("permute_index", &permute_index_cpu);
  m.impl("inverse_index", &inverse_index_cpu);
  m.impl("gather_rows", &gather_rows_cpu);
  m.impl("gather_sum", &gather_sum_cpu);
  m.impl("unpermute_backward", &unpermute_backward_cpu);
}

}  // namespace taskmoe

// The extension is imported as a Python module only so that the registrations above run.
extern "C" PyObject* PyInit__permute_ext(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_permute_ext", "taskmoe permutation operators (torch.ops.taskmoe.*)", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
