// Strict safetensors header validation.
//
// The header is parsed with Boost.JSON's SAX parser (basic_parser) rather than into a DOM: a DOM
// silently merges duplicate keys and turns 1.0 into a valid dimension, and both must be errors.
// The handler below is a small state machine over the only shapes a valid header can have:
//   top object -> "__metadata__": {string: string} | null
//              -> "<tensor>": {"dtype": string, "shape": [uint...], "data_offsets": [uint, uint],
//                              <ignored extra fields>}
// Semantic checks that need a whole entry (sizes, overflow) run when the entry closes; tiling of
// the data buffer runs once every entry is known.
#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <unordered_set>

#include <boost/json/basic_parser_impl.hpp>

#include "conflux/safetensors.h"

namespace conflux {
namespace {

namespace json = boost::json;

// Returns the offset of the first byte that breaks UTF-8 (overlongs, surrogates and code points
// past U+10FFFF included), or npos.
std::size_t find_invalid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const std::size_t n = s.size();
  std::size_t i = 0;
  while (i < n) {
    const unsigned c = p[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t len;
    std::uint32_t cp;
    if ((c & 0xE0) == 0xC0) {
      len = 2;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
      cp = c & 0x07;
    } else {
      return i;
    }
    if (n - i < len) return i;
    for (std::size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return i;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    const std::uint32_t min_cp = len == 2 ? 0x80 : len == 3 ? 0x800 : 0x10000;
    if (cp < min_cp || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return i;
    i += len;
  }
  return std::string_view::npos;
}

bool checked_mul(std::uint64_t a, std::uint64_t b, std::uint64_t& out) {
  return !__builtin_mul_overflow(a, b, &out);
}

// A rule violation found inside the SAX callbacks; the callbacks cannot throw through the parser.
struct Violation {
  Errc code;
  std::string detail;
  std::string tensor;
};

class HeaderHandler {
 public:
  static constexpr std::size_t max_object_size = std::size_t(-1);
  static constexpr std::size_t max_array_size = std::size_t(-1);
  static constexpr std::size_t max_key_size = std::size_t(-1);
  static constexpr std::size_t max_string_size = std::size_t(-1);

  std::optional<Violation> violation;
  std::vector<TensorInfo> tensors;
  Metadata metadata;

  bool on_document_begin(json::error_code&) { return true; }
  bool on_document_end(json::error_code&) { return true; }

  bool on_object_begin(json::error_code& ec) {
    if (skip_depth_ > 0) return ++skip_depth_, true;
    switch (state_) {
      case State::start:
        state_ = State::top;
        return true;
      case State::top_value:
        if (key_ == "__metadata__") {
          if (seen_metadata_) return fail(ec, Errc::invalid_metadata, "__metadata__ appears twice");
          seen_metadata_ = true;
          key_.clear();
          state_ = State::metadata;
          return true;
        }
        begin_tensor();
        state_ = State::tensor;
        return true;
      case State::metadata_value:
        return fail(ec, Errc::invalid_metadata,
                    "__metadata__ value of '" + key_ + "' is an object; values must be strings");
      case State::tensor_value:
        return value_for_field(ec, "an object");
      case State::shape:
        return fail(ec, Errc::invalid_shape, "shape holds an object", current_.name);
      case State::offsets:
        return fail(ec, Errc::invalid_field, "data_offsets holds an object", current_.name);
      default:
        return fail(ec, Errc::not_json, "unexpected object");
    }
  }

  bool on_object_end(std::size_t, json::error_code& ec) {
    if (skip_depth_ > 0) return end_skipped_value();
    switch (state_) {
      case State::top:
        state_ = State::done;
        return true;
      case State::metadata:
        state_ = State::top;
        return true;
      case State::tensor:
        state_ = State::top;
        return finish_tensor(ec);
      default:
        return fail(ec, Errc::not_json, "unexpected end of object");
    }
  }

  bool on_array_begin(json::error_code& ec) {
    if (skip_depth_ > 0) return ++skip_depth_, true;
    switch (state_) {
      case State::start:
        return fail(ec, Errc::not_an_object, "the header is a JSON array, not an object");
      case State::top_value:
        return not_an_entry(ec, "an array");
      case State::metadata_value:
        return fail(ec, Errc::invalid_metadata,
                    "__metadata__ value of '" + key_ + "' is an array; values must be strings");
      case State::tensor_value:
        if (field_ == Field::shape) {
          state_ = State::shape;
          current_.shape.clear();
          return true;
        }
        if (field_ == Field::offsets) {
          state_ = State::offsets;
          offsets_.clear();
          return true;
        }
        return value_for_field(ec, "an array");
      case State::shape:
        return fail(ec, Errc::invalid_shape, "shape holds a nested array", current_.name);
      case State::offsets:
        return fail(ec, Errc::invalid_field, "data_offsets holds a nested array", current_.name);
      default:
        return fail(ec, Errc::not_json, "unexpected array");
    }
  }

  bool on_array_end(std::size_t, json::error_code& ec) {
    if (skip_depth_ > 0) return end_skipped_value();
    if (state_ == State::shape) {
      have_shape_ = true;
      state_ = State::tensor;
      return true;
    }
    if (state_ == State::offsets) {
      if (offsets_.size() != 2)
        return fail(ec, Errc::invalid_field,
                    "data_offsets must hold 2 integers, not " + std::to_string(offsets_.size()),
                    current_.name);
      current_.begin = offsets_[0];
      current_.end = offsets_[1];
      have_offsets_ = true;
      state_ = State::tensor;
      return true;
    }
    return fail(ec, Errc::not_json, "unexpected end of array");
  }

  bool on_key_part(json::string_view s, std::size_t, json::error_code&) {
    if (skip_depth_ == 0) key_.append(s.data(), s.size());
    return true;
  }

  bool on_key(json::string_view s, std::size_t, json::error_code& ec) {
    if (skip_depth_ > 0) return true;
    key_.append(s.data(), s.size());
    switch (state_) {
      case State::top:
        state_ = State::top_value;
        if (key_ != "__metadata__" && !names_.insert(key_).second)
          return fail(ec, Errc::duplicate_name, "tensor name appears twice in the header", key_);
        return true;
      case State::metadata:
        if (!metadata_keys_.insert(key_).second)
          return fail(ec, Errc::invalid_metadata, "__metadata__ key '" + key_ + "' appears twice");
        state_ = State::metadata_value;
        return true;
      case State::tensor:
        return begin_field(ec);
      default:
        return fail(ec, Errc::not_json, "unexpected key");
    }
  }

  bool on_string_part(json::string_view s, std::size_t, json::error_code&) {
    if (skip_depth_ == 0) string_.append(s.data(), s.size());
    return true;
  }

  bool on_string(json::string_view s, std::size_t, json::error_code& ec) {
    if (skip_depth_ > 0) return true;
    string_.append(s.data(), s.size());
    std::string value = std::move(string_);
    string_.clear();
    switch (state_) {
      case State::start:
        return fail(ec, Errc::not_an_object, "the header is a JSON string, not an object");
      case State::top_value:
        return not_an_entry(ec, "a string");
      case State::metadata_value:
        metadata.emplace_back(std::move(key_), std::move(value));
        key_.clear();
        state_ = State::metadata;
        return true;
      case State::tensor_value:
        if (field_ == Field::dtype) {
          auto t = dtype_from_name(value);
          if (!t) return fail(ec, Errc::unknown_dtype, "unknown dtype \"" + value + "\"", current_.name);
          current_.dtype = *t;
          have_dtype_ = true;
          state_ = State::tensor;
          return true;
        }
        return value_for_field(ec, "a string");
      case State::shape:
        return fail(ec, Errc::invalid_shape, "shape holds a string", current_.name);
      case State::offsets:
        return fail(ec, Errc::invalid_field, "data_offsets holds a string", current_.name);
      default:
        return fail(ec, Errc::not_json, "unexpected string");
    }
  }

  bool on_number_part(json::string_view, json::error_code&) { return true; }

  bool on_int64(std::int64_t i, json::string_view, json::error_code& ec) {
    if (skip_depth_ > 0) return true;
    if (i < 0) {
      if (state_ == State::shape)
        return fail(ec, Errc::invalid_shape, "negative dimension " + std::to_string(i), current_.name);
      if (state_ == State::offsets)
        return fail(ec, Errc::invalid_field, "negative data offset " + std::to_string(i), current_.name);
    }
    return on_unsigned(static_cast<std::uint64_t>(i), ec, "a number");
  }

  bool on_uint64(std::uint64_t u, json::string_view, json::error_code& ec) {
    if (skip_depth_ > 0) return true;
    return on_unsigned(u, ec, "a number");
  }

  bool on_double(double, json::string_view s, json::error_code& ec) {
    if (skip_depth_ > 0) return true;
    const std::string text(s.data(), s.size());
    if (state_ == State::shape)
      return fail(ec, Errc::invalid_shape,
                  "dimension " + text + " is not an unsigned 64-bit integer", current_.name);
    if (state_ == State::offsets)
      return fail(ec, Errc::invalid_field,
                  "data offset " + text + " is not an unsigned 64-bit integer", current_.name);
    return other_scalar(ec, "a number");
  }

  bool on_bool(bool, json::error_code& ec) {
    if (skip_depth_ > 0) return true;
    return other_scalar(ec, "a boolean");
  }

  bool on_null(json::error_code& ec) {
    if (skip_depth_ > 0) return true;
    if (state_ == State::top_value && key_ == "__metadata__") {
      // The reference implementation reads a null __metadata__ as "no metadata".
      if (seen_metadata_) return fail(ec, Errc::invalid_metadata, "__metadata__ appears twice");
      seen_metadata_ = true;
      key_.clear();
      state_ = State::top;
      return true;
    }
    return other_scalar(ec, "null");
  }

  bool on_comment_part(json::string_view, json::error_code&) { return true; }
  bool on_comment(json::string_view, json::error_code&) { return true; }

 private:
  enum class State { start, top, top_value, metadata, metadata_value, tensor, tensor_value,
                     shape, offsets, done };
  enum class Field { dtype, shape, offsets, other };

  bool fail(json::error_code& ec, Errc code, std::string detail, std::string tensor = {}) {
    if (!violation) violation = Violation{code, std::move(detail), std::move(tensor)};
    ec = json::error::exception;
    return false;
  }

  bool not_an_entry(json::error_code& ec, const char* what) {
    if (key_ == "__metadata__")
      return fail(ec, Errc::invalid_metadata, std::string("__metadata__ is ") + what +
                                                   ", not an object of strings");
    return fail(ec, Errc::not_an_object,
                std::string("tensor entry is ") + what + ", not an object", key_);
  }

  // A scalar that is neither a string nor an unsigned integer.
  bool other_scalar(json::error_code& ec, const char* what) {
    switch (state_) {
      case State::start:
        return fail(ec, Errc::not_an_object, std::string("the header is ") + what + ", not an object");
      case State::top_value:
        return not_an_entry(ec, what);
      case State::metadata_value:
        return fail(ec, Errc::invalid_metadata, "__metadata__ value of '" + key_ + "' is " + what +
                                                    "; values must be strings");
      case State::tensor_value:
        return value_for_field(ec, what);
      case State::shape:
        return fail(ec, Errc::invalid_shape, std::string("shape holds ") + what, current_.name);
      case State::offsets:
        return fail(ec, Errc::invalid_field, std::string("data_offsets holds ") + what, current_.name);
      default:
        return fail(ec, Errc::not_json, "unexpected value");
    }
  }

  bool on_unsigned(std::uint64_t u, json::error_code& ec, const char* what) {
    if (state_ == State::shape) {
      current_.shape.push_back(u);
      return true;
    }
    if (state_ == State::offsets) {
      offsets_.push_back(u);
      return true;
    }
    return other_scalar(ec, what);
  }

  void begin_tensor() {
    current_ = TensorInfo{};
    current_.name = std::move(key_);
    key_.clear();
    fields_seen_.clear();
    have_dtype_ = have_shape_ = have_offsets_ = false;
  }

  bool begin_field(json::error_code& ec) {
    if (!fields_seen_.insert(key_).second)
      return fail(ec, Errc::invalid_field, "field \"" + key_ + "\" appears twice", current_.name);
    if (key_ == "dtype") field_ = Field::dtype;
    else if (key_ == "shape") field_ = Field::shape;
    else if (key_ == "data_offsets") field_ = Field::offsets;
    else field_ = Field::other;
    key_.clear();
    state_ = State::tensor_value;
    return true;
  }

  // Called for a value in a tensor entry that is not what its field needs; unknown fields take
  // any value (nested values are skipped by depth counting).
  bool value_for_field(json::error_code& ec, const char* what) {
    static constexpr const char* kNeeds[] = {"a string", "an array of integers",
                                             "an array of 2 integers"};
    static constexpr const char* kNames[] = {"dtype", "shape", "data_offsets"};
    if (field_ == Field::other) {
      if (std::strcmp(what, "an object") == 0 || std::strcmp(what, "an array") == 0)
        skip_depth_ = 1;
      else
        state_ = State::tensor;
      return true;
    }
    const int f = static_cast<int>(field_);
    return fail(ec, Errc::invalid_field,
                std::string("field \"") + kNames[f] + "\" is " + what + ", expected " + kNeeds[f],
                current_.name);
  }

  bool end_skipped_value() {
    if (--skip_depth_ == 0) state_ = State::tensor;
    return true;
  }

  bool finish_tensor(json::error_code& ec) {
    TensorInfo& t = current_;
    const char* missing = !have_dtype_ ? "dtype" : !have_shape_ ? "shape" : !have_offsets_ ? "data_offsets" : nullptr;
    if (missing)
      return fail(ec, Errc::invalid_field, std::string("missing field \"") + missing + "\"", t.name);
    std::uint64_t numel = 1;
    for (std::uint64_t d : t.shape)
      if (!checked_mul(numel, d, numel))
        return fail(ec, Errc::overflow, "shape product overflows 64 bits", t.name);
    // Whole-byte dtypes are sized in bytes, so a size that fits in 64 bits is never an overflow;
    // the sub-byte ones (F4, F6_*) in bits, which must come to whole bytes.
    const auto bits_per = static_cast<std::uint64_t>(dtype_bits(t.dtype));
    std::uint64_t nbytes;
    if (bits_per % 8 == 0) {
      if (!checked_mul(numel, bits_per / 8, nbytes))
        return fail(ec, Errc::overflow, "byte size of the shape overflows 64 bits", t.name);
    } else {
      std::uint64_t bits;
      if (!checked_mul(numel, bits_per, bits))
        return fail(ec, Errc::overflow, "bit size of the shape overflows 64 bits", t.name);
      if (bits % 8 != 0)
        return fail(ec, Errc::size_mismatch,
                    std::to_string(numel) + " elements of " + std::string(dtype_name(t.dtype)) +
                        " are not a whole number of bytes",
                    t.name);
      nbytes = bits / 8;
    }
    if (t.end < t.begin)
      return fail(ec, Errc::invalid_offsets,
                  "data_offsets end " + std::to_string(t.end) + " is before begin " + std::to_string(t.begin),
                  t.name);
    if (t.end - t.begin != nbytes)
      return fail(ec, Errc::size_mismatch,
                  "data_offsets span " + std::to_string(t.end - t.begin) + " bytes but shape and " +
                      std::string(dtype_name(t.dtype)) + " need " + std::to_string(nbytes),
                  t.name);
    t.numel = numel;
    tensors.push_back(std::move(t));
    current_ = TensorInfo{};
    return true;
  }

  State state_ = State::start;
  Field field_ = Field::other;
  int skip_depth_ = 0;
  std::string key_;
  std::string string_;
  TensorInfo current_;
  std::vector<std::uint64_t> offsets_;
  bool have_dtype_ = false, have_shape_ = false, have_offsets_ = false;
  bool seen_metadata_ = false;
  std::unordered_set<std::string> names_;
  std::unordered_set<std::string> metadata_keys_;
  std::unordered_set<std::string> fields_seen_;
};

bool is_json_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

// Checks that the tensors, sorted by offset, cover [0, data_size) exactly.
void check_tiling(std::vector<TensorInfo>& tensors, std::uint64_t data_size,
                  const std::filesystem::path& file) {
  std::stable_sort(tensors.begin(), tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  std::uint64_t expected = 0;
  const TensorInfo* previous = nullptr;
  for (const TensorInfo& t : tensors) {
    if (t.begin > expected)
      throw Error(Errc::invalid_offsets,
                  file, "hole in the data buffer: tensor starts at byte " + std::to_string(t.begin) +
                            " but the data before it ends at " + std::to_string(expected),
                  t.name);
    if (t.begin < expected)
      throw Error(Errc::invalid_offsets, file,
                  "overlaps tensor '" + (previous ? previous->name : std::string()) +
                      "': starts at byte " + std::to_string(t.begin) + ", before " +
                      std::to_string(expected),
                  t.name);
    if (t.end > data_size)
      throw Error(Errc::invalid_offsets, file,
                  "ends at byte " + std::to_string(t.end) + " of a data buffer of " +
                      std::to_string(data_size) + " bytes",
                  t.name);
    expected = t.end;
    previous = &t;
  }
  if (expected != data_size)
    throw Error(Errc::trailing_bytes, file,
                std::to_string(data_size - expected) + " bytes after the last tensor (data ends at " +
                    std::to_string(expected) + " of " + std::to_string(data_size) + ")");
}

}  // namespace

Layout parse_header(std::string_view text, std::uint64_t data_size, const std::filesystem::path& file) {
  if (auto nul = text.find('\0'); nul != std::string_view::npos)
    throw Error(Errc::nul_padding, file,
                "NUL byte at header offset " + std::to_string(nul) +
                    " (headers are padded with spaces, and JSON has no raw NUL)");
  if (auto bad = find_invalid_utf8(text); bad != std::string_view::npos)
    throw Error(Errc::invalid_utf8, file, "invalid UTF-8 at header offset " + std::to_string(bad));

  json::parse_options options;
  options.max_depth = 64;
  json::basic_parser<HeaderHandler> parser(options);
  json::error_code ec;
  const std::size_t used = parser.write_some(false, text.data(), text.size(), ec);
  HeaderHandler& h = parser.handler();
  if (h.violation) throw Error(h.violation->code, file, h.violation->detail, h.violation->tensor);
  if (ec)
    throw Error(Errc::not_json, file,
                "header is not valid JSON: " + ec.message() + " at offset " + std::to_string(used));
  for (std::size_t i = used; i < text.size(); ++i)
    if (!is_json_space(text[i]))
      throw Error(Errc::not_json, file,
                  "unexpected characters after the JSON object at header offset " + std::to_string(i));

  Layout layout;
  layout.header_size = text.size();
  layout.tensors = std::move(h.tensors);
  layout.metadata = std::move(h.metadata);
  check_tiling(layout.tensors, data_size, file);
  return layout;
}

Layout parse_safetensors(std::span<const std::byte> bytes, const std::filesystem::path& file) {
  if (bytes.size() < 8)
    throw Error(Errc::header_too_small, file,
                "file has " + std::to_string(bytes.size()) + " bytes, fewer than the 8-byte header length");
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<std::uint8_t>(bytes[i]);
  if (n > kMaxHeaderSize)
    throw Error(Errc::header_too_large, file,
                "declared header length " + std::to_string(n) + " exceeds the limit of " +
                    std::to_string(kMaxHeaderSize));
  if (n > bytes.size() - 8)
    throw Error(Errc::invalid_header_length, file,
                "declared header length " + std::to_string(n) + " runs past the end of the " +
                    std::to_string(bytes.size()) + "-byte file");
  const std::string_view text(reinterpret_cast<const char*>(bytes.data()) + 8, n);
  return parse_header(text, bytes.size() - 8 - n, file);
}

}  // namespace conflux
