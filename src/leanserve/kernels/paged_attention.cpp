// Decode attention straight over the paged KV cache, for CPUs.
//
// Each decode row is one new query token of one sequence. Its keys and values live in
// whole blocks of the pool ([blocks, block_size, kv_heads, head_dim]) named by the row's
// block table. Gathering those blocks into a padded batch and calling SDPA copies every
// key and value once more per layer and pays the kernel's per-call overheads for a query
// of length one; here each sequence's task reads its blocks in place, once, and computes
// all query heads from each token's row of keys (grouped-query heads share a kv head).
// Every task only reads its own sequence's cache, so a row's result does not depend on
// which other sequences share the step (batch-invariant by construction).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "products_avx2.h"

bool amx_bf16_available();  // below, with the AMX linears
bool bf16_packed_available();
bool amx_int8_available();

namespace {

template <typename T>
inline float to_f(T x) { return static_cast<float>(x); }

// NaN / inf tests on the bits: std::isnan and std::isinf fold to false under -ffast-math.
inline uint32_t magnitude_bits(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof(u));
  return u & 0x7fffffffu;
}
inline bool is_nan_bits(float v) { return magnitude_bits(v) > 0x7f800000u; }
inline bool is_inf_or_nan_bits(float v) { return magnitude_bits(v) >= 0x7f800000u; }

// A row to float32. c10::BFloat16's own conversion has a branch that keeps GCC from
// vectorizing the loop; bf16 is the top half of a float32, so shift the bits instead.
template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

template <>
inline void load_row<c10::BFloat16>(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t j = 0; j < n; ++j) {
    const uint32_t u = static_cast<uint32_t>(bits[j]) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    dst[j] = f;
  }
}

#if defined(__AVX512BF16__)
extern "C" __m512 _ZGVeN16v_expf(__m512);  // glibc's libmvec expf, 16 lanes (what GCC vectorizes std::exp to)

#if defined(__AVX512VNNI__)
// acc += a (unsigned bytes) . w (signed bytes), 4 to a lane. GCC 12's builtin for this does
// not tie the accumulator to the output: in dp_tile (below) it added a register copy per
// instruction, and the int8 kernel ran slower than the bf16 one.
inline void dpbusd(__m512i& acc, __m512i a, __m512i w) { asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(w)); }
#endif

// 16 bf16 values (in the low bits of 32-bit lanes' top halves) widened to float32.
inline __m512 widen_bf16(__m256i b) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)); }

// SwiGLU of 16 columns, silu(g) * u from bf16 values, rounded once to bf16 (nearest even):
// silu_mul and the fused gate_up epilogue (bf16_linear_packed) both run this, so their numbers
// are the same bits.
inline __m256i silu_mul16(__m512 g, __m512 u) {
  const __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(_mm512_setzero_ps(), g));
  return (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)), u));
}

// A softmax's exponentials: sp[j] = exp(sp[j] - mx) for j in [0, n), returning their sum; 16
// at a time, the last n % 16 as one masked vector. GCC's vectorized loop left that tail to
// scalar expf calls: ~7 a query head and layer for rows of random length, ~2% of a bf16
// decode step at 64 rows.
inline float exp_sum16(float* sp, int64_t n, float mx) {
  const __m512 m = _mm512_set1_ps(mx);
  __m512 sum = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(_mm512_loadu_ps(sp + j), m));
    _mm512_storeu_ps(sp + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (j < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sp + j), m));
    _mm512_mask_storeu_ps(sp + j, k, e);
    sum = _mm512_mask_add_ps(sum, k, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
}
#endif

// Caches in int8 carry one float32 scale per (token, kv head): `ks`/`vs` [blocks, block_size,
// kv_heads], nullptr for caches in the model dtype. A key's dot product, and a value's
// weight, are multiplied by its scale.
template <typename scalar_t, typename cache_t>
void decode_kernel(const scalar_t* q, int64_t qs, const cache_t* kc, const cache_t* vc, const float* ks,
                   const float* vs, const int64_t* tables, const int64_t* lens, scalar_t* out, int64_t B, int64_t H,
                   int64_t Hkv, int64_t D, int64_t bs, int64_t W, int64_t window, float scale) {
  const int64_t g = H / Hkv;
  const int64_t row = Hkv * D;  // one token's keys (or values) of all kv heads, contiguous
  const int64_t blk_stride = bs * row;
  // One task per sequence: each token's row of all kv heads is read once, whole.
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(H * D), acc(H * D), rowf(row), scores;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t len = lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;
      scores.resize(H * n);
      for (int64_t j = 0; j < H * D; ++j) qf[j] = to_f(q[b * qs + j]) * scale;
      const int64_t* table = tables + b * W;
      for (int64_t t = first; t < len; ++t) {  // scores: one pass over the keys
        const int64_t slot = table[t / bs] * bs + t % bs;
        load_row(kc + slot * row, rowf.data(), row);
        for (int64_t h = 0; h < H; ++h) {
          const float* qh = qf.data() + h * D;
          const float* kh = rowf.data() + (h / g) * D;
          float s = 0.f;
          for (int64_t d = 0; d < D; ++d) s += qh[d] * kh[d];
          scores[h * n + (t - first)] = ks ? s * ks[slot * Hkv + h / g] : s;
        }
      }
      for (int64_t h = 0; h < H; ++h) {  // softmax per query head
        float* s = scores.data() + h * n;
        float m = -std::numeric_limits<float>::max();  // built with -ffast-math: no infinities
        for (int64_t j = 0; j < n; ++j) m = std::max(m, s[j]);
        float sum = 0.f;
        for (int64_t j = 0; j < n; ++j) { s[j] = std::exp(s[j] - m); sum += s[j]; }
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < n; ++j) s[j] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = first; t < len; ++t) {  // weighted values: one pass over the values
        const int64_t slot = table[t / bs] * bs + t % bs;
        load_row(vc + slot * row, rowf.data(), row);
        for (int64_t h = 0; h < H; ++h) {
          float p = scores[h * n + (t - first)];
          if (vs) p *= vs[slot * Hkv + h / g];
          const float* vh = rowf.data() + (h / g) * D;
          float* a = acc.data() + h * D;
          for (int64_t d = 0; d < D; ++d) a[d] += p * vh[d];
        }
      }
      for (int64_t j = 0; j < H * D; ++j) out[b * H * D + j] = static_cast<scalar_t>(acc[j]);
    }
  });
}


#if defined(__AVX512F__)
// The hot case, hand-vectorised: bf16 caches, head_dim = 16 * NV, G query heads per kv head.
// Each sequence streams its keys, then its values, once each.
inline __m512 load_bf16x16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline __m512 load16(const c10::BFloat16* p) { return load_bf16x16(p); }
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// Past a sequence's first block, a steady stream of requests kPrefetchTokens rows ahead,
// into L2: asking for each whole block at its start took about twice as long (a step of 32
// x 192 tokens: 20.4 vs 11.5 ms on one thread, 11.1 vs 6.4 ms on two). Always inlined: a
// call in the token loop makes the compiler spill every live vector register around it.
constexpr int64_t kPrefetchTokens = 16;  // 24 measured the same, 8 and 32 slower

template <typename C>
__attribute__((always_inline)) inline void prefetch_row(const C* cache, const int64_t* table, int64_t t,
                                                        int64_t len, int64_t bs, int64_t blk_stride, int64_t row) {
  if (t >= len) return;
  const char* r = reinterpret_cast<const char*>(cache + table[t / bs] * blk_stride + (t % bs) * row);
  for (int64_t c = 0; c < row * static_cast<int64_t>(sizeof(C)); c += 64) _mm_prefetch(r + c, _MM_HINT_T1);
}

// The value pass of the float paths: ov[h * NV + v] (h = kv head x G + i) += each token t in
// [first, len) times its weight w[h * ws + t - base], a block at a time, and within it one kv
// head at a time: that head's G x NV accumulators then stay in registers (all H x NV of them
// do not fit; kept in memory, each token's FMAs waited on store forwarding).
template <typename C, int NV, int G>
void weighted_values(const C* vc, const float* vs, const int64_t* table, int64_t first, int64_t len, int64_t bs,
                     int64_t Hkv, const float* w, int64_t ws, int64_t base, __m512* ov) {
  constexpr bool kScaled = std::is_same_v<C, int8_t>;
  constexpr int64_t D = 16 * NV;
  const int64_t row = Hkv * D, blk_stride = bs * row;
  for (int64_t blk = first / bs; blk <= (len - 1) / bs; ++blk) {
    const int64_t t0 = std::max(first, blk * bs), t1 = std::min(len, (blk + 1) * bs);
    const int64_t slot0 = table[blk] * bs - blk * bs;  // + t: token t's slot
    for (int64_t kh = 0; kh < Hkv; ++kh) {
      __m512 acc[G * NV];
      for (int j = 0; j < G * NV; ++j) acc[j] = ov[kh * G * NV + j];
      for (int64_t t = t0; t < t1; ++t) {
        if (kh == 0) prefetch_row(vc, table, t + kPrefetchTokens, len, bs, blk_stride, row);
        const int64_t slot = slot0 + t;
        const C* vp = vc + slot * row + kh * D;
        __m512 vv[NV];
        for (int v = 0; v < NV; ++v) vv[v] = load16(vp + v * 16);
        const float vscale = kScaled ? vs[slot * Hkv + kh] : 1.f;
        for (int i = 0; i < G; ++i) {
          const float p = w[(kh * G + i) * ws + t - base];
          const __m512 pv = _mm512_set1_ps(kScaled ? p * vscale : p);
          for (int v = 0; v < NV; ++v) acc[i * NV + v] = _mm512_fmadd_ps(pv, vv[v], acc[i * NV + v]);
        }
      }
      for (int j = 0; j < G * NV; ++j) ov[kh * G * NV + j] = acc[j];
    }
  }
}

// 16 floats to bf16 as c10::BFloat16(float) rounds them: to nearest even, a NaN to 0x7FC0
// (in integer lanes: AVX-512F only, and no NaN test for -ffast-math to fold away)
inline __m256i bf16x16_c10(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7FFF));
  const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF)),
                                                _mm512_set1_epi32(0x7F800000));
  const __m512i r = _mm512_mask_mov_epi32(_mm512_srli_epi32(_mm512_add_epi32(u, bias), 16), nan, _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

// out[h * D + d] = ov[h][d] x inv[h], rounded to bf16, for H heads of 16 x NV dims (vector
// stores: with a prompt's rows attending as decodes, the scalar conversion cost as much as
// the attention of a short row)
template <int NV>
void store_heads(const __m512* ov, const float* inv, int64_t H, c10::BFloat16* out) {
  for (int64_t h = 0; h < H; ++h) {
    const __m512 iv = _mm512_set1_ps(inv[h]);
    for (int v = 0; v < NV; ++v)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (h * NV + v) * 16),
                          bf16x16_c10(_mm512_mul_ps(ov[h * NV + v], iv)));
  }
}

// C: the cache's element type, bf16 or int8 (then with per-(token, kv head) scales ks, vs).
template <typename C, int NV, int G>
void decode_bf16_avx512(const c10::BFloat16* q, int64_t qs, const C* kc, const C* vc, const float* ks,
                        const float* vs, const int64_t* tables, const int64_t* lens, c10::BFloat16* out, int64_t B,
                        int64_t Hkv, int64_t bs, int64_t W, int64_t window, float scale) {
  constexpr bool kScaled = std::is_same_v<C, int8_t>;
  constexpr int64_t D = 16 * NV;
  const int64_t H = Hkv * G;
  const int64_t row = Hkv * D;  // one token's keys of all kv heads: contiguous
  const int64_t blk_stride = bs * row;
  // One task per sequence, so each block (bs tokens x all kv heads) is read front to back
  // in one stream: reading one kv head's slice per task ran at a third of the bandwidth.
  // Threads take the next sequence as they finish one, rather than a fixed half each.
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(B, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    std::vector<float> scores;
    std::vector<__m512> qv(H * NV), ov(H * NV);
    for (int64_t b; (b = next.fetch_add(1, std::memory_order_relaxed)) < B;) {
      const int64_t len = lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t n = len - first;
      scores.resize(H * n);
      const int64_t* table = tables + b * W;
      const int64_t last_blk = (len - 1) / bs;
      // Blocks are scattered over the pool, so the hardware prefetcher cannot guess the
      // next one: ask for it ahead (decode attention is bound by reads).
      // (always inlined: a call would make the compiler spill every live vector register)
      auto prefetch = [&](const C* cache, int64_t blk) __attribute__((always_inline)) {
        if (blk > last_blk) return;
        const char* base = reinterpret_cast<const char*>(cache + table[blk] * blk_stride);
        for (int64_t c = 0; c < blk_stride * static_cast<int64_t>(sizeof(C)); c += 64) _mm_prefetch(base + c, _MM_HINT_T0);
      };
      const __m512 sc = _mm512_set1_ps(scale);
      for (int64_t h = 0; h < H; ++h)
        for (int v = 0; v < NV; ++v) qv[h * NV + v] = _mm512_mul_ps(load_bf16x16(q + b * qs + h * D + v * 16), sc);
      std::vector<float> mx(H, -std::numeric_limits<float>::max());  // -ffast-math: no infinities
      prefetch(kc, first / bs);
      // Walk whole blocks rather than dividing each position by the block size.
      for (int64_t t = first, blk = first / bs, off = first % bs; t < len; ++t) {
        prefetch_row(kc, table, t + kPrefetchTokens, len, bs, blk_stride, row);
        const int64_t slot = table[blk] * bs + off;
        const C* k = kc + slot * row;
        if (++off == bs) off = 0, ++blk;
        for (int64_t kh = 0; kh < Hkv; ++kh) {
          __m512 kv[NV];
          for (int v = 0; v < NV; ++v) kv[v] = load16(k + kh * D + v * 16);
          for (int i = 0; i < G; ++i) {
            const int64_t h = kh * G + i;
            __m512 acc = _mm512_mul_ps(qv[h * NV], kv[0]);
            for (int v = 1; v < NV; ++v) acc = _mm512_fmadd_ps(qv[h * NV + v], kv[v], acc);
            float sv = _mm512_reduce_add_ps(acc);
            if constexpr (kScaled) sv *= ks[slot * Hkv + kh];
            scores[h * n + (t - first)] = sv;
            mx[h] = std::max(mx[h], sv);
          }
        }
      }
      std::vector<float> inv(H);
      for (int64_t h = 0; h < H; ++h) {
        float* sp = scores.data() + h * n;
        inv[h] = 1.f / exp_sum16(sp, n, mx[h]);
      }
      std::fill(ov.begin(), ov.end(), _mm512_setzero_ps());
      prefetch(vc, first / bs);
      weighted_values<C, NV, G>(vc, vs, table, first, len, bs, Hkv, scores.data(), n, first, ov.data());
      store_heads<NV>(ov.data(), inv.data(), H, out + b * H * D);
    }
  });
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// ---- Decode attention over an int8 cache on VNNI dot products ------------------------------
// decode_bf16_avx512 widens every int8 key and value to float32 and sums each key's products
// across the register with a shuffle tree (~45 instructions per key and kv head), so an int8
// cache, with half of bf16's bytes, ran no faster than bf16 (64 sequences x 192 tokens x 30
// layers: ~18 ms either way, ~12 with every block in cache). Here both passes multiply bytes
// by bytes on VPDPBUSD, in exact int32 sums:
// - keys: each query head (times the softmax scale) as 16-bit integers, q ~= qs * (256 hi +
//   lo) with hi, lo signed bytes (15 bits against bf16's 8: the scores keep float precision),
//   against 16 keys at once, one key per dword lane (key_rows16); the keys go in as unsigned
//   bytes (sign bit flipped) and 128 x sum(q) comes off after;
// - values: each token's softmax weight times its value scale as a 16-bit fixed point of the
//   head's largest (hi, lo unsigned bytes), against 4 tokens' values interleaved byte by byte,
//   one dimension per dword lane (value_rows16). Weights under 1 / 65535 of the largest round
//   to zero.
// The same 64 x 192 x 30 step: ~10 ms from memory, ~8 with every block in cache; the outputs
// match the float path's to a bf16 rounding step. A row's result does not depend on the
// other rows. The value sums are int32: up to 65,536 keys (longer windows take the float path).

// One kv head's 64-byte part of 16 tokens' values (rows `row` bytes apart) into the sums of
// its G query heads: acc[i * 8 + half * 4 + c] (c < 2: the weights' high bytes, 2 + c: low).
// A function of its own, so its 12 sums stay in registers (inlined into the sequence loop,
// they lived on the stack).
template <int G, int HALF>
__attribute__((noinline)) void value_rows16(const int8_t* pr, int64_t row, const uint8_t* whi, const uint8_t* wlo,
                                            int64_t span, __m512i* acc) {
  __m512i a[G][4];
  for (int i = 0; i < G; ++i)
    for (int c = 0; c < 4; ++c) a[i][c] = acc[i * 8 + HALF * 4 + c];
  for (int t4 = 0; t4 < 16; t4 += 4, pr += 4 * row) {
    const __m512i r0 = _mm512_loadu_si512(pr), r1 = _mm512_loadu_si512(pr + row);
    const __m512i r2 = _mm512_loadu_si512(pr + 2 * row), r3 = _mm512_loadu_si512(pr + 3 * row);
    const __m512i s0 = HALF ? _mm512_unpackhi_epi8(r0, r1) : _mm512_unpacklo_epi8(r0, r1);
    const __m512i s2 = HALF ? _mm512_unpackhi_epi8(r2, r3) : _mm512_unpacklo_epi8(r2, r3);
    // x0 / x1, 128-bit lane L, dword i: dimension 16 L + 8 HALF + 4 c + i (c = 0 / 1) of the 4 tokens
    const __m512i x0 = _mm512_unpacklo_epi16(s0, s2), x1 = _mm512_unpackhi_epi16(s0, s2);
    for (int i = 0; i < G; ++i) {
      int32_t w4h, w4l;
      std::memcpy(&w4h, whi + i * span + t4, 4);
      std::memcpy(&w4l, wlo + i * span + t4, 4);
      const __m512i wh = _mm512_set1_epi32(w4h), wl = _mm512_set1_epi32(w4l);
      dpbusd(a[i][0], wh, x0);
      dpbusd(a[i][1], wh, x1);
      dpbusd(a[i][2], wl, x0);
      dpbusd(a[i][3], wl, x1);
    }
  }
  for (int i = 0; i < G; ++i)
    for (int c = 0; c < 4; ++c) acc[i * 8 + HALF * 4 + c] = a[i][c];
}

