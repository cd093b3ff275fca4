// Low-rank adapter deltas of many adapters in one call ("BGMV", as in Punica and S-LoRA).
//
// One call per fused projection (qkv, o, gate_up, down) adds, for every row that runs an
// adapter, y[row, part p's columns] += (x[row] @ A[slot, p]^T) @ B^T[slot, p] for all parts
// at once. The factors of every resident adapter are stacked in slots; each row names its
// slot. Rows are grouped by slot into tiles of at most TILE rows (the caller sorts them):
// a tile reads its slot's factors once for all its rows, and tiles run in parallel. Only the
// slot's own rank in this module is read, not the zero padding up to the stack's rank.
//
// Types: x and y float32 with float32 factors, or x and y bfloat16 with bfloat16 factors
// (AVX-512 BF16 dot products for x @ A^T), or x and y bfloat16 with int8 factors and one
// float32 scale per row of A and of B^T (half the bytes of bfloat16; widened to float32 in
// registers). Sums are in float32; y is rounded once.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t TILE = 4;    // rows of one slot sharing one read of its factors
constexpr int64_t CHUNK = 64;  // output columns summed in registers at a time
constexpr int64_t PREFETCH = 256;  // int8 factors: bytes ahead in a row to prefetch

inline float bf16_to_f(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Round to nearest even (no NaNs reach here: built with -ffast-math, inputs are finite).
inline uint16_t f_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  u += 0x7fff + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}

inline float load_f(const float* p, int64_t i) { return p[i]; }
inline float load_f(const uint16_t* p, int64_t i) { return bf16_to_f(p[i]); }
inline void add_store(float* p, int64_t i, float v) { p[i] += v; }
inline void add_store(uint16_t* p, int64_t i, float v) { p[i] = f_to_bf16(bf16_to_f(p[i]) + v); }

// h[k][j] = x[rows[k]] . a[j] for j < n (a: n rows of d_in).
inline void shrink(const float* x, const int64_t* rows, int64_t nk, const float* a, int64_t n, int64_t d_in,
                   float* h, int64_t h_stride) {
  for (int64_t j = 0; j < n; ++j) {
    const float* aj = a + j * d_in;
    for (int64_t k = 0; k < nk; ++k) {
      const float* xk = x + rows[k] * d_in;
      float s = 0.f;
      for (int64_t i = 0; i < d_in; ++i) s += xk[i] * aj[i];
      h[k * h_stride + j] = s;
    }
  }
}

#if defined(__AVX512F__)
// Lane i of the result is the sum of v[i]'s lanes: 16 sums in 45 instructions, not 160.
inline __m512 reduce16(const __m512* v) {
  __m512 t[8], u[4], w[2];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88), _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88), _mm512_shuffle_f32x4(w[0], w[1], 0xdd));
}
#endif

#if defined(__AVX512BF16__)

// NK x rows (NK = 1, 2 or 4) against 16 / NK rows of A at a time: 16 independent sums keep
// the dot-product units busy, and one transposing reduction finishes all 16.
template <int NK>
inline void shrink_bf16(const uint16_t* const* xs, const uint16_t* a, int64_t n, int64_t d_in, float* h,
                        int64_t h_stride) {
  constexpr int JB = 16 / NK;
  const int64_t full = d_in / 32 * 32;
  const __mmask32 tail = static_cast<__mmask32>((1ull << (d_in - full)) - 1);
  alignas(64) float sums[16];
  for (int64_t j0 = 0; j0 < n; j0 += JB) {
    const int64_t nj = std::min<int64_t>(JB, n - j0);
    __m512 acc[16];
    for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d_in; i += 32) {
      const __mmask32 m = i < full ? static_cast<__mmask32>(~0u) : tail;
      __m512bh xv[NK];
      for (int k = 0; k < NK; ++k) xv[k] = (__m512bh)_mm512_maskz_loadu_epi16(m, xs[k] + i);
      for (int j = 0; j < JB; ++j) {
        if (j < nj) {
          // the next block's rows, ahead: the hardware prefetcher stops at each 4 KiB page
          if (j0 + JB + j < n) _mm_prefetch(reinterpret_cast<const char*>(a + (j0 + JB + j) * d_in + i), _MM_HINT_T0);
          const __m512bh av = (__m512bh)_mm512_maskz_loadu_epi16(m, a + (j0 + j) * d_in + i);
          for (int k = 0; k < NK; ++k) acc[j * NK + k] = _mm512_dpbf16_ps(acc[j * NK + k], xv[k], av);
        }
      }
    }
    _mm512_store_ps(sums, reduce16(acc));
    for (int64_t j = 0; j < nj; ++j)
      for (int k = 0; k < NK; ++k) h[k * h_stride + j0 + j] = sums[j * NK + k];
  }
}
#endif

inline void shrink(const uint16_t* x, const int64_t* rows, int64_t nk, const uint16_t* a, int64_t n, int64_t d_in,
                   float* h, int64_t h_stride) {
#if defined(__AVX512BF16__)
  const uint16_t* xs[TILE];
  for (int64_t k = 0; k < TILE; ++k) xs[k] = x + rows[std::min(k, nk - 1)] * d_in;  // 3 rows: the last twice (h has TILE rows)
  if (nk == 1) return shrink_bf16<1>(xs, a, n, d_in, h, h_stride);
  if (nk == 2) return shrink_bf16<2>(xs, a, n, d_in, h, h_stride);
  return shrink_bf16<4>(xs, a, n, d_in, h, h_stride);
#else
  for (int64_t j = 0; j < n; ++j) {
    const uint16_t* aj = a + j * d_in;
    for (int64_t k = 0; k < nk; ++k) {
      const uint16_t* xk = x + rows[k] * d_in;
      float s = 0.f;
      for (int64_t i = 0; i < d_in; ++i) s += bf16_to_f(xk[i]) * bf16_to_f(aj[i]);
      h[k * h_stride + j] = s;
    }
  }
#endif
}

