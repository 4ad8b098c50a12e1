// Reading .safetensors files.
//
// Byte layout of the format:
//   [0, 8)          u64 little-endian N, the header length
//   [8, 8+N)        UTF-8 JSON object:
//                     { "<tensor>": {"dtype": "BF16", "shape": [d0, ...], "data_offsets": [b, e]},
//                       ...,
//                       "__metadata__": {"<key>": "<string>", ...} }   (optional)
//                   padded at the end with spaces (writers pad to a multiple of 8)
//   [8+N, EOF)      the data buffer; each tensor's bytes are [b, e) relative to its start
//
// Validation is complete before any tensor is handed out and at least as strict as the reference
// implementation; each violated rule is a distinct Errc (see error.h). Accepted: space padding,
// leading/trailing JSON whitespace, empty ([0]) and 0-rank ([]) tensors, unaligned offsets, a file
// with no tensors, "__metadata__": null. Unknown fields inside a tensor entry are ignored, as the
// reference implementation ignores them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "conflux/dtype.h"
#include "conflux/error.h"

namespace conflux {

inline constexpr std::uint64_t kMaxHeaderSize = 100'000'000;

struct TensorInfo {
  std::string name;
  DType dtype{};
  std::vector<std::uint64_t> shape;  // empty for a 0-rank (scalar) tensor
  std::uint64_t numel = 0;           // product of shape (1 for a scalar)
  std::uint64_t begin = 0;           // byte offsets relative to the data buffer
  std::uint64_t end = 0;
  std::uint64_t nbytes() const { return end - begin; }
};

using Metadata = std::vector<std::pair<std::string, std::string>>;

// The validated content of a header. Tensors are sorted by data offset.
struct Layout {
  std::uint64_t header_size = 0;  // N
  std::vector<TensorInfo> tensors;
  Metadata metadata;              // in the order of the header
  std::uint64_t data_offset() const { return 8 + header_size; }
};

// Parses and validates the header JSON `json` (the N bytes after the length prefix) against a
// data buffer of `data_size` bytes. `file` only labels errors. Throws Error.
Layout parse_header(std::string_view json, std::uint64_t data_size, const std::filesystem::path& file);

// Validates a whole file held in memory (length prefix, header, data). Throws Error.
Layout parse_safetensors(std::span<const std::byte> file_bytes, const std::filesystem::path& file);

// A typed, bounds-checked view of one tensor's elements. T must match the dtype's storage
// (float for F32, double for F64, std::uint16_t for F16/BF16 bit patterns, the integer types
// for I*/U*, std::uint8_t for BOOL and the 8-bit float formats). Elements are read with memcpy,
// so unaligned data is fine.
template <class T>
class TypedView {
 public:
  TypedView(std::span<const std::byte> bytes) : bytes_(bytes) {}
  std::size_t size() const { return bytes_.size() / sizeof(T); }
  T operator[](std::size_t i) const {
    if (i >= size()) throw std::out_of_range("tensor element index out of range");
    T v;
    std::memcpy(&v, bytes_.data() + i * sizeof(T), sizeof(T));
    return v;
  }

 private:
  std::span<const std::byte> bytes_;
};

struct TensorView {
  const TensorInfo* info = nullptr;
  std::span<const std::byte> bytes;  // exactly info->nbytes() bytes

  // Throws std::invalid_argument when sizeof(T) does not match the dtype.
  template <class T>
  TypedView<T> as() const {
    if (static_cast<int>(sizeof(T)) * 8 != dtype_bits(info->dtype))
      throw std::invalid_argument("tensor '" + info->name + "' has dtype " +
                                  std::string(dtype_name(info->dtype)) +
                                  ", which does not match the requested element type");
    return TypedView<T>(bytes);
  }
  // Element i of a mergeable (floating) tensor, widened to double.
  double element(std::size_t i) const;
};

// A read-only memory-mapped .safetensors file, validated on open (the mapping serves the header
// and views; read copies tensor data). Movable, not copyable.
// Thread-safe for concurrent reads.
class SafetensorsFile {
 public:
  // Maps and validates `path`. Throws Error naming the file (and the tensor) on any violation.
  static SafetensorsFile open(const std::filesystem::path& path);

  SafetensorsFile(SafetensorsFile&&) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept;
  ~SafetensorsFile();

  const std::filesystem::path& path() const { return path_; }
  std::uint64_t file_size() const { return file_size_; }
  const Layout& layout() const { return layout_; }
  const std::vector<TensorInfo>& tensors() const { return layout_.tensors; }
  const Metadata& metadata() const { return layout_.metadata; }

  // nullptr when absent.
  const TensorInfo* find(std::string_view name) const;
  // Throws Error(not_found) naming the file and tensor when absent.
  const TensorInfo& at(std::string_view name) const;

  TensorView view(const TensorInfo& t) const;
  // The raw N header bytes (for hashing into a manifest).
  std::span<const std::byte> header_bytes() const;

  // Copies data bytes [begin, end) (relative to the data buffer) to dst with pread, from the page
  // cache, without mapping them into this process: how the engine reads tensor data (cheaper
  // than faulting mapped pages in and releasing them again, and it leaves the resident set
  // alone; open advises the kernel of sequential reads). Throws Error naming the file on a
  // failed or short read (a file truncated under the merge).
  void read(std::uint64_t begin, std::uint64_t end, std::byte* dst) const;

 private:
  struct Mapping;
  SafetensorsFile() = default;

  std::filesystem::path path_;
  std::uint64_t file_size_ = 0;
  std::unique_ptr<Mapping> map_;
  const std::byte* base_ = nullptr;
  Layout layout_;
  std::vector<std::size_t> by_name_;  // indices into layout_.tensors sorted by name
};

}  // namespace conflux
