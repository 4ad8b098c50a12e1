// Highway kernels behind conflux/convert.h. Internal: included only by daemon/core/convert.cc,
// once per SIMD target (foreach_target.h re-includes it via HWY_TARGET_INCLUDE).
//
// Bit-exactness across targets. Highway 1.0.3's own conversions disagree between targets, so
// only those that are exact everywhere are used:
// - DemoteTo(bf16) truncates on every target (and can turn a NaN into Inf): not used;
// - f16 DemoteTo/PromoteTo without F16C (SSSE3, SSE4, EMU128, SCALAR) truncate, flush values
//   below 2^-24 to zero and mishandle Inf/NaN: not used;
// - with F16C (AVX2 and up) they are vcvtps2ph with imm 8 (round to nearest even from the
//   immediate, whatever MXCSR says; FTZ/DAZ ignored) and vcvtph2ps: used, and their NaN
//   handling (quiet bit set, payload shifted) is what the scalar reference reproduces;
// - f64 DemoteTo on SCALAR/EMU128 clamps to +/-FLT_MAX instead of rounding to Inf: casts there.
// The rest is integer arithmetic (plus one exact float multiply), the same on every target.
//
// Unaligned pointers. Every vector access is LoadU/StoreU. In Highway 1.0.3 these are
// _mm*_loadu/_mm*_storeu (full vectors), _mm_loadl_epi64/_mm_storel_epi64/_mm_loadl_pi/
// _mm_storel_pi (64-bit partial vectors; GCC implements them through byte-aligned types or
// builtins) on x86, and memcpy (CopySameSize) on SCALAR/EMU128: true unaligned accesses with no
// alignment assumption. The 16-bit and 64-bit pointers formed from the caller's void* may thus
// be misaligned; they are never dereferenced directly (tails go through memcpy). The tests run
// every target on odd addresses, also under -fsanitize=address,undefined.

#if defined(CONFLUX_DETAIL_CONVERT_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef CONFLUX_DETAIL_CONVERT_INL_H_
#undef CONFLUX_DETAIL_CONVERT_INL_H_
#else
#define CONFLUX_DETAIL_CONVERT_INL_H_
#endif

#include <cstddef>
#include <cstdint>
#include <cstring>

#include <hwy/highway.h>

#include "conflux/convert.h"

HWY_BEFORE_NAMESPACE();
namespace conflux::HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// True where the target converts f16 in hardware with the semantics above.
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2 && !defined(HWY_DISABLE_F16C)
#define CONFLUX_F16C 1
#else
#define CONFLUX_F16C 0
#endif

// Tails (fewer elements than one vector) use the scalar reference, which defines the results,
// and memcpy, as the pointers may be misaligned for their type.
template <typename T>
inline T LoadAt(const void* base, std::size_t i) {
  T v;
  std::memcpy(&v, static_cast<const unsigned char*>(base) + sizeof(T) * i, sizeof v);
  return v;
}
template <typename T>
inline void StoreAt(T v, void* base, std::size_t i) {
  std::memcpy(static_cast<unsigned char*>(base) + sizeof(T) * i, &v, sizeof v);
}

// bf16 -> f32 over n elements, each value passed through finish(vector, offset) (resp.
// finish_one(value, offset) in the tail) before it is stored: the plain conversion, or a task
// vector formed in the same sweep.
template <class Finish, class FinishOne>
inline void BF16ToF32Then(const void* src, float* HWY_RESTRICT dst, std::size_t n, Finish finish,
                          FinishOne finish_one) {
  const hn::ScalableTag<float> df;
  const hn::RebindToUnsigned<decltype(df)> du;
  const hn::Rebind<std::uint16_t, decltype(df)> d16;
  const std::size_t lanes = hn::Lanes(df);
  const auto* in = static_cast<const std::uint16_t*>(src);
  std::size_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    const auto bits = hn::PromoteTo(du, hn::LoadU(d16, in + i));
    hn::StoreU(finish(hn::BitCast(df, hn::ShiftLeft<16>(bits)), i), df, dst + i);
  }
  for (; i < n; ++i) StoreAt(finish_one(bf16_bits_to_f32(LoadAt<std::uint16_t>(src, i)), i), dst, i);
}

inline void BF16ToF32(const void* src, float* HWY_RESTRICT dst, std::size_t n) {
  BF16ToF32Then(
      src, dst, n, [](auto v, std::size_t) { return v; }, [](float v, std::size_t) { return v; });
}

// dst = bf16(src) - base: a task vector formed in the same sweep as the conversion.
inline void BF16ToF32Minus(const void* src, const float* HWY_RESTRICT base, float* HWY_RESTRICT dst, std::size_t n) {
  const hn::ScalableTag<float> df;
  BF16ToF32Then(
      src, dst, n, [&](auto v, std::size_t i) { return hn::Sub(v, hn::LoadU(df, base + i)); },
      [&](float v, std::size_t i) { return v - base[i]; });
}

