// The packed products on AVX-512 dot products (AVX512-BF16 / AVX512-VNNI), for CPUs without
// the tile unit. The public entry points are in products.h.
// Part of the paged_attention.cpp build unit (included there, in order, after the headers it needs).
#pragma once

#if defined(__x86_64__) && defined(__AVX512F__)
namespace {

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
}  // namespace
#endif