// y[rows[k], col + o] += sum_r h[k][r] * bt[r, o] for o < out (bt: r rows of `out`).
template <typename T, typename F>
inline void expand(const float* h, int64_t h_stride, int64_t nk, const F* bt, int64_t r, int64_t out,
                   T* y, const int64_t* rows, int64_t y_stride, int64_t col) {
  float acc[TILE][CHUNK];
  float b[CHUNK];
  for (int64_t o0 = 0; o0 < out; o0 += CHUNK) {
    const int64_t w = std::min(CHUNK, out - o0);
    for (int64_t k = 0; k < nk; ++k) std::fill(acc[k], acc[k] + CHUNK, 0.f);
    for (int64_t j = 0; j < r; ++j) {
      const F* row = bt + j * out + o0;
      for (int64_t o = 0; o < w; ++o) b[o] = load_f(row, o);
      for (int64_t k = 0; k < nk; ++k) {
        const float hk = h[k * h_stride + j];
        for (int64_t o = 0; o < w; ++o) acc[k][o] += hk * b[o];
      }
    }
    for (int64_t k = 0; k < nk; ++k) {
      T* yk = y + rows[k] * y_stride + col + o0;
      for (int64_t o = 0; o < w; ++o) add_store(yk, o, acc[k][o]);
    }
  }
}

#if defined(__AVX512BF16__)
// The bfloat16 expand on the dot-product units: rows j and j+1 of B^T interleaved (two
// unpacks) against the pair (h[j], h[j+1]) rounded to bfloat16, 32 products per
// instruction. The unpacks order columns within 128-bit lanes; a permute restores them
// once per 32 columns at the end. Sums stay in float32 registers: 64 columns x TILE rows.
template <>
inline void expand<uint16_t, uint16_t>(const float* h, int64_t h_stride, int64_t nk, const uint16_t* bt, int64_t r,
                                       int64_t out, uint16_t* y, const int64_t* rows, int64_t y_stride, int64_t col) {
  constexpr int64_t MAX_PAIRS = 128;  // ranks up to 256
  TORCH_CHECK(r <= 2 * MAX_PAIRS, "LoRA rank above 256");
  const int64_t pairs = (r + 1) / 2;
  alignas(64) uint32_t hp[TILE][MAX_PAIRS];
  for (int64_t k = 0; k < nk; ++k)
    for (int64_t p = 0; p < pairs; ++p) {
      const float lo = h[k * h_stride + 2 * p], hi = 2 * p + 1 < r ? h[k * h_stride + 2 * p + 1] : 0.f;
      hp[k][p] = static_cast<uint32_t>(f_to_bf16(lo)) | (static_cast<uint32_t>(f_to_bf16(hi)) << 16);
    }
  // lane c of a 16-column result: column c = 8L + u of the unpacked pair (lo: u < 4, hi: u >= 4)
  const __m512i idx_a = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i idx_b = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t o0 = 0; o0 < out; o0 += CHUNK) {
    __mmask32 m[2];
    for (int v = 0; v < 2; ++v) {
      const int64_t left = std::max<int64_t>(0, std::min<int64_t>(32, out - o0 - 32 * v));
      m[v] = static_cast<__mmask32>(left == 32 ? ~0u : (1u << left) - 1);
    }
    __m512 acc[TILE][4];
    for (int64_t k = 0; k < TILE; ++k)
      for (int v = 0; v < 4; ++v) acc[k][v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p) {
      const uint16_t* r0 = bt + 2 * p * out + o0;
      const bool odd = 2 * p + 1 >= r;
      __m512bh b[4];
      for (int v = 0; v < 2; ++v) {
        const __m512i a0 = _mm512_maskz_loadu_epi16(m[v], r0 + 32 * v);
        const __m512i a1 = odd ? _mm512_setzero_si512() : _mm512_maskz_loadu_epi16(m[v], r0 + out + 32 * v);
        b[2 * v] = (__m512bh)_mm512_unpacklo_epi16(a0, a1);
        b[2 * v + 1] = (__m512bh)_mm512_unpackhi_epi16(a0, a1);
      }
      for (int64_t k = 0; k < nk; ++k) {
        const __m512bh hv = (__m512bh)_mm512_set1_epi32(static_cast<int>(hp[k][p]));
        for (int v = 0; v < 4; ++v) acc[k][v] = _mm512_dpbf16_ps(acc[k][v], hv, b[v]);
      }
    }
    for (int64_t k = 0; k < nk; ++k) {
      uint16_t* yk = y + rows[k] * y_stride + col + o0;
      for (int v = 0; v < 2; ++v) {
        const __m512 sums[2] = {_mm512_permutex2var_ps(acc[k][2 * v], idx_a, acc[k][2 * v + 1]),
                                _mm512_permutex2var_ps(acc[k][2 * v], idx_b, acc[k][2 * v + 1])};
        for (int half = 0; half < 2; ++half) {
          const __mmask16 mh = static_cast<__mmask16>(m[v] >> (16 * half));
          if (!mh) continue;
          uint16_t* dst = yk + 32 * v + 16 * half;
          const __m512 cur = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mh, dst)), 16));
          _mm256_mask_storeu_epi16(dst, mh, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(cur, sums[half])));
        }
      }
    }
  }
}
#endif

// ---- int8 factors under bfloat16 activations ---------------------------------------------------
// A rows and B^T rows are int8 with one float32 scale per row (symmetric, absmax / 127). Both
// products run on the AVX-512 VNNI int16 dot products (vpdpwssd: 32 products per instruction,
// the int8 factors widened by one instruction per 32): each tile row of x and each row's
// low-rank activations h' (B^T's row scales folded in) are scaled to int16 (one float32 scale
// per row, absmax / 32767: an error ~1e-5 of the row's largest value, far below bfloat16's
// own rounding). The int32 sums become float32 times the scales; y is rounded once. The
// float32 widening (int8 -> float32, FMA) took 3x the instructions, and this path is bound by
// reading the factors only if the arithmetic per byte stays this small.

