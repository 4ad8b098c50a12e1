// Vector kernels of the merge host: the arithmetic the engine does around a strategy (task
// vectors, adding the base back) and the helpers it offers plugins through the SDK host table.
//
// Contract for every function: pointers may be unaligned; n may be any count (0 included);
// results are bit-identical on every SIMD target (no FMA contraction, fixed summation order),
// so a merge gives the same bytes on any x86-64 CPU. Highway kernels, dynamic dispatch.
// Thread-safe, no allocation.
#pragma once

#include <cstddef>
#include <cstdint>

namespace conflux {

// a[k] -= b[k]
void sub_f32(float* a, const float* b, std::size_t n);
// a[k] += b[k]
void add_f32(float* a, const float* b, std::size_t n);
// y[k] += a * x[k]   (a product, then a sum: two roundings, never fused)
void axpy_f32(float a, const float* x, float* y, std::size_t n);
// y[k] *= a
void scale_f32(float a, float* y, std::size_t n);
// Sum of x[k] * y[k] in double: the products are exact in double; they are added into 8
// accumulators (element k goes to accumulator k mod 8, in increasing k), which are then summed
// as ((a0+a1)+(a2+a3))+((a4+a5)+(a6+a7)).
double dot_f32(const float* x, const float* y, std::size_t n);

// Counter-based random numbers, as specified in sdk/include/conflux/plugin.h (cfx_host).
std::uint64_t random_key(std::uint64_t seed, const char* tensor_name, std::uint32_t model);
// out[k] = uniform [0, 1) for element first + k of stream `key`.
void random_uniform(std::uint64_t key, std::uint64_t first, std::size_t n, float* out);
// The scalar definition random_uniform must reproduce (the tests' oracle).
float random_uniform_at(std::uint64_t key, std::uint64_t element);

}  // namespace conflux
