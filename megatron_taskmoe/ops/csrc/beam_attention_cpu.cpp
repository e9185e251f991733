// Attention of a beam search's decoding step, the CPU kernels of `taskmoe::beam_decode_attention` (self-attention
// over a key/value cache that is never reordered) and `taskmoe::beam_cross_attention` (the K hypotheses of a
// sentence against its encoder keys/values). megatron_taskmoe/ops/beam_attention.py has the pure-torch
// equivalents and the Python entry points.
//
// Legend: B sentence slots of the cache, L live sentences, K hypotheses per sentence (beam), N = L*K rows,
// H query heads, Hkv key/value heads, Q query positions of a step, X query rows of a sentence in cross-attention
// (K * Q), T cache capacity (positions), t attended positions, S source positions, Dh head dim.
//
// Self-attention layout: key_cache / value_cache [B, Hkv, T, K, Dh]. A decoding step writes position p of every
// hypothesis of a sentence at [slot, :, p, k] (k: the hypothesis' beam index at that step) and never moves it.
// When beam search makes hypothesis k continue another one, only its ancestry row changes: ancestry[n, p] is the
// beam index whose slot holds hypothesis n's position p. A step therefore reads each cached key/value once, where a
// reordered cache would first copy all of them (read and write) and then read them again for attention.
//
// Cross-attention layout: key / value [L, Hkv, S, Dh], one copy per sentence, `allowed` [L, S] the source positions
// a sentence's queries may see (its real tokens).
//
// One parallel task is one (sentence, query head) block: its keys and values are contiguous in memory, and a thread
// prefetches its next block while it computes this one. The block's query rows (the K hypotheses' step positions)
// go through it in groups of four, position by position, so the block is read in address order and each key/value
// row, once loaded, serves every query that needs it. A row's scores accumulate in fp32, softmax subtracts the row
// maximum and takes a polynomial exp that vectorizes, and the weighted sum of the values accumulates in fp32 and is
// normalised at the end. At head dims 64 and 128 the rows are vectors of 16 floats (GCC vector extensions, lowered
// to AVX-512, AVX2 or SSE2 by the clone the loader picks); other head dims, and groups of 2 or 3 rows, take a
// scalar path. Every reduction runs in a fixed order, so results do not depend on the thread count (nor, on one
// machine, on anything but the inputs).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "multiversion.h"

// f32x16 values pass between always-inline helpers only; their ABI outside AVX-512 does not matter here.
#pragma GCC diagnostic ignored "-Wpsabi"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

// The attention bodies get an x86-64-v4 (AVX-512) clone besides multiversion.h's two: a 16-float vector is one
// AVX-512 register.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define TASKMOE_ATTENTION_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TASKMOE_ATTENTION_MULTIVERSION TASKMOE_MULTIVERSION
#endif