// One row of bfloat16 x to int16: q[i] = round(x[i] / scale), scale = max |x| / 32767 (0: a zero row).
inline float quantize_x16(const uint16_t* x, int64_t d_in, int16_t* q) {
  float top = 0.f;
  for (int64_t i = 0; i < d_in; ++i) top = std::max(top, std::abs(bf16_to_f(x[i])));
  const float inv = top > 0.f ? 32767.f / top : 0.f;
  for (int64_t i = 0; i < d_in; ++i) q[i] = static_cast<int16_t>(std::nearbyint(bf16_to_f(x[i]) * inv));
  return top / 32767.f;
}

// h[k][j] = sa[j] * (x[k] . q[j]) for j < n (q: n int8 rows of d_in); x[k] = xq[k] * sx[k]
// (int16 rows, quantize_x16), or xf[k] (float32 rows) in the portable build.
template <int NK>
inline void shrink_i8(const int16_t* const* xq, const float* sx, const float* const* xf, const int8_t* q,
                      const float* sa, int64_t n, int64_t d_in, float* h, int64_t h_stride) {
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
  constexpr int JB = 16 / NK;
  // an int32 lane gains at most 2 * 32767 * 127 per 32 columns: sums in int32 for 8192 columns at a time
  constexpr int64_t BLOCK = 8192;
  alignas(64) float sums[16];
  for (int64_t j0 = 0; j0 < n; j0 += JB) {
    const int64_t nj = std::min<int64_t>(JB, n - j0);
    __m512 total = _mm512_setzero_ps();
    for (int64_t b0 = 0; b0 < d_in; b0 += BLOCK) {
      const int64_t b1 = std::min(d_in, b0 + BLOCK);
      __m512i acc[16];
      for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_si512();
      for (int64_t i = b0; i < b1; i += 32) {
        const __mmask32 m = i + 32 <= b1 ? static_cast<__mmask32>(~0u) : static_cast<__mmask32>((1ull << (b1 - i)) - 1);
        __m512i xv[NK];
        for (int k = 0; k < NK; ++k) xv[k] = _mm512_maskz_loadu_epi16(m, xq[k] + i);
        // (no prefetch within A's rows: the next tile's factors are already on their way to L2,
        // and a prefetch per line here made the kernel ~15% slower on 2 threads: 4.97 vs 4.23 ms)
        for (int j = 0; j < JB; ++j) {
          if (j < nj) {
            const int8_t* row = q + (j0 + j) * d_in;
            const __m512i av = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m, row + i));
            for (int k = 0; k < NK; ++k) acc[j * NK + k] = _mm512_dpwssd_epi32(acc[j * NK + k], xv[k], av);
          }
        }
      }
      __m512 f[16];
      for (int i = 0; i < 16; ++i) f[i] = _mm512_cvtepi32_ps(acc[i]);
      total = _mm512_add_ps(total, reduce16(f));
    }
    _mm512_store_ps(sums, total);
    for (int64_t j = 0; j < nj; ++j)
      for (int k = 0; k < NK; ++k) h[k * h_stride + j0 + j] = sums[j * NK + k] * sx[k] * sa[j0 + j];
  }
#else
  for (int64_t j = 0; j < n; ++j) {
    const int8_t* qj = q + j * d_in;
    for (int k = 0; k < NK; ++k) {
      float s = 0.f;
      for (int64_t i = 0; i < d_in; ++i) s += xf[k][i] * static_cast<float>(qj[i]);
      h[k * h_stride + j] = s * sa[j];
    }
  }
#endif
}

// y[rows[k], col + o] += sum_j (h[k][j] * sb[j]) * q[j, o] for o < out (q: r int8 rows of `out`).
template <int NK>
inline void expand_i8(const float* h, int64_t h_stride, const int8_t* q, const float* sb, int64_t r, int64_t out,
                      uint16_t* y, const int64_t* rows, int64_t y_stride, int64_t col) {
  constexpr int64_t MAX_R = 256;  // r * 32767 * 127 stays within int32
  TORCH_CHECK(r <= MAX_R, "LoRA rank above 256");
  alignas(64) float hs[NK][MAX_R];
  for (int k = 0; k < NK; ++k)
    for (int64_t j = 0; j < r; ++j) hs[k][j] = h[k * h_stride + j] * sb[j];
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
  // h' as int16 pairs (h'[2p], h'[2p+1]) against rows 2p and 2p+1 of q interleaved (two
  // unpacks, as in the bfloat16 expand: a permute restores the column order at the end)
  const int64_t pairs = (r + 1) / 2;
  alignas(64) uint32_t hp[NK][MAX_R / 2];
  float sh[NK];
  for (int k = 0; k < NK; ++k) {
    float top = 0.f;
    for (int64_t j = 0; j < r; ++j) top = std::max(top, std::abs(hs[k][j]));
    const float inv = top > 0.f ? 32767.f / top : 0.f;
    sh[k] = top / 32767.f;
    for (int64_t p = 0; p < pairs; ++p) {
      const int32_t lo = static_cast<int32_t>(std::nearbyint(hs[k][2 * p] * inv));
      const int32_t hi = 2 * p + 1 < r ? static_cast<int32_t>(std::nearbyint(hs[k][2 * p + 1] * inv)) : 0;
      hp[k][p] = static_cast<uint32_t>(static_cast<uint16_t>(lo)) | (static_cast<uint32_t>(static_cast<uint16_t>(hi)) << 16);
    }
  }
  const __m512i idx_a = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i idx_b = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int64_t o0 = 0; o0 < out; o0 += 64) {
    __mmask32 m[2];
    for (int v = 0; v < 2; ++v) {
      const int64_t left = std::max<int64_t>(0, std::min<int64_t>(32, out - o0 - 32 * v));
      m[v] = static_cast<__mmask32>(left == 32 ? ~0u : (1u << left) - 1);
    }
    const bool ahead = o0 + PREFETCH < out;
    __m512i acc[NK][4];
    for (int k = 0; k < NK; ++k)
      for (int v = 0; v < 4; ++v) acc[k][v] = _mm512_setzero_si512();
    for (int64_t p = 0; p < pairs; ++p) {
      const int8_t* r0 = q + 2 * p * out + o0;
      const bool odd = 2 * p + 1 >= r;
      if (ahead) {
        _mm_prefetch(reinterpret_cast<const char*>(r0 + PREFETCH), _MM_HINT_T0);
        if (!odd) _mm_prefetch(reinterpret_cast<const char*>(r0 + out + PREFETCH), _MM_HINT_T0);
      }
      __m512i b[4];
      for (int v = 0; v < 2; ++v) {
        const __m512i a0 = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m[v], r0 + 32 * v));
        const __m512i a1 = odd ? _mm512_setzero_si512() : _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(m[v], r0 + out + 32 * v));
        b[2 * v] = _mm512_unpacklo_epi16(a0, a1);
        b[2 * v + 1] = _mm512_unpackhi_epi16(a0, a1);
      }
      for (int k = 0; k < NK; ++k) {
        const __m512i hv = _mm512_set1_epi32(static_cast<int>(hp[k][p]));
        for (int v = 0; v < 4; ++v) acc[k][v] = _mm512_dpwssd_epi32(acc[k][v], b[v], hv);
      }
    }
    for (int k = 0; k < NK; ++k) {
      uint16_t* yk = y + rows[k] * y_stride + col + o0;
      const __m512 s = _mm512_set1_ps(sh[k]);
      for (int v = 0; v < 2; ++v) {
        const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[k][2 * v]), s);
        const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[k][2 * v + 1]), s);
        const __m512 sums[2] = {_mm512_permutex2var_ps(lo, idx_a, hi), _mm512_permutex2var_ps(lo, idx_b, hi)};
        for (int half = 0; half < 2; ++half) {
          const __mmask16 mh = static_cast<__mmask16>(m[v] >> (16 * half));
          if (!mh) continue;
          uint16_t* dst = yk + 32 * v + 16 * half;
          const __m512 cur = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mh, dst)), 16));
          const __m512 sum = _mm512_add_ps(cur, sums[half]);
