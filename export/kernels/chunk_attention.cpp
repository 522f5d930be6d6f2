// sfedge::chunk_attention.out: a prefill chunk's causal attention over the used prefix of a static KV cache.
//
// q [1, T, H, D] float32; k_cache / v_cache [1, S, Hkv, D] float32 or bfloat16 (the layout of
// llama.update_cache); start_pos p: the chunk's own k/v are already at positions p .. p + T - 1, and
// token t attends to positions 0 .. p + t (causal). out [1, T, H, D] float32.
//
// Why: executorch 1.5.1's llama.custom_sdpa runs a chunk of T = 128 tokens at 35-60 GFLOP/s on a 2-core
// AVX-512 Xeon (about a third of PyTorch's own scaled_dot_product_attention on the same shapes), and at
// video prompt lengths (5K-9K tokens) that attention is about half of the time to first token.
//
// How (flash attention, GQA folded into rows): the H / Hkv query heads that share a kv head and a tile of
// tokens form one tile of ~96 query rows; a work item is (kv head, tile), spread over ExecuTorch's thread
// pool. The used prefix is first packed once per call (float, bfloat16 widened): k as [Hkv][L/64][D][64]
// (each 64-key block transposed, contiguous), v as [Hkv][L][D], so the scores of 6 rows x 64 keys are an
// outer-product register block (24 AVX-512 accumulators, 4 k vector loads per 24 FMAs); scores go through
// an online softmax per row (vector exp); P x V accumulates 6 rows x 64 columns in registers per pass over
// the 64-key block. Each tile reads the prefix once per 96 rows instead of once per row.
//
// A single token (a decode step through the same method) goes to decode_attention.cpp's kernel instead, which
// reads the cache in place: one method serves prefill and decode, so no second method re-packs the weights.
#include <executorch/extension/kernel_util/make_boxed_from_unboxed_functor.h>
#include <executorch/runtime/kernel/kernel_includes.h>
#include <executorch/runtime/kernel/thread_parallel_interface.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

namespace sfedge {

// decode_attention.cpp: one token over positions 0 .. positions - 1 of the cache, read in place.
void decode_attention_float(const float* q, const float* k, const float* v, float* out, int64_t heads,
                            int64_t kv_heads, int64_t dim, int64_t positions);
void decode_attention_bf16(const float* q, const uint16_t* k, const uint16_t* v, float* out, int64_t heads,
                           int64_t kv_heads, int64_t dim, int64_t positions);

namespace {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::KernelRuntimeContext;

constexpr int64_t KEYS = 64;         // keys per block
constexpr int64_t ROWS_S = 6;        // query rows per scores register block (x KEYS keys)
constexpr int64_t ROWS_PV = 6;       // query rows per P x V register block
// Query rows per tile (tokens x query heads of one kv head): 1B heads, T = 128, 2-core AVX-512 Xeon, min of 7
// (GFLOP/s at 2.5K / 5K / 9K cached positions): 48 rows 192-208, 72 166-228, 96 211-224, 144 149-155.
constexpr int64_t ROWS_TARGET = 96;
constexpr int64_t MAX_TILE = ROWS_TARGET + 16;  // rows per tile, padded
constexpr int64_t MAX_DIM = 256;
constexpr int64_t MAX_REPS = 16;
// The starting max and the masked score: finite, since the library is built with -ffast-math (no infinities).
constexpr float LOWEST = -std::numeric_limits<float>::max();

struct Problem {
  int64_t tokens, heads, kv_heads, reps, dim, start, row_stride;
  int64_t used;    // positions 0 .. start + tokens - 1
  int64_t padded;  // used rounded up to KEYS: the row length of the transposed K
  float scale;
};

inline float* align64(float* x) {  // the first 64-byte boundary at or after x (the buffer has 16 floats spare)
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(x) + 63) & ~static_cast<uintptr_t>(63));
}

