// Shared vector helpers: float conversions, NaN tests on the bits, bf16 widening and
// rounding, SwiGLU of 16 lanes, the softmax's exponentials.
// Part of the paged_attention.cpp build unit (included there, in order, after the headers it needs).
#pragma once

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

#if defined(__AVX512F__)
inline __m512 load_bf16x16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#endif

}  // namespace