#if defined(__AVX512BF16__)
          _mm256_mask_storeu_epi16(dst, mh, (__m256i)_mm512_cvtneps_pbh(sum));
#else
          alignas(64) float tmp[16];
          _mm512_store_ps(tmp, sum);
          for (int e = 0; e < 16; ++e)
            if (mh >> e & 1) dst[e] = f_to_bf16(tmp[e]);
#endif
        }
      }
    }
  }
#else
  float acc[NK][CHUNK];
  for (int64_t o0 = 0; o0 < out; o0 += CHUNK) {
    const int64_t w = std::min(CHUNK, out - o0);
    for (int k = 0; k < NK; ++k) std::fill(acc[k], acc[k] + CHUNK, 0.f);
    for (int64_t j = 0; j < r; ++j) {
      const int8_t* row = q + j * out + o0;
      for (int k = 0; k < NK; ++k)
        for (int64_t o = 0; o < w; ++o) acc[k][o] += hs[k][j] * static_cast<float>(row[o]);
    }
    for (int k = 0; k < NK; ++k) {
      uint16_t* yk = y + rows[k] * y_stride + col + o0;
      for (int64_t o = 0; o < w; ++o) add_store(yk, o, acc[k][o]);
    }
  }
#endif
}

inline void prefetch_lines(const int8_t* p, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i, 0, 2);  // into L2: measured ~5% faster than into L1
}

void lora_kernel_i8(const uint16_t* x, uint16_t* y, const int8_t* a, const float* a_scale,
                    const std::vector<const int8_t*>& bts, const std::vector<const float*>& bt_scales,
                    const std::vector<int64_t>& outs, const int32_t* ranks, const int64_t* rows, const int64_t* tiles,
                    int64_t n_tiles, int64_t d_in, int64_t y_stride, int64_t R, int64_t slot_stride_a) {
  const int64_t parts = static_cast<int64_t>(bts.size());
  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> h(TILE * parts * R);
    std::vector<float> xbuf(TILE * d_in);  // the portable build: x in float32
    std::vector<int16_t> xqbuf(TILE * d_in);
    float sx[TILE];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t start = tiles[3 * t], stop = tiles[3 * t + 1], slot = tiles[3 * t + 2];
      const int64_t r = ranks[slot], nk = stop - start;
      if (r == 0) continue;
      const int64_t* tr = rows + start;
      // the tile's rows of x as int16 (or float32), once for every part; 3 rows: the last twice
      const float* xf[TILE];
      const int16_t* xq[TILE];
      for (int64_t k = 0; k < TILE; ++k) {
        const int64_t kk = std::min(k, nk - 1);
        xf[k] = xbuf.data() + kk * d_in;
        xq[k] = xqbuf.data() + kk * d_in;
        if (k != kk) {
          sx[k] = sx[kk];
          continue;
        }
        const uint16_t* src = x + tr[k] * d_in;
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
        sx[k] = quantize_x16(src, d_in, xqbuf.data() + k * d_in);
#else
        for (int64_t i = 0; i < d_in; ++i) xbuf[k * d_in + i] = bf16_to_f(src[i]);
#endif
      }
      // The next tile's factors, now: a slot's factors of one module are only a few short
      // runs of lines (~20 KiB in all at rank 8), too short for the hardware prefetcher to
      // ramp up on, and the int8 arithmetic is too little to hide that latency.
      // (measured on SmolLM2 shapes, one thread: 12.8 -> ~11 ms per step; two tiles ahead: no better)
      if (t + 1 < end) {
        const int64_t next = tiles[3 * (t + 1) + 2], rn = ranks[next];
        for (int64_t p = 0; p < parts; ++p) {
          prefetch_lines(a + next * slot_stride_a + p * R * d_in, rn * d_in);
          prefetch_lines(bts[p] + next * R * outs[p], rn * outs[p]);
        }
      }
      const int8_t* as = a + slot * slot_stride_a;
      for (int64_t p = 0; p < parts; ++p) {
        const int8_t* q = as + p * R * d_in;
        const float* sa = a_scale + (slot * parts + p) * R;
        float* hp = h.data() + p * R;
        if (nk == 1) shrink_i8<1>(xq, sx, xf, q, sa, r, d_in, hp, parts * R);
        else if (nk == 2) shrink_i8<2>(xq, sx, xf, q, sa, r, d_in, hp, parts * R);
        else shrink_i8<4>(xq, sx, xf, q, sa, r, d_in, hp, parts * R);
      }
      int64_t col = 0;
      for (int64_t p = 0; p < parts; ++p) {
        const int8_t* q = bts[p] + slot * R * outs[p];
        const float* sb = bt_scales[p] + slot * R;
        const float* hp = h.data() + p * R;
        switch (nk) {
          case 1: expand_i8<1>(hp, parts * R, q, sb, r, outs[p], y, tr, y_stride, col); break;
          case 2: expand_i8<2>(hp, parts * R, q, sb, r, outs[p], y, tr, y_stride, col); break;
          case 3: expand_i8<3>(hp, parts * R, q, sb, r, outs[p], y, tr, y_stride, col); break;
          default: expand_i8<4>(hp, parts * R, q, sb, r, outs[p], y, tr, y_stride, col);
        }
        col += outs[p];
      }
    }
  });
}