namespace taskmoe {
namespace {

using at::Tensor;

// ---- vector path: GCC vector extensions, which each target clone lowers to its widest registers. A row of Dh
// = 16 * NV values is NV vectors of 16 floats. It needs __builtin_shufflevector and _Float16 (GCC >= 12, clang >= 15);
// older compilers build the scalar path only.
#ifndef TASKMOE_VECTOR_ATTENTION
#if (defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12) || (defined(__clang__) && __clang_major__ >= 15)
#define TASKMOE_VECTOR_ATTENTION 1
#else
#define TASKMOE_VECTOR_ATTENTION 0
#endif
#endif

#define TASKMOE_INLINE inline __attribute__((always_inline))

#if TASKMOE_VECTOR_ATTENTION
typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef _Float16 f16x16 __attribute__((vector_size(32)));

TASKMOE_INLINE f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
TASKMOE_INLINE f32x16 load16(const c10::BFloat16* p) {  // bf16 is the high half of a float
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  return (f32x16)(__builtin_convertvector(h, u32x16) << 16);
}
TASKMOE_INLINE f32x16 load16(const c10::Half* p) {
  f16x16 h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, f32x16);
}

// The sum of 16 lanes, as a tree in a fixed order.
TASKMOE_INLINE float hsum(f32x16 a) {
  const f32x8 a8 = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
                   __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x4 a4 = __builtin_shufflevector(a8, a8, 0, 1, 2, 3) + __builtin_shufflevector(a8, a8, 4, 5, 6, 7);
  return (a4[0] + a4[2]) + (a4[1] + a4[3]);
}
#endif  // TASKMOE_VECTOR_ATTENTION

// exp(x) for x <= 0 (a score minus its row's maximum): Cephes' single-precision polynomial (relative error about
// 1e-7) in plain arithmetic, for 16 lanes (V = f32x16) or one (V = float) with the same operations, so both give
// the same bits. (y + 1.5 * 2^23) - 1.5 * 2^23 rounds y to an integer. Below -87 (-inf included) it gives
// exp(-87) ~ 1.6e-38 rather than a denormal; NaN stays NaN.
template <typename V>
TASKMOE_INLINE V exp_nonpositive(V x) {
  constexpr float kRound = 12582912.0f;
  const V lowest = V{} - 87.0f;  // -87 in every lane (from zero: -inf * 0 would be NaN)
  x = x < -87.0f ? lowest : x;
  const V n = (x * 1.44269504088896341f + kRound) - kRound;  // in [-126, 0]
  const V r = (x - n * 0.693359375f) + n * 2.12194440e-4f;   // x - n ln2, ln2 in two parts
  V p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const V y = p * (r * r) + r + 1.0f;
  if constexpr (std::is_same_v<V, float>) {
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
    float two_n;
    std::memcpy(&two_n, &bits, sizeof two_n);
    return y * two_n;
  } else {
#if TASKMOE_VECTOR_ATTENTION
    return y * (V)((__builtin_convertvector(n, i32x16) + 127) << 23);
#endif
  }
}

// softmax numerators in place over score [t] (the row maximum subtracted); returns 1 / their sum.
TASKMOE_INLINE float softmax_numerators(float* __restrict__ score, int64_t t) {
  float max_score = -INFINITY;
  for (int64_t p = 0; p < t; ++p) max_score = score[p] > max_score ? score[p] : max_score;
  float total = 0.0f;
  int64_t t_main = 0;
#if TASKMOE_VECTOR_ATTENTION
  t_main = t - t % 16;
  f32x16 lanes{};
  for (int64_t p = 0; p < t_main; p += 16) {
    f32x16 s;
    std::memcpy(&s, score + p, sizeof s);
    s = exp_nonpositive(s - max_score);
    std::memcpy(score + p, &s, sizeof s);
    lanes += s;
  }
  total = hsum(lanes);
#endif
  float tail = 0.0f;
  for (int64_t p = t_main; p < t; ++p) {
    score[p] = exp_nonpositive(score[p] - max_score);
    tail += score[p];
  }
  return 1.0f / (total + tail);
}

#if TASKMOE_VECTOR_ATTENTION
// G query rows of one (sentence, head) block together, position by position, so that the block is read in
// address order (the hardware prefetcher follows) and each key/value row, once loaded, serves every query that
// needs it: query g's position p sits at keys/values + offset(g, p). score is [G, t] scratch.
template <typename T, int NV, int G, typename Offset>
TASKMOE_INLINE void attend_group(const T* const* q, const T* __restrict__ keys, const T* __restrict__ values,
                                 Offset offset, int64_t t, float scale, float* __restrict__ score, T* const* out) {
  f32x16 qv[G][NV];
  for (int g = 0; g < G; ++g) {
    for (int v = 0; v < NV; ++v) qv[g][v] = load16(q[g] + 16 * v);
  }
  for (int64_t p = 0; p < t; ++p) {
    const T* k[G];
    f32x16 a[G];
    for (int g = 0; g < G; ++g) {
      k[g] = keys + offset(g, p);
      a[g] = qv[g][0] * load16(k[g]);
    }
    for (int v = 1; v < NV; ++v) {
      for (int g = 0; g < G; ++g) a[g] += qv[g][v] * load16(k[g] + 16 * v);
    }
    for (int g = 0; g < G; ++g) score[g * t + p] = hsum(a[g]) * scale;
  }
  float inv_total[G];
  for (int g = 0; g < G; ++g) inv_total[g] = softmax_numerators(score + g * t, t);
  f32x16 acc[G][NV];
  for (int g = 0; g < G; ++g) {
    for (int v = 0; v < NV; ++v) acc[g][v] = f32x16{};
  }
  for (int64_t p = 0; p < t; ++p) {
    for (int g = 0; g < G; ++g) {
      const T* row = values + offset(g, p);
      const float w = score[g * t + p];
      for (int v = 0; v < NV; ++v) acc[g][v] += w * load16(row + 16 * v);
    }
  }
  for (int g = 0; g < G; ++g) {
    for (int v = 0; v < NV; ++v) {
      const f32x16 o = acc[g][v] * inv_total[g];
      for (int l = 0; l < 16; ++l) out[g][16 * v + l] = static_cast<T>(o[l]);
    }
  }
}

#endif  // TASKMOE_VECTOR_ATTENTION

// ---- scalar path (head dims the vector path does not take): one query row at a time, fp32 scores, the same
// softmax, fp32 accumulation normalised at the end.
template <typename T, typename Offset>
TASKMOE_INLINE void attend_row_scalar(const T* __restrict__ q, const T* __restrict__ keys,
                                      const T* __restrict__ values, Offset offset, int64_t t, int64_t D, float scale,
                                      float* __restrict__ score, float* __restrict__ acc, T* __restrict__ out) {
  for (int64_t p = 0; p < t; ++p) {
    const T* k = keys + offset(p);
    float s = 0.0f;
    for (int64_t d = 0; d < D; ++d) s += static_cast<float>(q[d]) * static_cast<float>(k[d]);
    score[p] = s * scale;
  }
  const float inv_total = softmax_numerators(score, t);
  for (int64_t d = 0; d < D; ++d) acc[d] = 0.0f;
  for (int64_t p = 0; p < t; ++p) {
    const T* v = values + offset(p);
    const float w = score[p];
    for (int64_t d = 0; d < D; ++d) acc[d] += w * static_cast<float>(v[d]);
  }
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(acc[d] * inv_total);
}

constexpr int kGroup = 4;  // query rows of a block processed together

// A group's vector body for its (G, NV): kGroup rows or one row, at head dims 64 and 128; false for other head dims
// (the scalar path).
template <typename T, typename Offset>
TASKMOE_INLINE bool attend_group_dispatch(int G, int64_t D, const T* const* q, const T* keys, const T* values,
                                          Offset offset, int64_t t, float scale, float* score, T* const* out) {
#if !TASKMOE_VECTOR_ATTENTION
  return false;
#else
#define TASKMOE_CASE(g, nv)                                                   \
  case (g) * 16 + (nv):                                                       \
    attend_group<T, nv, g>(q, keys, values, offset, t, scale, score, out); \
    return true;
  if (D % 16 != 0) return false;
  switch (G * 16 + D / 16) {
    TASKMOE_CASE(1, 4) TASKMOE_CASE(kGroup, 4) TASKMOE_CASE(1, 8) TASKMOE_CASE(kGroup, 8)
    default:
      return false;
  }
#undef TASKMOE_CASE
#endif
}

// One (sentence, head) block: its R query rows (q_rows[r], out_rows[r]) in groups of kGroup, the last R % kGroup one
// by one, row r's position p at keys/values + offset(r, p). score is [kGroup, t] scratch, acc [Dh].
template <typename T, typename Offset>
TASKMOE_INLINE void attend_block(int64_t R, const T* const* q_rows, T* const* out_rows, const T* keys,
                                 const T* values, Offset offset, int64_t t, int64_t D, float scale, float* score,
                                 float* acc) {
  for (int64_t r0 = 0; r0 < R;) {
    const int G = R - r0 >= kGroup ? kGroup : 1;
    auto group_offset = [&](int g, int64_t p) { return offset(r0 + g, p); };
    if (!attend_group_dispatch(G, D, q_rows + r0, keys, values, group_offset, t, scale, score, out_rows + r0)) {
      for (int g = 0; g < G; ++g) {
        attend_row_scalar(q_rows[r0 + g], keys, values, [&](int64_t p) { return offset(r0 + g, p); }, t, D, scale,
                          score, acc, out_rows[r0 + g]);
      }
    }
    r0 += G;
  }
}

// The two block bodies as multiversioned functions per dtype (the helpers above inline into each clone):
// self_block: row r reads position p from beam slot anc[r][p] of a [T, K, Dh] block;
// cross_block: every row reads the positions index[0..t) of an [S, Dh] block.
#define TASKMOE_ATTENTION_BLOCKS(T)                                                                                \
  TASKMOE_ATTENTION_MULTIVERSION void self_block(int64_t R, const T* const* q_rows, T* const* out_rows,            \
                                                 const int64_t* const* anc, const T* keys, const T* values,        \
                                                 int64_t K, int64_t t, int64_t D, float scale, float* score,       \
                                                 float* acc) {                                                     \
    attend_block(R, q_rows, out_rows, keys, values, [=](int64_t r, int64_t p) { return (p * K + anc[r][p]) * D; }, \
                 t, D, scale, score, acc);                                                                         \
  }                                                                                                                \
  TASKMOE_ATTENTION_MULTIVERSION void cross_block(int64_t R, const T* const* q_rows, T* const* out_rows,           \
                                                  const int64_t* index, const T* keys, const T* values, int64_t t, \
                                                  int64_t D, float scale, float* score, float* acc) {              \
    attend_block(R, q_rows, out_rows, keys, values, [=](int64_t, int64_t p) { return index[p] * D; }, t, D, scale, \
                 score, acc);                                                                                      \
  }
TASKMOE_ATTENTION_BLOCKS(float)
TASKMOE_ATTENTION_BLOCKS(c10::Half)
TASKMOE_ATTENTION_BLOCKS(c10::BFloat16)
#undef TASKMOE_ATTENTION_BLOCKS

// Prefetch `bytes` at `p` into the L2 cache, one line at a time: the block a thread attends next, fetched while it
// computes the current one.
void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 2);
}

