// Element types of the safetensors format.
//
// Every dtype the reference implementation knows is recognised so that any valid file can be
// inspected; merges compute on the floating types F16, BF16, F32 and F64 only (see
// dtype_is_mergeable). Sizes are given in bits because the sub-byte formats (F4, F6_*) pack
// several elements into one byte.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>

namespace conflux {

enum class DType : std::uint8_t {
  BOOL,
  F4,
  F6_E2M3,
  F6_E3M2,
  U8,
  I8,
  F8_E5M2,
  F8_E4M3,
  F8_E8M0,
  I16,
  U16,
  F16,
  BF16,
  I32,
  U32,
  F32,
  C64,
  F64,
  I64,
  U64,
};

inline constexpr int kDTypeCount = static_cast<int>(DType::U64) + 1;

// The name used in safetensors headers ("BF16", "F8_E4M3", ...).
std::string_view dtype_name(DType t);

// Parses a safetensors dtype name; case-sensitive, as the format is. nullopt if unknown.
std::optional<DType> dtype_from_name(std::string_view name);

// Storage size of one element in bits (BOOL is stored as one byte: 8).
int dtype_bits(DType t);

// True for the dtypes a merge reads and writes: F16, BF16, F32, F64.
bool dtype_is_mergeable(DType t);

// Significand bits, the implicit bit included, of a mergeable dtype (BF16 8, F16 11, F32 24,
// F64 53); 0 for any other dtype.
int dtype_significand_bits(DType t);

}  // namespace conflux