// Four 64-byte rows interleaved by dwords within each 128-bit lane: u[c], lane L, dword j =
// row j's dword 4L + c (the key passes' layout: one key per dword lane, four per lane set).
inline void interleave4(const __m512i* r, __m512i* u) {
  const __m512i t0 = _mm512_unpacklo_epi32(r[0], r[1]), t1 = _mm512_unpackhi_epi32(r[0], r[1]);
  const __m512i t2 = _mm512_unpacklo_epi32(r[2], r[3]), t3 = _mm512_unpackhi_epi32(r[2], r[3]);
  u[0] = _mm512_unpacklo_epi64(t0, t2);
  u[1] = _mm512_unpackhi_epi64(t0, t2);
  u[2] = _mm512_unpacklo_epi64(t1, t3);
  u[3] = _mm512_unpackhi_epi64(t1, t3);
}

// 16 keys' 64-byte parts (rows `row` bytes apart) against G query heads' 16-bit parts:
// out[i] += 256 x (hi sums) + (lo sums), one lane per key (keys as unsigned bytes, so still
// 128 x sum(q) over). The rows are interleaved within 128-bit lanes only (u[4g + c], lane L:
// keys 4g..4g+3 at dword 4L + c of the row); the query's dwords come permuted to match
// (qv[c]: dword 4L + c in lane L's four; qv[4 + c]: the low parts), and the four lanes'
// partial sums are added across at the end: fewer live registers than a full transpose.
template <int G>
__attribute__((noinline)) void key_rows16(const int8_t* kb, int64_t row, const __m512i* qv, int64_t qstride,
                                          const char* next, __m512i* out) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512i u[16];
  for (int g = 0; g < 4; ++g) {
    __m512i r[4];
    for (int j = 0; j < 4; ++j) {
      r[j] = _mm512_xor_si512(_mm512_loadu_si512(kb + (4 * g + j) * row), flip);
      if (next) _mm_prefetch(next + (4 * g + j) * row, _MM_HINT_T1);
    }
    interleave4(r, u + 4 * g);
  }
  for (int i = 0; i < G; ++i) {
    const __m512i* q = qv + i * qstride;
    __m512i comb[4];
    for (int g = 0; g < 4; ++g) {
      __m512i h = _mm512_setzero_si512(), l = _mm512_setzero_si512();
      for (int c = 0; c < 4; ++c) {
        dpbusd(h, u[4 * g + c], q[c]);
        dpbusd(l, u[4 * g + c], q[4 + c]);
      }
      comb[g] = _mm512_add_epi32(_mm512_slli_epi32(h, 8), l);
    }
    // lane (4g + i) of the result: the sum of comb[g]'s four 128-bit lanes' dword i
    const __m512i s01 = _mm512_add_epi32(_mm512_shuffle_i32x4(comb[0], comb[1], 0x44), _mm512_shuffle_i32x4(comb[0], comb[1], 0xEE));
    const __m512i s23 = _mm512_add_epi32(_mm512_shuffle_i32x4(comb[2], comb[3], 0x44), _mm512_shuffle_i32x4(comb[2], comb[3], 0xEE));
    out[i] = _mm512_add_epi32(out[i], _mm512_add_epi32(_mm512_shuffle_i32x4(s01, s23, 0x88), _mm512_shuffle_i32x4(s01, s23, 0xDD)));
  }
}
// How far ahead decode_int8_vnni asks for a sequence's lines (into L2; T0 and whole blocks
// at once measured slower, as for decode_bf16_avx512): 16, 32 and 48 tokens measured alike.
constexpr int64_t kAhead = 32;

template <int NV, int G>
void decode_int8_vnni(const c10::BFloat16* q, int64_t qs, const int8_t* kc, const int8_t* vc, const float* ks,
                      const float* vs, const int64_t* tables, const int64_t* lens, c10::BFloat16* out, int64_t B,
                      int64_t Hkv, int64_t bs, int64_t W, int64_t window, float scale) {
  constexpr int64_t D = 16 * NV;
  constexpr int KZ = NV / 4;  // 64-byte parts of a kv head's row
  const int64_t H = Hkv * G, row = Hkv * D, blk_stride = bs * row;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(B, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    std::vector<float> scores, vsc;
    std::vector<uint8_t> whi, wlo;
    std::vector<int32_t> qhi(D / 4), qlo(D / 4), corr(H);
    std::vector<__m512i> qv(H * KZ * 8);
    std::vector<float> qscale(H), osc(H);
    std::vector<__m512i> acc(H * KZ * 8);
    const __m512i lane_index = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int64_t b; (b = next.fetch_add(1, std::memory_order_relaxed)) < B;) {
      const int64_t len = lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t b0 = first / bs, b1 = (len - 1) / bs;  // the blocks read
      const int64_t start = b0 * bs, span = (b1 + 1) * bs - start, lo = first - start, hi = len - start;
      const int64_t* table = tables + b * W;
      scores.resize(H * span);
      vsc.resize(Hkv * span);
      whi.resize(H * span);
      wlo.resize(H * span);
      // the query heads as 16-bit integers: hi = floor((q16 + 128) / 256), lo = q16 - 256 hi
      for (int64_t h = 0; h < H; ++h) {
        float qf[D], amax = 0.f;
        for (int64_t d = 0; d < D; ++d) {
          qf[d] = static_cast<float>(q[b * qs + h * D + d]) * scale;
          amax = std::max(amax, std::abs(qf[d]));
        }
        const float inv = amax > 0.f ? 32639.f / amax : 0.f;
        int8_t* ph = reinterpret_cast<int8_t*>(qhi.data());
        int8_t* pl = reinterpret_cast<int8_t*>(qlo.data());
        int32_t sum = 0;
        for (int64_t d = 0; d < D; ++d) {
          const int32_t q16 = static_cast<int32_t>(std::nearbyint(qf[d] * inv));
          const int32_t h8 = (q16 + 128) >> 8;
          ph[d] = static_cast<int8_t>(h8);
          pl[d] = static_cast<int8_t>(q16 - 256 * h8);
          sum += q16;
        }
        corr[h] = 128 * sum;
        for (int z = 0; z < KZ; ++z)  // key_rows16's order: qv[c], lane 4L + i: dword 4L + c
          for (int c = 0; c < 4; ++c) {
            const __m512i idx = _mm512_add_epi32(_mm512_and_si512(lane_index, _mm512_set1_epi32(~3)), _mm512_set1_epi32(c));
            qv[(h * KZ + z) * 8 + c] = _mm512_permutexvar_epi32(idx, _mm512_loadu_si512(qhi.data() + z * 16));
            qv[(h * KZ + z) * 8 + 4 + c] = _mm512_permutexvar_epi32(idx, _mm512_loadu_si512(qlo.data() + z * 16));
          }
        qscale[h] = amax / 32639.f;
      }
      // keys, 16 at a time: scores[h * span + position from start] (every slot of the blocks
      // read; only [lo, hi) is used). The blocks are scattered over the pool, so the next 16
      // tokens' lines are asked for while these are summed, a kv head's share at a time, with
      // their key and value scales (and, at the end, the first values).
      auto rows_at = [&](const int8_t* cache, int64_t pos) { return cache + (table[pos / bs] * bs + pos % bs) * row; };
      auto scales_at = [&](const float* sc, int64_t pos) { return sc + (table[pos / bs] * bs + pos % bs) * Hkv; };
      const int64_t end = start + span;
      auto prefetch_scales = [&](int64_t pos) {  // 16 tokens' key and value scales
        for (int64_t c = 0; c < 16 * Hkv * 4; c += 64) {
          _mm_prefetch(reinterpret_cast<const char*>(scales_at(ks, pos)) + c, _MM_HINT_T1);
          _mm_prefetch(reinterpret_cast<const char*>(scales_at(vs, pos)) + c, _MM_HINT_T1);
        }
      };
      for (int64_t pk = start; pk < std::min(end, start + kAhead); pk += 16) {  // the first lines
        const char* k = reinterpret_cast<const char*>(rows_at(kc, pk));
        for (int64_t c = 0; c < 16 * row; c += 64) _mm_prefetch(k + c, _MM_HINT_T1);
        prefetch_scales(pk);
      }
      for (int64_t p = start; p < end; p += 16) {
        const int8_t* kb = rows_at(kc, p);
        const int64_t pk = p + kAhead;  // the position whose lines are asked for
        const int8_t* nk = pk < end ? rows_at(kc, pk) : pk - end < span ? rows_at(vc, start + pk - end) : nullptr;
        if (pk < end) prefetch_scales(pk);
        const float* ksp = scales_at(ks, p);
        for (int64_t kh = 0; kh < Hkv; ++kh) {
          __m512i sums[G];
          for (int i = 0; i < G; ++i) sums[i] = _mm512_setzero_si512();
          for (int z = 0; z < KZ; ++z)
            key_rows16<G>(kb + kh * D + z * 64, row, qv.data() + (kh * G * KZ + z) * 8, KZ * 8,
                          nk ? reinterpret_cast<const char*>(nk + kh * D + z * 64) : nullptr, sums);
          const __m512 kscale = _mm512_i32gather_ps(_mm512_mullo_epi32(lane_index, _mm512_set1_epi32(static_cast<int32_t>(Hkv))),
                                                    ksp + kh, 4);
          for (int i = 0; i < G; ++i) {
            const int64_t h = kh * G + i;
            const __m512i s = _mm512_sub_epi32(sums[i], _mm512_set1_epi32(corr[h]));
            _mm512_storeu_ps(scores.data() + h * span + p - start,
                             _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(_mm512_set1_ps(qscale[h]), kscale)));
          }
        }
      }
      // value scales by position (a block's are [bs, Hkv]); the softmax weights times them,
      // as 16-bit fixed point of the head's largest
      for (int64_t blk = b0; blk <= b1; ++blk) {
        const float* v = vs + table[blk] * bs * Hkv;
        for (int64_t o = 0; o < bs; ++o)
          for (int64_t kh = 0; kh < Hkv; ++kh) vsc[kh * span + (blk - b0) * bs + o] = v[o * Hkv + kh];
      }
      for (int64_t h = 0; h < H; ++h) {
        float* sp = scores.data() + h * span;
        const float* vp = vsc.data() + (h / G) * span;
        float mx = -std::numeric_limits<float>::max();
        for (int64_t j = lo; j < hi; ++j) mx = std::max(mx, sp[j]);
        // exp_sum16's loop, the weights times their value scales on the way (lanes past hi: 0)
        __m512 vsum = _mm512_setzero_ps(), vwmax = vsum, vwsum = vsum;
        for (int64_t j = lo; j < hi; j += 16) {
          const __mmask16 k = hi - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (hi - j)) - 1);
          const __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sp + j), _mm512_set1_ps(mx)));
          const __m512 w = _mm512_maskz_mul_ps(k, e, _mm512_maskz_loadu_ps(k, vp + j));
          _mm512_mask_storeu_ps(sp + j, k, w);
          vsum = _mm512_mask_add_ps(vsum, k, vsum, e);
          vwmax = _mm512_max_ps(vwmax, w);
          vwsum = _mm512_add_ps(vwsum, w);
        }
        const float sum = _mm512_reduce_add_ps(vsum), wmax = _mm512_reduce_max_ps(vwmax), wsum = _mm512_reduce_add_ps(vwsum);
        std::fill(sp, sp + lo, 0.f);  // the positions outside the window weigh nothing
        std::fill(sp + hi, sp + span, 0.f);
        const __m512 inv = _mm512_set1_ps(wmax > 0.f ? 65535.f / wmax : 0.f);
        uint8_t* ph = whi.data() + h * span;
        uint8_t* pl = wlo.data() + h * span;
        for (int64_t j = 0; j < span; j += 16) {  // span: whole blocks, 16 positions each at least
          const __m512i w16 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(sp + j), inv));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(ph + j), _mm512_cvtepi32_epi8(_mm512_srli_epi32(w16, 8)));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(pl + j),
                           _mm512_cvtepi32_epi8(_mm512_and_si512(w16, _mm512_set1_epi32(255))));
        }
        // a NaN or infinite score or scale makes the head's result NaN, as the float path does
        osc[h] = is_inf_or_nan_bits(wsum) ? std::numeric_limits<float>::quiet_NaN() : wmax / 65535.f / sum;
      }
      std::fill(acc.begin(), acc.end(), _mm512_setzero_si512());
      // values, 16 tokens at a time, one kv head (and 64-byte part) at a time
      for (int64_t p = start; p < end; p += 16) {
        const int8_t* vb = rows_at(vc, p);
        const int8_t* nv = p + kAhead < end ? rows_at(vc, p + kAhead) : nullptr;
        for (int64_t kh = 0; kh < Hkv; ++kh)
          for (int z = 0; z < KZ; ++z) {
            if (nv)
              for (int j = 0; j < 16; ++j) _mm_prefetch(reinterpret_cast<const char*>(nv + j * row + kh * D + z * 64), _MM_HINT_T1);
            // two passes over the 16 tokens, each over half the dimensions (the bytes the
            // low / high unpacks take), so a pass's G x 4 sums stay in registers
            const int8_t* pr = vb + kh * D + z * 64;
            const int64_t w0 = kh * G * span + p - start;
            __m512i* ap = acc.data() + (z * H + kh * G) * 8;
            value_rows16<G, 0>(pr, row, whi.data() + w0, wlo.data() + w0, span, ap);
            value_rows16<G, 1>(pr, row, whi.data() + w0, wlo.data() + w0, span, ap);
          }
      }
      for (int64_t h = 0; h < H; ++h) {
        c10::BFloat16* o = out + (b * H + h) * D;
        const __m512 f = _mm512_set1_ps(osc[h]);
        for (int z = 0; z < KZ; ++z) {
          __m512 V[4];  // V[2 half + c], lane 4L + i: dimension z * 64 + 16 L + 8 half + 4 c + i
          for (int half = 0; half < 2; ++half)
            for (int c = 0; c < 2; ++c) {
              const __m512i* a = acc.data() + (z * H + h) * 8 + half * 4;
              V[2 * half + c] = _mm512_mul_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(a[c]), _mm512_set1_ps(256.f),
                                                              _mm512_cvtepi32_ps(a[2 + c])), f);
            }
          // dimensions z * 64 + 16 L .. + 15 are the 128-bit lanes L of V[0..3]: a 4 x 4 transpose of lanes
          const __m512 t0 = _mm512_shuffle_f32x4(V[0], V[1], 0x44), t1 = _mm512_shuffle_f32x4(V[0], V[1], 0xEE);
          const __m512 t2 = _mm512_shuffle_f32x4(V[2], V[3], 0x44), t3 = _mm512_shuffle_f32x4(V[2], V[3], 0xEE);
          const __m512 rows[4] = {_mm512_shuffle_f32x4(t0, t2, 0x88), _mm512_shuffle_f32x4(t0, t2, 0xDD),
                                  _mm512_shuffle_f32x4(t1, t3, 0x88), _mm512_shuffle_f32x4(t1, t3, 0xDD)};
          for (int L = 0; L < 4; ++L)
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + z * 64 + 16 * L), bf16x16_c10(rows[L]));
        }
      }
    }
  });
}
#if defined(__AVX512BF16__)
// ---- Decode attention over a bf16 cache on VDPBF16PS -----------------------------------------
// decode_bf16_avx512's key pass widens every key to float32 and sums each key's products
// across the register with a shuffle tree, per key and query head: most of its time. Here the
// keys go as key_rows16 takes int8 ones: 16 keys' 64-byte parts (32 dims, 16 bf16 pairs)
// interleaved within 128-bit lanes, so one VDPBF16PS against the query's matching pairs
// (permuted to match) adds two dims' products for 16 keys at once, and the four lanes are
// added across once per 16 keys and query head. Scores are q . k in float32 (the pairs summed
// in that order), then scaled: not the same bits as decode_bf16_avx512, which scales q first.
// The value pass is decode_bf16_avx512's (weighted_values: float32 weights). A row's result
// does not depend on the other rows.

