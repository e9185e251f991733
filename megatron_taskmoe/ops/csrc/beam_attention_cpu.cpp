// Beam-search decoding attention over a key/value cache that is never reordered: the CPU kernel of
// `taskmoe::beam_decode_attention` (megatron_taskmoe/ops/beam_attention.py has the pure-torch equivalent and the
// Python entry point).
//
// Legend: B sentence slots of the cache, L live sentences, K hypotheses per sentence (beam), N = L*K rows,
// H query heads, Hkv key/value heads, Q query positions of a step, T cache capacity (positions), t attended
// positions, Dh head dim.
//
// Layout: key_cache / value_cache [B, Hkv, T, K, Dh]. A decoding step writes position p of every hypothesis of a
// sentence at [slot, :, p, k] (k: the hypothesis' beam index at that step) and never moves it. When beam search
// makes hypothesis k continue another one, only its ancestry row changes: ancestry[n, p] is the beam index whose
// slot holds hypothesis n's position p. A step therefore reads each cached key/value once, where a reordered cache
// would first copy all of them (read and write) and then read them again for attention.
//
// One parallel task is one (sentence, query head): its keys and values ([t, K, Dh], contiguous in the cache) are
// read by the K hypotheses in turn, from cache rather than memory. Scores and the weighted sum accumulate in fp32;
// softmax subtracts the row maximum. Each task's arithmetic is in a fixed order, so results do not depend on the
// thread count.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "multiversion.h"

#include <cmath>
#include <cstdint>
#include <vector>

