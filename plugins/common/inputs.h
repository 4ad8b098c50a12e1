// Kernels that read a chunk's inputs in either form the host hands out: float32 arrays, or the
// stored BF16 values of a pass with CFX_PASS_BF16_INPUTS (read straight from the mapped files,
// without the host's conversion sweep). A BF16 value widens to float32 exactly, so a kernel
// templated on the input type gives the same bits from both.
#pragma once

#include <conflux/plugin.hpp>

#include <cstddef>
#include <cstdint>

namespace conflux::plugins {

inline float value(const float* p, std::size_t k) { return p[k]; }
inline float value(const std::uint16_t* p, std::size_t k) { return sdk::bf16_to_float(p[k]); }

// f(models, base) with the chunk's typed inputs: (const float* const*, const float*) or
// (const std::uint16_t* const*, const std::uint16_t*); base is null without a base.
template <class F>
decltype(auto) with_inputs(const sdk::Chunk& c, F&& f) {
  if (c.is_bf16()) return f(c.bf16_models(), c.bf16_base());
  return f(c.models(), c.base().data());
}

}  // namespace conflux::plugins
