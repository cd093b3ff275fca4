// Decode attention straight over the paged KV cache, for CPUs.
//
// Each decode row is one new query token of one sequence. Its keys and values live in
// whole blocks of the pool ([blocks, block_size, kv_heads, head_dim]) named by the row's
// block table. Gathering those blocks into a padded batch and calling SDPA copies every
// key and value once more per layer and pays the kernel's per-call overheads for a query
// of length one; here each sequence's task reads its blocks in place, once, and computes
// all query heads from each token's row of keys (grouped-query heads share a kv head).
// Every task only reads its own sequence's cache, so a row's result does not depend on
// which other sequences share the step (batch-invariant by construction).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "products_avx2.h"

bool amx_bf16_available();  // below, with the AMX linears
bool bf16_packed_available();
bool amx_int8_available();

// The parts, one per operation family, in one build unit (the order matters: each uses the
// ones above it).
#include "vec.h"
#include "attention.h"
#include "kv_cache.h"
#include "isa.h"
#include "products_amx.h"
#include "attention_amx.h"
#include "products_avx512.h"
#include "products.h"
#include "elementwise.h"
#include "plan.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"), py::arg("seq_lens"),
        py::arg("window"), py::arg("scale"), py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none());
  m.def("write_kv", &write_kv, "a step's keys or values into their cache slots (int8: quantized per row)");
  m.def("rms_norm", &rms_norm, "RMSNorm, optionally after adding x into a residual in place");
  m.def("rope_", &rope_, "rotary embedding in place on the query and key heads of qkv rows");
  m.def("rope_write_kv_", &rope_write_kv_, "rope_, then the rows' keys and values into their cache slots");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  m.def("first_argmax", &first_argmax, "index of each row's first maximum");
  m.def("gather_dequant", &gather_dequant, "whole blocks of an int8 cache, dequantized");
  m.def("quantize_rows", &quantize_rows, "each row to int8 with its absmax / 127 scale");
  m.def("amx_int8_available", &amx_int8_available, "whether w8a8_linear_packed runs on AMX tiles here");
  m.def("w8a8_packed_available", &w8a8_packed_available,
        "whether w8a8_linear_packed can run here (AMX-INT8 tiles or AVX512-VNNI)");
  m.def("w8a8_linear_packed", &w8a8_linear_packed,
        "W8A8: int8 rows x a weight packed for the tiles (AMX-INT8, else AVX512-VNNI)",
        py::arg("x"), py::arg("packed"), py::arg("w_scales"), py::arg("bias") = py::none(),
        py::arg("sums128") = py::none(), py::arg("variant") = -1);
  m.def("w8a8_column_sums", &w8a8_column_sums, "128 x each column's sum of a packed int8 weight (w8a8_linear_packed's sums128)",
        py::arg("packed"));
  m.def("amx_bf16_available", &amx_bf16_available, "whether bf16_linear_packed runs on AMX tiles here");
  m.def("bf16_packed_available", &bf16_packed_available,
        "whether bf16_linear_packed can run here (AMX-BF16 tiles or AVX512-BF16)");
  m.def("bf16_linear_packed", &bf16_linear_packed,
        "bf16 rows x a weight packed for the tiles (AMX-BF16, else AVX512-BF16)",
        py::arg("x"), py::arg("packed"), py::arg("bias") = py::none(), py::arg("swiglu") = 0, py::arg("variant") = -1);
  m.def("bf16_linear_packed_argmax", &bf16_linear_packed_argmax,
        "each row's first argmax of bf16_linear_packed(x, packed), without writing the products", py::arg("x"),
        py::arg("packed"), py::arg("variant") = -1);
  m.def("product_variants", &product_variants,
        "the packed kernels' variants this CPU runs (0 AMX, 1 AVX-512 dot products, 2 AVX2 + FMA, 3 AVX-512F FMA)",
        py::arg("int8"));
  m.def("w8a8_linear", &w8a8_linear, "int8 activations x int8 weights (oneDNN), rescaled to x's dtype",
        py::arg("x"), py::arg("packed"), py::arg("w_scales"), py::arg("w_zero_points"), py::arg("bias") = py::none());
  py::class_<ForwardPlan>(m, "ForwardPlan")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, double, at::Tensor, at::Tensor>())
      .def("add_layer", &ForwardPlan::add_layer, py::arg("ln1"), py::arg("ln2"), py::arg("k_cache"),
           py::arg("v_cache"), py::arg("qkv"), py::arg("o"), py::arg("gate_up"), py::arg("down"),
           py::arg("k_scale") = py::none(), py::arg("v_scale") = py::none())
      .def("run", &ForwardPlan::run, py::arg("x"), py::arg("positions"), py::arg("slot_mapping"),
           py::arg("block_tables"), py::arg("seq_lens"), py::arg("chunks"), py::arg("lora_fn") = 0,
           py::arg("lora_step") = 0, py::call_guard<py::gil_scoped_release>());
}
