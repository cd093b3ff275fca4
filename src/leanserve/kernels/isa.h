// Which product kernels this CPU runs: the AMX checks (CPUID, the OS's tile state), the
// variants (Variant, measured by kernels/select.py) and their availability.
// Part of the paged_attention.cpp build unit (included there, in order, after the headers it needs).
#pragma once

namespace {
// True when the CPU has the tile unit and the AMX feature of CPUID leaf 7's EDX bit `bit`
// (22 AMX-BF16, 25 AMX-INT8), and the OS lets this process use the tile state (Linux asks
// each process to request it first, as oneDNN does). The module is built with AMX off
// (-mno-amx-*), so only the functions marked for it use it, after this check. LEANSERVE_AMX=0
// turns both kernels off.
bool amx_feature(unsigned bit) {
#if defined(__x86_64__) && defined(__AVX512F__) && defined(SYS_arch_prctl)  // the kernels below need both
  static const bool tiles = [] {
    const char* env = std::getenv("LEANSERVE_AMX");
    if (env != nullptr && std::string(env) == "0") return false;
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1u)) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtileData) == 0;
  }();
  unsigned a = 0, b = 0, c = 0, d = 0;
  return tiles && __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((d >> bit) & 1u);
#else
  (void)bit;
  return false;
#endif
}
}  // namespace

// whether w8a8_linear_packed can run on the tiles here
bool amx_int8_available() {
  static const bool ok = amx_feature(25);
  return ok;
}

// whether bf16_linear_packed can run on the tiles here
bool amx_bf16_available() {
  static const bool ok = amx_feature(22);
  return ok;
}

// whether bf16_linear_packed / w8a8_linear_packed can run here: on the AMX tiles, else on
// AVX512-BF16 / AVX512-VNNI dot products (the module is built for this CPU: -march=native)
constexpr bool kDotProducts =
#if defined(__x86_64__) && defined(__AVX512BF16__) && defined(__AVX512VNNI__)
    true;
#else
    false;
#endif

// The kernels a packed product can run on (the `variant` of bf16_linear_packed and
// w8a8_linear_packed; kernels/select.py measures them and picks one per row band). kAuto: the
// first of AMX tiles, AVX-512 dot products (BF16 / VNNI), AVX-512F FMA (bf16 only), AVX2 + FMA
// that this CPU has. The two FMA variants widen bf16 weights to float32 (products_avx2.h).
enum Variant : int64_t { kAuto = -1, kAmx = 0, kDot = 1, kAvx2 = 2, kAvx512f = 3 };

bool avx2_available() {
#if defined(__x86_64__)
  return avx2::available();
#else
  return false;
#endif
}

bool bf16_packed_available() { return kDotProducts || amx_bf16_available() || avx2_available(); }

bool w8a8_packed_available() { return kDotProducts || amx_int8_available() || avx2_available(); }

// Which variants can run here: bf16 (int8 = false) or W8A8 (int8 = true), fastest-first by kind.
std::vector<int64_t> product_variants(bool int8) {
  std::vector<int64_t> out;
  if (int8 ? amx_int8_available() : amx_bf16_available()) out.push_back(kAmx);
  if (kDotProducts) out.push_back(kDot);
#if defined(__x86_64__)
  if (!int8 && avx2_available() && avx2::avx512f_available()) out.push_back(kAvx512f);
#endif
  if (avx2_available()) out.push_back(kAvx2);
  return out;
}

// `variant` checked against this CPU, kAuto resolved
int64_t resolve_variant(int64_t variant, bool int8) {
  const auto here = product_variants(int8);
  TORCH_CHECK(!here.empty(), "no packed ", int8 ? "int8" : "bf16", " kernel can run on this CPU");
  if (variant == kAuto) return here.front();
  TORCH_CHECK(std::find(here.begin(), here.end(), variant) != here.end(), "kernel variant ", variant,
              " cannot run on this CPU");
  return variant;
}

