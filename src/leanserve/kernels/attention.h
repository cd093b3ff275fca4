// Decode attention over the paged KV cache: the portable loop, AVX-512 (float), int8 cache on
// VNNI, bf16 cache on VDPBF16PS; the AMX variant is in attention_amx.h. See the top of
// paged_attention.cpp.
// Part of the paged_attention.cpp build unit (included there, in order, after the headers it needs).
#pragma once

namespace {

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