// Per-thread scratch of a block: its rows' query/output pointers and ancestry rows, scores [kGroup, t], acc [Dh].
template <typename T>
struct Scratch {
  std::vector<const T*> q_rows;
  std::vector<T*> out_rows;
  std::vector<const int64_t*> anc_rows;
  std::vector<float> score, acc;
  Scratch(int64_t R, int64_t t, int64_t D) : q_rows(R), out_rows(R), anc_rows(R), score(kGroup * t), acc(D) {}
};

// Runs body(scratch, task, block) for tasks 0..tasks-1 in parallel, each one (sentence, head) block at offset
// block_of(task) of keys/values; a thread prefetches its next block (`bytes`) while it computes the current one.
// Each thread has its own scratch for blocks of R query rows over t positions.
template <typename T, typename BlockOf, typename Body>
void for_each_block(int64_t tasks, int64_t R, int64_t t, int64_t D, const T* keys, const T* values, int64_t bytes,
                    BlockOf block_of, Body body) {
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> s(R, t, D);
    prefetch(keys + block_of(begin), bytes);
    prefetch(values + block_of(begin), bytes);
    for (int64_t task = begin; task < end; ++task) {
      if (task + 1 < end) {
        prefetch(keys + block_of(task + 1), bytes);
        prefetch(values + block_of(task + 1), bytes);
      }
      body(s, task, block_of(task));
    }
  });
}

