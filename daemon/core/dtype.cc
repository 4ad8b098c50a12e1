#include "conflux/dtype.h"

#include <array>

namespace conflux {
namespace {

struct DTypeRow {
  DType type;
  std::string_view name;
  int bits;
};

// Order matches the enum, so a row is found by index.
constexpr std::array<DTypeRow, kDTypeCount> kRows{{
    {DType::BOOL, "BOOL", 8},      {DType::F4, "F4", 4},
    {DType::F6_E2M3, "F6_E2M3", 6}, {DType::F6_E3M2, "F6_E3M2", 6},
    {DType::U8, "U8", 8},          {DType::I8, "I8", 8},
    {DType::F8_E5M2, "F8_E5M2", 8}, {DType::F8_E4M3, "F8_E4M3", 8},
    {DType::F8_E8M0, "F8_E8M0", 8}, {DType::I16, "I16", 16},
    {DType::U16, "U16", 16},       {DType::F16, "F16", 16},
    {DType::BF16, "BF16", 16},     {DType::I32, "I32", 32},
    {DType::U32, "U32", 32},       {DType::F32, "F32", 32},
    {DType::C64, "C64", 64},       {DType::F64, "F64", 64},
    {DType::I64, "I64", 64},       {DType::U64, "U64", 64},
}};

constexpr bool rows_in_enum_order() {
  for (int i = 0; i < kDTypeCount; ++i)
    if (static_cast<int>(kRows[i].type) != i) return false;
  return true;
}
static_assert(rows_in_enum_order());

}  // namespace

std::string_view dtype_name(DType t) { return kRows[static_cast<int>(t)].name; }

int dtype_bits(DType t) { return kRows[static_cast<int>(t)].bits; }

std::optional<DType> dtype_from_name(std::string_view name) {
  for (const auto& row : kRows)
    if (row.name == name) return row.type;
  return std::nullopt;
}

bool dtype_is_mergeable(DType t) {
  return t == DType::F16 || t == DType::BF16 || t == DType::F32 || t == DType::F64;
}

int dtype_significand_bits(DType t) {
  switch (t) {
    case DType::BF16: return 8;
    case DType::F16: return 11;
    case DType::F32: return 24;
    case DType::F64: return 53;
    default: return 0;
  }
}

}  // namespace conflux
