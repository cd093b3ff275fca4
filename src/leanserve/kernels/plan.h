// The ForwardPlan: a whole step's layers in one C++ call.
// Part of the paged_attention.cpp build unit (included there, in order, after the headers it needs).
#pragma once

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
