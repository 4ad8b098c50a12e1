// Conversions between the floating storage dtypes and float32, the type every merge computes in.
//
// Contract for every function here:
// - `src` and `dst` may be unaligned (safetensors allows any byte offset) and must not overlap;
// - `n` may be any count, including 0 and counts that are not a multiple of the vector width;
// - narrowing (f32 -> bf16, f32 -> f16, f64 -> f32) rounds to nearest, ties to even; values too
//   large become +/-Inf; NaN stays NaN (quiet, sign kept); subnormals are converted exactly
//   where the target can represent them and rounded otherwise (no flush to zero);
// - widening is exact.
// The implementations are Highway kernels chosen at run time for the best target of the CPU
// (dynamic dispatch); results are bit-identical on every target. Thread-safe, no allocation.
#pragma once

#include <cstddef>

#include "conflux/dtype.h"

namespace conflux {

void bf16_to_f32(const void* src, float* dst, std::size_t n);
void f16_to_f32(const void* src, float* dst, std::size_t n);
void f64_to_f32(const void* src, float* dst, std::size_t n);
void f32_to_f32(const void* src, float* dst, std::size_t n);

void f32_to_bf16(const float* src, void* dst, std::size_t n);
void f32_to_f16(const float* src, void* dst, std::size_t n);
void f32_to_f64(const float* src, void* dst, std::size_t n);
void f32_to_f32_out(const float* src, void* dst, std::size_t n);

// Dispatch on a mergeable dtype (F16, BF16, F32, F64); throws std::invalid_argument otherwise.
void to_f32(DType from, const void* src, float* dst, std::size_t n);
void from_f32(DType to, const float* src, void* dst, std::size_t n);
// dst[k] = to_f32(src)[k] - base[k] (a float32 subtraction): a task vector, converted and formed
// in one sweep. `base` must not overlap `dst`.
void to_f32_minus(DType from, const void* src, const float* base, float* dst, std::size_t n);

// Scalar reference conversions (bit patterns in, bit patterns out). They define the rounding
// the vector kernels must reproduce and serve as the tests' oracle.
float bf16_bits_to_f32(unsigned short bits);
float f16_bits_to_f32(unsigned short bits);
unsigned short f32_to_bf16_bits(float v);
unsigned short f32_to_f16_bits(float v);

// Name of the Highway target the kernels dispatch to on this CPU (e.g. "AVX2"), for logs.
const char* convert_target_name();

}  // namespace conflux
