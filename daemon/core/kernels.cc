// Vector kernels of the merge host: dynamic dispatch to the Highway kernels in
// conflux/detail/kernels-inl.h (compiled once per target by foreach_target.h), and the scalar
// definition of the counter-based random numbers.
#include "conflux/kernels.h"

#include <cstddef>
#include <cstdint>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "conflux/detail/kernels-inl.h"
#include <hwy/foreach_target.h>  // must come before highway.h
#include <hwy/highway.h>

#include "conflux/detail/kernels-inl.h"  // the static target's instantiation

#if HWY_ONCE
namespace conflux {

HWY_EXPORT(SubF32);
HWY_EXPORT(AddF32);
HWY_EXPORT(AxpyF32);
HWY_EXPORT(ScaleF32);
HWY_EXPORT(DotF32);
HWY_EXPORT(RandomUniform);

void sub_f32(float* a, const float* b, std::size_t n) { HWY_DYNAMIC_DISPATCH(SubF32)(a, b, n); }
void add_f32(float* a, const float* b, std::size_t n) { HWY_DYNAMIC_DISPATCH(AddF32)(a, b, n); }
void axpy_f32(float a, const float* x, float* y, std::size_t n) {
  HWY_DYNAMIC_DISPATCH(AxpyF32)(a, x, y, n);
}
void scale_f32(float a, float* y, std::size_t n) { HWY_DYNAMIC_DISPATCH(ScaleF32)(a, y, n); }
double dot_f32(const float* x, const float* y, std::size_t n) {
  return HWY_DYNAMIC_DISPATCH(DotF32)(x, y, n);
}

// The definition in sdk/include/conflux/plugin.h (cfx_host::random_key), stable forever.
namespace {

std::uint64_t mix64(std::uint64_t z) {  // SplitMix64
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::uint32_t fmix32(std::uint32_t h) {  // MurmurHash3's finaliser
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}

std::uint64_t fnv1a64(const char* s) {
  std::uint64_t h = 0xCBF29CE484222325ull;
  for (; *s != '\0'; ++s) {
    h ^= static_cast<unsigned char>(*s);
    h *= 0x100000001B3ull;
  }
  return h;
}

}  // namespace

std::uint64_t random_key(std::uint64_t seed, const char* tensor_name, std::uint32_t model) {
  // Chained, so no two (seed, name, model) share a key but by a 64-bit hash collision. A null
  // name hashes as the empty name.
  return mix64(mix64(mix64(seed) ^ fnv1a64(tensor_name != nullptr ? tensor_name : "")) ^ model);
}

float random_uniform_at(std::uint64_t key, std::uint64_t element) {
  const auto k0 = static_cast<std::uint32_t>(key);
  const auto k1 = static_cast<std::uint32_t>(key >> 32);
  const auto lo = static_cast<std::uint32_t>(element);
  const auto hi = static_cast<std::uint32_t>(element >> 32);
  std::uint32_t h = fmix32(lo ^ k0);
  h = fmix32(h ^ k1 ^ (hi * 0x9E3779B9u));
  return static_cast<float>(h >> 8) * 0x1p-24f;  // both steps exact
}

void random_uniform(std::uint64_t key, std::uint64_t first, std::size_t n, float* out) {
  HWY_DYNAMIC_DISPATCH(RandomUniform)(key, first, n, out);
}

}  // namespace conflux
#endif  // HWY_ONCE