// GI query heads' scores for 16 keys (rows `row` elements apart, KZ 32-dim parts each):
// out[i], lane j: key j. qv[(i * KZ + z) * 4 + c], lane 4L + m: the query's pair 4L + c of part z.
template <int GI, int KZ>
__attribute__((noinline)) void bf16_key_rows16(const c10::BFloat16* kb, int64_t row, const __m512i* qv,
                                               const char* next, __m512* out) {
  __m512 comb[GI][4];
  for (int i = 0; i < GI; ++i)
    for (int g = 0; g < 4; ++g) comb[i][g] = _mm512_setzero_ps();
  for (int z = 0; z < KZ; ++z) {
    __m512i u[16];
    for (int g = 0; g < 4; ++g) {
      __m512i r[4];
      for (int j = 0; j < 4; ++j) {
        r[j] = _mm512_loadu_si512(kb + (4 * g + j) * row + z * 32);
        if (next) _mm_prefetch(next + ((4 * g + j) * row + z * 32) * 2, _MM_HINT_T1);
      }
      interleave4(r, u + 4 * g);
    }
    for (int i = 0; i < GI; ++i)
      for (int g = 0; g < 4; ++g)
        for (int c = 0; c < 4; ++c)
          comb[i][g] = _mm512_dpbf16_ps(comb[i][g], (__m512bh)u[4 * g + c], (__m512bh)qv[(i * KZ + z) * 4 + c]);
  }
  for (int i = 0; i < GI; ++i) {  // lane 4g + m: the sum of comb[i][g]'s four 128-bit lanes' dword m
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(comb[i][0], comb[i][1], 0x44), _mm512_shuffle_f32x4(comb[i][0], comb[i][1], 0xEE));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(comb[i][2], comb[i][3], 0x44), _mm512_shuffle_f32x4(comb[i][2], comb[i][3], 0xEE));
    out[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
  }
}

template <int NV, int G>
void decode_bf16_dp(const c10::BFloat16* q, int64_t qs, const c10::BFloat16* kc, const c10::BFloat16* vc,
                    const int64_t* tables, const int64_t* lens, c10::BFloat16* out, int64_t B, int64_t Hkv,
                    int64_t bs, int64_t W, int64_t window, float scale) {
  constexpr int64_t D = 16 * NV;
  constexpr int KZ = NV / 2;  // 32-dim parts of a kv head's row
  const int64_t H = Hkv * G, row = Hkv * D;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(B, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    std::vector<float> scores, inv(H);
    std::vector<__m512i> qv(H * KZ * 4);
    std::vector<__m512> ov(H * NV);
    const __m512i lane_index = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512 sc = _mm512_set1_ps(scale);
    for (int64_t b; (b = next.fetch_add(1, std::memory_order_relaxed)) < B;) {
      const int64_t len = lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t start = first / bs * bs, span = ((len - 1) / bs + 1) * bs - start, end = start + span;
      const int64_t* table = tables + b * W;
      scores.resize(H * span);
      for (int64_t h = 0; h < H; ++h)  // bf16_key_rows16's order: qv[c], lane 4L + m: pair 4L + c
        for (int z = 0; z < KZ; ++z)
          for (int c = 0; c < 4; ++c) {
            const __m512i idx = _mm512_add_epi32(_mm512_and_si512(lane_index, _mm512_set1_epi32(~3)), _mm512_set1_epi32(c));
            qv[(h * KZ + z) * 4 + c] = _mm512_permutexvar_epi32(idx, _mm512_loadu_si512(q + b * qs + h * D + z * 32));
          }
      auto rows_at = [&](const c10::BFloat16* cache, int64_t pos) { return cache + (table[pos / bs] * bs + pos % bs) * row; };
      for (int64_t pk = start; pk < std::min(end, start + kAhead); pk += 16) {  // the first lines
        const char* k = reinterpret_cast<const char*>(rows_at(kc, pk));
        for (int64_t c = 0; c < 16 * row * 2; c += 64) _mm_prefetch(k + c, _MM_HINT_T1);
      }
      // keys, 16 at a time: scores[h * span + position from start] (every slot of the blocks
      // read; only [first, len) is used), the lines kAhead tokens on asked for meanwhile
      for (int64_t p = start; p < end; p += 16) {
        const c10::BFloat16* kb = rows_at(kc, p);
        const int64_t pk = p + kAhead;
        const c10::BFloat16* nk = pk < end ? rows_at(kc, pk) : pk - end < span ? rows_at(vc, start + pk - end) : nullptr;
        for (int64_t kh = 0; kh < Hkv; ++kh) {
          __m512 s[G];
          const char* nx = nk ? reinterpret_cast<const char*>(nk + kh * D) : nullptr;
          for (int i0 = 0; i0 < G; i0 += 3) {  // three query heads a call: their 12 sums stay in registers
            const __m512i* qh = qv.data() + (kh * G + i0) * KZ * 4;
            switch (std::min(3, G - i0)) {
              case 1: bf16_key_rows16<1, KZ>(kb + kh * D, row, qh, nx, s + i0); break;
              case 2: bf16_key_rows16<2, KZ>(kb + kh * D, row, qh, nx, s + i0); break;
              default: bf16_key_rows16<3, KZ>(kb + kh * D, row, qh, nx, s + i0); break;
            }
            nx = nullptr;
          }
          for (int i = 0; i < G; ++i) _mm512_storeu_ps(scores.data() + (kh * G + i) * span + p - start, _mm512_mul_ps(s[i], sc));
        }
      }
      for (int64_t h = 0; h < H; ++h) {
        float* sp = scores.data() + h * span - start;  // sp[t]: token t
        float mx = -std::numeric_limits<float>::max();  // -ffast-math: no infinities
        for (int64_t t = first; t < len; ++t) mx = std::max(mx, sp[t]);
        inv[h] = 1.f / exp_sum16(sp + first, len - first, mx);
      }
      std::fill(ov.begin(), ov.end(), _mm512_setzero_ps());
      weighted_values<c10::BFloat16, NV, G>(vc, nullptr, table, first, len, bs, Hkv, scores.data(), span, start, ov.data());
      store_heads<NV>(ov.data(), inv.data(), H, out + b * H * D);
    }
  });
}
#endif
#endif

#if defined(__x86_64__)
template <int NV, int G>
void decode_bf16_amx(const c10::BFloat16* q, int64_t qs, const c10::BFloat16* kc, const c10::BFloat16* vc,
                     const int64_t* tables, const int64_t* lens, c10::BFloat16* out, int64_t B, int64_t Hkv,
                     int64_t bs, int64_t W, int64_t window, float scale);
#endif

// LEANSERVE_AMX_DECODE=0: the AVX-512 key pass instead (for comparisons)
inline bool amx_decode_off() {
  static const bool off = [] {
    const char* env = std::getenv("LEANSERVE_AMX_DECODE");
    return env != nullptr && std::string(env) == "0";
  }();
  return off;
}

// LEANSERVE_INT8_DECODE=float: int8 caches through decode_bf16_avx512 (for comparisons)
inline bool int8_decode_float() {
  static const bool on = [] {
    const char* env = std::getenv("LEANSERVE_INT8_DECODE");
    return env != nullptr && std::string(env) == "float";
  }();
  return on;
}

// LEANSERVE_BF16_DECODE=float: bf16 caches through decode_bf16_avx512 where the tiles are
// absent (for comparisons)
inline bool bf16_decode_float() {
  static const bool on = [] {
    const char* env = std::getenv("LEANSERVE_BF16_DECODE");
    return env != nullptr && std::string(env) == "float";
  }();
  return on;
}

template <typename C, int NV>
bool dispatch_groups(int64_t g, const c10::BFloat16* q, int64_t qs, const C* kc, const C* vc, const float* ks,
                     const float* vs, const int64_t* tables, const int64_t* lens, c10::BFloat16* out, int64_t B,
                     int64_t Hkv, int64_t bs, int64_t W, int64_t window, float scale) {
#if defined(__x86_64__)
  // bf16 caches: the scores on AMX tiles when all query heads fit one tile's 16 columns
  if constexpr (std::is_same_v<C, c10::BFloat16>) {
    if (Hkv * g <= 16 && bs % 16 == 0 && amx_bf16_available() && !amx_decode_off()) {
      switch (g) {
#define LEANSERVE_G(N) case N: decode_bf16_amx<NV, N>(q, qs, kc, vc, tables, lens, out, B, Hkv, bs, W, window, scale); return true;
        LEANSERVE_G(1) LEANSERVE_G(2) LEANSERVE_G(3) LEANSERVE_G(4) LEANSERVE_G(5) LEANSERVE_G(6) LEANSERVE_G(7) LEANSERVE_G(8)
#undef LEANSERVE_G
        default: break;
      }
    }
  }
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
  // bf16 caches without the tiles: the scores on VDPBF16PS, for whole 16-token chunks
  if constexpr (std::is_same_v<C, c10::BFloat16>) {
    if (bs % 16 == 0 && !bf16_decode_float()) {
      switch (g) {
#define LEANSERVE_G(N) case N: decode_bf16_dp<NV, N>(q, qs, kc, vc, tables, lens, out, B, Hkv, bs, W, window, scale); return true;
        LEANSERVE_G(1) LEANSERVE_G(2) LEANSERVE_G(3) LEANSERVE_G(4) LEANSERVE_G(5) LEANSERVE_G(6) LEANSERVE_G(7) LEANSERVE_G(8)
#undef LEANSERVE_G
        default: break;
      }
    }
  }
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  // int8 caches: on VNNI dot products, for whole 16-token chunks and windows of up to 65,536 keys
  if constexpr (std::is_same_v<C, int8_t>) {
    int64_t longest = 0;
    for (int64_t b = 0; b < B; ++b) longest = std::max(longest, lens[b]);
    if (window > 0) longest = std::min(longest, window);
    if (bs % 16 == 0 && longest <= 65536 && !int8_decode_float()) {
      switch (g) {
#define LEANSERVE_G(N) case N: decode_int8_vnni<NV, N>(q, qs, kc, vc, ks, vs, tables, lens, out, B, Hkv, bs, W, window, scale); return true;
        LEANSERVE_G(1) LEANSERVE_G(2) LEANSERVE_G(3) LEANSERVE_G(4) LEANSERVE_G(5) LEANSERVE_G(6) LEANSERVE_G(7) LEANSERVE_G(8)
#undef LEANSERVE_G
        default: break;
      }
    }
  }
#endif
  switch (g) {
#define LEANSERVE_G(N) case N: decode_bf16_avx512<C, NV, N>(q, qs, kc, vc, ks, vs, tables, lens, out, B, Hkv, bs, W, window, scale); return true;
    LEANSERVE_G(1) LEANSERVE_G(2) LEANSERVE_G(3) LEANSERVE_G(4) LEANSERVE_G(5) LEANSERVE_G(6) LEANSERVE_G(7) LEANSERVE_G(8)
#undef LEANSERVE_G
    default: return false;
  }
}

// True if the hand-vectorised path took the call (bf16 queries, head_dim 64 or 128, <= 8 groups).
template <typename C>
bool decode_bf16_fast(const c10::BFloat16* q, int64_t qs, const C* kc, const C* vc, const float* ks, const float* vs,
                      const int64_t* tables, const int64_t* lens, c10::BFloat16* out, int64_t B, int64_t H,
                      int64_t Hkv, int64_t D, int64_t bs, int64_t W, int64_t window, float scale) {
  const int64_t g = H / Hkv;
  if (D == 64) return dispatch_groups<C, 4>(g, q, qs, kc, vc, ks, vs, tables, lens, out, B, Hkv, bs, W, window, scale);
  if (D == 128) return dispatch_groups<C, 8>(g, q, qs, kc, vc, ks, vs, tables, lens, out, B, Hkv, bs, W, window, scale);
  return false;
}
#endif

}  // namespace

// q: [B, H, D]; k_cache, v_cache: [blocks, block_size, Hkv, D]; block_tables: [B, W] int64;
// seq_lens: [B] int64 (keys per sequence, the new token's included); window: 0 for none.
// q may be a view with rows apart (the query columns of a fused qkv output): no copy then.
// int8 caches come with float32 scales k_scale, v_scale: [blocks, block_size, Hkv].
torch::Tensor paged_decode_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens, int64_t window,
                                     double scale, std::optional<torch::Tensor> k_scale,
                                     std::optional<torch::Tensor> v_scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  const bool int8 = k_cache.scalar_type() == at::kChar;
  TORCH_CHECK(int8 || q.scalar_type() == k_cache.scalar_type(), "dtypes differ");
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), "key and value caches differ in dtype");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong, "tables must be int64");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && H % Hkv == 0, "head sizes do not match");
  TORCH_CHECK(block_tables.size(0) == B && seq_lens.size(0) == B, "one table and length per row");
  const float* ks = nullptr;
  const float* vs = nullptr;
  if (int8) {
    TORCH_CHECK(k_scale && v_scale && k_scale->scalar_type() == at::kFloat && v_scale->scalar_type() == at::kFloat &&
                    k_scale->is_contiguous() && v_scale->is_contiguous() &&
                    k_scale->numel() == k_cache.numel() / D && v_scale->numel() == k_scale->numel(),
                "an int8 cache needs float32 scales [blocks, block_size, kv_heads]");
    ks = k_scale->data_ptr<float>();
    vs = v_scale->data_ptr<float>();
  }
  auto qc = q.stride(2) == 1 && q.stride(1) == D ? q : q.contiguous();
  const int64_t qs = qc.stride(0);
  auto tables = block_tables.contiguous();
  auto lens = seq_lens.contiguous();
  auto out = torch::empty({B, H, D}, q.options());
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  const int64_t W = tables.size(1);
  const float sc = static_cast<float>(scale);
  // the cache's element type: int8, else the query's
  auto caches = [&](auto* element) {
    using C = std::remove_const_t<std::remove_pointer_t<decltype(element)>>;
    return std::make_pair(k_cache.data_ptr<C>(), v_cache.data_ptr<C>());
  };
#if defined(__AVX512F__)
  if (q.scalar_type() == at::kBFloat16) {
    const auto* qp = qc.data_ptr<c10::BFloat16>();
    auto* op = out.data_ptr<c10::BFloat16>();
    auto fast = [&](auto kv) {
      return decode_bf16_fast(qp, qs, kv.first, kv.second, ks, vs, tp, lp, op, B, H, Hkv, D, bs, W, window, sc);
    };
    if (int8 ? fast(caches(static_cast<int8_t*>(nullptr))) : fast(caches(static_cast<c10::BFloat16*>(nullptr))))
      return out;
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "paged_decode_attention", [&] {
    auto portable = [&](auto kv) {
      decode_kernel(qc.data_ptr<scalar_t>(), qs, kv.first, kv.second, ks, vs, tp, lp, out.data_ptr<scalar_t>(), B, H,
                    Hkv, D, bs, W, window, sc);
    };
    if (int8)
      portable(caches(static_cast<int8_t*>(nullptr)));
    else
      portable(caches(static_cast<scalar_t*>(nullptr)));
  });
  return out;
}

// One row of n floats to int8: x * (127 / absmax), one rounding per value (half to even);
// returns the scale absmax / 127 (a multiply). Bit-equal with `quantize_kv` in llama.py.
// A row holding inf or NaN gets zeros and a NaN scale, so whatever reads it is NaN, as it
// would be without quantization.
inline float quantize_row(const float* x, int64_t n, int8_t* out) {
  float amax = 0.f;
  bool finite = true;
  for (int64_t d = 0; d < n; ++d) {
    amax = std::max(amax, std::abs(x[d]));
    finite &= !is_inf_or_nan_bits(x[d]);
  }
  if (!finite) {
    std::memset(out, 0, n);
    return std::numeric_limits<float>::quiet_NaN();
  }
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  for (int64_t d = 0; d < n; ++d) out[d] = static_cast<int8_t>(std::nearbyint(x[d] * inv));
  return amax * (1.f / 127.f);
}

// quantize_row from a row of any float type (`buf`: n floats of scratch).
template <typename T>
inline float quantize_row(const T* x, float* buf, int64_t n, int8_t* out) {
  load_row(x, buf, n);
  return quantize_row(buf, n, out);
}
#if defined(__AVX512F__)
// bf16 rows, 16 at a time, same numbers: the absmax is an integer max over the magnitude
// bits (which orders finite floats as their values, and puts inf and NaN above them all);
// _mm512_cvtps_epi32 rounds half to even like nearbyint.
template <>
inline float quantize_row<c10::BFloat16>(const c10::BFloat16* x, float* buf, int64_t n, int8_t* out) {
  if (n % 16) {
    load_row(x, buf, n);
    return quantize_row(buf, n, out);
  }
  const auto* src = reinterpret_cast<const uint16_t*>(x);
  auto load = [&](int64_t j) {
    return _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j))), 16);
  };
  const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
  __m512i vmax = _mm512_setzero_si512();
  for (int64_t j = 0; j < n; j += 16) vmax = _mm512_max_epu32(vmax, _mm512_and_si512(load(j), magnitude));
  const uint32_t bits = _mm512_reduce_max_epu32(vmax);
  if (bits >= 0x7f800000u) {
    std::memset(out, 0, n);
    return std::numeric_limits<float>::quiet_NaN();
  }
  float amax;
  std::memcpy(&amax, &bits, sizeof(amax));
  const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  for (int64_t j = 0; j < n; j += 16) {
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_castsi512_ps(load(j)), inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j), _mm512_cvtsepi32_epi8(q));
  }
  return amax * (1.f / 127.f);
}
#endif

