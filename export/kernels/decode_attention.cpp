// sfedge::decode_attention.out: one decode token's attention over the used prefix of a static KV cache.
//
// q [1, 1, H, D] float32; k_cache / v_cache [1, S, Hkv, D] float32 or bfloat16 (the layout of
// llama.update_cache); start_pos p: the token's own k/v are already at position p, so positions
// 0..p are attended (a causal decode step) and nothing past p is read. out [1, 1, H, D] float32.
//
// Why: executorch 1.5.1's llama.custom_sdpa either runs one M = 1 GEMV per query head (causal, each kv
// head re-read H / Hkv times) or, with a mask, reads the whole max_seq_len cache (docs/executorch.md).
// This kernel reads each cached k and v row once for all H / Hkv query heads that share it, only up to
// p, converting bfloat16 rows on the fly (half the bytes of a float32 cache).
//
// Work split: (kv head, block of BLOCK positions) items over ExecuTorch's thread pool; each item keeps
// an online-softmax partial (max, sum, accumulator per query row), merged per kv head at the end
// (flash-decoding). AVX-512 intrinsics where the CPU has them (each k row loaded once for all query rows,
// v accumulated in registers), else plain loops for the compiler's vectoriser (-O3 -ffast-math).
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
#include <vector>

namespace sfedge {
namespace {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::KernelRuntimeContext;

constexpr int64_t BLOCK = 256;     // positions per work item
constexpr int64_t MAX_REPS = 16;   // query heads per kv head
constexpr int64_t MAX_DIM = 256;   // head_dim

inline void load_row(const float* src, float* dst, int64_t dim) { std::memcpy(dst, src, dim * sizeof(float)); }

inline void load_row(const uint16_t* src, float* dst, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) {
    uint32_t bits = static_cast<uint32_t>(src[d]) << 16;
    std::memcpy(&dst[d], &bits, sizeof(float));
  }
}

struct Partial {  // one (kv head, block): per query row the block max, exp-sum and weighted v sum
  float max[MAX_REPS];
  float sum[MAX_REPS];
  float acc[MAX_REPS][MAX_DIM];
};

#if defined(__AVX512F__)
inline __m512 load16(const float* src) { return _mm512_loadu_ps(src); }
inline __m512 load16(const uint16_t* src) {  // 16 bfloat16 -> float32: widen and shift into the high half
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))), 16));
}

// REPS query rows against `count` cached rows, dim a multiple of 16: k rows are loaded once into registers
// for all REPS dot products; v rows are accumulated 64 columns at a time (4 x REPS accumulators in registers).
template <typename T, int REPS>
void attend_block_avx512(const float* q, const T* k, const T* v, int64_t row_stride, int64_t first, int64_t count,
                         int64_t dim, Partial& out) {
  alignas(64) float scores[REPS][BLOCK];
  for (int64_t j = 0; j < count; ++j) {
    const T* row = k + (first + j) * row_stride;
    __m512 acc[REPS];
    for (int r = 0; r < REPS; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t c = 0; c < dim; c += 16) {
      const __m512 kv = load16(row + c);
      for (int r = 0; r < REPS; ++r) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(q + r * dim + c), kv, acc[r]);
    }
    for (int r = 0; r < REPS; ++r) scores[r][j] = _mm512_reduce_add_ps(acc[r]);
  }
  for (int r = 0; r < REPS; ++r) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < count; ++j) m = std::max(m, scores[r][j]);
    float s = 0.f;
    for (int64_t j = 0; j < count; ++j) {
      scores[r][j] = std::exp(scores[r][j] - m);
      s += scores[r][j];
    }
    out.max[r] = m;
    out.sum[r] = s;
  }
  for (int64_t c0 = 0; c0 < dim; c0 += 64) {
    const int64_t width = std::min<int64_t>(64, dim - c0) / 16;  // 1..4 vectors
    __m512 acc[REPS][4];
    for (int r = 0; r < REPS; ++r)
      for (int w = 0; w < 4; ++w) acc[r][w] = _mm512_setzero_ps();
    for (int64_t j = 0; j < count; ++j) {
      const T* row = v + (first + j) * row_stride + c0;
      __m512 vv[4];
      for (int w = 0; w < 4; ++w) vv[w] = w < width ? load16(row + 16 * w) : _mm512_setzero_ps();
      for (int r = 0; r < REPS; ++r) {
        const __m512 p = _mm512_set1_ps(scores[r][j]);
        for (int w = 0; w < 4; ++w) acc[r][w] = _mm512_fmadd_ps(p, vv[w], acc[r][w]);
      }
    }
    for (int r = 0; r < REPS; ++r)
      for (int w = 0; w < width; ++w) _mm512_storeu_ps(out.acc[r] + c0 + 16 * w, acc[r][w]);
  }
}
#endif