// Self-attention: every (live sentence, query head) as one parallel task (file comment); q and out [N, H, Q, Dh].
template <typename T>
void run_self(const Tensor& q, const Tensor& key_cache, const Tensor& value_cache, const int64_t* slot,
              const int64_t* anc, int64_t anc_stride, Tensor& out, int64_t length, float scale) {
  const int64_t H = q.size(1), Q = q.size(2), D = q.size(3);
  const int64_t Hkv = key_cache.size(1), T_cap = key_cache.size(2), K = key_cache.size(3);
  const int64_t L = q.size(0) / K, group = H / Hkv;
  const T* q_ptr = q.data_ptr<T>();
  const T* k_ptr = key_cache.data_ptr<T>();
  const T* v_ptr = value_cache.data_ptr<T>();
  T* o_ptr = out.data_ptr<T>();
  auto block_of = [&](int64_t task) {  // [slot, the task's kv head, 0, 0, 0]
    return (slot[task / H] * Hkv + (task % H) / group) * T_cap * K * D;
  };
  const int64_t bytes = length * K * D * static_cast<int64_t>(sizeof(T));
  for_each_block(L * H, K * Q, length, D, k_ptr, v_ptr, bytes, block_of, [&](Scratch<T>& s, int64_t task,
                                                                             int64_t block) {
    const int64_t l = task / H, h = task % H;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t n = l * K + k;
      for (int64_t j = 0; j < Q; ++j) {
        const int64_t row = ((n * H + h) * Q + j) * D;
        s.q_rows[k * Q + j] = q_ptr + row;
        s.out_rows[k * Q + j] = o_ptr + row;
        s.anc_rows[k * Q + j] = anc + n * anc_stride;
      }
    }
    self_block(K * Q, s.q_rows.data(), s.out_rows.data(), s.anc_rows.data(), k_ptr + block, v_ptr + block, K, length,
               D, scale, s.score.data(), s.acc.data());
  });
}

