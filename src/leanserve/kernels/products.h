// The projections' entry points: W8A8 (oneDNN, or packed on AMX / AVX512-VNNI / AVX2) and
// packed bf16 (AMX / AVX512-BF16 / AVX-512F / AVX2), their epilogues, the lm_head's argmax.
// The ISA kernels are products_amx.h, products_avx512.h and products_avx2.h.
// Part of the paged_attention.cpp build unit (included there, in order, after the headers it needs).
#pragma once

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

#if defined(__x86_64__) && defined(__AVX512F__)
namespace {

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