// One step's new keys (or values) into their cache slots. rows: [T, Hkv * D] (a view into
// the qkv rows is fine); cache: [blocks, block_size, Hkv, D]. An int8 cache takes each
// (token, kv head) row quantized by quantize_row, its scale into `scales` ([blocks, block_size, Hkv]).
// check_kv checks the arguments once; write_kv_rows writes tokens [begin, end), so a caller
// already running in parallel over the tokens (rope_write_kv_) can write its own.
void check_kv(const torch::Tensor& rows, const torch::Tensor& slots, const torch::Tensor& cache,
              const std::optional<torch::Tensor>& scales) {
  TORCH_CHECK(rows.dim() == 2 && rows.stride(1) == 1 && cache.is_contiguous(), "bad kv rows or cache");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.size(0) == rows.size(0), "bad slots");
  TORCH_CHECK(rows.size(1) == cache.size(2) * cache.size(3), "rows do not match the cache");
  if (cache.scalar_type() != at::kChar) {
    TORCH_CHECK(cache.scalar_type() == rows.scalar_type(), "cache and rows differ in dtype");
    return;
  }
  TORCH_CHECK(scales && scales->scalar_type() == at::kFloat && scales->is_contiguous() &&
                  scales->numel() == cache.numel() / cache.size(3), "an int8 cache needs float32 scales");
}

void write_kv_rows(const torch::Tensor& rows, const int64_t* sl, torch::Tensor& cache,
                   const std::optional<torch::Tensor>& scales, int64_t begin, int64_t end) {
  const int64_t width = rows.size(1), Hkv = cache.size(2), D = cache.size(3);
  if (cache.scalar_type() != at::kChar) {
    const int64_t bytes = width * rows.element_size();
    const char* src = static_cast<const char*>(rows.data_ptr());
    char* dst = static_cast<char*>(cache.data_ptr());
    for (int64_t t = begin; t < end; ++t)
      std::memcpy(dst + sl[t] * bytes, src + t * rows.stride(0) * rows.element_size(), bytes);
    return;
  }
  int8_t* dst = cache.data_ptr<int8_t>();
  float* sc = scales->data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, rows.scalar_type(), "write_kv", [&] {
    const scalar_t* src = rows.data_ptr<scalar_t>();
    std::vector<float> x(D);
    for (int64_t t = begin; t < end; ++t)
      for (int64_t h = 0; h < Hkv; ++h)
        sc[sl[t] * Hkv + h] = quantize_row(src + t * rows.stride(0) + h * D, x.data(), D, dst + (sl[t] * Hkv + h) * D);
  });
}

void write_kv(const torch::Tensor& rows, const torch::Tensor& slots, torch::Tensor cache,
              std::optional<torch::Tensor> scales) {
  check_kv(rows, slots, cache, scales);
  write_kv_rows(rows, slots.data_ptr<int64_t>(), cache, scales, 0, rows.size(0));
}

// Rows [0, M) of x [M, K] to int8 as the int8 KV cache's rows are (quantize_row): q [*, K], scales [*].
void quantize_rows_into(const torch::Tensor& x, int8_t* qp, float* sp) {
  const int64_t M = x.size(0), K = x.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "quantize_rows", [&] {
    const scalar_t* src = x.data_ptr<scalar_t>();
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> row(K);
      for (int64_t i = begin; i < end; ++i) sp[i] = quantize_row(src + i * x.stride(0), row.data(), K, qp + i * K);
    });
  });
}

// int8 activations for the W8A8 projections: each row of x [M, K] quantized as the int8 KV
// cache's rows are (quantize_row). Returns (int8 [M, K], float32 scales [M]).
std::tuple<torch::Tensor, torch::Tensor> quantize_rows(const torch::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "quantize_rows takes [rows, n] with contiguous rows");
  auto q = torch::empty({x.size(0), x.size(1)}, x.options().dtype(at::kChar));
  auto scales = torch::empty({x.size(0)}, x.options().dtype(at::kFloat));
  quantize_rows_into(x, q.data_ptr<int8_t>(), scales.data_ptr<float>());
  return {q, scales};
}

// out = acc * s + bias (bias may be null), rounded once to out's type. This pass runs over
// every projection output, so bf16 gets a vector path (round to nearest even, as c10's).
template <typename T>
inline void rescale_row(const float* acc, float s, const float* bias, T* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<T>(acc[j] * s + (bias ? bias[j] : 0.f));
}
#if defined(__AVX512BF16__)
template <>
inline void rescale_row<c10::BFloat16>(const float* acc, float s, const float* bias, c10::BFloat16* out, int64_t n) {
  const __m512 vs = _mm512_set1_ps(s);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    __m512 v = _mm512_mul_ps(_mm512_loadu_ps(acc + j), vs);
    if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + j));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), (__m256i)_mm512_cvtneps_pbh(v));
  }
  for (; j < n; ++j) out[j] = static_cast<c10::BFloat16>(acc[j] * s + (bias ? bias[j] : 0.f));
}
#endif

// Whole blocks of an int8 cache ([blocks, block_size, Hkv, D], scales [blocks, block_size,
// Hkv]) as [len(blocks) * block_size, Hkv, D] in `dtype`: each value times its row's scale
// in float32, rounded once -- the numbers of LayerCache.gather in llama.py, in one pass
// instead of five torch calls per cache (prefill chunks over an int8 pool read their keys so).
torch::Tensor gather_dequant(const torch::Tensor& cache, const torch::Tensor& scales, const torch::Tensor& blocks,
                             at::ScalarType dtype) {
  TORCH_CHECK(cache.scalar_type() == at::kChar && cache.dim() == 4 && cache.is_contiguous(), "an int8 cache");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() * cache.size(3) == cache.numel(),
              "float32 scales, one per cache row");
  auto idx = blocks.to(at::kLong).contiguous();
  const int64_t n = idx.numel(), bs = cache.size(1), Hkv = cache.size(2), D = cache.size(3);
  const int64_t rows_per_block = bs * Hkv;
  TORCH_CHECK(n == 0 || (idx.min().item<int64_t>() >= 0 && idx.max().item<int64_t>() < cache.size(0)),
              "block index out of range");
  auto out = torch::empty({n * bs, Hkv, D}, cache.options().dtype(dtype));
  const int8_t* cp = cache.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  const int64_t* ip = idx.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "gather_dequant", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int8_t* src = cp + ip[i] * rows_per_block * D;
        const float* sc = sp + ip[i] * rows_per_block;
        scalar_t* dst = op + i * rows_per_block * D;
        for (int64_t r = 0; r < rows_per_block; ++r)
          for (int64_t d = 0; d < D; ++d) dst[r * D + d] = static_cast<scalar_t>(static_cast<float>(src[r * D + d]) * sc[r]);
      }
    });
  });
  return out;
}

// The W8A8 projection: int8 activations (per row) times int8 weights (per output channel)
// through oneDNN's int8 matrix product (AMX-INT8 / VNNI), int32 sums exact, then
// y = sum * x_scale[row] * w_scale[col] (+ bias) in float32, rounded once to x's dtype.
// Every row's result is independent of the other rows in the call (batch-invariant).
torch::Tensor w8a8_linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& w_scales,
                          const torch::Tensor& w_zero_points, const std::optional<torch::Tensor>& bias) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("onednn::qlinear_pointwise", "tensor");
  static const auto one = torch::ones({1}, torch::kFloat);
  static const auto zero = torch::zeros({1}, torch::kLong);
  auto x2 = x.reshape({-1, x.size(-1)}).contiguous();
  auto [q, xs] = quantize_rows(x2);
  torch::jit::Stack stack{q, one, zero, packed, w_scales, w_zero_points, c10::IValue(), 1.0, int64_t{0},
                          at::ScalarType::Float, std::string("none"), c10::List<std::optional<at::Scalar>>(),
                          std::string("")};
  op.callBoxed(&stack);
  // w_scale is applied by oneDNN; the row scale (and bias) here
  const at::Tensor acc = stack[0].toTensor();
  const int64_t M = acc.size(0), N = acc.size(1);
  auto out = torch::empty({M, N}, x.options());
  std::optional<torch::Tensor> b;
  if (bias) b = bias->to(at::kFloat).contiguous();
  const float* ap = acc.data_ptr<float>();
  const float* sp = xs.data_ptr<float>();
  const float* bp = b ? b->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "w8a8_linear", [&] {
    scalar_t* op_ = out.data_ptr<scalar_t>();
    at::parallel_for(0, M, 4, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) rescale_row(ap + i * N, sp[i], bp, op_ + i * N, N);
    });
  });
  auto shape = x.sizes().vec();
  shape.back() = N;
  return out.view(shape);
}

// ---- W8A8 on AMX tiles ----------------------------------------------------------------
// oneDNN's int8 product (above) costs ~30 us per call before any arithmetic and used the
// second core poorly at decode sizes (one step's 121 int8 products: 1.4x faster on two
// threads than on one). Here the product runs straight on the AMX-INT8 tile unit: C (16 x 16
// int32) += A (16 rows x 64 int8) . B (64 x 16 int8, stored as 16 rows of 16 columns x 4)
// per instruction, four C tiles (32 rows x 32 columns) per pass over K. The int32 sums are
// exact and the epilogue rounds as above (sum * w_scale, then rescale_row), so the result is
// bit-equal with the oneDNN path; a row's result never depends on the other rows. SmolLM2's
// projections, 30 layers, 2 threads (us per layer): 184 vs 328 at 64 rows, 104 vs 177 at one.

namespace {
// True when the CPU has the tile unit and the AMX feature of CPUID leaf 7's EDX bit `bit`
// (22 AMX-BF16, 25 AMX-INT8), and the OS lets this process use the tile state (Linux asks
// each process to request it first, as oneDNN does). The module is built with AMX off
// (-mno-amx-*), so only the functions marked for it use it, after this check. LEANSERVE_AMX=0
// turns both kernels off.
bool amx_feature(unsigned bit) {
#if defined(__x86_64__) && defined(__AVX512F__) && defined(SYS_arch_prctl)  // the kernels below need both
  static const bool tiles = [] {
    const char* env = std::getenv("LEANSERVE_AMX");
    if (env != nullptr && std::string(env) == "0") return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1u)) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtileData) == 0;
  }();
  unsigned a = 0, b = 0, c = 0, d = 0;
  return tiles && __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((d >> bit) & 1u);
#else
  (void)bit;
  return false;
#endif
}
}  // namespace

// whether w8a8_linear_packed can run on the tiles here
bool amx_int8_available() {
  static const bool ok = amx_feature(25);
  return ok;
}

// whether bf16_linear_packed can run on the tiles here
bool amx_bf16_available() {
  static const bool ok = amx_feature(22);
  return ok;
}

// whether bf16_linear_packed / w8a8_linear_packed can run here: on the AMX tiles, else on
// AVX512-BF16 / AVX512-VNNI dot products (the module is built for this CPU: -march=native)
constexpr bool kDotProducts =
#if defined(__x86_64__) && defined(__AVX512BF16__) && defined(__AVX512VNNI__)
    true;
#else
    false;
#endif

// The kernels a packed product can run on (the `variant` of bf16_linear_packed and
// w8a8_linear_packed; kernels/select.py measures them and picks one per row band). kAuto: the
// first of AMX tiles, AVX-512 dot products (BF16 / VNNI), AVX-512F FMA (bf16 only), AVX2 + FMA
// that this CPU has. The two FMA variants widen bf16 weights to float32 (products_avx2.h).
enum Variant : int64_t { kAuto = -1, kAmx = 0, kDot = 1, kAvx2 = 2, kAvx512f = 3 };

bool avx2_available() {
#if defined(__x86_64__)
  return avx2::available();
#else
  return false;
#endif
}

bool bf16_packed_available() { return kDotProducts || amx_bf16_available() || avx2_available(); }

bool w8a8_packed_available() { return kDotProducts || amx_int8_available() || avx2_available(); }

// Which variants can run here: bf16 (int8 = false) or W8A8 (int8 = true), fastest-first by kind.
std::vector<int64_t> product_variants(bool int8) {
  std::vector<int64_t> out;
  if (int8 ? amx_int8_available() : amx_bf16_available()) out.push_back(kAmx);
  if (kDotProducts) out.push_back(kDot);
#if defined(__x86_64__)
  if (!int8 && avx2_available() && avx2::avx512f_available()) out.push_back(kAvx512f);
#endif
  if (avx2_available()) out.push_back(kAvx2);
  return out;
}

// `variant` checked against this CPU, kAuto resolved
int64_t resolve_variant(int64_t variant, bool int8) {
  const auto here = product_variants(int8);
  TORCH_CHECK(!here.empty(), "no packed ", int8 ? "int8" : "bf16", " kernel can run on this CPU");
  if (variant == kAuto) return here.front();
  TORCH_CHECK(std::find(here.begin(), here.end(), variant) != here.end(), "kernel variant ", variant,
              " cannot run on this CPU");
  return variant;
}

