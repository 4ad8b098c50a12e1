// Fuzzes the model.safetensors.index.json parser: it must accept or throw conflux::Error, and
// every shard name it accepts must be a plain file name (no path escapes the checkpoint).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "conflux/checkpoint.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  try {
    for (const auto& [tensor, shard] : conflux::parse_index(text, "fuzz-index.json"))
      if (shard.empty() || shard == ".." || shard.find('/') != std::string::npos) std::abort();
  } catch (const conflux::Error&) {
  }
  return 0;
}
