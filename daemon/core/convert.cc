// Float conversions: scalar references and dynamic dispatch to the Highway kernels in
// conflux/detail/convert-inl.h (compiled once per target by foreach_target.h).
#include "conflux/convert.h"

#include "conflux/kernels.h"

#include <bit>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "conflux/detail/convert-inl.h"
#include <hwy/foreach_target.h>  // must come before highway.h
#include <hwy/highway.h>

#include "conflux/detail/convert-inl.h"  // the static target's instantiation

#if HWY_ONCE
namespace conflux {

HWY_EXPORT(BF16ToF32);
HWY_EXPORT(BF16ToF32Minus);
HWY_EXPORT(F16ToF32);
HWY_EXPORT(F64ToF32);
HWY_EXPORT(F32ToBF16);
HWY_EXPORT(F32ToF16);
HWY_EXPORT(F32ToF64);
HWY_EXPORT(Target);

void bf16_to_f32(const void* src, float* dst, std::size_t n) {
  HWY_DYNAMIC_DISPATCH(BF16ToF32)(src, dst, n);
}
void f16_to_f32(const void* src, float* dst, std::size_t n) {
  HWY_DYNAMIC_DISPATCH(F16ToF32)(src, dst, n);
}
void f64_to_f32(const void* src, float* dst, std::size_t n) {
  HWY_DYNAMIC_DISPATCH(F64ToF32)(src, dst, n);
}
void f32_to_f32(const void* src, float* dst, std::size_t n) {
  if (n != 0) std::memcpy(dst, src, n * sizeof(float));  // memcpy(null, null, 0) is UB
}

void f32_to_bf16(const float* src, void* dst, std::size_t n) {
  HWY_DYNAMIC_DISPATCH(F32ToBF16)(src, dst, n);
}
void f32_to_f16(const float* src, void* dst, std::size_t n) {
  HWY_DYNAMIC_DISPATCH(F32ToF16)(src, dst, n);
}
void f32_to_f64(const float* src, void* dst, std::size_t n) {
  HWY_DYNAMIC_DISPATCH(F32ToF64)(src, dst, n);
}
void f32_to_f32_out(const float* src, void* dst, std::size_t n) {
  if (n != 0) std::memcpy(dst, src, n * sizeof(float));
}

void to_f32_minus(DType from, const void* src, const float* base, float* dst, std::size_t n) {
  if (from == DType::BF16) return HWY_DYNAMIC_DISPATCH(BF16ToF32Minus)(src, base, dst, n);
  to_f32(from, src, dst, n);
  sub_f32(dst, base, n);
}

void to_f32(DType from, const void* src, float* dst, std::size_t n) {
  switch (from) {
    case DType::F16: return f16_to_f32(src, dst, n);
    case DType::BF16: return bf16_to_f32(src, dst, n);
    case DType::F32: return f32_to_f32(src, dst, n);
    case DType::F64: return f64_to_f32(src, dst, n);
    default:
      throw std::invalid_argument("to_f32: cannot convert from " + std::string(dtype_name(from)));
  }
}

void from_f32(DType to, const float* src, void* dst, std::size_t n) {
  switch (to) {
    case DType::F16: return f32_to_f16(src, dst, n);
    case DType::BF16: return f32_to_bf16(src, dst, n);
    case DType::F32: return f32_to_f32_out(src, dst, n);
    case DType::F64: return f32_to_f64(src, dst, n);
    default:
      throw std::invalid_argument("from_f32: cannot convert to " + std::string(dtype_name(to)));
  }
}

float bf16_bits_to_f32(unsigned short bits) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(bits) << 16);
}

float f16_bits_to_f32(unsigned short bits) {
  const std::uint32_t sign = static_cast<std::uint32_t>(bits & 0x8000u) << 16;
  const std::uint32_t exp = (bits >> 10) & 0x1Fu;
  const std::uint32_t mant = bits & 0x3FFu;
  std::uint32_t out;
  if (exp == 0x1F) {
    // Inf, or NaN with its payload kept and the quiet bit set (as x86 vcvtph2ps does).
    out = 0x7F800000u | (mant << 13) | (mant != 0 ? 0x00400000u : 0u);
  } else if (exp != 0) {
    out = ((exp + 127 - 15) << 23) | (mant << 13);
  } else if (mant != 0) {
    // Subnormal mant * 2^-24: normalise so the leading 1 becomes the implicit bit.
    const int top = std::bit_width(mant) - 1;  // 0..9
    out = (static_cast<std::uint32_t>(top + 127 - 24) << 23) | ((mant << (23 - top)) & 0x7FFFFFu);
  } else {
    out = 0;
  }
  return std::bit_cast<float>(sign | out);
}

unsigned short f32_to_bf16_bits(float v) {
  const auto bits = std::bit_cast<std::uint32_t>(v);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) {
    // Rounding could carry a NaN payload into Inf: truncate and force quiet instead.
    return static_cast<unsigned short>((bits >> 16) | 0x0040u);
  }
  const std::uint32_t lsb = (bits >> 16) & 1u;
  return static_cast<unsigned short>((bits + 0x7FFFu + lsb) >> 16);
}

unsigned short f32_to_f16_bits(float v) {
  const auto bits = std::bit_cast<std::uint32_t>(v);
  const auto sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  const std::uint32_t abs = bits & 0x7FFFFFFFu;
  std::uint32_t out;
  if (abs > 0x7F800000u) {
    out = 0x7E00u | ((abs >> 13) & 0x3FFu);  // quiet NaN, top payload bits (as vcvtps2ph)
  } else if (abs >= 0x477FF000u) {
    out = 0x7C00u;  // >= 65520 (halfway between 65504 and 2^16) rounds to Inf
  } else if (abs >= 0x38800000u) {
    // Normal f16: rebias, then round to nearest even on the 13 dropped bits.
    const std::uint32_t rebiased = abs - ((127u - 15u) << 23);
    const std::uint32_t kept = rebiased >> 13;
    const std::uint32_t dropped = rebiased & 0x1FFFu;
    out = kept + ((dropped > 0x1000u || (dropped == 0x1000u && (kept & 1u))) ? 1u : 0u);
  } else if (abs > 0x33000000u) {
    // Subnormal f16 (the result counts units of 2^-24): significand * 2^(exp - 150 + 24).
    const std::uint32_t exp = abs >> 23;  // 102..112
    const std::uint32_t sig = (abs & 0x7FFFFFu) | 0x800000u;
    const std::uint32_t shift = 126 - exp;  // 14..24
    const std::uint32_t kept = sig >> shift;
    const std::uint32_t dropped = sig & ((1u << shift) - 1);
    const std::uint32_t half = 1u << (shift - 1);
    out = kept + ((dropped > half || (dropped == half && (kept & 1u))) ? 1u : 0u);
  } else {
    out = 0;  // at most 2^-25, half the smallest subnormal: ties to even, i.e. to zero
  }
  return static_cast<unsigned short>(sign | out);
}

const char* convert_target_name() { return hwy::TargetName(HWY_DYNAMIC_DISPATCH(Target)()); }

}  // namespace conflux
#endif  // HWY_ONCE
