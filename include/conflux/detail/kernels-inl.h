// Highway kernels behind conflux/kernels.h. Internal: included only by daemon/core/kernels.cc,
// once per SIMD target (foreach_target.h re-includes it via HWY_TARGET_INCLUDE).
//
// Bit-exactness across targets.
// - Element-wise kernels are one IEEE operation per element (two for axpy: a product rounded to
//   float, then a sum), the same on every target and in the scalar tails. GCC contracts a * b + c
//   into an FMA whenever the target has FMA (AVX2 and up) and -ffp-contract=fast is in effect,
//   which is its default for C++ even with -std=c++20 (only ISO C turns it off), across
//   statements and through Highway's Mul/Add, whose x86 intrinsics are plain vector arithmetic
//   to GCC. Contraction is therefore switched off for this file's functions below; clang's
//   default (-ffp-contract=on) only contracts within one expression, which the code never writes.
// - dot: the products of two floats are exact in double, so the only roundings are the additions,
//   done in the order the header specifies. The 8 accumulators live in four 128-bit double
//   vectors whatever the target's width (lane j of vector v is accumulator 2v + j), so every
//   target performs the same additions; the SCALAR target (1 lane) uses 8 scalars.
// - random_uniform is integer arithmetic plus an exact conversion and an exact multiply by 2^-24.
//
// Unaligned pointers. Every vector access is LoadU/StoreU (full vectors or, for the 2-float loads
// of dot, _mm_loadl_epi64: true unaligned accesses on x86; memcpy on SCALAR/EMU128). The float
// pointers may be misaligned for float; they are never dereferenced directly (tails go through
// memcpy). The tests run every target on odd addresses, also under -fsanitize=address,undefined.

#if defined(CONFLUX_DETAIL_KERNELS_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef CONFLUX_DETAIL_KERNELS_INL_H_
#undef CONFLUX_DETAIL_KERNELS_INL_H_
#else
#define CONFLUX_DETAIL_KERNELS_INL_H_
#endif

#include <cstddef>
#include <cstdint>
#include <cstring>

#include <hwy/highway.h>

#include "conflux/kernels.h"

HWY_BEFORE_NAMESPACE();
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif
namespace conflux::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Tails (fewer elements than one vector) go through memcpy, as the pointers may be misaligned.
inline float LoadF32(const float* base, std::size_t i) {
  float v;
  std::memcpy(&v, base + i, sizeof v);
  return v;
}
inline void StoreF32(float v, float* base, std::size_t i) { std::memcpy(base + i, &v, sizeof v); }

// a and b may be the same array; otherwise they must not overlap.
inline void SubF32(float* a, const float* b, std::size_t n) {
  const hn::ScalableTag<float> d;
  const std::size_t lanes = hn::Lanes(d);
  std::size_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    hn::StoreU(hn::Sub(hn::LoadU(d, a + i), hn::LoadU(d, b + i)), d, a + i);
  }
  for (; i < n; ++i) StoreF32(LoadF32(a, i) - LoadF32(b, i), a, i);
}

inline void AddF32(float* a, const float* b, std::size_t n) {
  const hn::ScalableTag<float> d;
  const std::size_t lanes = hn::Lanes(d);
  std::size_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    hn::StoreU(hn::Add(hn::LoadU(d, a + i), hn::LoadU(d, b + i)), d, a + i);
  }
  for (; i < n; ++i) StoreF32(LoadF32(a, i) + LoadF32(b, i), a, i);
}

// y + (a * x): the product is rounded to float, then the sum (never MulAdd).
inline void AxpyF32(float a, const float* x, float* y, std::size_t n) {
  const hn::ScalableTag<float> d;
  const std::size_t lanes = hn::Lanes(d);
  const auto va = hn::Set(d, a);
  std::size_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    const auto product = hn::Mul(va, hn::LoadU(d, x + i));
    hn::StoreU(hn::Add(hn::LoadU(d, y + i), product), d, y + i);
  }
  for (; i < n; ++i) {
    const float product = a * LoadF32(x, i);
    StoreF32(LoadF32(y, i) + product, y, i);
  }
}

inline void ScaleF32(float a, float* y, std::size_t n) {
  const hn::ScalableTag<float> d;
  const std::size_t lanes = hn::Lanes(d);
  const auto va = hn::Set(d, a);
  std::size_t i = 0;
  for (; i + lanes <= n; i += lanes) hn::StoreU(hn::Mul(hn::LoadU(d, y + i), va), d, y + i);
  for (; i < n; ++i) StoreF32(LoadF32(y, i) * a, y, i);
}