inline void F16ToF32(const void* src, float* HWY_RESTRICT dst, std::size_t n) {
  const hn::ScalableTag<float> df;
  const hn::Rebind<std::uint16_t, decltype(df)> d16;
  const std::size_t lanes = hn::Lanes(df);
  const auto* in = static_cast<const std::uint16_t*>(src);
  std::size_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    const auto h = hn::LoadU(d16, in + i);
#if CONFLUX_F16C
    const hn::Rebind<hwy::float16_t, decltype(df)> df16;
    const auto f = hn::PromoteTo(df, hn::BitCast(df16, h));
#else
    const hn::RebindToUnsigned<decltype(df)> du;
    const hn::RebindToSigned<decltype(df)> di;
    const auto bits = hn::PromoteTo(du, h);
    const auto abs = hn::And(bits, hn::Set(du, 0x7FFFu));
    const auto sign = hn::ShiftLeft<16>(hn::Xor(bits, abs));
    const auto abs_i = hn::BitCast(di, abs);
    // Normal: rebias the exponent by 127 - 15.
    const auto normal = hn::Add(hn::ShiftLeft<13>(abs), hn::Set(du, 0x38000000u));
    // Subnormal: mantissa * 2^-24 is exact in f32 (and a normal number, so FTZ/DAZ are moot).
    const auto subnormal = hn::BitCast(
        du, hn::Mul(hn::ConvertTo(df, abs_i), hn::Set(df, 0x1p-24f)));
    // Inf/NaN: exponent all ones; NaN payload kept and quiet bit set, as vcvtph2ps does.
    const auto is_nan = hn::RebindMask(du, abs_i > hn::Set(di, 0x7C00));
    const auto inf_nan = hn::Or(hn::ShiftLeft<13>(abs),
                                hn::IfThenElse(is_nan, hn::Set(du, 0x7FC00000u),
                                               hn::Set(du, 0x7F800000u)));
    auto r = hn::IfThenElse(hn::RebindMask(du, abs_i < hn::Set(di, 0x0400)), subnormal, normal);
    r = hn::IfThenElse(hn::RebindMask(du, abs_i > hn::Set(di, 0x7BFF)), inf_nan, r);
    const auto f = hn::BitCast(df, hn::Or(r, sign));
#endif
    hn::StoreU(f, df, dst + i);
  }
  for (; i < n; ++i) StoreAt(f16_bits_to_f32(LoadAt<std::uint16_t>(src, i)), dst, i);
}

inline void F32ToBF16(const float* HWY_RESTRICT src, void* dst, std::size_t n) {
  const hn::ScalableTag<float> df;
  const hn::RebindToUnsigned<decltype(df)> du;
  const hn::RebindToSigned<decltype(df)> di;
  const hn::Rebind<std::uint16_t, decltype(df)> d16;
  const std::size_t lanes = hn::Lanes(df);
  auto* out = static_cast<std::uint16_t*>(dst);
  std::size_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    const auto bits = hn::BitCast(du, hn::LoadU(df, src + i));
    // Round to nearest even on the 16 dropped bits; cannot wrap for non-NaN inputs.
    const auto lsb = hn::And(hn::ShiftRight<16>(bits), hn::Set(du, 1u));
    const auto rounded = hn::ShiftRight<16>(hn::Add(bits, hn::Add(hn::Set(du, 0x7FFFu), lsb)));
    // NaN: truncate and set the quiet bit (rounding could carry a NaN into Inf).
    const auto abs_i = hn::BitCast(di, hn::And(bits, hn::Set(du, 0x7FFFFFFFu)));
    const auto is_nan = hn::RebindMask(du, abs_i > hn::Set(di, 0x7F800000));
    const auto nan = hn::Or(hn::ShiftRight<16>(bits), hn::Set(du, 0x0040u));
    const auto r = hn::IfThenElse(is_nan, nan, rounded);
    hn::StoreU(hn::DemoteTo(d16, hn::BitCast(di, r)), d16, out + i);
  }
  for (; i < n; ++i) StoreAt<std::uint16_t>(f32_to_bf16_bits(LoadAt<float>(src, i)), dst, i);
}