template <typename T>
void attend_block(const float* q /*[reps, dim], scaled*/, const T* k, const T* v, int64_t row_stride, int64_t first,
                  int64_t count, int64_t reps, int64_t dim, Partial& out) {
  alignas(64) float scores[MAX_REPS][BLOCK];
  alignas(64) float row[MAX_DIM];
  for (int64_t j = 0; j < count; ++j) {
    load_row(k + (first + j) * row_stride, row, dim);
    for (int64_t r = 0; r < reps; ++r) {
      const float* qr = q + r * dim;
      float dot = 0.f;
      for (int64_t d = 0; d < dim; ++d) dot += qr[d] * row[d];
      scores[r][j] = dot;
    }
  }
  for (int64_t r = 0; r < reps; ++r) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < count; ++j) m = std::max(m, scores[r][j]);
    float s = 0.f;
    for (int64_t j = 0; j < count; ++j) {
      scores[r][j] = std::exp(scores[r][j] - m);
      s += scores[r][j];
    }
    out.max[r] = m;
    out.sum[r] = s;
    std::fill(out.acc[r], out.acc[r] + dim, 0.f);
  }
  for (int64_t j = 0; j < count; ++j) {
    load_row(v + (first + j) * row_stride, row, dim);
    for (int64_t r = 0; r < reps; ++r) {
      const float p = scores[r][j];
      float* acc = out.acc[r];
      for (int64_t d = 0; d < dim; ++d) acc[d] += p * row[d];
    }
  }
}

// The AVX-512 path for the common query-heads-per-kv-head counts (dim a multiple of 16), else the plain loops.
template <typename T>
void attend(const float* q, const T* k, const T* v, int64_t row_stride, int64_t first, int64_t count, int64_t reps,
            int64_t dim, Partial& out) {
#if defined(__AVX512F__)
  if (dim % 16 == 0) {
    switch (reps) {
      case 1: return attend_block_avx512<T, 1>(q, k, v, row_stride, first, count, dim, out);
      case 2: return attend_block_avx512<T, 2>(q, k, v, row_stride, first, count, dim, out);
      case 4: return attend_block_avx512<T, 4>(q, k, v, row_stride, first, count, dim, out);
      case 6: return attend_block_avx512<T, 6>(q, k, v, row_stride, first, count, dim, out);
      case 7: return attend_block_avx512<T, 7>(q, k, v, row_stride, first, count, dim, out);
      case 8: return attend_block_avx512<T, 8>(q, k, v, row_stride, first, count, dim, out);
      default: break;
    }
  }
#endif
  attend_block<T>(q, k, v, row_stride, first, count, reps, dim, out);
}

