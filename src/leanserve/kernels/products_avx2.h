// Products on AVX2 + FMA, for CPUs without AVX-512 (AMD Zen 2/3, many desktops and VMs), and
// the bf16 one in 512-bit vectors for CPUs with AVX-512F but no fast bf16 dot products.
//
// They read the weights as the AMX / AVX-512 kernels do (pack_for_tiles in models/quant.py:
// [N / 16, K / g, 16, g], a column block's 64-byte rows its K pairs (bf16) or quads (int8)
// in order), so one packed weight serves every kernel and the choice between them is made
// per call (kernels/select.py measures which is fastest for each row band).
//
// bf16: the weight is widened to float32 in registers (a bf16 is the top half of a float32:
// the even input of a pair is the 32-bit lane shifted left by 16, the odd one the lane with
// its low half cleared) and multiplied by float32 rows with FMA, one accumulator per output,
// in K order. So an output's sum is the same chain of roundings whatever the row count, the
// tile shape or the thread count: a row's result never depends on the other rows of the call.
// (torch's own bf16 matmul on such CPUs emulates bf16 arithmetic: ~40x slower at one row.)
//
// int8 (W8A8): the int8 rows and weights widened to int16 and multiplied with VPMADDWD, which
// sums pairs of products exactly in int32 (VPMADDUBSW, what oneDNN uses on AVX2, saturates
// them in int16). The int32 sums are exact, so the results are those of every other W8A8 path.
//
// Every function using vector intrinsics carries the target attribute, so this code builds
// and is only called (avx2::available) where the CPU has the instructions, whatever -march.
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include <ATen/Parallel.h>

#define LEANSERVE_AVX2 __attribute__((target("avx2,fma")))

namespace avx2 {

inline bool available() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

// Sums of R float32 rows (x, K apart) times C column blocks of a packed bf16 weight (b, K * 16
// apart), stored as the tiles store theirs: rows of 32, blocks 2h and 2h + 1 at out + h * R * 32.
template <int R, int C>
LEANSERVE_AVX2 void bf16_tile(const float* x, int64_t K, const uint16_t* b, float* out) {
  __m256 acc[R][C][2];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c][0] = acc[r][c][1] = _mm256_setzero_ps();
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  const int64_t bs = K * 16;
  for (int64_t p = 0; p < K / 2; ++p) {
    for (int c = 0; c < C; ++c)
      for (int h = 0; h < 2; ++h) {  // columns 8h..8h + 7 of the block, each (even, odd) input
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + c * bs + p * 32 + h * 16));
        const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(v, high));
        for (int r = 0; r < R; ++r) {
          acc[r][c][h] = _mm256_fmadd_ps(even, _mm256_broadcast_ss(x + r * K + 2 * p), acc[r][c][h]);
          acc[r][c][h] = _mm256_fmadd_ps(odd, _mm256_broadcast_ss(x + r * K + 2 * p + 1), acc[r][c][h]);
        }
      }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      for (int h = 0; h < 2; ++h) _mm256_storeu_ps(out + (c / 2) * R * 32 + r * 32 + (c % 2) * 16 + h * 8, acc[r][c][h]);
}

// bf16_tile in 512-bit vectors, for CPUs with AVX-512F but no AVX512-BF16 (Intel Skylake-SP to
// Ice Lake, or with AVX512-BF16 dot products slower than its FMA units): a block's 16 columns
// are one register, and each output the same FMA chain in K order as bf16_tile's, so the two
// give the same bits and may share a shape's row bands.
template <int R, int C>
__attribute__((target("avx512f"))) void bf16_tile512(const float* x, int64_t K, const uint16_t* b, float* out) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  const int64_t bs = K * 16;
  for (int64_t p = 0; p < K / 2; ++p) {
    for (int c = 0; c < C; ++c) {
      const __m512i v = _mm512_loadu_si512(b + c * bs + p * 32);
      const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(v, high));
      for (int r = 0; r < R; ++r) {
        acc[r][c] = _mm512_fmadd_ps(even, _mm512_set1_ps(x[r * K + 2 * p]), acc[r][c]);
        acc[r][c] = _mm512_fmadd_ps(odd, _mm512_set1_ps(x[r * K + 2 * p + 1]), acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + (c / 2) * R * 32 + r * 32 + (c % 2) * 16, acc[r][c]);
}

inline bool avx512f_available() {
  static const bool ok = __builtin_cpu_supports("avx512f");
  return ok;
}

// The same for int16 rows (int8 values) and a packed int8 weight (b, K * 16 apart): exact int32 sums.
template <int R, int C>
LEANSERVE_AVX2 void int8_tile(const int16_t* x, int64_t K, const int8_t* b, int32_t* out) {
  __m256i acc[R][C][4];  // [c][i]: columns 4i..4i + 3 of block c, two partial sums each
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      for (int i = 0; i < 4; ++i) acc[r][c][i] = _mm256_setzero_si256();
  const int64_t bs = K * 16;
  for (int64_t p = 0; p < K / 4; ++p) {
    __m256i xq[R];  // the row's 4 inputs of this quad, in every 64-bit lane
    for (int r = 0; r < R; ++r) {
      int64_t four;
      std::memcpy(&four, x + r * K + 4 * p, sizeof(four));
      xq[r] = _mm256_set1_epi64x(four);
    }
    for (int c = 0; c < C; ++c)
      for (int i = 0; i < 4; ++i) {
        const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + c * bs + p * 64 + i * 16)));
        for (int r = 0; r < R; ++r) acc[r][c][i] = _mm256_add_epi32(acc[r][c][i], _mm256_madd_epi16(w, xq[r]));
      }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      for (int i = 0; i < 4; i += 2) {  // pair sums in column order: hadd gives 0 1 4 5 | 2 3 6 7
        const __m256i s = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[r][c][i], acc[r][c][i + 1]), 0xD8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + (c / 2) * R * 32 + r * 32 + (c % 2) * 16 + i * 4), s);
      }
}

