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
// Work split: blocks of BLOCK positions (all kv heads of a position together: the cache is read as one
// sequential stream, prefetched ahead) over ExecuTorch's thread pool; each (block, kv head) keeps an
// online-softmax partial (max, sum, accumulator per query row), merged per head at the end
// (flash-decoding). AVX-512 intrinsics where the CPU has them (a k row loaded once for all its query
// rows, v accumulated in registers), else plain loops for the compiler's vectoriser (-O3 -ffast-math).
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

namespace sfedge {
namespace {

using executorch::aten::ScalarType;
using executorch::aten::Tensor;
using executorch::runtime::KernelRuntimeContext;

constexpr int64_t BLOCK = 128;     // positions per work item
constexpr int64_t MAX_REPS = 16;   // query heads per kv head
constexpr int64_t MAX_DIM = 256;   // head_dim
constexpr int64_t PREFETCH = 8;    // rows ahead

struct Shape {
  int64_t kv_heads, reps, dim, row_stride;  // row_stride = kv_heads * dim elements per cached position
};

// One (block, kv head) partial: max[reps], sum[reps], acc[reps * dim], packed in a float buffer.
inline int64_t partial_floats(const Shape& s) { return s.reps * (2 + s.dim); }

inline void load_row(const float* src, float* dst, int64_t dim) { std::memcpy(dst, src, dim * sizeof(float)); }

inline void load_row(const uint16_t* src, float* dst, int64_t dim) {
  for (int64_t d = 0; d < dim; ++d) {
    uint32_t bits = static_cast<uint32_t>(src[d]) << 16;
    std::memcpy(&dst[d], &bits, sizeof(float));
  }
}

template <typename T>
inline void prefetch_row(const T* row, int64_t elements) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t byte = 0; byte < elements * static_cast<int64_t>(sizeof(T)); byte += 64) __builtin_prefetch(p + byte, 0, 2);
}

// scores [reps][BLOCK] -> exp(score - max) in place; writes max and sum of the partial.
inline void softmax_rows(float (*scores)[BLOCK], int64_t reps, int64_t count, float* max_out, float* sum_out) {
  for (int64_t r = 0; r < reps; ++r) {
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < count; ++j) m = std::max(m, scores[r][j]);
    float s = 0.f;
    for (int64_t j = 0; j < count; ++j) {
      scores[r][j] = std::exp(scores[r][j] - m);
      s += scores[r][j];
    }
    max_out[r] = m;
    sum_out[r] = s;
  }
}

template <typename T>
void block_generic(const float* q, const T* k, const T* v, const Shape& s, int64_t first, int64_t count, float* partials) {
  alignas(64) float scores[MAX_REPS][BLOCK];
  alignas(64) float row[MAX_DIM];
  for (int64_t h = 0; h < s.kv_heads; ++h) {
    const float* qh = q + h * s.reps * s.dim;
    float* part = partials + h * partial_floats(s);
    for (int64_t j = 0; j < count; ++j) {
      load_row(k + (first + j) * s.row_stride + h * s.dim, row, s.dim);
      for (int64_t r = 0; r < s.reps; ++r) {
        float dot = 0.f;
        for (int64_t d = 0; d < s.dim; ++d) dot += qh[r * s.dim + d] * row[d];
        scores[r][j] = dot;
      }
    }
    softmax_rows(scores, s.reps, count, part, part + s.reps);
    float* acc = part + 2 * s.reps;
    std::fill(acc, acc + s.reps * s.dim, 0.f);
    for (int64_t j = 0; j < count; ++j) {
      load_row(v + (first + j) * s.row_stride + h * s.dim, row, s.dim);
      for (int64_t r = 0; r < s.reps; ++r)
        for (int64_t d = 0; d < s.dim; ++d) acc[r * s.dim + d] += scores[r][j] * row[d];
    }
  }
}

#if defined(__AVX512F__)
inline __m512 load16(const float* src) { return _mm512_loadu_ps(src); }
inline __m512 load16(const uint16_t* src) {  // 16 bfloat16 -> float32: widen and shift into the high half
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src))), 16));
}