inline double DotF32(const float* x, const float* y, std::size_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::size_t i = 0;
#if HWY_TARGET != HWY_SCALAR
  const hn::FixedTag<double, 2> dd;
  const hn::Rebind<float, decltype(dd)> df;  // 2 floats
  auto acc01 = hn::Zero(dd), acc23 = hn::Zero(dd), acc45 = hn::Zero(dd), acc67 = hn::Zero(dd);
  const auto product = [&](std::size_t k) {  // exact: 24-bit significands, double has 53
    return hn::Mul(hn::PromoteTo(dd, hn::LoadU(df, x + k)),
                   hn::PromoteTo(dd, hn::LoadU(df, y + k)));
  };
  for (; i + 8 <= n; i += 8) {
    acc01 = hn::Add(acc01, product(i));
    acc23 = hn::Add(acc23, product(i + 2));
    acc45 = hn::Add(acc45, product(i + 4));
    acc67 = hn::Add(acc67, product(i + 6));
  }
  hn::StoreU(acc01, dd, acc);
  hn::StoreU(acc23, dd, acc + 2);
  hn::StoreU(acc45, dd, acc + 4);
  hn::StoreU(acc67, dd, acc + 6);
#endif
  // The tail (everything on SCALAR) continues with element k into accumulator k % 8.
  for (; i < n; ++i) {
    const double p = static_cast<double>(LoadF32(x, i)) * static_cast<double>(LoadF32(y, i));
    acc[i % 8] += p;
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// fmix32 of MurmurHash3 on every lane (u32 multiplies wrap modulo 2^32; on SSSE3, Highway
// 1.0.3 emulates the missing pmulld with two pmuludq).
template <class V>
HWY_INLINE V Fmix32(const hn::DFromV<V> du, V h) {
  h = hn::Xor(h, hn::ShiftRight<16>(h));
  h = hn::Mul(h, hn::Set(du, 0x85EBCA6Bu));
  h = hn::Xor(h, hn::ShiftRight<13>(h));
  h = hn::Mul(h, hn::Set(du, 0xC2B2AE35u));
  return hn::Xor(h, hn::ShiftRight<16>(h));
}

inline void RandomUniform(std::uint64_t key, std::uint64_t first, std::size_t n, float* out) {
  const hn::ScalableTag<float> df;
  const hn::RebindToUnsigned<decltype(df)> du;
  const hn::RebindToSigned<decltype(df)> di;
  const std::size_t lanes = hn::Lanes(df);
  const auto k0 = hn::Set(du, static_cast<std::uint32_t>(key));
  const auto scale = hn::Set(df, 0x1p-24f);
  const auto step = hn::Set(du, static_cast<std::uint32_t>(lanes));
  std::size_t i = 0;
  while (i < n) {
    // One segment: the elements up to the next multiple of 2^32 (or the end), which share
    // hi32(e); lo32(e) then counts up without wrapping.
    const std::uint64_t e = first + i;
    const auto lo = static_cast<std::uint32_t>(e);
    const auto hi = static_cast<std::uint32_t>(e >> 32);
    const std::uint64_t in_segment = (std::uint64_t{1} << 32) - lo;
    const std::size_t end = n - i <= in_segment ? n : i + static_cast<std::size_t>(in_segment);
    const auto salt = hn::Set(du, static_cast<std::uint32_t>(key >> 32) ^ (hi * 0x9E3779B9u));
    auto index = hn::Iota(du, lo);  // lo32 of elements i .. i + lanes - 1
    for (; i + lanes <= end; i += lanes) {
      const auto h = Fmix32(du, hn::Xor(Fmix32(du, hn::Xor(index, k0)), salt));
      // h >> 8 < 2^24 converts exactly; the product by 2^-24 is exact too.
      const auto u = hn::ConvertTo(df, hn::BitCast(di, hn::ShiftRight<8>(h)));
      hn::StoreU(hn::Mul(u, scale), df, out + i);
      index = hn::Add(index, step);
    }
    for (; i < end; ++i) StoreF32(random_uniform_at(key, first + i), out, i);
  }
}

}  // namespace conflux::HWY_NAMESPACE
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
HWY_AFTER_NAMESPACE();

#endif  // include guard toggled per target