// acc[j] = c[j] * w_scale[j], each product rounded to float32: W8A8's epilogue first step. Not
// inlined, so that -ffast-math cannot merge it with the row scale's multiply that follows.
__attribute__((noinline)) inline void scale_sums(const int32_t* c, const float* ws, float* acc, int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] = static_cast<float>(c[j]) * ws[j];
}

// One tile of R rows and C (1..4) blocks through `tile`, then the epilogue over its sums.
template <typename Acc, int R, int C, typename Row, typename W, typename Tile, typename Epilogue>
inline void run_tile(const Tile& tile, const Row* x, int64_t m, int64_t K, const W* wp, int64_t nb,
                     const Epilogue& epilogue) {
  alignas(32) Acc sums[2 * R * 32];
  tile(x + m * K, K, wp + nb * K * 16, sums);
  for (int h = 0; 2 * h < C; ++h) epilogue(sums + h * R * 32, m, R, nb * 16 + 32 * h, std::min(2, C - 2 * h) * 16);
}

// x [M, K] (float32 rows for bf16 weights, int16 for int8) times the packed weight [N / 16, ...]:
// the threads take groups of 4 column blocks; each passes its groups over chunks of kChunk rows
// (a chunk's rows and a group's weights stay in L2), 4 rows by 1 block (wide: 2), 2 by 2, or
// 1 by 4 (8 accumulators each in AVX2: FMA's latency covered). epilogue(sums, m0, rows, n0, cols) as the tiles'.
constexpr int64_t kChunk = 32;

// wide: bf16 in 512-bit vectors (bf16_tile512)
template <typename Row, typename W, typename Epilogue>
void product(const Row* x, int64_t M, int64_t K, const W* wp, int64_t N, const Epilogue& epilogue, bool wide = false) {
  using Acc = std::conditional_t<std::is_same_v<W, int8_t>, int32_t, float>;
  auto tile = [wide](auto r, auto c) {
    constexpr int kR = decltype(r)::value, kC = decltype(c)::value;
    if constexpr (std::is_same_v<W, int8_t>) return &int8_tile<kR, kC>;
    else return wide ? &bf16_tile512<kR, kC> : &bf16_tile<kR, kC>;
  };
  using I1 = std::integral_constant<int, 1>;
  using I2 = std::integral_constant<int, 2>;
  using I3 = std::integral_constant<int, 3>;
  using I4 = std::integral_constant<int, 4>;
  constexpr bool kInt8 = std::is_same_v<W, int8_t>;  // int8 tiles hold 4 accumulators per block: half the rows
  const int64_t blocks = N / 16, groups = (blocks + 3) / 4;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t m0 = 0; m0 < M; m0 += kChunk) {
      const int64_t m1 = std::min(M, m0 + kChunk);
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t nb0 = 4 * g, nb1 = std::min(blocks, nb0 + 4);
        int64_t m = m0;
        if constexpr (kInt8) {
          for (; m + 2 <= m1; m += 2)
            for (int64_t nb = nb0; nb < nb1; ++nb) run_tile<Acc, 2, 1>(tile(I2{}, I1{}), x, m, K, wp, nb, epilogue);
          if (m < m1) {
            int64_t nb = nb0;
            for (; nb + 2 <= nb1; nb += 2) run_tile<Acc, 1, 2>(tile(I1{}, I2{}), x, m, K, wp, nb, epilogue);
            if (nb < nb1) run_tile<Acc, 1, 1>(tile(I1{}, I1{}), x, m, K, wp, nb, epilogue);
          }
        } else {
          for (; m + 4 <= m1; m += 4) {
            int64_t nb = nb0;
            if (wide)  // one register a block: two blocks for 8 accumulators
              for (; nb + 2 <= nb1; nb += 2) run_tile<Acc, 4, 2>(tile(I4{}, I2{}), x, m, K, wp, nb, epilogue);
            for (; nb < nb1; ++nb) run_tile<Acc, 4, 1>(tile(I4{}, I1{}), x, m, K, wp, nb, epilogue);
          }
          for (; m + 2 <= m1; m += 2) {
            int64_t nb = nb0;
            for (; nb + 2 <= nb1; nb += 2) run_tile<Acc, 2, 2>(tile(I2{}, I2{}), x, m, K, wp, nb, epilogue);
            if (nb < nb1) run_tile<Acc, 2, 1>(tile(I2{}, I1{}), x, m, K, wp, nb, epilogue);
          }
          if (m < m1) {
            switch (nb1 - nb0) {
              case 4: run_tile<Acc, 1, 4>(tile(I1{}, I4{}), x, m, K, wp, nb0, epilogue); break;
              case 3: run_tile<Acc, 1, 3>(tile(I1{}, I3{}), x, m, K, wp, nb0, epilogue); break;
              case 2: run_tile<Acc, 1, 2>(tile(I1{}, I2{}), x, m, K, wp, nb0, epilogue); break;
              default: run_tile<Acc, 1, 1>(tile(I1{}, I1{}), x, m, K, wp, nb0, epilogue);
            }
          }
        }
      }
    }
  });
}

}  // namespace avx2

#undef LEANSERVE_AVX2
#endif