inline float widen(float x) { return x; }
inline float widen(uint16_t x) {
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Packs the used prefix per kv head, contiguous: kt [kv_heads][padded / KEYS][dim][KEYS] (each key block's k
// transposed, zero past `used`) and vp [kv_heads][used][dim] (v rows), bfloat16 widened to float32. The cache's
// own layout interleaves the kv heads (row stride kv_heads x dim): contiguous blocks keep the scores' and P x V's
// working sets free of cache-set conflicts.
template <typename T>
void pack(const T* k, const T* v, const Problem& p, float* kt, float* vp) {
  const int64_t blocks = p.padded / KEYS;
  executorch::extension::parallel_for(0, p.kv_heads * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / blocks, block = item % blocks, first = block * KEYS;
      float* dst = kt + (h * blocks + block) * p.dim * KEYS;
      for (int64_t j = 0; j < KEYS; ++j) {
        const int64_t pos = first + j;
        if (pos < p.used) {
          const T* krow = k + pos * p.row_stride + h * p.dim;
          const T* vrow = v + pos * p.row_stride + h * p.dim;
          float* vdst = vp + (h * p.used + pos) * p.dim;
          for (int64_t d = 0; d < p.dim; ++d) {
            dst[d * KEYS + j] = widen(krow[d]);
            vdst[d] = widen(vrow[d]);
          }
        } else {
          for (int64_t d = 0; d < p.dim; ++d) dst[d * KEYS + j] = 0.f;
        }
      }
    }
  });
}

// One tile's state: rows [rows_padded][dim] of scaled q, the output accumulator, the online-softmax max and
// sum, each row's last visible position, and the scores of the current key block.
struct Tile {
  alignas(64) float q[MAX_TILE * MAX_DIM];
  alignas(64) float o[MAX_TILE * MAX_DIM];
  alignas(64) float s[MAX_TILE * KEYS];
  float m[MAX_TILE], l[MAX_TILE];
  int64_t last[MAX_TILE];
  int64_t rows, rows_padded;
};

// scores s[rows_padded][KEYS] = q x kb, kb = one packed key block [dim][KEYS]
void scores_generic(Tile& t, const float* kb, const Problem& p) {
  for (int64_t i = 0; i < t.rows_padded; ++i) {
    float* srow = t.s + i * KEYS;
    std::fill(srow, srow + KEYS, 0.f);
    for (int64_t d = 0; d < p.dim; ++d) {
      const float qd = t.q[i * p.dim + d];
      const float* krow = kb + d * KEYS;
      for (int64_t j = 0; j < KEYS; ++j) srow[j] += qd * krow[j];
    }
  }
}

// o[i] += sum_j s[i][j] vb[j]  for j < count, vb = the block's packed v rows [count][dim]
void pv_generic(Tile& t, const float* vb, const Problem& p, int64_t count) {
  for (int64_t i = 0; i < t.rows_padded; ++i) {
    float* orow = t.o + i * p.dim;
    for (int64_t j = 0; j < count; ++j) {
      const float w = t.s[i * KEYS + j];
      const float* vrow = vb + j * p.dim;
      for (int64_t d = 0; d < p.dim; ++d) orow[d] += w * vrow[d];
    }
  }
}

// Online softmax over one key block: mask positions past each row's last, update max / sum, rescale the
// output row, leave exp(s - max) in s (0 where masked).
void softmax_generic(Tile& t, const Problem& p, int64_t first) {
  for (int64_t i = 0; i < t.rows_padded; ++i) {
    float* srow = t.s + i * KEYS;
    const int64_t visible = std::min<int64_t>(KEYS, t.last[i] - first + 1);
    if (visible <= 0) {
      std::fill(srow, srow + KEYS, 0.f);
      continue;
    }
    float block_max = LOWEST;
    for (int64_t j = 0; j < visible; ++j) block_max = std::max(block_max, srow[j]);
    const float m_new = std::max(t.m[i], block_max);
    const float correction = std::exp(t.m[i] - m_new);
    float sum = 0.f;
    for (int64_t j = 0; j < KEYS; ++j) {
      srow[j] = j < visible ? std::exp(srow[j] - m_new) : 0.f;
      sum += srow[j];
    }
    t.l[i] = t.l[i] * correction + sum;
    t.m[i] = m_new;
    if (correction != 1.f)
      for (int64_t d = 0; d < p.dim; ++d) t.o[i * p.dim + d] *= correction;
  }
}