template <typename T>
void lora_kernel(const T* x, T* y, const T* a, const std::vector<const T*>& bts, const std::vector<int64_t>& outs,
                 const int32_t* ranks, const int64_t* rows, const int64_t* tiles, int64_t n_tiles, int64_t d_in,
                 int64_t y_stride, int64_t R, int64_t slot_stride_a) {
  const int64_t parts = static_cast<int64_t>(bts.size());
  at::parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> h(TILE * parts * R);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t start = tiles[3 * t], stop = tiles[3 * t + 1], slot = tiles[3 * t + 2];
      const int64_t r = ranks[slot], nk = stop - start;
      if (r == 0) continue;
      const int64_t* tr = rows + start;
      const T* as = a + slot * slot_stride_a;
      // every part's low-rank activations: rows p*R .. p*R+r of the slot's A
      for (int64_t p = 0; p < parts; ++p) shrink(x, tr, nk, as + p * R * d_in, r, d_in, h.data() + p * R, parts * R);
      int64_t col = 0;
      for (int64_t p = 0; p < parts; ++p) {
        const T* bt = bts[p] + slot * R * outs[p];
        expand(h.data() + p * R, parts * R, nk, bt, r, outs[p], y, tr, y_stride, col);
        col += outs[p];
      }
    }
  });
}

// int8 factors come with float32 scales: a_scale [slots, parts, R] (A's rows) and per part
// [slots, R] (B^T's rows); float32 and bfloat16 factors with none.
void check_scales(const at::Tensor& a, const std::vector<at::Tensor>& bts, const std::optional<at::Tensor>& a_scale,
                  const std::vector<at::Tensor>& bt_scales) {
  if (a.scalar_type() != at::kChar) {
    TORCH_CHECK(!a_scale.has_value() && bt_scales.empty(), "scales are for int8 factors only");
    return;
  }
  TORCH_CHECK(a_scale.has_value() && a_scale->scalar_type() == at::kFloat && a_scale->is_contiguous() &&
              a_scale->dim() == 3 && a_scale->size(0) == a.size(0) && a_scale->size(1) == a.size(1) &&
              a_scale->size(2) == a.size(2), "int8 factors need a_scale: float32 [slots, parts, R]");
  TORCH_CHECK(bt_scales.size() == bts.size(), "int8 factors need one b^t scale tensor per part");
  for (const auto& s : bt_scales)
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.is_contiguous() && s.dim() == 2 && s.size(0) == a.size(0) &&
                s.size(1) == a.size(2), "bad b^t scales: float32 [slots, R]");
}

std::vector<const float*> float_ptrs(const std::vector<at::Tensor>& ts) {
  std::vector<const float*> out;
  for (const auto& t : ts) out.push_back(t.data_ptr<float>());
  return out;
}

std::vector<const int8_t*> int8_ptrs(const std::vector<at::Tensor>& ts) {
  std::vector<const int8_t*> out;
  for (const auto& t : ts) out.push_back(t.data_ptr<int8_t>());
  return out;
}

