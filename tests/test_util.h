// Shared helpers for the conflux_core GoogleTest suites: temporary directories, raw safetensors
// byte builders and an expectation helper for conflux::Error.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iterator>
#include <optional>
#include <ostream>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "conflux/dtype.h"
#include "conflux/error.h"

namespace conflux {

// Readable gtest output for the project's enums.
inline void PrintTo(Errc c, std::ostream* os) { *os << errc_name(c); }
inline void PrintTo(DType t, std::ostream* os) { *os << dtype_name(t); }

}  // namespace conflux

namespace conflux_test {

namespace fs = std::filesystem;

// A fresh directory under $TMPDIR (or /tmp), removed recursively on destruction.
class TempDir {
 public:
  TempDir() {
    const char* env = std::getenv("TMPDIR");
    std::string base = (env != nullptr && *env != '\0') ? env : "/tmp";
    std::string templ = base + "/conflux-test-XXXXXX";
    std::vector<char> buf(templ.begin(), templ.end());
    buf.push_back('\0');
    if (::mkdtemp(buf.data()) == nullptr) throw std::runtime_error("mkdtemp failed for " + templ);
    path_ = fs::path(buf.data());
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }

  const fs::path& path() const { return path_; }
  fs::path operator/(const fs::path& rel) const { return path_ / rel; }

 private:
  fs::path path_;
};

// The 8 little-endian bytes of v.
inline std::string le64(std::uint64_t v) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xFFu);
  return out;
}

inline std::uint64_t read_le64(std::string_view bytes) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i)
    v = (v << 8) | static_cast<unsigned char>(bytes[static_cast<std::size_t>(i)]);
  return v;
}

// Raw file bytes: 8-byte little-endian length (header_json.size() unless declared_len is given),
// the header bytes exactly as given (no automatic padding) and the data.
inline std::string make_safetensors(std::string_view header_json, std::string_view data,
                                    std::optional<std::uint64_t> declared_len = {}) {
  std::string out = le64(declared_len ? *declared_len : header_json.size());
  out.append(header_json);
  out.append(data);
  return out;
}

inline void write_file(const fs::path& path, std::string_view bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  if (!f) throw std::runtime_error("cannot create " + path.string());
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!f) throw std::runtime_error("cannot write " + path.string());
}

inline std::string read_file(const fs::path& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path.string());
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

inline std::span<const std::byte> as_bytes(std::string_view s) {
  return std::span<const std::byte>(reinterpret_cast<const std::byte*>(s.data()), s.size());
}

inline std::string to_string(std::span<const std::byte> b) {
  return std::string(reinterpret_cast<const char*>(b.data()), b.size());
}

// The bytes of an array of trivially copyable values, in host (little-endian) order.
template <class T>
std::string bytes_of(std::initializer_list<T> values) {
  std::string out(values.size() * sizeof(T), '\0');
  std::size_t i = 0;
  for (const T& v : values) {
    std::memcpy(out.data() + i * sizeof(T), &v, sizeof(T));
    ++i;
  }
  return out;
}

// Deterministic pseudo-random bytes.
inline std::string pattern_bytes(std::size_t n, std::uint32_t seed) {
  std::string out(n, '\0');
  std::uint32_t x = seed * 2654435761u + 12345u;
  for (std::size_t i = 0; i < n; ++i) {
    x = x * 1103515245u + 12345u;
    out[i] = static_cast<char>((x >> 16) & 0xFFu);
  }
  return out;
}

