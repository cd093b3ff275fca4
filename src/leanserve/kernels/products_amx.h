// Products on AMX tiles (AMX-INT8 for W8A8, AMX-BF16 for bf16): the tile loop, its
// configuration, and the split over threads. The public entry points are in products.h.
// Part of the paged_attention.cpp build unit (included there, in order, after the headers it needs).
#pragma once

// ---- W8A8 on AMX tiles ----------------------------------------------------------------
// oneDNN's int8 product (above) costs ~30 us per call before any arithmetic and used the
// second core poorly at decode sizes (one step's 121 int8 products: 1.4x faster on two
// threads than on one). Here the product runs straight on the AMX-INT8 tile unit: C (16 x 16
// int32) += A (16 rows x 64 int8) . B (64 x 16 int8, stored as 16 rows of 16 columns x 4)
// per instruction, four C tiles (32 rows x 32 columns) per pass over K. The int32 sums are
// exact and the epilogue rounds as above (sum * w_scale, then rescale_row), so the result is
// bit-equal with the oneDNN path; a row's result never depends on the other rows. SmolLM2's
// projections, 30 layers, 2 threads (us per layer): 184 vs 328 at 64 rows, 104 vs 177 at one.

#if defined(__x86_64__) && defined(__AVX512F__)
namespace {

struct alignas(64) TileConfig {  // palette 1: every tile 16 rows of 64 bytes
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

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

}  // namespace
#endif