// x [T, in], y [T, sum of outs] (in place), a [slots, parts, R, in], bts: per part [slots, R, out_p],
// ranks int32 [slots], rows int64 [n] (row indices grouped by slot), tiles int64 [tiles, 3]:
// (start, end) into rows and the slot, at most TILE rows each. x, y and the factors float32, or
// x and y bfloat16 with bfloat16 factors, or with int8 factors and their scales (check_scales).
void apply(const at::Tensor& x, at::Tensor& y, const at::Tensor& a, const std::vector<at::Tensor>& bts,
           const at::Tensor& ranks, const at::Tensor& rows, const at::Tensor& tiles,
           const std::optional<at::Tensor>& a_scale, const std::vector<at::Tensor>& bt_scales) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0), "x [T, in] and y [T, out]");
  TORCH_CHECK(x.is_contiguous() && y.is_contiguous() && a.is_contiguous(), "x, y and a must be contiguous");
  const bool i8 = a.scalar_type() == at::kChar;
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && (i8 ? x.scalar_type() == at::kBFloat16 : x.scalar_type() == a.scalar_type()),
              "x, y and a dtypes differ (int8 factors take bfloat16 x and y)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "float32 or bfloat16 only");
  check_scales(a, bts, a_scale, bt_scales);
  TORCH_CHECK(a.dim() == 4 && a.size(1) == static_cast<int64_t>(bts.size()) && a.size(3) == x.size(1), "bad a");
  TORCH_CHECK(ranks.scalar_type() == at::kInt && ranks.is_contiguous() && ranks.size(0) == a.size(0), "bad ranks");
  TORCH_CHECK(rows.scalar_type() == at::kLong && tiles.scalar_type() == at::kLong && rows.is_contiguous() &&
              tiles.is_contiguous() && (tiles.numel() == 0 || tiles.size(-1) == 3), "bad rows or tiles");
  const int64_t R = a.size(2);
  std::vector<int64_t> outs;
  int64_t total = 0;
  for (const auto& bt : bts) {
    TORCH_CHECK(bt.is_contiguous() && bt.scalar_type() == a.scalar_type() && bt.dim() == 3 &&
                bt.size(0) == a.size(0) && bt.size(1) == R, "bad b^t");
    outs.push_back(bt.size(2));
    total += bt.size(2);
  }
  TORCH_CHECK(total == y.size(1), "the parts' outputs do not add up to y's width");
  const int64_t n_tiles = tiles.numel() / 3;
  const int64_t* t = tiles.data_ptr<int64_t>();
  for (int64_t i = 0; i < n_tiles; ++i)
    TORCH_CHECK(t[3 * i] >= 0 && t[3 * i] < t[3 * i + 1] && t[3 * i + 1] - t[3 * i] <= TILE &&
                t[3 * i + 1] <= rows.numel() && t[3 * i + 2] >= 0 && t[3 * i + 2] < a.size(0), "bad tile");
  const int64_t* rw = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < rows.numel(); ++i) TORCH_CHECK(rw[i] >= 0 && rw[i] < x.size(0), "row out of range");
  if (i8) {
    lora_kernel_i8(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()),
                   reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), a.data_ptr<int8_t>(), a_scale->data_ptr<float>(),
                   int8_ptrs(bts), float_ptrs(bt_scales), outs, ranks.data_ptr<int32_t>(), rw, t, n_tiles, x.size(1),
                   y.size(1), R, a.stride(0));
  } else if (x.scalar_type() == at::kFloat) {
    std::vector<const float*> b;
    for (const auto& bt : bts) b.push_back(bt.data_ptr<float>());
    lora_kernel<float>(x.data_ptr<float>(), y.data_ptr<float>(), a.data_ptr<float>(), b, outs,
                       ranks.data_ptr<int32_t>(), rw, t, n_tiles, x.size(1), y.size(1), R, a.stride(0));
  } else {
    auto u16 = [](const at::Tensor& v) { return reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>()); };
    std::vector<const uint16_t*> b;
    for (const auto& bt : bts) b.push_back(u16(bt));
    lora_kernel<uint16_t>(u16(x), reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), u16(a), b, outs,
                          ranks.data_ptr<int32_t>(), rw, t, n_tiles, x.size(1), y.size(1), R, a.stride(0));
  }
}

// dst[j, o] = src[o, j] * scale for a B [out, r] (float32) into B^T [r, out].
template <typename T>
void transpose_scaled(const float* src, T* dst, int64_t out, int64_t r, float scale) {
  int64_t o0 = 0;
#if defined(__AVX512F__)
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(static_cast<int>(r)));
  const __m512 sv = _mm512_set1_ps(scale);
  for (; o0 + 16 <= out; o0 += 16)
    for (int64_t j = 0; j < r; ++j) {
      const __m512 v = _mm512_mul_ps(_mm512_i32gather_ps(idx, src + o0 * r + j, 4), sv);
      if constexpr (std::is_same_v<T, float>) {
        _mm512_storeu_ps(dst + j * out + o0, v);
      } else {
#if defined(__AVX512BF16__)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j * out + o0), (__m256i)_mm512_cvtneps_pbh(v));
#else
        alignas(64) float tmp[16];
        _mm512_store_ps(tmp, v);
        for (int e = 0; e < 16; ++e) dst[j * out + o0 + e] = f_to_bf16(tmp[e]);
#endif
      }
    }
#endif
  for (; o0 < out; ++o0)
    for (int64_t j = 0; j < r; ++j) {
      const float v = src[o0 * r + j] * scale;
      if constexpr (std::is_same_v<T, float>) dst[j * out + o0] = v; else dst[j * out + o0] = f_to_bf16(v);
    }
}

// Rows of v = src[j * row_stride + i * col_stride] * mul (j < rows, i < cols) to int8:
// dst[j * cols + i] = round(v / scales[j]), scales[j] = max_i |v| / 127 (0 for a zero row).
void quantize_rows(const float* src, int64_t rows, int64_t cols, int64_t row_stride, int64_t col_stride, float mul,
                   int8_t* dst, float* scales) {
  for (int64_t j = 0; j < rows; ++j) {
    const float* s = src + j * row_stride;
    float top = 0.f;
    for (int64_t i = 0; i < cols; ++i) top = std::max(top, std::abs(s[i * col_stride] * mul));
    const float inv = top > 0.f ? 127.f / top : 0.f;
    for (int64_t i = 0; i < cols; ++i) {
      const float q = std::nearbyint(s[i * col_stride] * mul * inv);
      dst[j * cols + i] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, q)));
    }
    scales[j] = top / 127.f;
  }
}

template <typename T>
void convert(const float* src, T* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<T, float>) dst[i] = src[i]; else dst[i] = f_to_bf16(src[i]);
  }
}