inline std::string shape_json(const std::vector<std::uint64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ",";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

// One tensor entry of a header: "name":{"dtype":..,"shape":..,"data_offsets":[b,e]}.
inline std::string entry_json(std::string_view name, std::string_view dtype,
                              const std::vector<std::uint64_t>& shape, std::uint64_t begin,
                              std::uint64_t end) {
  std::string s = "\"";
  s.append(name);
  s += "\":{\"dtype\":\"";
  s.append(dtype);
  s += "\",\"shape\":" + shape_json(shape) + ",\"data_offsets\":[" + std::to_string(begin) + "," +
       std::to_string(end) + "]}";
  return s;
}

// Builds a valid safetensors file from tensors laid out in the order added (offsets assigned
// sequentially), with optional metadata; the header is space-padded to a multiple of 8.
class StBuilder {
 public:
  StBuilder& add(std::string name, std::string dtype, std::vector<std::uint64_t> shape,
                 std::string data) {
    entries_.push_back({std::move(name), std::move(dtype), std::move(shape), std::move(data)});
    return *this;
  }
  // List the tensors in the header in reverse order of their offsets.
  StBuilder& reverse_header(bool on = true) {
    reverse_ = on;
    return *this;
  }
  StBuilder& meta(std::string key, std::string value) {
    metadata_.emplace_back(std::move(key), std::move(value));
    return *this;
  }

  std::string header() const {
    std::string h = "{";
    bool first = true;
    if (!metadata_.empty()) {
      h += "\"__metadata__\":{";
      for (std::size_t i = 0; i < metadata_.size(); ++i) {
        if (i) h += ",";
        h += "\"" + metadata_[i].first + "\":\"" + metadata_[i].second + "\"";
      }
      h += "}";
      first = false;
    }
    std::vector<std::string> items;
    std::uint64_t off = 0;
    for (const auto& e : entries_) {
      items.push_back(entry_json(e.name, e.dtype, e.shape, off, off + e.data.size()));
      off += e.data.size();
    }
    if (reverse_) std::reverse(items.begin(), items.end());
    for (const auto& item : items) {
      if (!first) h += ",";
      first = false;
      h += item;
    }
    h += "}";
    while (h.size() % 8 != 0) h += ' ';
    return h;
  }

  std::string data() const {
    std::string d;
    for (const auto& e : entries_) d += e.data;
    return d;
  }

  std::string build() const { return make_safetensors(header(), data()); }
  void write(const fs::path& path) const { write_file(path, build()); }

 private:
  struct Entry {
    std::string name, dtype;
    std::vector<std::uint64_t> shape;
    std::string data;
  };
  std::vector<Entry> entries_;
  std::vector<std::pair<std::string, std::string>> metadata_;
  bool reverse_ = false;
};

// Runs f and expects a conflux::Error with `code`. Returns the error (nullopt, after recording a
// failure, when f did not throw a conflux::Error) for further checks.
template <class F>
std::optional<conflux::Error> expect_error(conflux::Errc code, F&& f) {
  try {
    std::forward<F>(f)();
  } catch (const conflux::Error& e) {
    EXPECT_EQ(e.code(), code) << "what(): " << e.what();
    return e;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected conflux::Error(" << conflux::errc_name(code)
                  << ") but got another exception: " << e.what();
    return std::nullopt;
  }
  ADD_FAILURE() << "expected conflux::Error(" << conflux::errc_name(code)
                << ") but nothing was thrown";
  return std::nullopt;
}

// Like expect_error but accepts any of `codes` (for cases the specification leaves open).
template <class F>
std::optional<conflux::Error> expect_error_in(const std::vector<conflux::Errc>& codes, F&& f) {
  std::string names;
  for (auto c : codes) {
    if (!names.empty()) names += "/";
    names += conflux::errc_name(c);
  }
  try {
    std::forward<F>(f)();
  } catch (const conflux::Error& e) {
    bool ok = false;
    for (auto c : codes) ok = ok || e.code() == c;
    EXPECT_TRUE(ok) << "expected one of " << names << ", got " << conflux::errc_name(e.code())
                    << "; what(): " << e.what();
    return e;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected conflux::Error(" << names
                  << ") but got another exception: " << e.what();
    return std::nullopt;
  }
  ADD_FAILURE() << "expected conflux::Error(" << names << ") but nothing was thrown";
  return std::nullopt;
}

inline bool contains(std::string_view haystack, std::string_view needle) {
  return haystack.find(needle) != std::string_view::npos;
}

}  // namespace conflux_test
