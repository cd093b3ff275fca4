// KV cache writes and the int8 row quantizer (the int8 cache's rows and W8A8's activations),
// and the dequantizing gather of int8 blocks.
// Part of the paged_attention.cpp build unit (included there, in order, after the headers it needs).
#pragma once

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