#if defined(__AVX512F__)
// e^x for x <= 0: 2^n x 2^f with |f| <= 1/2, 2^f by its degree-6 Taylor polynomial (relative error ~1.2e-7).
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 poly = _mm512_set1_ps(1.54035304e-4f);
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(1.33335581e-3f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(9.61812911e-3f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(5.55041087e-2f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(2.40226507e-1f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(6.93147181e-1f));
  poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(poly, n);
}

void scores_avx512(Tile& t, const float* kb, const Problem& p) {
  for (int64_t i0 = 0; i0 < t.rows_padded; i0 += ROWS_S) {
    __m512 acc[ROWS_S][KEYS / 16];
    for (int r = 0; r < ROWS_S; ++r)
      for (int w = 0; w < KEYS / 16; ++w) acc[r][w] = _mm512_setzero_ps();
    const float* qrow = t.q + i0 * p.dim;
    for (int64_t d = 0; d < p.dim; ++d) {
      __m512 kv[KEYS / 16];
      for (int w = 0; w < KEYS / 16; ++w) kv[w] = _mm512_load_ps(kb + d * KEYS + 16 * w);
      for (int r = 0; r < ROWS_S; ++r) {
        const __m512 qd = _mm512_set1_ps(qrow[r * p.dim + d]);
        for (int w = 0; w < KEYS / 16; ++w) acc[r][w] = _mm512_fmadd_ps(qd, kv[w], acc[r][w]);
      }
    }
    for (int r = 0; r < ROWS_S; ++r)
      for (int w = 0; w < KEYS / 16; ++w) _mm512_store_ps(t.s + (i0 + r) * KEYS + 16 * w, acc[r][w]);
  }
}

void softmax_avx512(Tile& t, const Problem& p, int64_t first) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512 masked = _mm512_set1_ps(LOWEST);
  for (int64_t i = 0; i < t.rows_padded; ++i) {
    float* srow = t.s + i * KEYS;
    const int64_t visible = std::min<int64_t>(KEYS, t.last[i] - first + 1);
    if (visible <= 0) {
      std::fill(srow, srow + KEYS, 0.f);
      continue;
    }
    __mmask16 keep[KEYS / 16];
    __m512 x[KEYS / 16];
    __m512 vmax = masked;
    for (int w = 0; w < KEYS / 16; ++w) {
      keep[w] = _mm512_cmplt_epi32_mask(lane, _mm512_set1_epi32(static_cast<int32_t>(visible - 16 * w)));
      x[w] = _mm512_mask_blend_ps(keep[w], masked, _mm512_load_ps(srow + 16 * w));
      vmax = _mm512_max_ps(vmax, x[w]);
    }
    const float m_new = std::max(t.m[i], _mm512_reduce_max_ps(vmax));
    const float correction = std::exp(t.m[i] - m_new);
    const __m512 vm = _mm512_set1_ps(m_new);
    __m512 vsum = _mm512_setzero_ps();
    for (int w = 0; w < KEYS / 16; ++w) {
      const __m512 e = _mm512_maskz_mov_ps(keep[w], exp512(_mm512_sub_ps(x[w], vm)));
      _mm512_store_ps(srow + 16 * w, e);
      vsum = _mm512_add_ps(vsum, e);
    }
    t.l[i] = t.l[i] * correction + _mm512_reduce_add_ps(vsum);
    t.m[i] = m_new;
    if (correction != 1.f) {
      const __m512 c = _mm512_set1_ps(correction);
      for (int64_t d = 0; d < p.dim; d += 16)
        _mm512_store_ps(t.o + i * p.dim + d, _mm512_mul_ps(c, _mm512_load_ps(t.o + i * p.dim + d)));
    }
  }
}

void pv_avx512(Tile& t, const float* vb, const Problem& p, int64_t count) {
  for (int64_t c0 = 0; c0 < p.dim; c0 += 64) {  // a 64-column slice of the block's v stays in L1 for every row group
    const int width = static_cast<int>(std::min<int64_t>(64, p.dim - c0) / 16);  // 1..4 vectors
    for (int64_t i0 = 0; i0 < t.rows_padded; i0 += ROWS_PV) {
      __m512 acc[ROWS_PV][4];
      for (int r = 0; r < ROWS_PV; ++r)
        for (int w = 0; w < 4; ++w) acc[r][w] = w < width ? _mm512_load_ps(t.o + (i0 + r) * p.dim + c0 + 16 * w) : _mm512_setzero_ps();
      for (int64_t j = 0; j < count; ++j) {
        const float* vrow = vb + j * p.dim + c0;
        __m512 vv[4];
        for (int w = 0; w < 4; ++w) vv[w] = w < width ? _mm512_loadu_ps(vrow + 16 * w) : _mm512_setzero_ps();
        for (int r = 0; r < ROWS_PV; ++r) {
          const __m512 pj = _mm512_set1_ps(t.s[(i0 + r) * KEYS + j]);
          for (int w = 0; w < 4; ++w) acc[r][w] = _mm512_fmadd_ps(pj, vv[w], acc[r][w]);
        }
      }
      for (int r = 0; r < ROWS_PV; ++r)
        for (int w = 0; w < width; ++w) _mm512_store_ps(t.o + (i0 + r) * p.dim + c0 + 16 * w, acc[r][w]);
    }
  }
}
#endif

// One (kv head, tile of tokens) work item: rows i = (token - first_token) * reps + rep.
void attend_tile(const float* q, const float* kt_head, const float* v_head, float* out, const Problem& p,
                 int64_t h, int64_t first_token, int64_t tile_tokens) {
  // one Tile per thread, on the heap: thread_local storage of a dlopen'ed library need not honour alignas(64)
  thread_local std::unique_ptr<Tile> owned(new Tile);
  Tile& t = *owned;
  t.rows = tile_tokens * p.reps;
  t.rows_padded = (t.rows + ROWS_S - 1) / ROWS_S * ROWS_S;
  for (int64_t i = 0; i < t.rows_padded; ++i) {
    const int64_t row = i < t.rows ? i : 0;  // padded rows repeat row 0 (computed, never written out)
    const int64_t token = first_token + row / p.reps, head = h * p.reps + row % p.reps;
    const float* src = q + (token * p.heads + head) * p.dim;
    for (int64_t d = 0; d < p.dim; ++d) t.q[i * p.dim + d] = src[d] * p.scale;
    std::fill(t.o + i * p.dim, t.o + (i + 1) * p.dim, 0.f);
    t.m[i] = LOWEST;
    t.l[i] = 0.f;
    t.last[i] = p.start + token;
  }
  const int64_t end = p.start + first_token + tile_tokens;  // one past the last visible position of the tile
  const bool fast =
#if defined(__AVX512F__)
      p.dim % 16 == 0;
#else
      false;
#endif
  for (int64_t first = 0; first < end; first += KEYS) {
    const int64_t count = std::min(KEYS, end - first);
    const float* kb = kt_head + first * p.dim;  // key block first / KEYS: [dim][KEYS]
    const float* vb = v_head + first * p.dim;   // its v rows: [count][dim]
#if defined(__AVX512F__)
    if (fast) {
      scores_avx512(t, kb, p);
      softmax_avx512(t, p, first);
      pv_avx512(t, vb, p, count);
      continue;
    }
#endif
    scores_generic(t, kb, p);
    softmax_generic(t, p, first);
    pv_generic(t, vb, p, count);
  }
  (void)fast;
  for (int64_t i = 0; i < t.rows; ++i) {
    const int64_t token = first_token + i / p.reps, head = h * p.reps + i % p.reps;
    float* dst = out + (token * p.heads + head) * p.dim;
    const float inv = 1.0f / t.l[i];
    for (int64_t d = 0; d < p.dim; ++d) dst[d] = t.o[i * p.dim + d] * inv;
  }
}

template <typename T>
void chunk_attention(const float* q, const T* k, const T* v, float* out, const Problem& p) {
  thread_local std::vector<float> kt_buffer, v_buffer;  // grown once, reused by every call of this thread
  kt_buffer.resize(std::max<size_t>(kt_buffer.size(), p.kv_heads * p.dim * p.padded + 16));
  v_buffer.resize(std::max<size_t>(v_buffer.size(), p.kv_heads * p.used * p.dim));
  float* kt = align64(kt_buffer.data());
  pack<T>(k, v, p, kt, v_buffer.data());
  const float* vp = v_buffer.data();
  const int64_t tile_tokens = std::max<int64_t>(1, ROWS_TARGET / p.reps);
  const int64_t tiles = (p.tokens + tile_tokens - 1) / tile_tokens;
  executorch::extension::parallel_for(0, p.kv_heads * tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      // heaviest tiles (latest tokens: the longest prefix) first, kv heads interleaved
      const int64_t tile = tiles - 1 - item / p.kv_heads, h = item % p.kv_heads;
      const int64_t first_token = tile * tile_tokens, count = std::min(tile_tokens, p.tokens - first_token);
      attend_tile(q, kt + h * p.dim * p.padded, vp + h * p.used * p.dim, out, p, h, first_token, count);
    }
  });
}

