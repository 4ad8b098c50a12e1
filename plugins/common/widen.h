// Four inputs at a time widened to double in a GCC/Clang vector (four doubles per vector: the
// same bits on every instruction set under CONFLUX_MULTIVERSION), from float32 or stored BF16
// inputs (common/inputs.h). Used by the double-precision statistics kernels of slerp and
// model_stock.
#pragma once

#include <cstdint>
#include <cstring>

#include "inputs.h"

namespace conflux::plugins {

typedef double v4d __attribute__((vector_size(32)));

// By reference: returning a 32-byte vector from a function built without AVX changes the ABI
// (-Wpsabi); these are always inlined. Float32: one vcvtps2pd (__builtin_convertvector on eight
// floats compiles to extracts and inserts).
[[gnu::always_inline]] inline void widen4(const float* p, v4d& out) { out = v4d{p[0], p[1], p[2], p[3]}; }

// Stored BF16: the four patterns interleaved with zeros are their float32 bits (exact): one
// 8-byte load, one vpunpcklwd, then the same vcvtps2pd, on every instruction set. (The scalar
// fallback, for compilers without __builtin_shufflevector, is left to the SLP vectorizer, which
// turns it into scalar conversions through the stack in model_stock's statistics kernels.)
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)  // GCC 12, Clang
#define CFX_SHUFFLEVECTOR 1
#endif
#endif
[[gnu::always_inline]] inline void widen4(const std::uint16_t* p, v4d& out) {
#ifdef CFX_SHUFFLEVECTOR
  typedef std::uint16_t v8h __attribute__((vector_size(16)));
  typedef std::uint64_t v2q __attribute__((vector_size(16)));
  typedef float v4f __attribute__((vector_size(16)));
  std::uint64_t q;
  std::memcpy(&q, p, sizeof q);
  const v2q low = {q, 0};
  v8h h;
  std::memcpy(&h, &low, sizeof h);
  const v8h bits = __builtin_shufflevector(v8h{}, h, 0, 8, 1, 9, 2, 10, 3, 11);  // h[i] << 16 in lane i
  v4f f;
  std::memcpy(&f, &bits, sizeof f);
#else
  const float f[4] = {value(p, 0), value(p, 1), value(p, 2), value(p, 3)};
#endif
  out = v4d{f[0], f[1], f[2], f[3]};
}
#undef CFX_SHUFFLEVECTOR

}  // namespace conflux::plugins