#if defined(__x86_64__) && defined(__AVX512F__)
namespace {

struct alignas(64) TileConfig {  // palette 1: every tile 16 rows of 64 bytes
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// ---- bf16 decode attention with the scores on AMX tiles -------------------------------
// decode_bf16_avx512's key pass spends most of its time on shuffles: a horizontal sum per key
// and query head, and the bf16 widening, all on one port. Here each 16 keys of a block are
// the rows of an A tile, loaded straight from the cache at its row stride (32 dims of one kv
// head per tile row); the B tiles hold the query heads as columns, each kv head's tile with
// only its own query heads (zero in the others' columns). Summed over the kv heads into one C
// tile, that is 16 keys x every query head (up to 16) of float32 scores, stored straight into
// the sequence's score rows. The softmax runs on those rows (16 lanes: the heads). Scores are
// q . k in float32 (the pairs summed by the tile unit), then scaled: not the same bits as the
// AVX-512 pass, which scales q first. A row's result does not depend on the other rows.
// 30 layers x 64 sequences x ~170 keys, 2 threads: 7.1 -> 3.6 ms with the cache in L2 (the
// arithmetic), 13.6 -> 13.2 ms from DRAM (the reads bound it; they run at ~19 GB/s, where
// this machine streams random 6 KB blocks at 22-25 and in-order ones at 28).

// The first `lines` cache lines of block `blk` (if it is one of the sequence's).
template <int Hint = _MM_HINT_T0>
inline void prefetch_block(const c10::BFloat16* cache, const int64_t* table, int64_t blk, int64_t last,
                           int64_t blk_stride, int64_t lines) {
  if (blk > last) return;
  const char* p = reinterpret_cast<const char*>(cache + table[blk] * blk_stride);
  for (int64_t c = 0; c < std::min(blk_stride * 2, lines * 64); c += 64) _mm_prefetch(p + c, static_cast<_mm_hint>(Hint));
}

// One thread's part of decode_bf16_amx: sequences from the shared counter until none is left.
template <int NV, int G>
__attribute__((target("amx-tile,amx-bf16"))) void decode_bf16_amx_thread(
    const c10::BFloat16* q, int64_t qs, const c10::BFloat16* kc, const c10::BFloat16* vc, const int64_t* tables,
    const int64_t* lens, c10::BFloat16* out, int64_t B, int64_t Hkv, int64_t bs, int64_t W, int64_t window,
    float scale, std::atomic<int64_t>& next) {
  constexpr int64_t D = 16 * NV, KS = D / 32;  // KS: tile steps over one head's dims
  const int64_t H = Hkv * G, row = Hkv * D, row_bytes = row * 2, blk_stride = bs * row, nbt = Hkv * KS;
  const bool keep_b = nbt <= 6;  // tiles 2-7 hold every B tile for the whole sequence
  const TileConfig cfg;
  asm volatile("" : : "m"(cfg) : "memory");  // see amx_blocks
  _tile_loadconfig(&cfg);
  std::vector<__m512> qt(nbt * 16), srow, ov(H * NV);  // qt: B tiles, 16 rows of 64 bytes each
  for (int64_t b; (b = next.fetch_add(1, std::memory_order_relaxed)) < B;) {
    const int64_t len = lens[b];
    const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
    const int64_t blk0 = first / bs, last_blk = (len - 1) / bs, base = blk0 * bs;  // srow[i]: position base + i
    const int64_t* table = tables + b * W;
    const int64_t blk_lines = blk_stride * 2 / 64;
    prefetch_block(kc, table, blk0, last_blk, blk_stride, blk_lines);
    srow.resize((last_blk + 1) * bs - base);
    std::memset(static_cast<void*>(qt.data()), 0, qt.size() * sizeof(__m512));
    auto* qw = reinterpret_cast<uint16_t*>(qt.data());
    const auto* qb = reinterpret_cast<const uint16_t*>(q + b * qs);
    for (int64_t h = 0; h < H; ++h)  // B tile (kv head, step): row r, column h = dims 2r, 2r+1 of head h
      for (int64_t s = 0; s < KS; ++s) {
        uint16_t* tile = qw + ((h / G) * KS + s) * 512;
        for (int r = 0; r < 16; ++r) {
          tile[(r * 16 + h) * 2] = qb[h * D + s * 32 + 2 * r];
          tile[(r * 16 + h) * 2 + 1] = qb[h * D + s * 32 + 2 * r + 1];
        }
      }
    if (keep_b) {  // tile numbers are immediates
      _tile_loadd(2, qt.data(), 64);
      if (nbt > 1) _tile_loadd(3, qt.data() + 16, 64);
      if (nbt > 2) _tile_loadd(4, qt.data() + 32, 64);
      if (nbt > 3) _tile_loadd(5, qt.data() + 48, 64);
      if (nbt > 4) _tile_loadd(6, qt.data() + 64, 64);
      if (nbt > 5) _tile_loadd(7, qt.data() + 80, 64);
    }
    for (int64_t blk = blk0; blk <= last_blk; ++blk) {  // the key pass
      // The next block into L2, or at the last one the first value block's first lines.
      // Random 6 KB blocks stream at ~22 GB/s here (28 in order); asking for a block's first
      // lines one block ahead gains ~10% in that test, asking for whole blocks into L1 loses.
      // In this kernel the variants measured level (within 1%): it is bound by reads either way.
      if (blk < last_blk) prefetch_block<_MM_HINT_T1>(kc, table, blk + 1, last_blk, blk_stride, blk_lines);
      else prefetch_block(vc, table, blk0, last_blk, blk_stride, 8);
      const char* kb = reinterpret_cast<const char*>(kc + table[blk] * blk_stride);
      for (int64_t t0 = 0; t0 < bs && blk * bs + t0 < len; t0 += 16) {
        _tile_zero(0);
        for (int64_t i = 0; i < nbt; ++i) {
          _tile_loadd(1, kb + t0 * row_bytes + (i / KS) * D * 2 + (i % KS) * 64, row_bytes);
          if (!keep_b) {
            _tile_loadd(2, qt.data() + i * 16, 64);
            _tile_dpbf16ps(0, 1, 2);
            continue;
          }
          switch (i) {
            case 0: _tile_dpbf16ps(0, 1, 2); break;
            case 1: _tile_dpbf16ps(0, 1, 3); break;
            case 2: _tile_dpbf16ps(0, 1, 4); break;
            case 3: _tile_dpbf16ps(0, 1, 5); break;
            case 4: _tile_dpbf16ps(0, 1, 6); break;
            default: _tile_dpbf16ps(0, 1, 7); break;
          }
        }
        _tile_stored(0, srow.data() + blk * bs + t0 - base, 64);
      }
    }
    const __m512 sc = _mm512_set1_ps(scale);
    __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::max()), sum = _mm512_setzero_ps();
    for (int64_t t = first; t < len; ++t) {
      const __m512 sv = _mm512_mul_ps(srow[t - base], sc);
      srow[t - base] = sv;
      mx = _mm512_max_ps(mx, sv);
    }
    for (int64_t t = first; t < len; ++t) {
      const __m512 e = _ZGVeN16v_expf(_mm512_sub_ps(srow[t - base], mx));
      srow[t - base] = e;
      sum = _mm512_add_ps(sum, e);
    }
    // The value pass, a block at a time and within it one kv head at a time, so that head's
    // G x NV accumulators stay in registers (all H x NV of them do not fit: kept in memory,
    // each token's FMAs waited on store forwarding).
    std::fill(ov.begin(), ov.end(), _mm512_setzero_ps());
    for (int64_t blk = blk0; blk <= last_blk; ++blk) {
      const int64_t t0 = std::max(first, blk * bs), t1 = std::min(len, (blk + 1) * bs);
      const c10::BFloat16* vb = vc + table[blk] * blk_stride - blk * bs * row;  // + t * row: token t's row
      if (blk < last_blk) {
        prefetch_block(vc, table, blk + 1, last_blk, blk_stride, 8);
      } else {  // the sequence this thread probably takes next
        const int64_t nb = next.load(std::memory_order_relaxed);
        if (nb < B) {
          const int64_t nlen = lens[nb], nfirst = window > 0 ? std::max<int64_t>(0, nlen - window) : 0;
          prefetch_block(kc, tables + nb * W, nfirst / bs, (nlen - 1) / bs, blk_stride, 8);
        }
      }
      for (int64_t kh = 0; kh < Hkv; ++kh) {
        __m512 acc[G * NV];
        for (int j = 0; j < G * NV; ++j) acc[j] = ov[kh * G * NV + j];
        for (int64_t t = t0; t < t1; ++t) {
          // whole rows ahead: this head's slice alone is a strided read the hardware does
          // not run ahead of (without these, 30% slower)
          if (kh == 0) prefetch_row(vc, table, t + kPrefetchTokens, len, bs, blk_stride, row);
          const c10::BFloat16* vp = vb + t * row + kh * D;
          const float* p = reinterpret_cast<const float*>(srow.data() + (t - base)) + kh * G;
          // 32 dims per load, widened without a shuffle: vector 2c holds the even dims of
          // chunk c (each lane's low half shifted up), 2c + 1 the odd ones (the high half)
          __m512 vv[NV];
          for (int c = 0; c < NV / 2; ++c) {
            const __m512i raw = _mm512_loadu_si512(vp + c * 32);
            vv[2 * c] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
            vv[2 * c + 1] = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
          }
          for (int i = 0; i < G; ++i) {
            const __m512 pv = _mm512_set1_ps(p[i]);
            for (int v = 0; v < NV; ++v) acc[i * NV + v] = _mm512_fmadd_ps(pv, vv[v], acc[i * NV + v]);
          }
        }
        for (int j = 0; j < G * NV; ++j) ov[kh * G * NV + j] = acc[j];
      }
    }
    alignas(64) float sums[16];
    _mm512_store_ps(sums, sum);
    for (int64_t h = 0; h < H; ++h) {
      const __m512 iv = _mm512_set1_ps(1.f / sums[h]);
      c10::BFloat16* o = out + (b * H + h) * D;
      for (int c = 0; c < NV / 2; ++c) {
        alignas(64) float even[16], odd[16];
        _mm512_store_ps(even, _mm512_mul_ps(ov[h * NV + 2 * c], iv));
        _mm512_store_ps(odd, _mm512_mul_ps(ov[h * NV + 2 * c + 1], iv));
        for (int j = 0; j < 16; ++j) {
          o[c * 32 + 2 * j] = c10::BFloat16(even[j]);
          o[c * 32 + 2 * j + 1] = c10::BFloat16(odd[j]);
        }
      }
    }
  }
  _tile_release();
}

template <int NV, int G>
void decode_bf16_amx(const c10::BFloat16* q, int64_t qs, const c10::BFloat16* kc, const c10::BFloat16* vc,
                     const int64_t* tables, const int64_t* lens, c10::BFloat16* out, int64_t B, int64_t Hkv,
                     int64_t bs, int64_t W, int64_t window, float scale) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(B, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    decode_bf16_amx_thread<NV, G>(q, qs, kc, vc, tables, lens, out, B, Hkv, bs, W, window, scale, next);
  });
}

// Column blocks [nb0, nb1) of 16 of y [M, N] = rows of x [Mp, K] (Mp: M rounded up to 16,
// rows past M any values) times the packed weight [N / 16, K / KT, 16, 64 bytes], KT = 64
// int8 or 32 bf16 inputs per tile row. Tiles: 0-3 C, 4-5 A, 6-7 B. The epilogue sees each
// 32 x 32 block of sums (int32 for int8, float32 for bf16): epilogue(sums, row0, rows, col0, cols).
// A C element only ever sums its own row's products, in K order, one tile instruction at a
// time, so a row's result does not depend on the other rows of the call. Each block's
// epilogue runs after the next block's tile instructions are issued, on the other of two
// buffers, so it overlaps the tile unit's work (and never reads what a tile store just
// wrote): bf16 6.5% less time at 512 rows, 2.4% at 64; int8 level to 3% less.
template <typename T, typename Epilogue>
__attribute__((target("amx-tile,amx-int8,amx-bf16"))) void amx_blocks(const T* x, int64_t M, int64_t K,
                                                                      const T* wp, int64_t nb0, int64_t nb1,
                                                                      const Epilogue& epilogue) {
  constexpr bool kInt8 = std::is_same_v<T, int8_t>;
  constexpr int64_t KT = 64 / sizeof(T);
  using Acc = std::conditional_t<kInt8, int32_t, float>;
  const TileConfig cfg;
  // GCC's ldtilecfg builtin is modelled as reading one byte, so dead-store elimination may drop
  // the rest of the config (it did for a small function's config: LDTILECFG then faulted).
  asm volatile("" : : "m"(cfg) : "memory");
  _tile_loadconfig(&cfg);
  alignas(64) Acc c[2][32 * 32];
  int cur = 0;
  struct { int64_t m0 = -1, rows = 0, n0 = 0, cols = 0; } prev;  // the block whose epilogue is due
  const int64_t kb_n = K / KT, Mp = (M + 15) / 16 * 16, xs = K * static_cast<int64_t>(sizeof(T));
  const char* xb = reinterpret_cast<const char*>(x);
  for (int64_t nb = nb0; nb < nb1; nb += 2) {
    const bool two_n = nb + 1 < nb1;
    const char* b0 = reinterpret_cast<const char*>(wp) + nb * kb_n * 1024;
    const char* b1 = b0 + kb_n * 1024;
    // The next pair's weights, asked into L2 a few lines per k-step over this pair's whole
    // row sweep. The hardware prefetcher does not do it: it stops at each 4 KB page, and
    // while the rows run the loop only re-reads this pair. SmolLM2's projections, 30 layers,
    // 2 threads (us per layer): 350 -> 305 at 64 rows, 513 -> 462 at 128, 1480 -> 1400 at
    // 512. Into L1 (T0) instead: level; front-loaded or two pairs ahead: slower.
    const char* pf = b0 + (two_n ? 2 : 1) * kb_n * 1024;
    const char* pf_end = nb + 2 < nb1 ? pf + std::min<int64_t>(2, nb1 - nb - 2) * kb_n * 1024 : pf;
    const int64_t steps = (Mp + 31) / 32 * kb_n;
    const int64_t per_step = ((pf_end - pf) / 64 + steps - 1) / steps;
    for (int64_t m = 0; m < Mp; m += 32) {
      const bool two_m = m + 16 < Mp;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t kb = 0; kb < kb_n; ++kb) {
        for (int64_t j = 0; j < per_step && pf < pf_end; ++j, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
        _tile_loadd(4, xb + m * xs + kb * 64, xs);
        _tile_loadd(6, b0 + kb * 1024, 64);
        if constexpr (kInt8) _tile_dpbssd(0, 4, 6); else _tile_dpbf16ps(0, 4, 6);
        if (two_n) {
          _tile_loadd(7, b1 + kb * 1024, 64);
          if constexpr (kInt8) _tile_dpbssd(1, 4, 7); else _tile_dpbf16ps(1, 4, 7);
        }
        if (two_m) {
          _tile_loadd(5, xb + (m + 16) * xs + kb * 64, xs);
          if constexpr (kInt8) _tile_dpbssd(2, 5, 6); else _tile_dpbf16ps(2, 5, 6);
          if (two_n) {
            if constexpr (kInt8) _tile_dpbssd(3, 5, 7); else _tile_dpbf16ps(3, 5, 7);
          }
        }
      }
      if (prev.m0 >= 0) epilogue(c[cur ^ 1], prev.m0, prev.rows, prev.n0, prev.cols);
      _tile_stored(0, c[cur], 128);
      _tile_stored(1, c[cur] + 16, 128);
      _tile_stored(2, c[cur] + 512, 128);
      _tile_stored(3, c[cur] + 528, 128);
      prev = {m, std::min<int64_t>(32, M - m), nb * 16, two_n ? 32 : 16};
      cur ^= 1;
    }
  }
  if (prev.m0 >= 0) epilogue(c[cur ^ 1], prev.m0, prev.rows, prev.n0, prev.cols);
  _tile_release();
}

// The whole product over the threads: column blocks go to them in pairs (two C tiles wide),
// each thread a contiguous run, so each streams its part of the weight in one pass (taking
// the next pairs from a shared counter instead was 4-17% slower).
template <typename T, typename Epilogue>
void amx_product(const T* x, int64_t M, int64_t K, const T* wp, int64_t N, const Epilogue& epilogue) {
  at::parallel_for(0, (N / 16 + 1) / 2, 1, [&](int64_t begin, int64_t end) {
    amx_blocks(x, M, K, wp, 2 * begin, std::min(2 * end, N / 16), epilogue);
  });
}

#if defined(__AVX512BF16__) && defined(__AVX512VNNI__)
// ---- The same products on AVX-512 dot products, for CPUs without the tile unit -------------
// The tiles' packed layout ([N / 16, K / KT, 16, 64 bytes]) is also what VDPBF16PS and
// VPDPBUSD read: a column block's 64-byte rows are its K pairs (bf16) or quads (int8) in
// order, 16 columns each, one zmm. So a CPU with AVX512-BF16 / AVX512-VNNI but no AMX (AMD
// Zen 4, Intel Cooper Lake / Ice Lake) runs the same packed weights with the same epilogues:
// per K step, C zmm of weights, each of R rows' 4 input bytes broadcast from memory, R x C
// accumulators (6 x 4 = 24: the latency of the dot products is covered and 29 of the 32
// registers are used). As on the tiles, an element sums only its own row's products, in K
// order, so a row's result does not depend on the other rows of the call.
// VPDPBUSD multiplies unsigned by signed bytes: the int8 rows go in as x + 128 (the sign bit
// flipped once for the call, dp_unsigned_rows: flipping each broadcast instead made the
// kernel slower than bf16) and the epilogue gets sum - 128 * (column sum of w), the exact
// int32 sums again.


// pf, lines: cache lines to ask L2 for while the tile runs, spread over its K steps (the next
// column group's weights, see dp_columns)
template <typename T, int R, int C>
inline void dp_tile(const T* x, int64_t K, const T* b, const __m512i* bias128, void* out, const char* pf,
                    int64_t lines) {
  constexpr bool kInt8 = std::is_same_v<T, int8_t>;
  using V = std::conditional_t<kInt8, __m512i, __m512>;  // int32 or float32 sums (one type: casts made GCC spill)
  V acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      if constexpr (kInt8) acc[r][c] = _mm512_setzero_si512();
      else acc[r][c] = _mm512_setzero_ps();
    }
  const char* xb = reinterpret_cast<const char*>(x);
  const char* bb = reinterpret_cast<const char*>(b);
  const int64_t bs = K * 16 * sizeof(T), xs = K * sizeof(T), steps = xs / 4;  // bytes; 4-byte K steps
  const int64_t every = lines > 0 ? std::max<int64_t>(1, steps / lines) : 0, per = lines > 0 ? (lines + steps - 1) / steps : 0;
  const char* const pf_end = pf + lines * 64;
  int64_t countdown = every;
  for (int64_t p = 0; p < steps; ++p) {
    if (countdown && --countdown == 0) {
      countdown = every;
      for (int64_t j = 0; j < per && pf < pf_end; ++j, pf += 64) _mm_prefetch(pf, _MM_HINT_T1);
    }
    __m512i w[C];
    for (int c = 0; c < C; ++c) w[c] = _mm512_loadu_si512(bb + c * bs + p * 64);
    for (int r = 0; r < R; ++r) {
      int32_t four;
      std::memcpy(&four, xb + r * xs + p * 4, sizeof(four));
      const __m512i a = _mm512_set1_epi32(four);  // int8: already x + 128 (dp_unsigned_rows)
      for (int c = 0; c < C; ++c) {
        if constexpr (kInt8) dpbusd(acc[r][c], a, w[c]);
        else acc[r][c] = _mm512_dpbf16_ps(acc[r][c], (__m512bh)a, (__m512bh)w[c]);
      }
    }
  }
  // as the tiles store their sums: rows of 32 elements, column blocks 2h and 2h + 1 at out + h * R * 32
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float* o = static_cast<float*>(out) + (c / 2) * R * 32 + r * 32 + (c % 2) * 16;
      if constexpr (kInt8) _mm512_store_si512(o, _mm512_sub_epi32(acc[r][c], bias128[c]));
      else _mm512_store_ps(o, acc[r][c]);
    }
}

// int8 rows to VPDPBUSD's unsigned bytes, in place: x + 128, the sign bit flipped
inline void dp_unsigned_rows(int8_t* q, int64_t n) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) _mm512_storeu_si512(q + i, _mm512_xor_si512(_mm512_loadu_si512(q + i), flip));
  for (; i < n; ++i) q[i] = static_cast<int8_t>(static_cast<uint8_t>(q[i]) ^ 0x80u);
}

template <typename T, int C, int R, typename Epilogue>
inline void dp_rows(const T* x, int64_t m0, int64_t K, const T* b, const __m512i* bias128, int64_t n0,
                    const Epilogue& epilogue, const char* pf = nullptr, int64_t lines = 0) {
  using Acc = std::conditional_t<std::is_same_v<T, int8_t>, int32_t, float>;
  alignas(64) Acc sums[(C + 1) / 2 * R * 32];
  dp_tile<T, R, C>(x + m0 * K, K, b, bias128, sums, pf, lines);
  for (int h = 0; 2 * h < C; ++h) epilogue(sums + h * R * 32, m0, R, n0 + 32 * h, std::min(2, C - 2 * h) * 16);
}

// The last `left` (< R) rows as one smaller tile.
template <typename T, int C, int R, typename Epilogue>
inline void dp_tail(const T* x, int64_t m0, int64_t left, int64_t K, const T* b, const __m512i* bias128, int64_t n0,
                    const Epilogue& epilogue, const char* pf, int64_t lines) {
  if constexpr (R > 0) {
    if (left == R) dp_rows<T, C, R>(x, m0, K, b, bias128, n0, epilogue, pf, lines);
    else dp_tail<T, C, R - 1>(x, m0, left, K, b, bias128, n0, epilogue, pf, lines);
  }
}

