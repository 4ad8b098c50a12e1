// The one exception type of conflux_core.
//
// Every failure carries a code (which rule was broken), the file it concerns and, when there is
// one, the tensor. what() is a single line meant for a user's terminal:
//   "<file>: <rule>: <detail> (tensor '<name>')"
#pragma once

#include <filesystem>
#include <stdexcept>
#include <string>
#include <string_view>

namespace conflux {

enum class Errc {
  io,                     // open/read/map/write failed (errno text in the detail)
  // safetensors file rules, one per way a file can be wrong
  header_too_small,       // file shorter than the 8-byte length prefix
  header_too_large,       // declared header length > 100,000,000
  invalid_header_length,  // header extends past the end of the file
  invalid_utf8,           // header bytes are not UTF-8
  nul_padding,            // header padded with NUL bytes (the format pads with spaces)
  not_json,               // header is not a JSON document
  not_an_object,          // header JSON (or a tensor entry) is not an object
  invalid_field,          // missing, duplicated or wrongly typed field in a tensor entry
  unknown_dtype,          // dtype string not in the format's list
  invalid_shape,          // a dimension is negative, fractional or not a number
  overflow,               // shape product or byte size does not fit in 64 bits
  size_mismatch,          // data_offsets span != shape product x dtype size
  invalid_offsets,        // offsets do not tile the data buffer (start at 0, no hole/overlap)
  trailing_bytes,         // bytes after the last tensor (the buffer must end with the data)
  duplicate_name,         // the same tensor name twice
  invalid_metadata,       // __metadata__ is not an object of string values
  // checkpoint directory rules
  not_found,              // a path, shard or tensor that must exist does not
  no_checkpoint,          // a directory without safetensors weights
  pickle_checkpoint,      // a .bin (pickle) checkpoint: refused, never unpickled
  invalid_index,          // model.safetensors.index.json malformed
  index_mismatch,         // index and shards disagree
  // writer
  invalid_argument,       // a caller passed an impossible plan (e.g. empty tensor name)
};

// Short stable name of a rule ("header_too_large"), used in --json output and tests.
std::string_view errc_name(Errc c);

class Error : public std::runtime_error {
 public:
  Error(Errc code, std::filesystem::path file, std::string detail, std::string tensor = {});

  Errc code() const noexcept { return code_; }
  const std::filesystem::path& file() const noexcept { return file_; }
  const std::string& tensor() const noexcept { return tensor_; }
  const std::string& detail() const noexcept { return detail_; }

 private:
  Errc code_;
  std::filesystem::path file_;
  std::string detail_;
  std::string tensor_;
};

}  // namespace conflux