namespace taskmoe {
namespace {

using at::Tensor;

constexpr int64_t kDotLanes = 8;  // fixed accumulation lanes of the score dot product (vectorizable, fixed order)

template <typename T>
inline __attribute__((always_inline)) float dot(const T* __restrict__ q, const T* __restrict__ k, int64_t D) {
  float lane[kDotLanes] = {};
  const int64_t D_main = D - D % kDotLanes;
  for (int64_t d = 0; d < D_main; d += kDotLanes) {
    for (int64_t l = 0; l < kDotLanes; ++l) lane[l] += static_cast<float>(q[d + l]) * static_cast<float>(k[d + l]);
  }
  for (int64_t d = D_main; d < D; ++d) lane[d - D_main] += static_cast<float>(q[d]) * static_cast<float>(k[d]);
  float sum = 0;
  for (int64_t l = 0; l < kDotLanes; ++l) sum += lane[l];
  return sum;
}

// One query row q [Dh] of hypothesis beam row `anc` (its ancestry, t entries) against a (sentence, kv head) block
// keys/values [t, K, Dh] -> out [Dh]. score [t] and acc [Dh] are scratch.
template <typename T>
inline __attribute__((always_inline)) void attend_query(
    const T* __restrict__ q, const T* __restrict__ keys, const T* __restrict__ values, const int64_t* __restrict__ anc,
    T* __restrict__ out, float* __restrict__ score, float* __restrict__ acc, int64_t K, int64_t D, int64_t t,
    float scale) {
  float max_score = -INFINITY;
  for (int64_t p = 0; p < t; ++p) {
    const float s = dot(q, keys + (p * K + anc[p]) * D, D) * scale;
    score[p] = s;
    max_score = s > max_score ? s : max_score;
  }
  float total = 0;
  for (int64_t p = 0; p < t; ++p) {
    score[p] = std::exp(score[p] - max_score);
    total += score[p];
  }
  const float inv_total = 1.0f / total;
  for (int64_t d = 0; d < D; ++d) acc[d] = 0.0f;
  for (int64_t p = 0; p < t; ++p) {
    const T* __restrict__ v = values + (p * K + anc[p]) * D;
    const float w = score[p] * inv_total;
    for (int64_t d = 0; d < D; ++d) acc[d] += static_cast<float>(v[d]) * w;
  }
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(acc[d]);
}

// The per-query body as one multiversioned function per dtype (the helpers above inline into each clone).
#define TASKMOE_ATTEND_QUERY(T)                                                                                   \
  TASKMOE_MULTIVERSION void attend_query_mv(const T* q, const T* keys, const T* values, const int64_t* anc,       \
                                            T* out, float* score, float* acc, int64_t K, int64_t D, int64_t t,  \
                                            float scale) {                                                        \
    attend_query<T>(q, keys, values, anc, out, score, acc, K, D, t, scale);                                       \
  }
TASKMOE_ATTEND_QUERY(float)
TASKMOE_ATTEND_QUERY(c10::Half)
TASKMOE_ATTEND_QUERY(c10::BFloat16)
#undef TASKMOE_ATTEND_QUERY

// Every (live sentence, query head) as one parallel task (file comment); q and out [N, H, Q, Dh] contiguous.
template <typename scalar_t>
void run(const Tensor& q, const Tensor& key_cache, const Tensor& value_cache, const int64_t* slot,
         const int64_t* anc, int64_t anc_stride, Tensor& out, int64_t length, float scale) {
  const int64_t H = q.size(1), Q = q.size(2), D = q.size(3);
  const int64_t Hkv = key_cache.size(1), T = key_cache.size(2), K = key_cache.size(3);
  const int64_t L = q.size(0) / K, group = H / Hkv;
  const scalar_t* q_ptr = q.data_ptr<scalar_t>();
  const scalar_t* k_ptr = key_cache.data_ptr<scalar_t>();
  const scalar_t* v_ptr = value_cache.data_ptr<scalar_t>();
  scalar_t* o_ptr = out.data_ptr<scalar_t>();
  at::parallel_for(0, L * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> score(length), acc(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t l = task / H, h = task % H;
      const int64_t block = (slot[l] * Hkv + h / group) * T * K * D;  // [slot, h's kv head, 0, 0, 0]
      for (int64_t k = 0; k < K; ++k) {
        const int64_t n = l * K + k;
        for (int64_t j = 0; j < Q; ++j) {
          const int64_t row = ((n * H + h) * Q + j) * D;
          attend_query_mv(q_ptr + row, k_ptr + block, v_ptr + block, anc + n * anc_stride, o_ptr + row, score.data(),
                          acc.data(), K, D, length, scale);
        }
      }
    }
  });
}

void check_index(const Tensor& t, int64_t dims, const char* name) {
  TORCH_CHECK(t.dim() == dims && t.scalar_type() == at::kLong, "beam_decode_attention: ", name, " must be a ", dims,
              "-D int64 tensor, got ", t.scalar_type(), " of shape ", t.sizes());
}

Tensor beam_decode_attention_cpu(const Tensor& query, const Tensor& key_cache, const Tensor& value_cache,
                                 const Tensor& slots, const Tensor& ancestry, int64_t length, double scale) {
  TORCH_CHECK(query.dim() == 4, "beam_decode_attention: query must be [N, H, Q, Dh], got shape ", query.sizes());
  TORCH_CHECK(key_cache.dim() == 5 && key_cache.sizes() == value_cache.sizes(),
              "beam_decode_attention: key_cache and value_cache must both be [B, Hkv, T, K, Dh], got shapes ",
              key_cache.sizes(), " and ", value_cache.sizes());
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(),
              "beam_decode_attention: the caches must be contiguous");
  TORCH_CHECK(query.scalar_type() == key_cache.scalar_type() && query.scalar_type() == value_cache.scalar_type(),
              "beam_decode_attention: query, key_cache and value_cache must share a dtype, got ",
              query.scalar_type(), ", ", key_cache.scalar_type(), ", ", value_cache.scalar_type());
  check_index(slots, 1, "slots");
  check_index(ancestry, 2, "ancestry");
  const int64_t N = query.size(0), H = query.size(1), Q = query.size(2), D = query.size(3);
  const int64_t B = key_cache.size(0), Hkv = key_cache.size(1), T = key_cache.size(2), K = key_cache.size(3);
  const int64_t L = slots.size(0);
  TORCH_CHECK(key_cache.size(4) == D, "beam_decode_attention: head dim ", D, " of the query, ", key_cache.size(4),
              " of the cache");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "beam_decode_attention: ", H, " query heads are not a multiple of ", Hkv,
              " key/value heads");
  TORCH_CHECK(N == L * K, "beam_decode_attention: ", N, " query rows, expected ", L, " sentences x ", K, " beams");
  TORCH_CHECK(length >= 1 && length <= T, "beam_decode_attention: length ", length, " outside [1, ", T, "]");
  TORCH_CHECK(ancestry.size(0) == N && ancestry.size(1) >= length && ancestry.stride(1) == 1,
              "beam_decode_attention: ancestry must be [", N, ", >= ", length, "] with unit stride, got shape ",
              ancestry.sizes());

  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(slot[l] >= 0 && slot[l] < B, "beam_decode_attention: slots[", l, "] = ", slot[l],
                " outside [0, ", B, ")");
  }
  const int64_t* anc = ancestry.data_ptr<int64_t>();
  const int64_t anc_stride = ancestry.stride(0);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t p = 0; p < length; ++p) {
      const int64_t a = anc[n * anc_stride + p];
      TORCH_CHECK(a >= 0 && a < K, "beam_decode_attention: ancestry[", n, ", ", p, "] = ", a, " outside [0, ", K,
                  ")");
    }
  }

  const Tensor q = query.contiguous();
  Tensor out = at::empty({N, H, Q, D}, q.options());
  const float scale_f = static_cast<float>(scale);
  switch (q.scalar_type()) {
    case at::kFloat:
      run<float>(q, key_cache, value_cache, slot, anc, anc_stride, out, length, scale_f);
      break;
    case at::kHalf:
      run<c10::Half>(q, key_cache, value_cache, slot, anc, anc_stride, out, length, scale_f);
      break;
    case at::kBFloat16:
      run<c10::BFloat16>(q, key_cache, value_cache, slot, anc, anc_stride, out, length, scale_f);
      break;
    default:
      TORCH_CHECK(false, "beam_decode_attention: no CPU kernel for ", q.scalar_type(),
                  " (float32, float16, bfloat16; the pure-torch path takes any)");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(taskmoe, m) {
  m.def("beam_decode_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor slots, Tensor ancestry, "
        "int length, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(taskmoe, CPU, m) {
  m.impl("beam_decode_attention", &beam_decode_attention_cpu);
}

}  // namespace taskmoe