// All M rows against the C column blocks from column n0, R rows at a time. Blocking K (so a
// chunk's weights stay in L1 while the rows pass) was level to 10% slower on Zen 4: the
// weights come from L2 fast enough for the one 512-bit dot product a cycle it can issue.
// next, next_bytes: the weights the thread multiplies after these (none: nullptr, 0), asked
// for a share per row tile, so they are in L2 when that group starts: otherwise its first
// row tile waits on memory (at 64 rows, 1 tile in 11).
template <typename T, int C, int R, typename Epilogue>
void dp_columns(const T* x, int64_t M, int64_t K, const T* b, int64_t n0, const Epilogue& epilogue,
                const T* next = nullptr, int64_t next_bytes = 0, const int32_t* sums128 = nullptr) {
  alignas(64) __m512i bias128[C];  // int8: 128 x each column's weight sum (given, or one pass here)
  if (std::is_same_v<T, int8_t> && sums128 != nullptr) {
    for (int c = 0; c < C; ++c) bias128[c] = _mm512_loadu_si512(sums128 + n0 + 16 * c);
  } else if constexpr (std::is_same_v<T, int8_t>) {
    const __m512i ones = _mm512_set1_epi8(static_cast<char>(0x80));
    for (int c = 0; c < C; ++c) bias128[c] = _mm512_setzero_si512();
    const char* bb = reinterpret_cast<const char*>(b);
    for (int64_t p = 0; p < K / 4; ++p)
      for (int c = 0; c < C; ++c)
        dpbusd(bias128[c], ones, _mm512_loadu_si512(bb + c * K * 16 + p * 64));
  }
  const char* pf = reinterpret_cast<const char*>(next);
  const int64_t tiles = (M + R - 1) / R, lines = tiles > 1 ? next_bytes / 64 : 0;  // one tile: streaming (measured slower)
  int64_t m = 0, tile = 0;
  auto share = [&](int64_t i) { return pf + lines * i / tiles * 64; };  // tile i's first line
  for (; m + R <= M; m += R, ++tile)
    dp_rows<T, C, R>(x, m, K, b, bias128, n0, epilogue, share(tile), (share(tile + 1) - share(tile)) / 64);
  dp_tail<T, C, R - 1>(x, m, M - m, K, b, bias128, n0, epilogue, share(tile), (share(tile + 1) - share(tile)) / 64);
}

// Rows a work unit of dp_product takes at most (a multiple of the tiles' 6): at 96 rows a unit
// of the down projection (64 columns x 1536) is ~80 µs on this machine class.
constexpr int64_t kUnitRows = 96;

// The whole product over the threads. With two threads (this machine class) they take work
// units from opposite ends until they meet, so the one that runs faster does more: a fixed
// half each left one thread waiting ~6% of a c=64 step on the other (vCPUs here do not run at
// one speed; the first one takes the interrupts). A unit is a group of four column blocks
// (6 x 4 sums; the last group may have fewer) times a run of up to kUnitRows rows, the runs of
// a group next to each other: a thread passes all its runs over a group's weights, read from
// memory once (it asks L2 for its next group's, in its direction, during its last run of this
// one) and then from L2. Whole groups over all rows as units left the thread that finished
// first waiting up to one group's time at the end of every large product (~7% of a c=64 step,
// both threads together). With other thread counts each thread takes a contiguous run of
// pairs of column blocks over all rows, as amx_product splits them.
template <typename T, typename Epilogue>
void dp_product(const T* x, int64_t M, int64_t K, const T* wp, int64_t N, const Epilogue& epilogue,
                const int32_t* sums128) {
  const int64_t blocks = N / 16, pairs = (blocks + 1) / 2;
  const int64_t group_bytes = 4 * K * 16 * static_cast<int64_t>(sizeof(T));
  // blocks [nb, last) over rows [m0, m0 + rows); next: the group to ask L2 for (nullptr: none)
  auto run = [&](int64_t nb, int64_t last, int64_t m0, int64_t rows, const T* next) {
    const T* xm = x + m0 * K;
    auto ep = [&](const auto* c, int64_t m, int64_t n, int64_t n0, int64_t cols) { epilogue(c, m0 + m, n, n0, cols); };
    for (; nb + 4 <= last; nb += 4) {
      const bool more = nb + 4 < last;  // more of this claim follows; else the next claim's group
      const T* pf = more ? wp + (nb + 4) * K * 16 : next;
      const int64_t pf_bytes = more ? std::min<int64_t>(4, last - nb - 4) * group_bytes / 4 : pf ? group_bytes : 0;
      dp_columns<T, 4, 6>(xm, rows, K, wp + nb * K * 16, nb * 16, ep, pf, pf_bytes, sums128);
    }
    if (last - nb >= 2) {
      dp_columns<T, 2, 12>(xm, rows, K, wp + nb * K * 16, nb * 16, ep, nullptr, 0, sums128);
      nb += 2;
    }
    if (last - nb == 1) dp_columns<T, 1, 12>(xm, rows, K, wp + nb * K * 16, nb * 16, ep, nullptr, 0, sums128);
  };
  if (at::get_num_threads() == 2) {
    if (M == 0) return;
    // runs of equal length (to a multiple of 6): 100 rows as 54 + 46, not 96 + 4. An odd
    // count of equal units leaves one thread a whole unit alone at the end (the down and o
    // projections at 64 rows: 9 units, the last ~25 us of a ~190 us call); then the rows go
    // in one more run. 30 layers of the four projections at 64 rows: bf16 -3.5 to -5.7%,
    // W8A8 -2.7 to -3.4% (in one process, alternating; other row counts are not changed).
    const int64_t groups = (blocks + 3) / 4;
    int64_t most = (M + kUnitRows - 1) / kUnitRows;
    if (groups * most % 2 == 1 && M >= 12) ++most;
    const int64_t unit_rows = ((M + most - 1) / most + 5) / 6 * 6, runs = (M + unit_rows - 1) / unit_rows;
    const int64_t units = groups * runs;
    std::atomic<int64_t> taken{0};  // units claimed by either thread
    at::parallel_for(0, 2, 1, [&](int64_t begin, int64_t end) {
      const bool back = begin == 1 && end == 2;  // the second thread; one thread alone takes all from the front
      for (int64_t mine = 0; taken.fetch_add(1, std::memory_order_relaxed) < units; ++mine) {
        const int64_t u = back ? units - 1 - mine : mine, g = u / runs, r = u % runs;
        const int64_t ng = back ? g - 1 : g + 1;  // the next group this thread would take
        const bool leaving = r == (back ? 0 : runs - 1);
        const T* next = leaving && ng >= 0 && 4 * ng + 4 <= blocks ? wp + 4 * ng * K * 16 : nullptr;
        const int64_t m0 = r * unit_rows;
        run(4 * g, std::min(4 * g + 4, blocks), m0, std::min(M - m0, unit_rows), next);
      }
    });
    return;
  }
  at::parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    run(2 * begin, std::min(2 * end, blocks), 0, M, nullptr);
  });
}
#endif

// x times the packed weight: on the tiles (`tiles`), else on AVX-512 dot products
// (int8 rows: x is changed, see dp_unsigned_rows; sums128: w8a8_column_sums of the weight,
// else the dot-product path makes them at each call)
template <typename T, typename Epilogue>
void packed_product(T* x, int64_t M, int64_t K, const T* wp, int64_t N, const Epilogue& epilogue,
                    const int32_t* sums128 = nullptr, bool tiles = true) {
#if defined(__AVX512BF16__) && defined(__AVX512VNNI__)
  if (!tiles) {
    if constexpr (std::is_same_v<T, int8_t>) dp_unsigned_rows(x, M * K);
    return dp_product(static_cast<const T*>(x), M, K, wp, N, epilogue, sums128);
  }
#endif
  amx_product(x, M, K, wp, N, epilogue);
}

}  // namespace
#endif

// 128 x each column's sum of a packed int8 weight [N / 16, K / 64, 16, 64], int32 [N]: what the
// AVX512-VNNI path subtracts from its unsigned-row sums, made once at load rather than with a
// pass over the weights in every call (which at one row doubled the dot products).
torch::Tensor w8a8_column_sums(const torch::Tensor& packed) {
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 64 &&
                  packed.is_contiguous(), "packed must be int8 [N / 16, K / 64, 16, 64]");
  const int64_t K = packed.size(1) * 64, N = packed.size(0) * 16;
  auto out = torch::zeros({N}, packed.options().dtype(at::kInt));
  const int8_t* w = packed.data_ptr<int8_t>();
  int32_t* o = out.data_ptr<int32_t>();
  for (int64_t n = 0; n < N; ++n)  // the packed block of column n: its 4 K values at p * 64 + (n % 16) * 4
    for (int64_t p = 0; p < K / 4; ++p)
      for (int64_t j = 0; j < 4; ++j) o[n] += 128 * w[(n / 16) * K * 16 + p * 64 + (n % 16) * 4 + j];
  return out;
}

// y = x @ w^T for W8A8: x [..., K] quantized per row (quantize_row), the int8 weight packed
// by W8A8Linear for the tiles ([N / 16, K / 64, 16, 64]: tile row r holds, for 16 output
// columns, 4 consecutive inputs each), float32 per-column scales, optional bias; out in x's dtype;
// sums128: w8a8_column_sums(packed), else the AVX512-VNNI path makes them in the call.
torch::Tensor w8a8_linear_packed(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& w_scales,
                              const std::optional<torch::Tensor>& bias, const std::optional<torch::Tensor>& sums128,
                              int64_t variant) {
  variant = resolve_variant(variant, true);
  TORCH_CHECK(packed.scalar_type() == at::kChar && packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 64 &&
                  packed.is_contiguous(), "packed must be int8 [N / 16, K / 64, 16, 64]");
  const int64_t K = packed.size(1) * 64, N = packed.size(0) * 16;
  TORCH_CHECK(x.size(-1) == K, "x has ", x.size(-1), " columns; the weight takes ", K);
  TORCH_CHECK(w_scales.scalar_type() == at::kFloat && w_scales.is_contiguous() && w_scales.numel() == N, "bad w_scales");
  TORCH_CHECK(!sums128 || (sums128->scalar_type() == at::kInt && sums128->is_contiguous() && sums128->numel() == N),
              "sums128 must be w8a8_column_sums(packed)");
  auto x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0), Mp = variant == kAmx ? (M + 15) / 16 * 16 : M;
  auto q = torch::empty({Mp, K}, x.options().dtype(at::kChar));
  auto xs = torch::empty({Mp}, x.options().dtype(at::kFloat));
  quantize_rows_into(x2, q.data_ptr<int8_t>(), xs.data_ptr<float>());
  std::memset(q.data_ptr<int8_t>() + M * K, 0, (Mp - M) * K);  // tile rows past M: read, never stored
  auto out = torch::empty({M, N}, x.options());
  std::optional<torch::Tensor> b;
  if (bias) b = bias->to(at::kFloat).contiguous();
#if defined(__x86_64__)
  if (variant == kAvx2) {  // the same epilogue in scalar code: sum * w_scale rounded to float32, then rescale_row
    const float* ws = w_scales.data_ptr<float>();
    const float* sp = xs.data_ptr<float>();
    const float* bp = b ? b->data_ptr<float>() : nullptr;
    std::vector<int16_t> q16(M * K);
    const int8_t* qp = q.data_ptr<int8_t>();
    for (int64_t i = 0; i < M * K; ++i) q16[i] = qp[i];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "w8a8_linear_avx2", [&] {
      scalar_t* op_ = out.data_ptr<scalar_t>();
      auto epilogue = [&](const int32_t* c, int64_t m0, int64_t rows, int64_t n0, int64_t cols) {
        float acc[32];
        for (int64_t i = 0; i < rows; ++i) {
          avx2::scale_sums(c + i * 32, ws + n0, acc, cols);
          rescale_row(acc, sp[m0 + i], bp ? bp + n0 : nullptr, op_ + (m0 + i) * N + n0, cols);
        }
      };
      avx2::product(q16.data(), M, K, packed.data_ptr<int8_t>(), N, epilogue);
    });
    auto shape = x.sizes().vec();
    shape.back() = N;
    return out.view(shape);
  }
#endif
#if defined(__x86_64__) && defined(__AVX512F__)
  const float* ws = w_scales.data_ptr<float>();
  const float* sp = xs.data_ptr<float>();
  const float* bp = b ? b->data_ptr<float>() : nullptr;
  int8_t* qp = q.data_ptr<int8_t>();
  const int8_t* wp = packed.data_ptr<int8_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "w8a8_linear_packed", [&] {
    scalar_t* op_ = out.data_ptr<scalar_t>();
    // sums * w_scale rounded to float32 (oneDNN's output), then rescale_row: the oneDNN path's numbers
    auto epilogue = [&](const int32_t* c, int64_t m0, int64_t rows, int64_t n0, int64_t cols) {
      alignas(64) float acc[32];
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t j = 0; j < cols; j += 16)
          _mm512_store_ps(acc + j, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c + i * 32 + j)),
                                                  _mm512_loadu_ps(ws + n0 + j)));
        rescale_row(acc, sp[m0 + i], bp ? bp + n0 : nullptr, op_ + (m0 + i) * N + n0, cols);
      }
    };
    packed_product(qp, M, K, wp, N, epilogue, sums128 ? sums128->data_ptr<int32_t>() : nullptr, variant == kAmx);
  });
#endif
  auto shape = x.sizes().vec();
  shape.back() = N;
  return out.view(shape);
}

// ---- bf16 on AMX tiles, or on AVX512-BF16 -----------------------------------------------
// The default (bf16) projections. oneDNN's packed bf16 linear (PackedLinear) spends most of a
// decode-sized call outside the arithmetic; the same tile loop as W8A8's, with TDPBF16PS (C
// 16 x 16 float32 += A 16 rows x 32 bf16 . B 32 x 16 bf16, stored as 16 rows of 16 columns x
// 2), reads the weight at close to memory speed. SmolLM2's projections, 30 layers, 2 threads
// (us per layer): 376 vs 575 at 64 rows, 269 vs 363 at one, 1679 vs 1840 at 512. Sums are
// float32 in K order and rounded once to bf16 (nearest even, as oneDNN does): a few outputs
// in 10^4 differ from oneDNN's by one bf16 step, and no row depends on the rows it shares
// the call with, which oneDNN's kernels (chosen by the number of rows) do not promise.
// Without the tiles (AMD Zen 4), dp_product runs the same packed weight and epilogues on
// AVX512-BF16: per layer, 2 threads, vs oneDNN: 300 vs 700 us at one row, 1.4 vs 2.0 ms at
// 64, level at 512 (where both reach ~80% of the cores' one dot product a cycle).

// y = x @ w^T: x bf16 [..., K], the weight packed by PackedLinear ([N / 16, K / 32, 16, 32]:
// tile row r holds, for 16 output columns, 2 consecutive inputs each), optional bias.
// swiglu: 0, a plain weight; else the weight of a gate_up projection packed with its gate
// and up column blocks interleaved (PackedLinear(swiglu=True): each 32-column tile pair holds
// gate columns 16j.. and the matching up columns), no bias. 1: the output as usual, [gate |
// up]; 2: the MLP's activation silu(gate) * up ([M, N / 2], silu_mul's numbers), made in the
// epilogue from the tiles' sums, so the gate_up output is never written and read back.
namespace {
// The checks and the rows of bf16_linear_packed and bf16_linear_packed_argmax: x [..., K] as
// contiguous rows, for the tiles padded with zeros to a multiple of 16 (tile rows past M are
// read, never stored or used). Returns (rows, M, K, N).
std::tuple<torch::Tensor, int64_t, int64_t, int64_t> packed_bf16_rows(const torch::Tensor& x,
                                                                   const torch::Tensor& packed, int64_t variant) {
  TORCH_CHECK(packed.scalar_type() == at::kBFloat16 && packed.dim() == 4 && packed.size(2) == 16 &&
                  packed.size(3) == 32 && packed.is_contiguous(), "packed must be bf16 [N / 16, K / 32, 16, 32]");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "x must be bf16, got ", x.scalar_type());
  const int64_t K = packed.size(1) * 32, N = packed.size(0) * 16;
  TORCH_CHECK(x.size(-1) == K, "x has ", x.size(-1), " columns; the weight takes ", K);
  auto x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0), Mp = variant == kAmx ? (M + 15) / 16 * 16 : M;
  if (Mp != M) {
    auto padded = torch::empty({Mp, K}, x2.options());
    padded.narrow(0, 0, M).copy_(x2);
    padded.narrow(0, M, Mp - M).zero_();
    x2 = padded;
  }
  return {x2, M, K, N};
}

#if defined(__x86_64__)
// bf16 rows [M, K] as float32 (exact), the AVX2 kernel's input
std::vector<float> widened_rows(const torch::Tensor& x2, int64_t M, int64_t K) {
  std::vector<float> xf(M * K);
  const auto* src = reinterpret_cast<const uint16_t*>(x2.data_ptr<at::BFloat16>());
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin * K; i < end * K; ++i) {
      const uint32_t bits = static_cast<uint32_t>(src[i]) << 16;
      std::memcpy(&xf[i], &bits, sizeof(float));
    }
  });
  return xf;
}

