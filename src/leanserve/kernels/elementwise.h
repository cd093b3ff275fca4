// Fused elementwise kernels: RMSNorm (+ residual), RoPE (+ KV writes), SiLU*up, greedy argmax.
// Part of the paged_attention.cpp build unit (included there, in order, after the headers it needs).
#pragma once

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
