// bf16 decode attention with the scores on AMX tiles (declared in attention.h).
// Part of the paged_attention.cpp build unit (included there, in order, after the headers it needs).
#pragma once

#if defined(__x86_64__) && defined(__AVX512F__)
namespace {

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

}  // namespace
#endif