template <typename T>
void decode_attention(const float* q, const T* k, const T* v, float* out, int64_t heads, int64_t kv_heads,
                      int64_t dim, int64_t positions) {
  const int64_t reps = heads / kv_heads;
  const int64_t blocks = (positions + BLOCK - 1) / BLOCK;
  const int64_t row_stride = kv_heads * dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  std::vector<float> scaled(heads * dim);
  for (int64_t i = 0; i < heads * dim; ++i) scaled[i] = q[i] * scale;
  std::vector<Partial> partials(kv_heads * blocks);
  // Items ordered block-major: the pool's contiguous ranges of items are contiguous ranges of cache memory.
  executorch::extension::parallel_for(0, kv_heads * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / kv_heads, h = item % kv_heads;
      const int64_t first = b * BLOCK;
      attend<T>(scaled.data() + h * reps * dim, k + h * dim, v + h * dim, row_stride, first,
                std::min(BLOCK, positions - first), reps, dim, partials[h * blocks + b]);
    }
  });
  for (int64_t h = 0; h < kv_heads; ++h) {
    for (int64_t r = 0; r < reps; ++r) {
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t b = 0; b < blocks; ++b) m = std::max(m, partials[h * blocks + b].max[r]);
      float total = 0.f;
      float* o = out + (h * reps + r) * dim;
      std::fill(o, o + dim, 0.f);
      for (int64_t b = 0; b < blocks; ++b) {
        const Partial& part = partials[h * blocks + b];
        const float w = std::exp(part.max[r] - m);
        total += w * part.sum[r];
        for (int64_t d = 0; d < dim; ++d) o[d] += w * part.acc[r][d];
      }
      const float inv = 1.0f / total;
      for (int64_t d = 0; d < dim; ++d) o[d] *= inv;
    }
  }
}

Tensor& decode_attention_out(KernelRuntimeContext& ctx, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                             int64_t start_pos, Tensor& out) {
  ET_KERNEL_CHECK_MSG(ctx, q.dim() == 4 && q.size(0) == 1 && q.size(1) == 1, InvalidArgument, out,
                      "q must be [1, 1, heads, head_dim]");
  ET_KERNEL_CHECK_MSG(ctx, k_cache.dim() == 4 && k_cache.size(0) == 1, InvalidArgument, out,
                      "k_cache must be [1, max_seq_len, kv_heads, head_dim]");
  const int64_t heads = q.size(2), dim = q.size(3), kv_heads = k_cache.size(2), capacity = k_cache.size(1);
  ET_KERNEL_CHECK_MSG(ctx, k_cache.size(3) == dim && v_cache.dim() == 4 && v_cache.size(1) == capacity &&
                      v_cache.size(2) == kv_heads && v_cache.size(3) == dim, InvalidArgument, out,
                      "k_cache and v_cache must have the same [1, S, kv_heads, head_dim] shape as q's head_dim");
  ET_KERNEL_CHECK_MSG(ctx, kv_heads > 0 && heads % kv_heads == 0 && heads / kv_heads <= MAX_REPS && dim <= MAX_DIM,
                      InvalidArgument, out, "unsupported head shape");
  ET_KERNEL_CHECK_MSG(ctx, start_pos >= 0 && start_pos < capacity, InvalidArgument, out, "start_pos out of the cache");
  ET_KERNEL_CHECK_MSG(ctx, q.scalar_type() == ScalarType::Float && out.scalar_type() == ScalarType::Float &&
                      k_cache.scalar_type() == v_cache.scalar_type(), InvalidArgument, out,
                      "q and out must be float32, k_cache and v_cache of one dtype");
  ET_KERNEL_CHECK(ctx, executorch::runtime::resize_tensor(out, q.sizes()) == executorch::runtime::Error::Ok,
                  InvalidArgument, out);
  const int64_t positions = start_pos + 1;
  if (k_cache.scalar_type() == ScalarType::Float) {
    decode_attention<float>(q.const_data_ptr<float>(), k_cache.const_data_ptr<float>(), v_cache.const_data_ptr<float>(),
                            out.mutable_data_ptr<float>(), heads, kv_heads, dim, positions);
  } else if (k_cache.scalar_type() == ScalarType::BFloat16) {
    decode_attention<uint16_t>(q.const_data_ptr<float>(), static_cast<const uint16_t*>(k_cache.const_data_ptr()),
                               static_cast<const uint16_t*>(v_cache.const_data_ptr()), out.mutable_data_ptr<float>(),
                               heads, kv_heads, dim, positions);
  } else {
    ET_KERNEL_CHECK_MSG(ctx, false, InvalidArgument, out, "k_cache must be float32 or bfloat16");
  }
  return out;
}

}  // namespace
}  // namespace sfedge

EXECUTORCH_LIBRARY(sfedge, "decode_attention.out", sfedge::decode_attention_out);