inline void F32ToF16(const float* HWY_RESTRICT src, void* dst, std::size_t n) {
  const hn::ScalableTag<float> df;
  const hn::Rebind<std::uint16_t, decltype(df)> d16;
  const std::size_t lanes = hn::Lanes(df);
  auto* out = static_cast<std::uint16_t*>(dst);
  std::size_t i = 0;
  for (; i + lanes <= n; i += lanes) {
    const auto v = hn::LoadU(df, src + i);
#if CONFLUX_F16C
    const hn::Rebind<hwy::float16_t, decltype(df)> df16;
    const auto h = hn::BitCast(d16, hn::DemoteTo(df16, v));
#else
    const hn::RebindToUnsigned<decltype(df)> du;
    const hn::RebindToSigned<decltype(df)> di;
    const auto bits = hn::BitCast(du, v);
    const auto abs = hn::And(bits, hn::Set(du, 0x7FFFFFFFu));
    const auto sign = hn::ShiftRight<16>(hn::Xor(bits, abs));
    const auto abs_i = hn::BitCast(di, abs);

    // Normal result: rebias the exponent, round to nearest even on the 13 dropped bits; a carry
    // out of the mantissa correctly bumps the exponent, up to Inf (0x7C00) at 65520.
    const auto m = hn::Sub(abs, hn::Set(du, 0x38000000u));
    const auto m_lsb = hn::And(hn::ShiftRight<13>(m), hn::Set(du, 1u));
    const auto normal = hn::Min(
        hn::ShiftRight<13>(hn::Add(m, hn::Add(hn::Set(du, 0x0FFFu), m_lsb))),
        hn::Set(du, 0x7C00u));

    // Subnormal result (|v| < 2^-14): the significand with its implicit bit, shifted right by
    // 126 - exponent and rounded to nearest even. Shifts of 25 or more give 0; clamping keeps the
    // unused lanes' shift counts in range.
    const auto exp = hn::ShiftRight<23>(abs_i);
    const auto shift = hn::BitCast(
        du, hn::Min(hn::Max(hn::Sub(hn::Set(di, 126), exp), hn::Set(di, 14)), hn::Set(di, 25)));
    const auto sig = hn::Or(hn::And(abs, hn::Set(du, 0x007FFFFFu)), hn::Set(du, 0x00800000u));
    const auto s_lsb = hn::And(sig >> shift, hn::Set(du, 1u));
    const auto half_minus_1 =
        hn::Sub(hn::Set(du, 1u) << hn::Sub(shift, hn::Set(du, 1u)), hn::Set(du, 1u));
    const auto subnormal = hn::Add(sig, hn::Add(half_minus_1, s_lsb)) >> shift;

    // NaN: quiet, top 10 payload bits kept (what vcvtps2ph does).
    const auto nan = hn::Or(hn::And(hn::ShiftRight<13>(abs), hn::Set(du, 0x03FFu)),
                            hn::Set(du, 0x7E00u));

    auto r = hn::IfThenElse(hn::RebindMask(du, abs_i < hn::Set(di, 0x38800000)), subnormal,
                            normal);
    r = hn::IfThenElse(hn::RebindMask(du, abs_i > hn::Set(di, 0x7F800000)), nan, r);
    const auto h = hn::DemoteTo(d16, hn::BitCast(di, hn::Or(r, sign)));
#endif
    hn::StoreU(h, d16, out + i);
  }
  for (; i < n; ++i) StoreAt<std::uint16_t>(f32_to_f16_bits(LoadAt<float>(src, i)), dst, i);
}

#undef CONFLUX_F16C

// x86 cvtpd2ps/cvtps2pd round like the scalar casts (same MXCSR); Highway's SCALAR/EMU128
// DemoteTo clamps instead, and other architectures are unverified, so they use the casts.
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_SSSE3
#define CONFLUX_VECTOR_F64 1
#else
#define CONFLUX_VECTOR_F64 0
#endif

inline void F64ToF32(const void* src, float* HWY_RESTRICT dst, std::size_t n) {
  std::size_t i = 0;
#if CONFLUX_VECTOR_F64
  const hn::ScalableTag<double> dd;
  const hn::Rebind<float, decltype(dd)> df;
  const std::size_t lanes = hn::Lanes(dd);
  const auto* in = static_cast<const double*>(src);
  for (; i + lanes <= n; i += lanes) {
    hn::StoreU(hn::DemoteTo(df, hn::LoadU(dd, in + i)), df, dst + i);
  }
#endif
  for (; i < n; ++i) StoreAt(static_cast<float>(LoadAt<double>(src, i)), dst, i);
}

inline void F32ToF64(const float* HWY_RESTRICT src, void* dst, std::size_t n) {
  std::size_t i = 0;
#if CONFLUX_VECTOR_F64
  const hn::ScalableTag<double> dd;
  const hn::Rebind<float, decltype(dd)> df;
  const std::size_t lanes = hn::Lanes(dd);
  auto* out = static_cast<double*>(dst);
  for (; i + lanes <= n; i += lanes) {
    hn::StoreU(hn::PromoteTo(dd, hn::LoadU(df, src + i)), dd, out + i);
  }
#endif
  for (; i < n; ++i) StoreAt(static_cast<double>(LoadAt<float>(src, i)), dst, i);
}

#undef CONFLUX_VECTOR_F64

inline std::int64_t Target() { return HWY_TARGET; }

}  // namespace conflux::HWY_NAMESPACE
HWY_AFTER_NAMESPACE();

#endif  // include guard toggled per target