Tensor& chunk_attention_out(KernelRuntimeContext& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                            int64_t start_pos, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, q.dim() == 4 && q.size(0) == 1 && q.size(1) >= 1, InvalidArgument, out,
                      "q must be [1, tokens, heads, head_dim]");
  ET_KERNEL_CHECK_MSG(ctx, k_cache.dim() == 4 && k_cache.size(0) == 1, InvalidArgument, out,
                      "k_cache must be [1, max_seq_len, kv_heads, head_dim]");
  const int64_t tokens = q.size(1), heads = q.size(2), dim = q.size(3), kv_heads = k_cache.size(2), capacity = k_cache.size(1);
  ET_KERNEL_CHECK_MSG(ctx, k_cache.size(3) == dim && v_cache.dim() == 4 && v_cache.size(1) == capacity &&
                      v_cache.size(2) == kv_heads && v_cache.size(3) == dim, InvalidArgument, out,
                      "k_cache and v_cache must have the same [1, S, kv_heads, head_dim] shape as q's head_dim");
  ET_KERNEL_CHECK_MSG(ctx, kv_heads > 0 && heads % kv_heads == 0 && heads / kv_heads <= MAX_REPS && dim <= MAX_DIM,
                      InvalidArgument, out, "unsupported head shape");
  ET_KERNEL_CHECK_MSG(ctx, start_pos >= 0 && start_pos + tokens <= capacity, InvalidArgument, out, "chunk out of the cache");
  ET_KERNEL_CHECK_MSG(ctx, q.scalar_type() == ScalarType::Float && out.scalar_type() == ScalarType::Float &&
                      k_cache.scalar_type() == v_cache.scalar_type(), InvalidArgument, out,
                      "q and out must be float32, k_cache and v_cache of one dtype");
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, q.sizes()) == executorch::runtime::Error::Ok,
                  InvalidArgument, out);
  const int64_t used = start_pos + tokens;
  if (tokens == 1) {  // a decode step: the decode kernel reads the prefix in place (packing it costs more than
                      // the attention itself: 1B, 5.8K cached positions, 108 vs 72 ms per token)
    if (k_cache.scalar_type() == ScalarType::Float) {
      decode_attention_float(q.const_data_ptr<float>(), k_cache.const_data_ptr<float>(), v_cache.const_data_ptr<float>(),
                             out.mutable_data_ptr<float>(), heads, kv_heads, dim, used);
      return out;
    }
    if (k_cache.scalar_type() == ScalarType::BFloat16) {
      decode_attention_bf16(q.const_data_ptr<float>(), static_cast<const uint16_t*>(k_cache.const_data_ptr()),
                            static_cast<const uint16_t*>(v_cache.const_data_ptr()), out.mutable_data_ptr<float>(), heads,
                            kv_heads, dim, used);
      return out;
    }
  }
  const Problem p{tokens, heads, kv_heads, heads / kv_heads, dim, start_pos, kv_heads * dim, used,
                  (used + KEYS - 1) / KEYS * KEYS, 1.0f / std::sqrt(static_cast<float>(dim))};
  if (k_cache.scalar_type() == ScalarType::Float) {
    chunk_attention<float>(q.const_data_ptr<float>(), k_cache.const_data_ptr<float>(), v_cache.const_data_ptr<float>(),
                           out.mutable_data_ptr<float>(), p);
  } else if (k_cache.scalar_type() == ScalarType::BFloat16) {
    chunk_attention<uint16_t>(q.const_data_ptr<float>(), static_cast<const uint16_t*>(k_cache.const_data_ptr()),
                              static_cast<const uint16_t*>(v_cache.const_data_ptr()), out.mutable_data_ptr<float>(), p);
  } else {
    ET_KERNEL_CHECK_MSG(ctx, false, InvalidArgument, out, "k_cache must be float32 or bfloat16");
  }
  return out;
}

}  // namespace
}  // namespace sfedge

EXECUTORCH_LIBRARY(sfedge, "chunk_attention.out", sfedge::chunk_attention_out);