// REPS query rows per kv head, dim a multiple of 16. Per position, the k rows of every kv head (one
// contiguous run of the cache) are dotted with their REPS query rows, each k vector loaded once; v is
// then accumulated 64 columns at a time in 4 x REPS registers over the block (now in L2).
template <typename T, int REPS>
void block_avx512(const float* q, const T* k, const T* v, const Shape& s, int64_t first, int64_t count, float* partials) {
  alignas(64) float scores[16][REPS][BLOCK];  // [kv head][row][position]
  for (int64_t j = 0; j < count; ++j) {
    const T* krow = k + (first + j) * s.row_stride;
    prefetch_row(krow + PREFETCH * s.row_stride, s.row_stride);
    prefetch_row(v + (first + j + PREFETCH) * s.row_stride, s.row_stride);
    for (int64_t h = 0; h < s.kv_heads; ++h) {
      const float* qh = q + h * REPS * s.dim;
      const T* row = krow + h * s.dim;
      __m512 acc[REPS];
      for (int r = 0; r < REPS; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t c = 0; c < s.dim; c += 16) {
        const __m512 kv = load16(row + c);
        for (int r = 0; r < REPS; ++r) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(qh + r * s.dim + c), kv, acc[r]);
      }
      for (int r = 0; r < REPS; ++r) scores[h][r][j] = _mm512_reduce_add_ps(acc[r]);
    }
  }
  for (int64_t h = 0; h < s.kv_heads; ++h) {
    float* part = partials + h * partial_floats(s);
    softmax_rows(scores[h], REPS, count, part, part + REPS);
    float* out = part + 2 * REPS;
    for (int64_t c0 = 0; c0 < s.dim; c0 += 64) {
      const int64_t width = std::min<int64_t>(64, s.dim - c0) / 16;  // 1..4 vectors
      __m512 acc[REPS][4];
      for (int r = 0; r < REPS; ++r)
        for (int w = 0; w < 4; ++w) acc[r][w] = _mm512_setzero_ps();
      for (int64_t j = 0; j < count; ++j) {
        const T* row = v + (first + j) * s.row_stride + h * s.dim + c0;
        __m512 vv[4];
        for (int w = 0; w < 4; ++w) vv[w] = w < width ? load16(row + 16 * w) : _mm512_setzero_ps();
        for (int r = 0; r < REPS; ++r) {
          const __m512 p = _mm512_set1_ps(scores[h][r][j]);
          for (int w = 0; w < 4; ++w) acc[r][w] = _mm512_fmadd_ps(p, vv[w], acc[r][w]);
        }
      }
      for (int r = 0; r < REPS; ++r)
        for (int w = 0; w < width; ++w) _mm512_storeu_ps(out + r * s.dim + c0 + 16 * w, acc[r][w]);
    }
  }
}
#endif

// The AVX-512 path for the common query-heads-per-kv-head counts (dim a multiple of 16, at most 16 kv
// heads), else the plain loops.
template <typename T>
void attend_block(const float* q, const T* k, const T* v, const Shape& s, int64_t first, int64_t count, float* partials) {
#if defined(__AVX512F__)
  if (s.dim % 16 == 0 && s.kv_heads <= 16) {
    switch (s.reps) {
      case 1: return block_avx512<T, 1>(q, k, v, s, first, count, partials);
      case 2: return block_avx512<T, 2>(q, k, v, s, first, count, partials);
      case 4: return block_avx512<T, 4>(q, k, v, s, first, count, partials);
      case 6: return block_avx512<T, 6>(q, k, v, s, first, count, partials);
      case 7: return block_avx512<T, 7>(q, k, v, s, first, count, partials);
      case 8: return block_avx512<T, 8>(q, k, v, s, first, count, partials);
      default: break;
    }
  }
#endif
  block_generic<T>(q, k, v, s, first, count, partials);
}

template <typename T>
void decode_attention(const float* q, const T* k, const T* v, float* out, int64_t heads, int64_t kv_heads,
                      int64_t dim, int64_t positions) {
  const Shape s{kv_heads, heads / kv_heads, dim, kv_heads * dim};
  const int64_t blocks = (positions + BLOCK - 1) / BLOCK;
  const int64_t per_block = kv_heads * partial_floats(s);
  const float scale = 1.0f / std::sqrt(static_cast<float>(dim));
  std::unique_ptr<float[]> scaled(new float[heads * dim]);
  for (int64_t i = 0; i < heads * dim; ++i) scaled[i] = q[i] * scale;
  std::unique_ptr<float[]> partials(new float[blocks * per_block]);  // every entry is written before it is read
  executorch::extension::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t first = b * BLOCK;
      attend_block<T>(scaled.get(), k, v, s, first, std::min(BLOCK, positions - first), partials.get() + b * per_block);
    }
  });
  for (int64_t h = 0; h < kv_heads; ++h) {
    for (int64_t r = 0; r < s.reps; ++r) {
      const auto part = [&](int64_t b) { return partials.get() + b * per_block + h * partial_floats(s); };
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t b = 0; b < blocks; ++b) m = std::max(m, part(b)[r]);
      float total = 0.f;
      float* o = out + (h * s.reps + r) * dim;
      std::fill(o, o + dim, 0.f);
      for (int64_t b = 0; b < blocks; ++b) {
        const float w = std::exp(part(b)[r] - m);
        total += w * part(b)[s.reps + r];
        const float* acc = part(b) + 2 * s.reps + r * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] += w * acc[d];
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

// The decode path for chunk_attention.cpp's single-token calls (one prefill method serves decode steps too):
// reads the cache in place, where the chunk kernel would first pack the whole used prefix.
void decode_attention_float(const float* q, const float* k, const float* v, float* out, int64_t heads,
                            int64_t kv_heads, int64_t dim, int64_t positions) {
  decode_attention<float>(q, k, v, out, heads, kv_heads, dim, positions);
}

void decode_attention_bf16(const float* q, const uint16_t* k, const uint16_t* v, float* out, int64_t heads,
                           int64_t kv_heads, int64_t dim, int64_t positions) {
  decode_attention<uint16_t>(q, k, v, out, heads, kv_heads, dim, positions);
}

}  // namespace sfedge

EXECUTORCH_LIBRARY(sfedge, "decode_attention.out", sfedge::decode_attention_out);