// An adapter into `slot` in one call: for each factor i, rows :r of part parts[i] of
// a_stacks[i] ([slots, parts, R, in]) = a_src[i] ([r, in]) and rows :r of bt_stacks[i]
// ([slots, R, out]) = b_src[i]^T * scales[i] ([out, r]); float32 sources, stacks float32,
// bfloat16 or int8. int8 stacks are quantized per row (quantize_rows), their scales written to
// rows :r of part parts[i] of a_scales[i] ([slots, parts, R]) and of bt_scales[i] ([slots, R]);
// the other stacks pass both lists empty. The stacks are passed whole: slicing 2 x ~210 views
// in Python cost more than this.
void pack(int64_t slot, const std::vector<at::Tensor>& a_stacks, const std::vector<int64_t>& parts,
          const std::vector<at::Tensor>& a_src, const std::vector<at::Tensor>& bt_stacks,
          const std::vector<at::Tensor>& b_src, const std::vector<double>& scales,
          const std::vector<at::Tensor>& a_scales, const std::vector<at::Tensor>& bt_scales) {
  const int64_t n = static_cast<int64_t>(a_stacks.size());
  TORCH_CHECK(parts.size() == a_stacks.size() && a_src.size() == a_stacks.size() && bt_stacks.size() == a_stacks.size() &&
              b_src.size() == a_stacks.size() && scales.size() == a_stacks.size(), "one of each per factor");
  const bool any_i8 = std::any_of(a_stacks.begin(), a_stacks.end(), [](const at::Tensor& t) { return t.scalar_type() == at::kChar; });
  TORCH_CHECK(any_i8 ? a_scales.size() == a_stacks.size() && bt_scales.size() == a_stacks.size()
                     : a_scales.empty() && bt_scales.empty(), "scales: one of each per factor for int8 stacks, none else");
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor &as = a_stacks[i], &bs = bt_stacks[i], &a = a_src[i], &b = b_src[i];
    TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && a.is_contiguous() &&
                b.is_contiguous() && a.dim() == 2 && b.dim() == 2, "sources: contiguous float32 matrices");
    TORCH_CHECK(as.scalar_type() == bs.scalar_type() && (as.scalar_type() == at::kFloat || as.scalar_type() == at::kBFloat16 ||
                as.scalar_type() == at::kChar) && as.is_contiguous() && bs.is_contiguous() && as.dim() == 4 && bs.dim() == 3,
                "bad stacks");
    if (any_i8) {
      const at::Tensor &sa = a_scales[i], &sb = bt_scales[i];
      TORCH_CHECK(as.scalar_type() == at::kChar && sa.scalar_type() == at::kFloat && sb.scalar_type() == at::kFloat &&
                  sa.is_contiguous() && sb.is_contiguous() && sa.dim() == 3 && sb.dim() == 2 &&
                  sa.size(0) == as.size(0) && sa.size(1) == as.size(1) && sa.size(2) == as.size(2) &&
                  sb.size(0) == bs.size(0) && sb.size(1) == bs.size(1), "bad int8 stacks or scales");
    }
    TORCH_CHECK(slot >= 0 && slot < as.size(0) && slot < bs.size(0) && parts[i] >= 0 && parts[i] < as.size(1), "bad slot or part");
    TORCH_CHECK(a.size(0) <= as.size(2) && a.size(1) == as.size(3) && b.size(1) == a.size(0) && b.size(0) == bs.size(2) &&
                a.size(0) <= bs.size(1), "shapes do not match");
  }
  at::parallel_for(0, 2 * n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t i = t / 2;
      const bool bf = a_stacks[i].scalar_type() == at::kBFloat16, i8 = a_stacks[i].scalar_type() == at::kChar;
      if (t % 2 == 0) {
        const at::Tensor& as = a_stacks[i];
        const int64_t off = (slot * as.size(1) + parts[i]) * as.size(2) * as.size(3);
        const float* src = a_src[i].data_ptr<float>();
        if (i8)
          quantize_rows(src, a_src[i].size(0), a_src[i].size(1), a_src[i].size(1), 1, 1.f, as.data_ptr<int8_t>() + off,
                        a_scales[i].data_ptr<float>() + (slot * as.size(1) + parts[i]) * as.size(2));
        else if (bf) convert(src, reinterpret_cast<uint16_t*>(as.data_ptr<at::BFloat16>()) + off, a_src[i].numel());
        else convert(src, as.data_ptr<float>() + off, a_src[i].numel());
      } else {
        const at::Tensor& bs = bt_stacks[i];
        const int64_t off = slot * bs.size(1) * bs.size(2);
        const float* src = b_src[i].data_ptr<float>();
        const int64_t out = b_src[i].size(0), r = b_src[i].size(1);
        const float sc = static_cast<float>(scales[i]);
        if (i8)  // row j of B^T: column j of B, scaled
          quantize_rows(src, r, out, 1, r, sc, bs.data_ptr<int8_t>() + off, bt_scales[i].data_ptr<float>() + slot * bs.size(1));
        else if (bf) transpose_scaled(src, reinterpret_cast<uint16_t*>(bs.data_ptr<at::BFloat16>()) + off, out, r, sc);
        else transpose_scaled(src, bs.data_ptr<float>() + off, out, r, sc);
      }
    }
  });
}

// Every (layer, module)'s stacked factors, registered once (index: layer * 4 + module, the
// modules in the order qkv, o, gate_up, down), for steps driven from native code.
struct Slots {
  struct Ref {
    at::Tensor a;
    std::vector<at::Tensor> bts;
    std::vector<int64_t> outs;
    at::Tensor ranks;
    std::optional<at::Tensor> a_scale;  // int8 factors: their scales (check_scales)
    std::vector<at::Tensor> bt_scales;
  };
  std::vector<std::optional<Ref>> refs;

  void add(int64_t index, const at::Tensor& a, const std::vector<at::Tensor>& bts, const at::Tensor& ranks,
           const std::optional<at::Tensor>& a_scale, const std::vector<at::Tensor>& bt_scales) {
    TORCH_CHECK(index >= 0 && a.is_contiguous() && ranks.scalar_type() == at::kInt && ranks.is_contiguous(), "bad stack");
    TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16 || a.scalar_type() == at::kChar,
                "float32, bfloat16 or int8 factors");
    TORCH_CHECK(a.dim() == 4 && a.size(1) == static_cast<int64_t>(bts.size()) && ranks.size(0) == a.size(0), "bad stack");
    check_scales(a, bts, a_scale, bt_scales);
    std::vector<int64_t> outs;
    for (const auto& bt : bts) {
      TORCH_CHECK(bt.is_contiguous() && bt.scalar_type() == a.scalar_type() && bt.size(1) == a.size(2), "bad b^t");
      outs.push_back(bt.size(2));
    }
    if (static_cast<int64_t>(refs.size()) <= index) refs.resize(index + 1);
    refs[index] = Ref{a, bts, outs, ranks, a_scale, bt_scales};
  }
};

