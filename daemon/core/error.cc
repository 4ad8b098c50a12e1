#include "conflux/error.h"

namespace conflux {

std::string_view errc_name(Errc c) {
  switch (c) {
    case Errc::io: return "io";
    case Errc::header_too_small: return "header_too_small";
    case Errc::header_too_large: return "header_too_large";
    case Errc::invalid_header_length: return "invalid_header_length";
    case Errc::invalid_utf8: return "invalid_utf8";
    case Errc::nul_padding: return "nul_padding";
    case Errc::not_json: return "not_json";
    case Errc::not_an_object: return "not_an_object";
    case Errc::invalid_field: return "invalid_field";
    case Errc::unknown_dtype: return "unknown_dtype";
    case Errc::invalid_shape: return "invalid_shape";
    case Errc::overflow: return "overflow";
    case Errc::size_mismatch: return "size_mismatch";
    case Errc::invalid_offsets: return "invalid_offsets";
    case Errc::trailing_bytes: return "trailing_bytes";
    case Errc::duplicate_name: return "duplicate_name";
    case Errc::invalid_metadata: return "invalid_metadata";
    case Errc::not_found: return "not_found";
    case Errc::no_checkpoint: return "no_checkpoint";
    case Errc::pickle_checkpoint: return "pickle_checkpoint";
    case Errc::invalid_index: return "invalid_index";
    case Errc::index_mismatch: return "index_mismatch";
    case Errc::invalid_argument: return "invalid_argument";
  }
  return "unknown";
}

namespace {

std::string compose(Errc code, const std::filesystem::path& file, const std::string& detail,
                    const std::string& tensor) {
  std::string s = file.empty() ? std::string("<input>") : file.string();
  s += ": ";
  s += errc_name(code);
  s += ": ";
  s += detail;
  if (!tensor.empty()) s += " (tensor '" + tensor + "')";
  // The message is one terminal line: names from files may hold control characters.
  std::string out;
  out.reserve(s.size());
  static constexpr char kHex[] = "0123456789abcdef";
  for (unsigned char c : s) {
    if (c < 0x20 || c == 0x7f) {
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

}  // namespace

Error::Error(Errc code, std::filesystem::path file, std::string detail, std::string tensor)
    : std::runtime_error(compose(code, file, detail, tensor)),
      code_(code),
      file_(std::move(file)),
      detail_(std::move(detail)),
      tensor_(std::move(tensor)) {}

}  // namespace conflux