// Cross-attention: every (sentence, query head) as one parallel task; q and out [L, H, X, Dh], index[l] the allowed
// source positions of sentence l.
template <typename T>
void run_cross(const Tensor& q, const Tensor& key, const Tensor& value,
               const std::vector<std::vector<int64_t>>& index, Tensor& out, float scale) {
  const int64_t L = q.size(0), H = q.size(1), X = q.size(2), D = q.size(3);
  const int64_t Hkv = key.size(1), S = key.size(2), group = H / Hkv;
  const T* q_ptr = q.data_ptr<T>();
  const T* k_ptr = key.data_ptr<T>();
  const T* v_ptr = value.data_ptr<T>();
  T* o_ptr = out.data_ptr<T>();
  auto block_of = [&](int64_t task) { return ((task / H) * Hkv + (task % H) / group) * S * D; };  // [l, kv head]
  const int64_t bytes = S * D * static_cast<int64_t>(sizeof(T));
  for_each_block(L * H, X, S, D, k_ptr, v_ptr, bytes, block_of, [&](Scratch<T>& s, int64_t task, int64_t block) {
    const int64_t l = task / H, h = task % H;
    for (int64_t x = 0; x < X; ++x) {
      const int64_t row = ((l * H + h) * X + x) * D;
      s.q_rows[x] = q_ptr + row;
      s.out_rows[x] = o_ptr + row;
    }
    cross_block(X, s.q_rows.data(), s.out_rows.data(), index[l].data(), k_ptr + block, v_ptr + block,
                static_cast<int64_t>(index[l].size()), D, scale, s.score.data(), s.acc.data());
  });
}

template <typename Fn>
void dispatch(at::ScalarType dtype, const char* op, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      fn(float{});
      break;
    case at::kHalf:
      fn(c10::Half{});
      break;
    case at::kBFloat16:
      fn(c10::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, op, ": no CPU kernel for ", dtype, " (float32, float16, bfloat16; the pure-torch path "
                  "takes any)");
  }
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

  const Tensor slots_c = slots.contiguous();
  const int64_t* slot = slots_c.data_ptr<int64_t>();
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
  dispatch(q.scalar_type(), "beam_decode_attention", [&](auto tag) {
    using scalar_t = decltype(tag);
    run_self<scalar_t>(q, key_cache, value_cache, slot, anc, anc_stride, out, length, static_cast<float>(scale));
  });
  return out;
}

Tensor beam_cross_attention_cpu(const Tensor& query, const Tensor& key, const Tensor& value, const Tensor& allowed,
                                double scale) {
  TORCH_CHECK(query.dim() == 4, "beam_cross_attention: query must be [L, H, X, Dh], got shape ", query.sizes());
  TORCH_CHECK(key.dim() == 4 && key.sizes() == value.sizes(),
              "beam_cross_attention: key and value must both be [L, Hkv, S, Dh], got shapes ", key.sizes(), " and ",
              value.sizes());
  TORCH_CHECK(query.scalar_type() == key.scalar_type() && query.scalar_type() == value.scalar_type(),
              "beam_cross_attention: query, key and value must share a dtype, got ", query.scalar_type(), ", ",
              key.scalar_type(), ", ", value.scalar_type());
  const int64_t L = query.size(0), H = query.size(1), X = query.size(2), D = query.size(3);
  const int64_t Hkv = key.size(1), S = key.size(2);
  TORCH_CHECK(key.size(0) == L && key.size(3) == D, "beam_cross_attention: key/value ", key.sizes(),
              " do not fit query ", query.sizes(), " (same sentences and head dim)");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "beam_cross_attention: ", H, " query heads are not a multiple of ", Hkv,
              " key/value heads");
  TORCH_CHECK(allowed.dim() == 2 && allowed.size(0) == L && allowed.size(1) == S &&
                  allowed.scalar_type() == at::kBool,
              "beam_cross_attention: allowed must be a bool [", L, ", ", S, "] tensor, got ", allowed.scalar_type(),
              " of shape ", allowed.sizes());
  const Tensor allowed_c = allowed.contiguous();
  const bool* allowed_ptr = allowed_c.data_ptr<bool>();
  std::vector<std::vector<int64_t>> index(L);
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t s = 0; s < S; ++s) {
      if (allowed_ptr[l * S + s]) index[l].push_back(s);
    }
    TORCH_CHECK(!index[l].empty(), "beam_cross_attention: sentence ", l, " allows no source position");
  }
  const Tensor q = query.contiguous(), k = key.contiguous(), v = value.contiguous();
  Tensor out = at::empty({L, H, X, D}, q.options());
  dispatch(q.scalar_type(), "beam_cross_attention", [&](auto tag) {
    using scalar_t = decltype(tag);
    run_cross<scalar_t>(q, k, v, index, out, static_cast<float>(scale));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(taskmoe, m) {
  m.def("beam_decode_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor slots, Tensor ancestry, "
        "int length, float scale) -> Tensor");
  m.def("beam_cross_attention(Tensor query, Tensor key, Tensor value, Tensor allowed, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(taskmoe, CPU, m) {
  m.impl("beam_decode_attention", &beam_decode_attention_cpu);
  m.impl("beam_cross_attention", &beam_cross_attention_cpu);
}

}  // namespace taskmoe