// bf16_linear_packed on FMA, AVX2 or AVX-512F (wide) (swiglu 0 or 1)
torch::Tensor bf16_linear_widened(const torch::Tensor& x2, int64_t M, int64_t K, int64_t N, const torch::Tensor& packed,
                                  const std::optional<torch::Tensor>& bias, int64_t swiglu, bool wide) {
  TORCH_CHECK(swiglu < 2, "the fused SwiGLU epilogue runs on AMX / AVX512-BF16 only");
  auto out = torch::empty({M, N}, x2.options());
  std::optional<torch::Tensor> b;
  if (bias) b = bias->to(at::kFloat).contiguous();
  const float* bp = b ? b->data_ptr<float>() : nullptr;
  const std::vector<float> xf = widened_rows(x2, M, K);
  at::BFloat16* op_ = out.data_ptr<at::BFloat16>();
  auto epilogue = [&](const float* c, int64_t m0, int64_t rows, int64_t n0, int64_t cols) {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j0 = 0; j0 < cols; j0 += 16) {  // one block: in a swiglu weight, gate or up by its parity
        const int64_t blk = (n0 + j0) / 16, col = swiglu ? (blk % 2) * (N / 2) + (blk / 2) * 16 : blk * 16;
        at::BFloat16* o = op_ + (m0 + i) * N + col;
        const float* s = c + i * 32 + j0;
        for (int64_t j = 0; j < 16; ++j) o[j] = at::BFloat16(bp ? s[j] + bp[col + j] : s[j]);
      }
  };
  avx2::product(xf.data(), M, K, reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>()), N, epilogue, wide);
  return out;
}
#endif
}  // namespace

torch::Tensor bf16_linear_packed(const torch::Tensor& x, const torch::Tensor& packed,
                              const std::optional<torch::Tensor>& bias, int64_t swiglu, int64_t variant) {
  variant = resolve_variant(variant, false);
  torch::Tensor x2;
  int64_t M, K, N;  // named variables, not a structured binding: the epilogues capture them
  std::tie(x2, M, K, N) = packed_bf16_rows(x, packed, variant);
  TORCH_CHECK(swiglu == 0 || (swiglu <= 2 && !bias && N % 32 == 0), "bad swiglu call");
#if defined(__x86_64__)
  if (variant == kAvx2 || variant == kAvx512f) {
    auto shape = x.sizes().vec();
    shape.back() = N;
    return bf16_linear_widened(x2, M, K, N, packed, bias, swiglu, variant == kAvx512f).view(shape);
  }
#endif
#if !defined(__AVX512BF16__)
  TORCH_CHECK(swiglu == 0, "the SwiGLU epilogue needs AVX512-BF16");
#endif
  auto out = torch::empty({M, swiglu == 2 ? N / 2 : N}, x.options());
  std::optional<torch::Tensor> b;
  if (bias) b = bias->to(at::kFloat).contiguous();
#if defined(__x86_64__) && defined(__AVX512F__)
  const float* bp = b ? b->data_ptr<float>() : nullptr;
  auto* xp = reinterpret_cast<uint16_t*>(x2.data_ptr<at::BFloat16>());  // only read (the int8 rows are changed)
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  at::BFloat16* op_ = out.data_ptr<at::BFloat16>();
  auto epilogue = [&](const float* c, int64_t m0, int64_t rows, int64_t n0, int64_t cols) {
#if defined(__AVX512BF16__)
    if (swiglu) {  // a gate block and its up block; their output columns start at n0 / 2
      for (int64_t i = 0; i < rows; ++i) {
        const __m256i g = (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(c + i * 32));
        const __m256i u = (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(c + i * 32 + 16));
        if (swiglu == 2) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(op_ + (m0 + i) * (N / 2) + n0 / 2),
                              silu_mul16(widen_bf16(g), widen_bf16(u)));
        } else {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(op_ + (m0 + i) * N + n0 / 2), g);
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(op_ + (m0 + i) * N + N / 2 + n0 / 2), u);
        }
      }
      return;
    }
#endif
    for (int64_t i = 0; i < rows; ++i) {
      at::BFloat16* o = op_ + (m0 + i) * N + n0;
#if defined(__AVX512BF16__)
      if (cols == 32 && !bp) {  // the row's 32 outputs in one 64-byte store (a whole cache line: 5% faster)
        const __m256i lo = (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(c + i * 32));
        const __m256i hi = (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(c + i * 32 + 16));
        _mm512_storeu_si512(o, _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
        continue;
      }
#endif
      for (int64_t j = 0; j < cols; j += 16) {
        __m512 v = _mm512_load_ps(c + i * 32 + j);
        if (bp) v = _mm512_add_ps(v, _mm512_loadu_ps(bp + n0 + j));
#if defined(__AVX512BF16__)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + j), (__m256i)_mm512_cvtneps_pbh(v));
#else
        alignas(64) float f[16];
        _mm512_store_ps(f, v);
        for (int t = 0; t < 16; ++t) o[j + t] = at::BFloat16(f[t]);
#endif
      }
    }
  };
  packed_product(xp, M, K, wp, N, epilogue, nullptr, variant == kAmx);
#endif
  auto shape = x.sizes().vec();
  shape.back() = swiglu == 2 ? N / 2 : N;
  return out.view(shape);
}

// Greedy decoding's lm_head: each row's first_argmax of x @ w^T rounded to bf16, without
// writing the logits ([rows, vocab]: 6 MB at 64 rows of SmolLM2) and reading them back. Each
// thread keeps a running best per row over its columns, which it visits in increasing order
// (a contiguous run of them, lowest first for thread 0), taking a strictly greater value only:
// so the first maximum, as first_argmax on the written logits gives.
torch::Tensor bf16_linear_packed_argmax(const torch::Tensor& x, const torch::Tensor& packed, int64_t variant) {
  TORCH_CHECK(x.dim() == 2, "x must be [rows, K]");
  variant = resolve_variant(variant, false);
  torch::Tensor x2;
  int64_t M, K, N;  // named variables, not a structured binding: the epilogues capture them
  std::tie(x2, M, K, N) = packed_bf16_rows(x, packed, variant);
  auto out = torch::zeros({M}, x.options().dtype(at::kLong));
  const int64_t threads = at::get_num_threads();
  std::vector<float> best(threads * M, -std::numeric_limits<float>::infinity());
  std::vector<int64_t> where(threads * M, 0);
  auto merge = [&] {  // each row's best over the threads, the lowest column on ties
    int64_t* op_ = out.data_ptr<int64_t>();
    for (int64_t r = 0; r < M; ++r) {
      float b = best[r];
      op_[r] = where[r];
      for (int64_t t = 1; t < threads; ++t)
        if (best[t * M + r] > b || (best[t * M + r] == b && where[t * M + r] < op_[r])) b = best[t * M + r], op_[r] = where[t * M + r];
    }
  };
#if defined(__x86_64__)
  if (variant == kAvx2 || variant == kAvx512f) {  // each sum rounded to bf16 and widened back, as the logits hold it
    const std::vector<float> xf = widened_rows(x2, M, K);
    auto epilogue = [&](const float* c, int64_t m0, int64_t rows, int64_t n0, int64_t cols) {
      const int64_t t = at::get_thread_num();
      for (int64_t i = 0; i < rows; ++i) {
        float& b = best[t * M + m0 + i];
        int64_t& w = where[t * M + m0 + i];
        for (int64_t j = 0; j < cols; ++j) {
          const float v = static_cast<float>(at::BFloat16(c[i * 32 + j]));
          if (v > b || (v == b && n0 + j < w)) b = v, w = n0 + j;
        }
      }
    };
    avx2::product(xf.data(), M, K, reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>()), N, epilogue,
                  variant == kAvx512f);
    merge();
    return out;
  }
#endif
#if defined(__x86_64__) && defined(__AVX512F__) && defined(__AVX512BF16__)
  auto* xp = reinterpret_cast<uint16_t*>(x2.data_ptr<at::BFloat16>());  // only read (the int8 rows are changed)
  const auto* wp = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  auto epilogue = [&](const float* c, int64_t m0, int64_t rows, int64_t n0, int64_t cols) {
    const int64_t t = at::get_thread_num();
    for (int64_t i = 0; i < rows; ++i) {
      float& b = best[t * M + m0 + i];
      int64_t& w = where[t * M + m0 + i];
      for (int64_t j = 0; j < cols; j += 16) {  // the bf16 value of each sum, widened back
        const __m512 v = widen_bf16((__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(c + i * 32 + j)));
        const float m = _mm512_reduce_max_ps(v);
        if (m >= b) {  // a tie keeps the first column: a thread may take its column groups last to first
          const int64_t at = n0 + j + __builtin_ctz(static_cast<unsigned>(_mm512_cmp_ps_mask(v, _mm512_set1_ps(m), _CMP_EQ_OQ)));
          if (m > b || at < w) b = m, w = at;
        }
      }
    }
  };
  packed_product(xp, M, K, wp, N, epilogue, nullptr, variant == kAmx);
  merge();
#else
  TORCH_CHECK(false, "bf16_linear_packed_argmax needs AVX512-BF16");
#endif
  return out;
}

// ---- Fused elementwise work around the projections ----------------------------------
// Eager torch spends ~8 small kernel calls on an RMSNorm and ~12 on a rotary embedding,
// each paying dispatch and a pass over memory; at decode sizes those calls, not the
// arithmetic, are the cost. These do each in one pass, in float32, rounding once.

namespace {

template <typename T>
inline T from_f(float x) { return static_cast<T>(x); }

#if defined(__AVX512BF16__)
// One bf16 row of rms_norm_kernel, 16 lanes at a time (n % 16 == 0): the same operations and
// roundings, but the bf16 conversions in vector instructions (c10::BFloat16's scalar rounding
// kept the compiler from vectorizing the residual and output loops). The same bits; with the
// residual, 64 x 576: 9.8 -> 8.0 µs, 512 x 576: 58.5 -> 50.2 µs (the rest is the parallel
// region and the reads).
inline void rms_norm_row_bf16(const uint16_t* x, uint16_t* res, const uint16_t* w, uint16_t* o, int64_t n,
                              float eps, float* buf) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    __m512 v = widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + j)));
    if (res != nullptr) {  // residual += x, rounded; the rounded sum is what is normalised
      const __m256i r = (__m256i)_mm512_cvtneps_pbh(
          _mm512_add_ps(widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(res + j))), v));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(res + j), r);
      v = widen_bf16(r);
    }
    _mm512_storeu_ps(buf + j, v);
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / n + eps));
  for (int64_t j = 0; j < n; j += 16) {
    const __m512 h = widen_bf16((__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(buf + j), inv)));
    const __m512 wv = widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + j), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(wv, h)));
  }
}
#endif

template <typename scalar_t>
void rms_norm_kernel(scalar_t* x, scalar_t* residual, const scalar_t* w, scalar_t* out, int64_t rows, int64_t n,
                     float eps) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(n);
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (n % 16 == 0) {
        auto bits = [](auto* p) { return reinterpret_cast<uint16_t*>(p); };
        for (int64_t r = begin; r < end; ++r)
          rms_norm_row_bf16(bits(x + r * n), residual ? bits(residual + r * n) : nullptr,
                            reinterpret_cast<const uint16_t*>(w), bits(out + r * n), n, eps, buf.data());
        return;
      }
    }
#endif
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* xr = x + r * n;
      if (residual != nullptr) {  // residual += x; normalise the sum
        scalar_t* rr = residual + r * n;
        for (int64_t j = 0; j < n; ++j) rr[j] = from_f<scalar_t>(to_f(rr[j]) + to_f(xr[j]));
        xr = rr;
      }
      load_row(xr, buf.data(), n);
      float ss = 0.f;
      for (int64_t j = 0; j < n; ++j) ss += buf[j] * buf[j];
      const float inv = 1.f / std::sqrt(ss / n + eps);
      scalar_t* o = out + r * n;
      // As transformers: normalise in float32, round to the model dtype, then scale by the weight.
      for (int64_t j = 0; j < n; ++j) o[j] = from_f<scalar_t>(to_f(w[j]) * to_f(from_f<scalar_t>(buf[j] * inv)));
    }
  });
}

// `after(begin, end)` runs on the thread that rotated rows [begin, end), right after.
template <typename scalar_t, typename After>
void rope_kernel(scalar_t* qkv, const int64_t* pos, const float* cos, const float* sin, int64_t T, int64_t width,
                 int64_t heads, int64_t D, const After& after) {
  const int64_t half = D / 2;
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos + pos[t] * D;
      const float* s = sin + pos[t] * D;
      for (int64_t h = 0; h < heads; ++h) {
        scalar_t* x = qkv + t * width + h * D;
        for (int64_t j = 0; j < half; ++j) {
          const float x1 = to_f(x[j]), x2 = to_f(x[j + half]);
          x[j] = from_f<scalar_t>(x1 * c[j] - x2 * s[j]);
          x[j + half] = from_f<scalar_t>(x2 * c[j + half] + x1 * s[j + half]);
        }
      }
    }
    after(begin, end);
  });
}

template <typename scalar_t>
void silu_mul_kernel(const scalar_t* gate_up, scalar_t* out, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* g = gate_up + r * 2 * n;
      const scalar_t* u = g + n;
      scalar_t* o = out + r * n;
      int64_t j = 0;
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        auto ld = [](const scalar_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); };
        for (; j + 16 <= n; j += 16)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + j), silu_mul16(widen_bf16(ld(g + j)), widen_bf16(ld(u + j))));
      }
#endif
      for (; j < n; ++j) {
        const float gv = to_f(g[j]);
        o[j] = from_f<scalar_t>(gv / (1.f + std::exp(-gv)) * to_f(u[j]));
      }
    }
  });
}

}  // namespace

// RMSNorm of each row of x ([rows, n]); with `residual`, first residual += x (in place) and
// normalise the sum. Returns a new tensor.
torch::Tensor rms_norm(torch::Tensor x, std::optional<torch::Tensor> residual, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && x.size(-1) == weight.size(0), "bad rms_norm input");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "rms_norm: dtypes differ");
  const int64_t n = x.size(-1), rows = x.numel() / n;
  if (residual) TORCH_CHECK(residual->is_contiguous() && residual->sizes() == x.sizes(), "bad residual");
  auto out = torch::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    rms_norm_kernel<scalar_t>(x.data_ptr<scalar_t>(), residual ? residual->data_ptr<scalar_t>() : nullptr,
                              weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, n, static_cast<float>(eps));
  });
  return out;
}

// Rotary embedding (half-split layout) in place on the first `heads` heads of each row of
// qkv ([T, width]): the query and key heads. cos, sin: float32 [max_len, D].
template <typename After>
void rope_with(torch::Tensor& qkv, const torch::Tensor& positions, const torch::Tensor& cos, const torch::Tensor& sin,
               int64_t heads, int64_t head_dim, const After& after) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "qkv must be [T, width] with contiguous rows");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous() &&
              cos.size(1) == head_dim, "cos/sin must be float32 [max_len, head_dim]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.size(0) == qkv.size(0), "one position per row");
  auto pos = positions.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "rope_", [&] {
    rope_kernel<scalar_t>(qkv.data_ptr<scalar_t>(), pos.data_ptr<int64_t>(), cos.data_ptr<float>(),
                          sin.data_ptr<float>(), qkv.size(0), qkv.stride(0), heads, head_dim, after);
  });
}

void rope_(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin, int64_t heads,
           int64_t head_dim) {
  rope_with(qkv, positions, cos, sin, heads, head_dim, [](int64_t, int64_t) {});
}

// rope_ on the query and key heads of qkv ([T, (heads + 2 * kv_heads) * head_dim]), then the
// rows' keys and values into their cache slots (write_kv), each thread writing the rows it
// just rotated: the same numbers as rope_ then write_kv twice, in one parallel pass instead
// of three calls, two of them on one thread. 30 layers, SmolLM2's shapes, 2 threads: 0.46 ->
// 0.25 ms at 64 rows, 2.18 -> 1.27 ms at 512 (the decode step of 64 sequences is ~34 ms).
void rope_write_kv_(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin, int64_t heads,
                    int64_t kv_heads, int64_t head_dim, torch::Tensor slots, torch::Tensor k_cache,
                    torch::Tensor v_cache, std::optional<torch::Tensor> k_scale, std::optional<torch::Tensor> v_scale) {
  const int64_t kv_width = kv_heads * head_dim, q_width = heads * head_dim;
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == q_width + 2 * kv_width, "qkv must be [T, (heads + 2 kv_heads) D]");
  const auto k = qkv.narrow(1, q_width, kv_width), v = qkv.narrow(1, q_width + kv_width, kv_width);
  check_kv(k, slots, k_cache, k_scale);
  check_kv(v, slots, v_cache, v_scale);
  const int64_t* sl = slots.data_ptr<int64_t>();
  rope_with(qkv, positions, cos, sin, heads + kv_heads, head_dim, [&](int64_t begin, int64_t end) {
    write_kv_rows(k, sl, k_cache, k_scale, begin, end);
    write_kv_rows(v, sl, v_cache, v_scale, begin, end);
  });
}

// SwiGLU: silu(gate) * up for gate_up = [rows, 2n] (gate first). Returns [rows, n].
torch::Tensor silu_mul(torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.is_contiguous() && gate_up.size(-1) % 2 == 0, "bad gate_up");
  const int64_t n = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * n);
  auto sizes = gate_up.sizes().vec();
  sizes.back() = n;
  auto out = torch::empty(sizes, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "silu_mul", [&] {
    silu_mul_kernel<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, n);
  });
  return out;
}

// ---- Greedy picks ---------------------------------------------------------------------
// The index of each row's first maximum (what torch's argmax and max(dim).indices give), read
// straight from the model-dtype logits. At 128 rows x 49152 the float32 copy plus torch's max
// was ~8 ms of a ~78 ms decode step; one pass over the bf16 rows is well under a millisecond.
// Rows holding a NaN: as torch, the first NaN's index.

