// Fuzzes the whole-file validator: any byte string must either validate or throw conflux::Error,
// never crash, hang or read out of bounds. A validated layout is re-checked for the invariants
// the rest of Conflux relies on.
#include <cstddef>
#include <cstdint>
#include <cstdlib>

#include "conflux/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  try {
    const conflux::Layout layout = conflux::parse_safetensors(bytes, "fuzz-input");
    std::uint64_t expected = 0;
    for (const conflux::TensorInfo& t : layout.tensors) {
      if (t.begin != expected || t.end < t.begin) std::abort();
      expected = t.end;
    }
    if (8 + layout.header_size + expected != size) std::abort();
  } catch (const conflux::Error&) {
  }
  return 0;
}
