// Kernels that read a chunk's inputs in either form the host hands out: float32 arrays, or the
// stored BF16 values of a pass with CFX_PASS_BF16_INPUTS (read straight from the mapped files,
// without the host's conversion sweep). A BF16 value widens to float32 exactly, so a kernel
// templated on the input type gives the same bits from both.
#pragma once

#include <conflux/plugin.hpp>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define CONFLUX_PLUGINS_AVX512_LOADS 1
#endif

namespace conflux::plugins {

inline float value(const float* p, std::size_t k) { return p[k]; }
inline float value(const std::uint16_t* p, std::size_t k) { return sdk::bf16_to_float(p[k]); }

#ifdef CONFLUX_PLUGINS_AVX512_LOADS
// Whether the hand-written AVX-512 kernels run (decided once per process): the CPU has AVX-512F
// and the environment does not set CONFLUX_PORTABLE_KERNELS=1. That setting selects the portable
// kernels, which give the same bits: the tests run both forms on one machine, and a user can
// rule the AVX-512 ones out when chasing a discrepancy. (The CONFLUX_MULTIVERSION clones are the
// same source compiled for several ISAs; the setting does not choose among them.)
inline bool have_avx512() {
  static const bool yes = [] {
    const char* portable = std::getenv("CONFLUX_PORTABLE_KERNELS");
    if (portable && std::strcmp(portable, "1") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0;
  }();
  return yes;
}

// 16 inputs as float32 lanes, for hand-written AVX-512 kernels: loaded, or widened from stored
// BF16 (to 32 bits, shifted into the high half). The zero-masking forms with every lane on: GCC
// 12 warns that the plain forms' undefined source "may be used uninitialized".
__attribute__((target("avx512f"))) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
// 16 BF16 values zero-extended to 32-bit lanes, as float32 (the value's bits in the high half).
__attribute__((target("avx512f"))) inline __m512 bf16_as_f32(__m512i wide) {
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(static_cast<__mmask16>(0xFFFF), wide, 16));
}
__attribute__((target("avx512f"))) inline __m512 load16(const std::uint16_t* p) {
  const auto all = static_cast<__mmask16>(0xFFFF);
  return bf16_as_f32(_mm512_maskz_cvtepu16_epi32(all, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
}
#endif

// f(models, base) with the chunk's typed inputs: (const float* const*, const float*) or
// (const std::uint16_t* const*, const std::uint16_t*); base is null without a base.
template <class F>
decltype(auto) with_inputs(const sdk::Chunk& c, F&& f) {
  if (c.is_bf16()) return f(c.bf16_models(), c.bf16_base());
  return f(c.models(), c.base().data());
}

}  // namespace conflux::plugins