// One step's row map over Slots. Native code (the fused decode plan) calls
// leanserve_lora_step_apply(step.address(), index, x, y) after each projection: y [T, out]
// += the deltas of x [T, in] (both contiguous, in the factors' dtype; bfloat16 for int8 factors).
struct Step {
  std::shared_ptr<Slots> slots;
  at::Tensor rows, tiles;

  Step(std::shared_ptr<Slots> s, at::Tensor r, at::Tensor t) : slots(std::move(s)), rows(r), tiles(t) {
    TORCH_CHECK(rows.scalar_type() == at::kLong && tiles.scalar_type() == at::kLong && rows.is_contiguous() &&
                tiles.is_contiguous(), "bad rows or tiles");
  }

  void run(int64_t index, const void* x, void* y) const {
    if (index < 0 || index >= static_cast<int64_t>(slots->refs.size()) || !slots->refs[index]) return;
    const Slots::Ref& s = *slots->refs[index];
    int64_t width = 0;
    for (int64_t o : s.outs) width += o;
    const int64_t n_tiles = tiles.numel() / 3;
    if (s.a.scalar_type() == at::kChar) {
      lora_kernel_i8(static_cast<const uint16_t*>(x), static_cast<uint16_t*>(y), s.a.data_ptr<int8_t>(),
                     s.a_scale->data_ptr<float>(), int8_ptrs(s.bts), float_ptrs(s.bt_scales), s.outs,
                     s.ranks.data_ptr<int32_t>(), rows.data_ptr<int64_t>(), tiles.data_ptr<int64_t>(), n_tiles,
                     s.a.size(3), width, s.a.size(2), s.a.stride(0));
    } else if (s.a.scalar_type() == at::kFloat) {
      std::vector<const float*> b;
      for (const auto& bt : s.bts) b.push_back(bt.data_ptr<float>());
      lora_kernel<float>(static_cast<const float*>(x), static_cast<float*>(y), s.a.data_ptr<float>(), b, s.outs,
                         s.ranks.data_ptr<int32_t>(), rows.data_ptr<int64_t>(), tiles.data_ptr<int64_t>(), n_tiles,
                         s.a.size(3), width, s.a.size(2), s.a.stride(0));
    } else {
      std::vector<const uint16_t*> b;
      for (const auto& bt : s.bts) b.push_back(reinterpret_cast<const uint16_t*>(bt.data_ptr<at::BFloat16>()));
      lora_kernel<uint16_t>(static_cast<const uint16_t*>(x), static_cast<uint16_t*>(y),
                            reinterpret_cast<const uint16_t*>(s.a.data_ptr<at::BFloat16>()), b, s.outs,
                            s.ranks.data_ptr<int32_t>(), rows.data_ptr<int64_t>(), tiles.data_ptr<int64_t>(), n_tiles,
                            s.a.size(3), width, s.a.size(2), s.a.stride(0));
    }
  }

  // from Python (tests): the same entry as native callers, on tensors
  void apply(int64_t index, const at::Tensor& x, at::Tensor& y) const {
    TORCH_CHECK(x.is_contiguous() && y.is_contiguous() && x.size(0) == y.size(0), "contiguous x [T, in], y [T, out]");
    const int64_t* rw = rows.data_ptr<int64_t>();
    for (int64_t i = 0; i < rows.numel(); ++i) TORCH_CHECK(rw[i] >= 0 && rw[i] < x.size(0), "row out of range");
    run(index, x.data_ptr(), y.data_ptr());
  }
};

}  // namespace

extern "C" void leanserve_lora_step_apply(const void* step, int64_t index, const void* x, void* y) {
  static_cast<const Step*>(step)->run(index, x, y);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Slots, std::shared_ptr<Slots>>(m, "Slots")
      .def(py::init<>())
      .def("add", &Slots::add, py::arg("index"), py::arg("a"), py::arg("bts"), py::arg("ranks"),
           py::arg("a_scale") = py::none(), py::arg("bt_scales") = std::vector<at::Tensor>{});
  py::class_<Step>(m, "Step")
      .def(py::init<std::shared_ptr<Slots>, at::Tensor, at::Tensor>())
      .def("apply", &Step::apply)
      .def("address", [](const Step& s) { return reinterpret_cast<uintptr_t>(&s); });
  // void leanserve_lora_step_apply(const void* step, int64_t index, const void* x, void* y)
  m.def("step_apply_address", [] { return reinterpret_cast<uintptr_t>(&leanserve_lora_step_apply); });
  m.def("apply", &apply, "y[rows] += LoRA deltas of each row's adapter slot, all parts of a fused projection",
        py::arg("x"), py::arg("y"), py::arg("a"), py::arg("bts"), py::arg("ranks"), py::arg("rows"), py::arg("tiles"),
        py::arg("a_scale") = py::none(), py::arg("bt_scales") = std::vector<at::Tensor>{});
  m.def("pack", &pack, "an adapter's factors into its slot: A converted, B transposed, scaled and converted "
        "(int8: quantized per row, with their scales)", py::arg("slot"), py::arg("a_stacks"), py::arg("parts"),
        py::arg("a_src"), py::arg("bt_stacks"), py::arg("b_src"), py::arg("scales"),
        py::arg("a_scales") = std::vector<at::Tensor>{}, py::arg("bt_scales") = std::vector<at::Tensor>{});
}