namespace {

template <typename scalar_t>
int64_t first_max_scalar(const scalar_t* r, int64_t n) {
  int64_t best = 0;
  float bv = to_f(r[0]);
  for (int64_t j = 0; j < n; ++j) {
    const float v = to_f(r[j]);
    if (is_nan_bits(v)) return j;
    if (v > bv) bv = v, best = j;
  }
  return best;
}

template <typename scalar_t>
int64_t first_max(const scalar_t* r, int64_t n) { return first_max_scalar(r, n); }

#if defined(__AVX512F__)
template <>
int64_t first_max<c10::BFloat16>(const c10::BFloat16* r, int64_t n) {
  const int64_t full = n / 16 * 16;
  __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::max());
  __mmask16 nan = 0;
  const __m256i magnitude = _mm256_set1_epi16(0x7fff), inf = _mm256_set1_epi16(0x7f80);
  for (int64_t j = 0; j < full; j += 16) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r + j));
    // NaN from the bits (integers: -ffast-math cannot fold this test away)
    nan |= _mm256_cmpgt_epi16_mask(_mm256_and_si256(raw, magnitude), inf);
    m = _mm512_max_ps(m, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16)));
  }
  float bv = _mm512_reduce_max_ps(m);
  for (int64_t j = full; j < n; ++j) {
    const float v = to_f(r[j]);
    if (is_nan_bits(v)) nan = 1;
    bv = std::max(bv, v);
  }
  if (nan) return first_max_scalar(r, n);  // rare: the plain loop finds the first NaN
  const __m512 best = _mm512_set1_ps(bv);
  for (int64_t j = 0; j < full; j += 16) {
    const __mmask16 hit = _mm512_cmp_ps_mask(load_bf16x16(r + j), best, _CMP_EQ_OQ);
    if (hit) return j + __builtin_ctz(hit);
  }
  for (int64_t j = full; j < n; ++j)
    if (to_f(r[j]) == bv) return j;
  return 0;  // every entry -inf (below the start value): torch's answer too
}
#endif

}  // namespace

// x: [rows, n] with contiguous rows. Returns int64 [rows].
torch::Tensor first_argmax(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.size(1) > 0, "first_argmax takes [rows, n] with contiguous rows");
  const int64_t rows = x.size(0), n = x.size(1), stride = x.stride(0);
  auto out = torch::empty({rows}, x.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "first_argmax", [&] {
    const scalar_t* base = x.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) o[i] = first_max(base + i * stride, n);
    });
  });
  return out;
}

// ---- A whole step's layers in one call ---------------------------------------------------
// At decode sizes a layer is ~12 small operations. Run from Python, each pays the module
// call, the argument parsing and the dispatcher (together ~5 ms of a ~20 ms step for one
// sequence on SmolLM2-135M); here the same kernels run from one C++ loop. The projections
// are the same torch operations the modules call (oneDNN's packed bf16 linear, the int8 /
// int4 weight-only kernels, or a plain linear), and prefill chunks go through the same SDPA
// calls with the same masks as `paged_attention` in llama.py, so results match the module path.

namespace {

enum LinearKind : int64_t { kDense = 0, kPacked = 1, kInt8 = 2, kInt4 = 3, kW8A8 = 4, kW8A8Packed = 5, kBf16Packed = 6,
                             kBf16PackedSwiglu = 7 };

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x, w, bias, std::string("none"), c10::List<std::optional<at::Scalar>>(), c10::IValue()};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

struct LinearSpec {
  int64_t kind;
  at::Tensor w;                       // dense, packed, int8 or int4-packed weight
  std::optional<at::Tensor> extra;    // int8 / W8A8 weight scales, int4 scales_and_zeros
  std::optional<at::Tensor> bias;
  int64_t group;                      // int4 group size
  int64_t max_rows;                   // with `dense`: calls of more rows take the dense weight
  std::optional<at::Tensor> dense;    // the bf16 weight, for many rows
  int64_t dense_kind;                 // how `dense` is stored: kDense, kPacked, kBf16Packed(Swiglu)
  std::optional<at::Tensor> zero_points;  // W8A8: the weights' (zero) zero points, int64
  std::optional<at::Tensor> sums128;      // W8A8 packed: w8a8_column_sums(w)
  std::vector<std::pair<int64_t, int64_t>> bands;  // packed kinds: (up to rows, variant), rising; none: kAuto

  // the packed kernel's variant for a call of `rows` rows (select.py's choice for its band)
  int64_t variant(int64_t rows) const {
    for (const auto& [most, v] : bands)
      if (rows <= most) return v;
    return bands.empty() ? kAuto : bands.back().second;
  }

  at::Tensor operator()(const at::Tensor& x) const {
    const int64_t rows = x.size(0);
    if (dense && rows > max_rows) {
      if (dense_kind == kPacked) return packed_linear(x, *dense, bias);
      if (dense_kind == kBf16Packed || dense_kind == kBf16PackedSwiglu)
        return bf16_linear_packed(x, *dense, bias, dense_kind == kBf16PackedSwiglu, variant(rows));
      return at::linear(x, *dense, bias);
    }
    at::Tensor y;
    switch (kind) {
      case kPacked: return packed_linear(x, w, bias);
      case kW8A8: return w8a8_linear(x, w, *extra, *zero_points, bias);
      case kW8A8Packed: return w8a8_linear_packed(x, w, *extra, bias, sums128, variant(rows));
      case kBf16Packed: return bf16_linear_packed(x, w, bias, 0, variant(rows));
      case kBf16PackedSwiglu: return bf16_linear_packed(x, w, bias, 1, variant(rows));
      case kInt8: y = at::_weight_int8pack_mm(x, w, *extra); break;
      case kInt4: y = at::_weight_int4pack_mm_for_cpu(x, w, group, *extra); break;
      default: return at::linear(x, w, bias);
    }
    return bias ? y.add(*bias) : y;
  }
};

struct Chunk {
  int64_t start, length;
  std::optional<at::Tensor> blocks;  // context blocks to attend over, else the chunk's own keys
  std::optional<at::Tensor> mask;    // additive mask; none: plain causal
  int64_t count;                     // chunks of `length` rows from `start`, one SDPA batch
};

struct LayerSpec {
  at::Tensor ln1, ln2, k_cache, v_cache;
  LinearSpec qkv, o, gate_up, down;
  std::optional<at::Tensor> k_scale, v_scale;  // int8 caches only

  // whole blocks of one cache as [blocks * block_size, Hkv, D] in `dtype` (dequantized if int8)
  at::Tensor gather(const at::Tensor& cache, const std::optional<at::Tensor>& scales, const at::Tensor& blocks,
                    at::ScalarType dtype) const {
    if (scales) return gather_dequant(cache, *scales, blocks, dtype);
    return cache.index_select(0, blocks).flatten(0, 1);
  }
};

}  // namespace

class ForwardPlan {
 public:
  ForwardPlan(int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t window, double eps, at::Tensor cos,
             at::Tensor sin)
      : nh_(heads), nkv_(kv_heads), hd_(head_dim), window_(window), eps_(eps), cos_(cos), sin_(sin) {}

  void add_layer(at::Tensor ln1, at::Tensor ln2, at::Tensor k_cache, at::Tensor v_cache, py::tuple qkv,
                 py::tuple o, py::tuple gate_up, py::tuple down, std::optional<at::Tensor> k_scale,
                 std::optional<at::Tensor> v_scale) {
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
    TORCH_CHECK((k_cache.scalar_type() == at::kChar) == (k_scale.has_value() && v_scale.has_value()),
                "int8 caches, and only they, come with scales");
    layers_.push_back({ln1, ln2, k_cache, v_cache, spec(qkv), spec(o), spec(gate_up), spec(down), k_scale, v_scale});
  }

  // x: [T, hidden] embeddings of the step's tokens: B decodes first, then prefill chunks,
  // each (start row, length, context blocks or None, additive mask or None: causal alone,
  // count: that many chunks of `length` rows, batched; AttnBatch.prefill_chunks).
  // Returns (x, residual) after the last layer, as the module path does (the final norm and
  // the lm_head stay in Python).
  // lora_fn, lora_step: 0, or a LoRA step's entry (engine/lora.py native_hook), called after each
  // projection of layer i with index i * 4 + (0 qkv, 1 o, 2 gate_up, 3 down).
  std::tuple<at::Tensor, at::Tensor> run(at::Tensor x, at::Tensor positions, at::Tensor slot_mapping,
                                         at::Tensor block_tables, at::Tensor seq_lens, const py::list& chunk_list,
                                         int64_t lora_fn = 0, int64_t lora_step = 0) {
    using LoRAFn = void (*)(const void*, int64_t, const void*, void*);
    const auto lora = reinterpret_cast<LoRAFn>(lora_fn);
    const void* step = reinterpret_cast<const void*>(lora_step);
    auto proj = [&](const LinearSpec& spec, const at::Tensor& in, int64_t index) {
      at::Tensor out = spec(in);
      if (lora) lora(step, index, in.data_ptr(), out.data_ptr());
      return out;
    };
    std::vector<Chunk> chunks;
    {
      py::gil_scoped_acquire gil;
      for (auto item : chunk_list) {
        auto t = item.cast<py::tuple>();
        chunks.push_back({t[0].cast<int64_t>(), t[1].cast<int64_t>(), t[2].cast<std::optional<at::Tensor>>(),
                          t[3].cast<std::optional<at::Tensor>>(), t[4].cast<int64_t>()});
      }
    }
    c10::InferenceMode guard;
    const int64_t T = x.size(0), B = block_tables.size(0), q_width = nh_ * hd_, kv_width = nkv_ * hd_;
    auto slots = slot_mapping.contiguous();
    const double scale = 1.0 / std::sqrt(static_cast<double>(hd_));
    at::Tensor residual, h;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const LayerSpec& L = layers_[i];
      if (i == 0) {
        residual = x;
        h = rms_norm(x, std::nullopt, L.ln1, eps_);
      } else {
        h = rms_norm(x, residual, L.ln1, eps_);
      }
      at::Tensor qkv = proj(L.qkv, h, 4 * i);
      // rotary embedding, then this step's keys and values into their cache slots
      rope_write_kv_(qkv, positions, cos_, sin_, nh_, nkv_, hd_, slots, L.k_cache, L.v_cache, L.k_scale, L.v_scale);
      at::Tensor q = qkv.narrow(1, 0, q_width).view({T, nh_, hd_});
      at::Tensor attn;
      if (chunks.empty()) {
        attn = paged_decode_attention(q, L.k_cache, L.v_cache, block_tables, seq_lens, window_, scale, L.k_scale,
                                      L.v_scale);
      } else {
        attn = at::empty({T, nh_, hd_}, qkv.options());
        if (B) attn.narrow(0, 0, B).copy_(paged_decode_attention(q.narrow(0, 0, B), L.k_cache, L.v_cache, block_tables,
                                                                 seq_lens, window_, scale, L.k_scale, L.v_scale));
        at::Tensor k = qkv.narrow(1, q_width, kv_width).view({T, nkv_, hd_});
        at::Tensor v = qkv.narrow(1, q_width + kv_width, kv_width).view({T, nkv_, hd_});
        for (const Chunk& c : chunks) {  // as the module path (llama.py paged_attention)
          const int64_t rows = c.count * c.length;
          at::Tensor ks, vs;
          if (c.blocks) {
            ks = L.gather(L.k_cache, L.k_scale, *c.blocks, qkv.scalar_type());
            vs = L.gather(L.v_cache, L.v_scale, *c.blocks, qkv.scalar_type());
          } else {
            ks = k.narrow(0, c.start, rows);
            vs = v.narrow(0, c.start, rows);
          }
          auto batch = [&](const at::Tensor& t) { return t.unflatten(0, {c.count, -1}).transpose(1, 2); };
          at::Tensor o = at::scaled_dot_product_attention(batch(q.narrow(0, c.start, rows)), batch(ks), batch(vs),
                                                          c.mask, 0.0, !c.mask.has_value(), std::nullopt, true);
          attn.narrow(0, c.start, rows).unflatten(0, {c.count, -1}).copy_(o.transpose(1, 2));  // one strided copy
        }
      }
      h = rms_norm(proj(L.o, attn.view({T, q_width}), 4 * i + 1), residual, L.ln2, eps_);
      const int64_t gate_up_variant = resolve_variant(L.gate_up.variant(T), false);
      const bool swiglu = L.gate_up.kind == kBf16PackedSwiglu && !L.gate_up.dense && !lora &&
                          (gate_up_variant == kAmx || gate_up_variant == kDot);  // fused epilogue (those only)
      x = proj(L.down, swiglu ? bf16_linear_packed(h, L.gate_up.w, std::nullopt, 2, gate_up_variant)
                              : silu_mul(proj(L.gate_up, h, 4 * i + 2)),
               4 * i + 3);
    }
    return {x, residual};
  }

 private:
  static LinearSpec spec(const py::tuple& t) {
    TORCH_CHECK(t.size() == 10, "a linear spec is (kind, weight, extra, bias, group, max_rows, dense, dense_kind, sums128, "
                "bands)");
    LinearSpec s{t[0].cast<int64_t>(), t[1].cast<at::Tensor>(), t[2].cast<std::optional<at::Tensor>>(),
                 t[3].cast<std::optional<at::Tensor>>(), t[4].cast<int64_t>(), t[5].cast<int64_t>(),
                 t[6].cast<std::optional<at::Tensor>>(), t[7].cast<int64_t>(), std::nullopt,
                 t[8].cast<std::optional<at::Tensor>>()};
    if (s.kind == kW8A8) s.zero_points = torch::zeros({s.extra->size(0)}, torch::kLong);
    for (auto band : t[9].cast<py::tuple>()) s.bands.push_back(band.cast<std::pair<int64_t, int64_t>>());
    return s;
  }

  int64_t nh_, nkv_, hd_, window_;
  double eps_;
  at::Tensor cos_, sin_;
  std::vector<LayerSpec> layers_;
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("seq_lens"),
        py::arg("window"), py::arg("scale"), py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none());
  m.def("write_kv", &write_kv, "a step's keys or values into their cache slots (int8: quantized per row)");
  m.def("rms_norm", &rms_norm, "RMSNorm, optionally after adding x into a residual in place");
  m.def("rope_", &rope_, "rotary embedding in place on the query and key heads of qkv rows");
  m.def("rope_write_kv_", &rope_write_kv_, "rope_, then the rows' keys and values into their cache slots");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  m.def("first_argmax", &first_argmax, "index of each row's first maximum");
  m.def("gather_dequant", &gather_dequant, "whole blocks of an int8 cache, dequantized");
  m.def("quantize_rows", &quantize_rows, "each row to int8 with its absmax / 127 scale");
  m.def("amx_int8_available", &amx_int8_available, "whether w8a8_linear_packed runs on AMX tiles here");
  m.def("w8a8_packed_available", &w8a8_packed_available,
        "whether w8a8_linear_packed can run here (AMX-INT8 tiles or AVX512-VNNI)");
  m.def("w8a8_linear_packed", &w8a8_linear_packed,
        "W8A8: int8 rows x a weight packed for the tiles (AMX-INT8, else AVX512-VNNI)",
        py::arg("x"), py::arg("packed"), py::arg("w_scales"), py::arg("bias") = py::none(),
        py::arg("sums128") = py::none(), py::arg("variant") = -1);
  m.def("w8a8_column_sums", &w8a8_column_sums, "128 x each column's sum of a packed int8 weight (w8a8_linear_packed's sums128)",
        py::arg("packed"));
  m.def("amx_bf16_available", &amx_bf16_available, "whether bf16_linear_packed runs on AMX tiles here");
  m.def("bf16_packed_available", &bf16_packed_available,
        "whether bf16_linear_packed can run here (AMX-BF16 tiles or AVX512-BF16)");
  m.def("bf16_linear_packed", &bf16_linear_packed,
        "bf16 rows x a weight packed for the tiles (AMX-BF16, else AVX512-BF16)",
        py::arg("x"), py::arg("packed"), py::arg("bias") = py::none(), py::arg("swiglu") = 0, py::arg("variant") = -1);
  m.def("bf16_linear_packed_argmax", &bf16_linear_packed_argmax,
        "each row's first argmax of bf16_linear_packed(x, packed), without writing the products", py::arg("x"),
        py::arg("packed"), py::arg("variant") = -1);
  m.def("product_variants", &product_variants,
        "the packed kernels' variants this CPU runs (0 AMX, 1 AVX-512 dot products, 2 AVX2 + FMA, 3 AVX-512F FMA)",
        py::arg("int8"));
  m.def("w8a8_linear", &w8a8_linear, "int8 activations x int8 weights (oneDNN), rescaled to x's dtype",
        py::arg("x"), py::arg("packed"), py::arg("w_scales"), py::arg("w_zero_points"), py::arg("bias") = py::none());
  py::class_<ForwardPlan>(m, "ForwardPlan")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, double, at::Tensor, at::Tensor>())
      .def("add_layer", &ForwardPlan::add_layer, py::arg("ln1"), py::arg("ln2"), py::arg("k_cache"),
           py::arg("v_cache"), py::arg("qkv"), py::arg("o"), py::arg("gate_up"), py::arg("down"),
           py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none())
      .def("run", &ForwardPlan::run, py::arg("x"), py::arg("positions"), py::arg("slot_mapping"),
           py::arg("block_tables"), py::arg("seq_lens"), py::arg("chunks"), py::arg("lora_fn") = 0,
           py::arg("lora_step") = 0, py::call_guard<py::gil_scoped_release>());
}
