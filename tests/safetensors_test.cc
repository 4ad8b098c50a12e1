// Tests of the safetensors reader (include/conflux/safetensors.h, dtype.h, error.h): one test per
// validation rule, each run through both parse_safetensors() (bytes in memory) and
// SafetensorsFile::open() (a file on disk), plus the accepted corner cases and the typed views.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "conflux/dtype.h"
#include "conflux/error.h"
#include "conflux/safetensors.h"
#include "test_util.h"

namespace {

using namespace std::string_literals;
using conflux::DType;
using conflux::Errc;
using conflux::Error;
using conflux::Layout;
using conflux::SafetensorsFile;
using conflux::TensorInfo;
using conflux::TensorView;
using conflux_test::as_bytes;
using conflux_test::bytes_of;
using conflux_test::contains;
using conflux_test::entry_json;
using conflux_test::expect_error;
using conflux_test::expect_error_in;
using conflux_test::make_safetensors;
using conflux_test::TempDir;
using conflux_test::write_file;

// Pads a header with spaces to a multiple of 8, as writers do.
std::string pad8(std::string h) {
  while (h.size() % 8 != 0) h += ' ';
  return h;
}

// A file of one header (padded) and data.
std::string st(const std::string& header, const std::string& data = {}) {
  return make_safetensors(pad8(header), data);
}

// One-tensor header {"t": {...}}.
std::string one(std::string_view dtype, const std::vector<std::uint64_t>& shape, std::uint64_t b,
                std::uint64_t e) {
  return "{" + entry_json("t", dtype, shape, b, e) + "}";
}

// A tensor entry whose body is given raw: {"t": <body>}.
std::string raw_entry(const std::string& body) { return "{\"t\":" + body + "}"; }

void expect_same_layout(const Layout& a, const Layout& b) {
  EXPECT_EQ(a.header_size, b.header_size);
  ASSERT_EQ(a.tensors.size(), b.tensors.size());
  for (std::size_t i = 0; i < a.tensors.size(); ++i) {
    EXPECT_EQ(a.tensors[i].name, b.tensors[i].name);
    EXPECT_EQ(a.tensors[i].dtype, b.tensors[i].dtype);
    EXPECT_EQ(a.tensors[i].shape, b.tensors[i].shape);
    EXPECT_EQ(a.tensors[i].numel, b.tensors[i].numel);
    EXPECT_EQ(a.tensors[i].begin, b.tensors[i].begin);
    EXPECT_EQ(a.tensors[i].end, b.tensors[i].end);
  }
  EXPECT_EQ(a.metadata, b.metadata);
}

class Safetensors : public ::testing::Test {
 protected:
  TempDir dir;
  int counter = 0;

  std::filesystem::path next_path() {
    return dir / ("case-" + std::to_string(++counter) + ".safetensors");
  }

  // Expects both parse_safetensors() and SafetensorsFile::open() to reject `bytes` with one of
  // `codes`; when `tensors` is not empty, Error::tensor() must be one of them and what() must name
  // it. what() must always name the file.
  void reject_any(std::string_view desc, const std::string& bytes, const std::vector<Errc>& codes,
                  const std::vector<std::string>& tensors = {}) {
    SCOPED_TRACE(std::string(desc));
    auto check = [&](const std::optional<Error>& e, const std::filesystem::path& file) {
      if (!e) return;
      EXPECT_TRUE(contains(e->what(), file.string()))
          << "what() does not name the file " << file << ": " << e->what();
      EXPECT_EQ(e->file().string(), file.string());
      if (!tensors.empty()) {
        bool named = false;
        for (const auto& t : tensors) named = named || e->tensor() == t;
        EXPECT_TRUE(named) << "Error::tensor() is '" << e->tensor() << "'; what(): " << e->what();
        if (!e->tensor().empty()) {
          EXPECT_TRUE(contains(e->what(), e->tensor()))
              << "what() does not name the tensor: " << e->what();
        }
      }
    };
    {
      SCOPED_TRACE("parse_safetensors");
      const std::filesystem::path label = "in-memory-" + std::to_string(++counter) + ".safetensors";
      auto e = expect_error_in(codes, [&] { (void)conflux::parse_safetensors(as_bytes(bytes), label); });
      check(e, label);
    }
    {
      SCOPED_TRACE("SafetensorsFile::open");
      const auto path = next_path();
      write_file(path, bytes);
      auto e = expect_error_in(codes, [&] { (void)SafetensorsFile::open(path); });
      check(e, path);
    }
  }

  void reject(std::string_view desc, const std::string& bytes, Errc code,
              const std::vector<std::string>& tensors = {}) {
    reject_any(desc, bytes, {code}, tensors);
  }

  // Both paths accept `bytes` with the same layout; returns the opened file.
  SafetensorsFile accept(const std::string& bytes) {
    Layout mem;
    EXPECT_NO_THROW(mem = conflux::parse_safetensors(as_bytes(bytes), "mem.safetensors"));
    const auto path = next_path();
    write_file(path, bytes);
    SafetensorsFile f = SafetensorsFile::open(path);  // throws (and fails the test) if rejected
    expect_same_layout(mem, f.layout());
    EXPECT_EQ(f.path().string(), path.string());
    EXPECT_EQ(f.file_size(), bytes.size());
    return f;
  }
};

// ---------------------------------------------------------------------------------------------
// Length prefix and header bounds

TEST_F(Safetensors, RejectsFileShorterThanLengthPrefix) {
  reject("0-byte file", "", Errc::header_too_small);
  reject("1-byte file", "\x01"s, Errc::header_too_small);
  reject("7-byte file", "\x02\0\0\0\0\0\0"s, Errc::header_too_small);
}

TEST_F(Safetensors, RejectsHeaderLengthAboveLimit) {
  reject("100,000,001", make_safetensors("{}", "", conflux::kMaxHeaderSize + 1), Errc::header_too_large);
  reject("2^63", make_safetensors("{}", "", std::uint64_t{1} << 63), Errc::header_too_large);
  reject("2^64-1", make_safetensors("{}", "", std::numeric_limits<std::uint64_t>::max()),
         Errc::header_too_large);
  reject("2^64-8 (8+N would wrap)",
         make_safetensors("{}", "", std::numeric_limits<std::uint64_t>::max() - 7),
         Errc::header_too_large);
}

TEST_F(Safetensors, HeaderLengthAtLimitIsNotTooLarge) {
  // Exactly 100,000,000 is allowed by the limit; this file is just too short for it.
  reject("N = 100,000,000 in a tiny file", make_safetensors("{}", "", conflux::kMaxHeaderSize),
         Errc::invalid_header_length);
}

TEST_F(Safetensors, RejectsHeaderPastEndOfFile) {
  reject("N = 100, 2 header bytes", make_safetensors("{}", "", 100), Errc::invalid_header_length);
  reject("N one past EOF", make_safetensors("{}", "", 3), Errc::invalid_header_length);
  reject("8-byte file, N = 1", make_safetensors("", "", 1), Errc::invalid_header_length);
}

TEST_F(Safetensors, EmptyHeaderIsNotJson) {
  reject("N = 0", make_safetensors("", ""), Errc::not_json);
  reject("only spaces", make_safetensors("        ", ""), Errc::not_json);
}

// ---------------------------------------------------------------------------------------------
// Encoding

TEST_F(Safetensors, RejectsInvalidUtf8) {
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"lone 0xFF", "\xff"},
      {"lone continuation byte", "\x80"},
      {"overlong NUL", "\xc0\x80"},
      {"overlong slash", "\xe0\x80\xaf"},
      {"UTF-16 surrogate", "\xed\xa0\x80"},
      {"above U+10FFFF", "\xf4\x90\x80\x80"},
      {"truncated 3-byte sequence", "\xe2\x82"},
  };
  for (const auto& [desc, seq] : bad) {
    reject("in metadata value: " + desc, st("{\"__metadata__\":{\"k\":\"a" + seq + "b\"}}"),
           Errc::invalid_utf8);
    reject("in tensor name: " + desc,
           st("{\"x" + seq + "\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", "A"),
           Errc::invalid_utf8);
  }
  reject("0xFF in padding", make_safetensors("{}   \xff"s, ""), Errc::invalid_utf8);
}

TEST_F(Safetensors, AcceptsValidMultibyteUtf8) {
  // é, €, 😀 in a tensor name and a metadata value.
  const std::string name = "w\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80";
  auto f = accept(st("{\"__metadata__\":{\"k\":\"" + name + "\"}," +
                     entry_json(name, "U8", {1}, 0, 1) + "}", "Z"));
  ASSERT_EQ(f.tensors().size(), 1u);
  EXPECT_EQ(f.tensors()[0].name, name);
  ASSERT_EQ(f.metadata().size(), 1u);
  EXPECT_EQ(f.metadata()[0].second, name);
}

TEST_F(Safetensors, RejectsNulPadding) {
  reject("{} + 6 NULs", make_safetensors("{}\0\0\0\0\0\0"s, ""), Errc::nul_padding);
  reject("tensor header + NULs",
         make_safetensors(one("F32", {1}, 0, 4) + std::string(5, '\0'), bytes_of<float>({1.0f})),
         Errc::nul_padding);
  reject("spaces then NULs", make_safetensors("{}    \0\0"s, ""), Errc::nul_padding);
  reject("a single trailing NUL", make_safetensors("{}\0"s, ""), Errc::nul_padding);
}

TEST_F(Safetensors, RejectsNulInsideHeader) {
  // The rule for NUL bytes not at the end is not pinned down: nul_padding or not_json.
  reject_any("NUL then spaces", make_safetensors("{}\0     "s, ""),
             {Errc::nul_padding, Errc::not_json});
  reject_any("NUL inside a string", st("{\"__metadata__\":{\"k\":\"a\0b\"}}"s),
             {Errc::nul_padding, Errc::not_json});
  reject_any("NUL between tokens", make_safetensors("{\0}"s, ""), {Errc::nul_padding, Errc::not_json});
  reject_any("leading NUL", make_safetensors("\0{}"s, ""), {Errc::nul_padding, Errc::not_json});
}

// ---------------------------------------------------------------------------------------------
// JSON structure

TEST_F(Safetensors, RejectsNonJson) {
  reject("garbage", st("hello world"), Errc::not_json);
  reject("truncated object", st("{\"t\":"), Errc::not_json);
  reject("truncated entry", st("{\"t\":{\"dtype\":\"F32\""), Errc::not_json);
  reject("unterminated string", st("{\"t"), Errc::not_json);
  reject("trailing garbage after the object", st("{} x"), Errc::not_json);
  reject("trailing garbage after a tensor object",
         make_safetensors(one("F32", {1}, 0, 4) + "garbage", bytes_of<float>({1.0f})), Errc::not_json);
  reject("two objects", st("{}{}"), Errc::not_json);
  reject("trailing comma", st("{\"__metadata__\":{\"a\":\"b\"},}"), Errc::not_json);
  reject("single quotes", st("{'a':'b'}"), Errc::not_json);
  reject("comment", st("{/* c */}"), Errc::not_json);
  reject("bad escape", st("{\"__metadata__\":{\"a\":\"\\q\"}}"), Errc::not_json);
  reject("NaN", st("{\"t\":{\"dtype\":\"F32\",\"shape\":[NaN],\"data_offsets\":[0,4]}}",
                   bytes_of<float>({1.0f})),
         Errc::not_json);
}

TEST_F(Safetensors, RejectsJsonThatIsNotAnObject) {
  reject("[]", st("[]"), Errc::not_an_object);
  reject("string", st("\"x\""), Errc::not_an_object);
  reject("number", st("1"), Errc::not_an_object);
  reject("null", st("null"), Errc::not_an_object);
  reject("true", st("true"), Errc::not_an_object);
  reject("array of objects", st("[{}]"), Errc::not_an_object);
}

TEST_F(Safetensors, RejectsTensorEntryThatIsNotAnObject) {
  reject("number", st(raw_entry("1")), Errc::not_an_object, {"t"});
  reject("array", st(raw_entry("[\"F32\",[1],[0,4]]"), bytes_of<float>({1.0f})),
         Errc::not_an_object, {"t"});
  reject("string", st(raw_entry("\"F32\"")), Errc::not_an_object, {"t"});
  reject("null", st(raw_entry("null")), Errc::not_an_object, {"t"});
}

// ---------------------------------------------------------------------------------------------
// Tensor entry fields

TEST_F(Safetensors, RejectsMissingFields) {
  const std::string d = bytes_of<float>({1.0f});
  reject("no dtype", st(raw_entry("{\"shape\":[1],\"data_offsets\":[0,4]}"), d), Errc::invalid_field, {"t"});
  reject("no shape", st(raw_entry("{\"dtype\":\"F32\",\"data_offsets\":[0,4]}"), d), Errc::invalid_field, {"t"});
  reject("no data_offsets", st(raw_entry("{\"dtype\":\"F32\",\"shape\":[1]}"), d), Errc::invalid_field, {"t"});
  reject("empty entry", st(raw_entry("{}"), d), Errc::invalid_field, {"t"});
}

TEST_F(Safetensors, RejectsWronglyTypedFields) {
  const std::string d = bytes_of<float>({1.0f});
  auto e = [](const std::string& dtype, const std::string& shape, const std::string& offs) {
    return raw_entry("{\"dtype\":" + dtype + ",\"shape\":" + shape + ",\"data_offsets\":" + offs + "}");
  };
  reject("dtype a number", st(e("32", "[1]", "[0,4]"), d), Errc::invalid_field, {"t"});
  reject("dtype null", st(e("null", "[1]", "[0,4]"), d), Errc::invalid_field, {"t"});
  reject("dtype an array", st(e("[\"F32\"]", "[1]", "[0,4]"), d), Errc::invalid_field, {"t"});
  reject("shape a string", st(e("\"F32\"", "\"1\"", "[0,4]"), d), Errc::invalid_field, {"t"});
  reject("shape a number", st(e("\"F32\"", "1", "[0,4]"), d), Errc::invalid_field, {"t"});
  reject("shape an object", st(e("\"F32\"", "{}", "[0,4]"), d), Errc::invalid_field, {"t"});
  reject("data_offsets with 1 element", st(e("\"F32\"", "[1]", "[4]"), d), Errc::invalid_field, {"t"});
  reject("data_offsets with 0 elements", st(e("\"F32\"", "[1]", "[]"), d), Errc::invalid_field, {"t"});
  reject("data_offsets with 3 elements", st(e("\"F32\"", "[1]", "[0,4,4]"), d), Errc::invalid_field, {"t"});
  reject("data_offsets strings", st(e("\"F32\"", "[1]", "[\"0\",\"4\"]"), d), Errc::invalid_field, {"t"});
  reject("data_offsets a string", st(e("\"F32\"", "[1]", "\"0,4\""), d), Errc::invalid_field, {"t"});
  reject("data_offsets an object", st(e("\"F32\"", "[1]", "{\"b\":0,\"e\":4}"), d), Errc::invalid_field, {"t"});
  reject_any("data_offsets negative", st(e("\"F32\"", "[1]", "[-4,0]"), d),
             {Errc::invalid_field, Errc::invalid_offsets}, {"t"});
}

TEST_F(Safetensors, RejectsDuplicateFieldInEntry) {
  const std::string d = bytes_of<float>({1.0f});
  reject("dtype twice",
         st(raw_entry("{\"dtype\":\"F32\",\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}"), d),
         Errc::invalid_field, {"t"});
  reject("shape twice",
         st(raw_entry("{\"dtype\":\"F32\",\"shape\":[2],\"shape\":[1],\"data_offsets\":[0,4]}"), d),
         Errc::invalid_field, {"t"});
  reject("data_offsets twice",
         st(raw_entry("{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4],\"data_offsets\":[0,4]}"), d),
         Errc::invalid_field, {"t"});
}

TEST_F(Safetensors, RejectsUnknownDtype) {
  const std::string d = bytes_of<float>({1.0f});
  for (std::string name : {"F17", "f32", "bf16", "", "FLOAT32", "F32 ", " F32", "F8", "Q4_0"}) {
    reject("dtype '" + name + "'", st(one(name, {1}, 0, 4), d), Errc::unknown_dtype, {"t"});
  }
}

TEST_F(Safetensors, RejectsInvalidShape) {
  const std::string d = bytes_of<float>({1.0f});
  auto with_shape = [&](const std::string& shape) {
    return st(raw_entry("{\"dtype\":\"F32\",\"shape\":" + shape + ",\"data_offsets\":[0,4]}"), d);
  };
  reject("negative dim", with_shape("[-1]"), Errc::invalid_shape, {"t"});
  reject("negative dim among others", with_shape("[1,-1,1]"), Errc::invalid_shape, {"t"});
  reject("fractional dim", with_shape("[1.5]"), Errc::invalid_shape, {"t"});
  reject("1e3", with_shape("[1e3]"), Errc::invalid_shape, {"t"});
  reject("1.0", with_shape("[1.0]"), Errc::invalid_shape, {"t"});
  reject("string dim", with_shape("[\"1\"]"), Errc::invalid_shape, {"t"});
  reject("null dim", with_shape("[null]"), Errc::invalid_shape, {"t"});
  reject("bool dim", with_shape("[true]"), Errc::invalid_shape, {"t"});
  reject("nested array dim", with_shape("[[1]]"), Errc::invalid_shape, {"t"});
  reject_any("dim 2^64 (does not fit u64)", with_shape("[18446744073709551616]"),
             {Errc::invalid_shape, Errc::overflow}, {"t"});
}

TEST_F(Safetensors, RejectsShapeProductOverflow) {
  const std::string d = bytes_of<float>({1.0f});
  reject("2^32 x 2^32 x 2 elements", st(one("F32", {1ull << 32, 1ull << 32, 2}, 0, 4), d),
         Errc::overflow, {"t"});
  reject("2^32 x 2^32 U8 elements", st(one("U8", {1ull << 32, 1ull << 32}, 0, 4), d), Errc::overflow,
         {"t"});
  reject("(2^64-1) x 2", st(one("U8", {~0ull, 2}, 0, 4), d), Errc::overflow, {"t"});
}

TEST_F(Safetensors, RejectsByteSizeOverflow) {
  const std::string d = bytes_of<float>({1.0f});
  reject("F32 x 2^62", st(one("F32", {1ull << 62}, 0, 4), d), Errc::overflow, {"t"});
  reject("F64 x 2^61", st(one("F64", {1ull << 61}, 0, 4), d), Errc::overflow, {"t"});
  reject("F16 x 2^63", st(one("F16", {1ull << 63}, 0, 4), d), Errc::overflow, {"t"});
  reject("I64 x 2^32 x 2^29", st(one("I64", {1ull << 32, 1ull << 29}, 0, 4), d), Errc::overflow, {"t"});
}

TEST_F(Safetensors, HugeButRepresentableByteSizeIsRejected) {
  // 2^64-1 U8 elements need 2^64-1 bytes, which fits in 64 bits, but 8 x (2^64-1) bits do not.
  // The reference implementation multiplies in bits (so it reports an overflow); error.h speaks of
  // the byte size. Either way the file is rejected; both codes are accepted here.
  reject_any("U8 x (2^64-1) with a 4-byte span", st(one("U8", {~0ull}, 0, 4), bytes_of<float>({1.0f})),
             {Errc::size_mismatch, Errc::overflow}, {"t"});
  // 2^60 U8 elements: 2^63 bits, no overflow in either unit.
  reject("U8 x 2^60 with a 4-byte span", st(one("U8", {1ull << 60}, 0, 4), bytes_of<float>({1.0f})),
         Errc::size_mismatch, {"t"});
}

TEST_F(Safetensors, RejectsSizeMismatch) {
  reject("F32[2] in 4 bytes", st(one("F32", {2}, 0, 4), bytes_of<float>({1.0f})), Errc::size_mismatch, {"t"});
  reject("F32[1] in 8 bytes", st(one("F32", {1}, 0, 8), bytes_of<float>({1.0f, 2.0f})),
         Errc::size_mismatch, {"t"});
  reject("F32 scalar in 0 bytes", st(one("F32", {}, 0, 0)), Errc::size_mismatch, {"t"});
  reject("empty U8[0] in 1 byte", st(one("U8", {0}, 0, 1), "x"), Errc::size_mismatch, {"t"});
  reject("BF16[3] in 4 bytes", st(one("BF16", {3}, 0, 4), "abcd"), Errc::size_mismatch, {"t"});
  reject("second tensor wrong",
         st("{" + entry_json("a", "U8", {2}, 0, 2) + "," + entry_json("b", "I16", {2}, 2, 8) + "}",
            "abcdefgh"),
         Errc::size_mismatch, {"b"});
}

TEST_F(Safetensors, RejectsSubByteShapesThatAreNotWholeBytes) {
  reject("F4[3] = 12 bits, span 2", st(one("F4", {3}, 0, 2), "ab"), Errc::size_mismatch, {"t"});
  reject("F4[3] = 12 bits, span 1", st(one("F4", {3}, 0, 1), "a"), Errc::size_mismatch, {"t"});
  reject("F4[1] = 4 bits, span 1", st(one("F4", {1}, 0, 1), "a"), Errc::size_mismatch, {"t"});
  reject("F6_E2M3[3] = 18 bits", st(one("F6_E2M3", {3}, 0, 3), "abc"), Errc::size_mismatch, {"t"});
  reject("F6_E3M2[1] = 6 bits", st(one("F6_E3M2", {1}, 0, 1), "a"), Errc::size_mismatch, {"t"});
  reject("F6_E3M2 scalar", st(one("F6_E3M2", {}, 0, 1), "a"), Errc::size_mismatch, {"t"});
}

// ---------------------------------------------------------------------------------------------
// Offsets tiling the buffer

TEST_F(Safetensors, RejectsFirstTensorNotAtZero) {
  reject("single tensor at [4,8)", st(one("F32", {1}, 4, 8), bytes_of<float>({1.0f, 2.0f})),
         Errc::invalid_offsets, {"t"});
  reject("two tensors starting at 1",
         st("{" + entry_json("a", "U8", {1}, 1, 2) + "," + entry_json("b", "U8", {1}, 2, 3) + "}", "xyz"),
         Errc::invalid_offsets, {"a"});
}

TEST_F(Safetensors, RejectsHoleBetweenTensors) {
  reject("hole [4,8)",
         st("{" + entry_json("a", "F32", {1}, 0, 4) + "," + entry_json("b", "F32", {1}, 8, 12) + "}",
            bytes_of<float>({1, 2, 3})),
         Errc::invalid_offsets, {"a", "b"});
}

TEST_F(Safetensors, RejectsOverlappingTensors) {
  reject("b inside a",
         st("{" + entry_json("a", "F32", {2}, 0, 8) + "," + entry_json("b", "F32", {1}, 4, 8) + "}",
            bytes_of<float>({1, 2})),
         Errc::invalid_offsets, {"a", "b"});
  reject("same span twice",
         st("{" + entry_json("a", "F32", {1}, 0, 4) + "," + entry_json("b", "F32", {1}, 0, 4) + "}",
            bytes_of<float>({1})),
         Errc::invalid_offsets, {"a", "b"});
  reject("partial overlap",
         st("{" + entry_json("a", "F32", {2}, 0, 8) + "," + entry_json("b", "F32", {2}, 4, 12) + "}",
            bytes_of<float>({1, 2, 3})),
         Errc::invalid_offsets, {"a", "b"});
}

TEST_F(Safetensors, RejectsEndBeforeBegin) {
  reject("[8,4)", st(one("U8", {4}, 8, 4), "abcdefgh"), Errc::invalid_offsets, {"t"});
  reject("[4,0) after a", st("{" + entry_json("a", "U8", {4}, 0, 4) + "," + entry_json("t", "U8", {4}, 4, 0) + "}",
                             "abcd"),
         Errc::invalid_offsets, {"t"});
}

TEST_F(Safetensors, RejectsDataShorterThanLastEnd) {
  // The offsets must tile the buffer exactly; a buffer shorter than the declared end is invalid.
  reject("F32[2] with 4 data bytes", st(one("F32", {2}, 0, 8), bytes_of<float>({1})),
         Errc::invalid_offsets, {"t"});
  reject("no data at all", st(one("F32", {1}, 0, 4)), Errc::invalid_offsets, {"t"});
  reject("second tensor cut",
         st("{" + entry_json("a", "U8", {4}, 0, 4) + "," + entry_json("b", "U8", {4}, 4, 8) + "}", "abcdef"),
         Errc::invalid_offsets, {"b"});
  reject("end 2^60 in a 4-byte buffer", st(one("U8", {1ull << 60}, 0, 1ull << 60), "abcd"),
         Errc::invalid_offsets, {"t"});
}

TEST_F(Safetensors, RejectsTrailingBytes) {
  reject("one extra byte after a tensor", st(one("F32", {1}, 0, 4), bytes_of<float>({1}) + "x"),
         Errc::trailing_bytes);
  reject("data with no tensors", st("{}", "x"), Errc::trailing_bytes);
  reject("data after an empty tensor", st(one("U8", {0}, 0, 0), "x"), Errc::trailing_bytes);
  reject("metadata only, with data", st("{\"__metadata__\":{\"format\":\"pt\"}}", "12345678"),
         Errc::trailing_bytes);
}

TEST_F(Safetensors, RejectsDuplicateTensorName) {
  reject("a twice",
         st("{" + entry_json("a", "U8", {4}, 0, 4) + "," + entry_json("a", "U8", {4}, 4, 8) + "}", "abcdefgh"),
         Errc::duplicate_name, {"a"});
  reject("a twice, another tensor between",
         st("{" + entry_json("a", "U8", {2}, 0, 2) + "," + entry_json("b", "U8", {2}, 2, 4) + "," +
                entry_json("a", "U8", {2}, 4, 6) + "}",
            "abcdef"),
         Errc::duplicate_name, {"a"});
}

// ---------------------------------------------------------------------------------------------
// __metadata__

TEST_F(Safetensors, RejectsInvalidMetadata) {
  reject("non-string value (number)", st("{\"__metadata__\":{\"k\":1}}"), Errc::invalid_metadata);
  reject("non-string value (null)", st("{\"__metadata__\":{\"k\":null}}"), Errc::invalid_metadata);
  reject("non-string value (array)", st("{\"__metadata__\":{\"k\":[\"v\"]}}"), Errc::invalid_metadata);
  reject("non-string value (object)", st("{\"__metadata__\":{\"k\":{}}}"), Errc::invalid_metadata);
  reject("non-string value (bool)", st("{\"__metadata__\":{\"a\":\"b\",\"k\":true}}"), Errc::invalid_metadata);
  reject("metadata a string", st("{\"__metadata__\":\"pt\"}"), Errc::invalid_metadata);
  reject("metadata an array", st("{\"__metadata__\":[]}"), Errc::invalid_metadata);
  reject("metadata a number", st("{\"__metadata__\":1}"), Errc::invalid_metadata);
  reject("metadata with tensors", st("{\"__metadata__\":[\"x\"]," + one("F32", {1}, 0, 4).substr(1),
                                     bytes_of<float>({1})),
         Errc::invalid_metadata);
}

TEST_F(Safetensors, RejectsDuplicateMetadataKey) {
  reject("k twice", st("{\"__metadata__\":{\"k\":\"a\",\"k\":\"b\"}}"), Errc::invalid_metadata);
  reject_any("__metadata__ twice", st("{\"__metadata__\":{\"a\":\"1\"},\"__metadata__\":{\"b\":\"2\"}}"),
             {Errc::invalid_metadata, Errc::duplicate_name});
}

// ---------------------------------------------------------------------------------------------
// Accepted corner cases

TEST_F(Safetensors, AcceptsSpacePadding) {
  auto f = accept(make_safetensors("{}      ", ""));
  EXPECT_TRUE(f.tensors().empty());
  EXPECT_EQ(f.layout().header_size, 8u);

  const std::string h = one("F32", {1}, 0, 4) + std::string(13, ' ');
  auto g = accept(make_safetensors(h, bytes_of<float>({2.5f})));
  ASSERT_EQ(g.tensors().size(), 1u);
  EXPECT_EQ(g.layout().header_size, h.size());
  EXPECT_EQ(g.layout().data_offset(), 8 + h.size());
  EXPECT_FLOAT_EQ(g.view(g.tensors()[0]).as<float>()[0], 2.5f);
}

TEST_F(Safetensors, AcceptsUnpaddedHeader) {
  auto f = accept(make_safetensors("{}", ""));
  EXPECT_TRUE(f.tensors().empty());
  EXPECT_EQ(f.layout().header_size, 2u);
}

TEST_F(Safetensors, AcceptsLeadingAndInnerWhitespace) {
  auto f = accept(make_safetensors(" \n\t\r{}", ""));
  EXPECT_TRUE(f.tensors().empty());
  auto g = accept(make_safetensors(
      "\n  { \"t\" : { \"dtype\" : \"U8\" ,\n \"shape\" : [ 2 ] , \"data_offsets\" : [ 0 , 2 ] } }\n  ", "hi"));
  ASSERT_EQ(g.tensors().size(), 1u);
  EXPECT_EQ(conflux_test::to_string(g.view(g.tensors()[0]).bytes), "hi");
}

TEST_F(Safetensors, AcceptsEmptyTensor) {
  auto f = accept(st("{" + entry_json("a", "U8", {4}, 0, 4) + "," + entry_json("e", "F32", {0}, 4, 4) + "}",
                     "abcd"));
  const TensorInfo* e = f.find("e");
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->shape, (std::vector<std::uint64_t>{0}));
  EXPECT_EQ(e->numel, 0u);
  EXPECT_EQ(e->begin, 4u);
  EXPECT_EQ(e->end, 4u);
  EXPECT_EQ(e->nbytes(), 0u);
  TensorView v = f.view(*e);
  EXPECT_EQ(v.info, e);
  EXPECT_EQ(v.bytes.size(), 0u);
  EXPECT_EQ(v.as<float>().size(), 0u);
  EXPECT_THROW(v.as<float>()[0], std::out_of_range);
}

TEST_F(Safetensors, AcceptsEmptyTensorsWithZeroInShape) {
  auto f = accept(st("{" + entry_json("e", "F32", {2, 0, 3}, 0, 0) + "}"));
  ASSERT_EQ(f.tensors().size(), 1u);
  EXPECT_EQ(f.tensors()[0].numel, 0u);
  EXPECT_EQ(f.tensors()[0].shape, (std::vector<std::uint64_t>{2, 0, 3}));
}

TEST_F(Safetensors, EmptyTensorsSortBeforeTheTensorAtTheSameOffset) {
  // As in the reference implementation, tensors are ordered by (begin, end): an empty tensor at k
  // comes before a non-empty tensor starting at k, wherever the header lists it.
  auto f = accept(st("{" + entry_json("b", "U8", {4}, 4, 8) + "," + entry_json("e", "F32", {0}, 4, 4) + "," +
                         entry_json("a", "U8", {4}, 0, 4) + "," + entry_json("z", "BF16", {0}, 0, 0) + "}",
                     "abcdefgh"));
  ASSERT_EQ(f.tensors().size(), 4u);
  EXPECT_EQ(f.tensors()[0].name, "z");
  EXPECT_EQ(f.tensors()[1].name, "a");
  EXPECT_EQ(f.tensors()[2].name, "e");
  EXPECT_EQ(f.tensors()[3].name, "b");
  EXPECT_EQ(conflux_test::to_string(f.view(*f.find("b")).bytes), "efgh");
}

TEST_F(Safetensors, AcceptsScalarTensor) {
  auto f = accept(st(one("F32", {}, 0, 4), bytes_of<float>({3.5f})));
  ASSERT_EQ(f.tensors().size(), 1u);
  const TensorInfo& t = f.tensors()[0];
  EXPECT_TRUE(t.shape.empty());
  EXPECT_EQ(t.numel, 1u);
  EXPECT_EQ(t.nbytes(), 4u);
  TensorView v = f.view(t);
  EXPECT_EQ(v.as<float>().size(), 1u);
  EXPECT_EQ(v.as<float>()[0], 3.5f);
  EXPECT_EQ(v.element(0), 3.5);
}

TEST_F(Safetensors, AcceptsUnalignedOffsets) {
  const std::string data = "\x7f"s + bytes_of<float>({1.25f, -2.5f}) + bytes_of<double>({6.75}) +
                           bytes_of<std::uint16_t>({0x3C00});
  auto f = accept(st("{" + entry_json("u", "U8", {1}, 0, 1) + "," + entry_json("f", "F32", {2}, 1, 9) + "," +
                         entry_json("d", "F64", {}, 9, 17) + "," + entry_json("h", "F16", {1}, 17, 19) + "}",
                     data));
  const TensorInfo& fi = f.at("f");
  EXPECT_EQ(fi.begin, 1u);
  TensorView fv = f.view(fi);
  auto floats = fv.as<float>();
  ASSERT_EQ(floats.size(), 2u);
  EXPECT_EQ(floats[0], 1.25f);
  EXPECT_EQ(floats[1], -2.5f);
  EXPECT_EQ(fv.element(0), 1.25);
  EXPECT_EQ(fv.element(1), -2.5);
  EXPECT_THROW(floats[2], std::out_of_range);

  TensorView dv = f.view(f.at("d"));
  EXPECT_EQ(dv.as<double>()[0], 6.75);
  EXPECT_EQ(dv.element(0), 6.75);
  TensorView hv = f.view(f.at("h"));
  EXPECT_EQ(hv.as<std::uint16_t>()[0], 0x3C00);
  EXPECT_EQ(hv.element(0), 1.0);
  EXPECT_EQ(f.view(f.at("u")).as<std::uint8_t>()[0], 0x7f);
}

TEST_F(Safetensors, AcceptsFileWithNoTensors) {
  auto f = accept(st("{}"));
  EXPECT_TRUE(f.tensors().empty());
  EXPECT_TRUE(f.metadata().empty());
  EXPECT_EQ(f.find("x"), nullptr);
}

TEST_F(Safetensors, AcceptsMetadataOnly) {
  auto f = accept(st("{\"__metadata__\":{\"format\":\"pt\"}}"));
  EXPECT_TRUE(f.tensors().empty());
  ASSERT_EQ(f.metadata().size(), 1u);
  EXPECT_EQ(f.metadata()[0].first, "format");
  EXPECT_EQ(f.metadata()[0].second, "pt");
}

TEST_F(Safetensors, AcceptsNullAndEmptyMetadata) {
  auto f = accept(st("{\"__metadata__\":null," + one("U8", {1}, 0, 1).substr(1), "q"));
  EXPECT_TRUE(f.metadata().empty());
  ASSERT_EQ(f.tensors().size(), 1u);
  EXPECT_EQ(f.tensors()[0].name, "t");  // __metadata__ is never a tensor
  auto g = accept(st("{\"__metadata__\":{}}"));
  EXPECT_TRUE(g.metadata().empty());
  EXPECT_TRUE(g.tensors().empty());
}

TEST_F(Safetensors, IgnoresUnknownFieldsInTensorEntry) {
  auto f = accept(st(raw_entry("{\"extra\":[1,{\"x\":2}],\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2],"
                               "\"dtype2\":\"nope\",\"n\":null}"),
                     "ok"));
  ASSERT_EQ(f.tensors().size(), 1u);
  EXPECT_EQ(f.tensors()[0].dtype, DType::U8);
  EXPECT_EQ(f.tensors()[0].shape, (std::vector<std::uint64_t>{2}));
}

TEST_F(Safetensors, UnescapesJsonStrings) {
  auto f = accept(st("{\"__metadata__\":{\"k\\u0065y\":\"a\\\"b\\\\c\\n\\u00e9\"}," +
                     std::string("\"w\\u0062\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}"),
                     "x"));
  ASSERT_EQ(f.metadata().size(), 1u);
  EXPECT_EQ(f.metadata()[0].first, "key");
  EXPECT_EQ(f.metadata()[0].second, "a\"b\\c\n\xc3\xa9");
  ASSERT_EQ(f.tensors().size(), 1u);
  EXPECT_EQ(f.tensors()[0].name, "wb");
  EXPECT_NE(f.find("wb"), nullptr);
}

struct DtypeCase {
  const char* name;
  DType type;
  int bits;
  bool mergeable;
};

const std::vector<DtypeCase>& all_dtypes() {
  static const std::vector<DtypeCase> v = {
      {"BOOL", DType::BOOL, 8, false},       {"F4", DType::F4, 4, false},
      {"F6_E2M3", DType::F6_E2M3, 6, false}, {"F6_E3M2", DType::F6_E3M2, 6, false},
      {"U8", DType::U8, 8, false},           {"I8", DType::I8, 8, false},
      {"F8_E5M2", DType::F8_E5M2, 8, false}, {"F8_E4M3", DType::F8_E4M3, 8, false},
      {"F8_E8M0", DType::F8_E8M0, 8, false}, {"I16", DType::I16, 16, false},
      {"U16", DType::U16, 16, false},        {"F16", DType::F16, 16, true},
      {"BF16", DType::BF16, 16, true},       {"I32", DType::I32, 32, false},
      {"U32", DType::U32, 32, false},        {"F32", DType::F32, 32, true},
      {"C64", DType::C64, 64, false},        {"F64", DType::F64, 64, true},
      {"I64", DType::I64, 64, false},        {"U64", DType::U64, 64, false},
  };
  return v;
}

TEST(DTypes, NamesBitsAndMergeability) {
  EXPECT_EQ(conflux::kDTypeCount, 20);
  ASSERT_EQ(all_dtypes().size(), 20u);
  for (const auto& c : all_dtypes()) {
    SCOPED_TRACE(c.name);
    EXPECT_EQ(conflux::dtype_name(c.type), c.name);
    EXPECT_EQ(conflux::dtype_from_name(c.name), std::optional<DType>(c.type));
    EXPECT_EQ(conflux::dtype_bits(c.type), c.bits);
    EXPECT_EQ(conflux::dtype_is_mergeable(c.type), c.mergeable);
    // Significand bits (the implicit bit included) of the mergeable dtypes; 0 for the rest.
    const int significand = c.type == DType::BF16 ? 8 : c.type == DType::F16 ? 11 : c.type == DType::F32 ? 24
                            : c.type == DType::F64 ? 53 : 0;
    EXPECT_EQ(conflux::dtype_significand_bits(c.type), significand);
  }
  EXPECT_FALSE(conflux::dtype_from_name("f32").has_value());
  EXPECT_FALSE(conflux::dtype_from_name("F17").has_value());
  EXPECT_FALSE(conflux::dtype_from_name("").has_value());
}

TEST_F(Safetensors, RecognisesEveryDtype) {
  // One file holding every dtype, 8 elements each (8 x bits / 8 = bits bytes).
  std::string header = "{";
  std::string data;
  std::uint64_t off = 0;
  for (const auto& c : all_dtypes()) {
    const std::uint64_t n = static_cast<std::uint64_t>(c.bits);
    if (header.size() > 1) header += ",";
    header += entry_json(std::string("t_") + c.name, c.name, {8}, off, off + n);
    data += conflux_test::pattern_bytes(n, static_cast<std::uint32_t>(off));
    off += n;
  }
  header += "}";
  auto f = accept(st(header, data));
  ASSERT_EQ(f.tensors().size(), all_dtypes().size());
  for (const auto& c : all_dtypes()) {
    SCOPED_TRACE(c.name);
    const TensorInfo* t = f.find(std::string("t_") + c.name);
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->dtype, c.type);
    EXPECT_EQ(t->numel, 8u);
    EXPECT_EQ(t->nbytes(), static_cast<std::uint64_t>(c.bits));
  }
}

TEST_F(Safetensors, AcceptsSubByteShapesOfWholeBytes) {
  auto f = accept(st("{" + entry_json("a", "F4", {2}, 0, 1) + "," + entry_json("b", "F6_E2M3", {4}, 1, 4) + "," +
                         entry_json("c", "F6_E3M2", {2, 2}, 4, 7) + "," + entry_json("d", "F4", {0}, 7, 7) + "}",
                     "abcdefg"));
  EXPECT_EQ(f.at("a").nbytes(), 1u);
  EXPECT_EQ(f.at("b").nbytes(), 3u);
  EXPECT_EQ(f.at("c").nbytes(), 3u);
  EXPECT_EQ(f.at("c").numel, 4u);
  EXPECT_EQ(f.at("d").nbytes(), 0u);
}

// ---------------------------------------------------------------------------------------------
// Layout, lookup, metadata, views

TEST_F(Safetensors, TensorsAreSortedByOffset) {
  auto f = accept(st("{" + entry_json("c", "U8", {2}, 4, 6) + "," + entry_json("a", "U8", {3}, 1, 4) + "," +
                         entry_json("b", "U8", {1}, 0, 1) + "}",
                     "012345"));
  const auto& ts = f.layout().tensors;
  ASSERT_EQ(ts.size(), 3u);
  EXPECT_EQ(ts[0].name, "b");
  EXPECT_EQ(ts[1].name, "a");
  EXPECT_EQ(ts[2].name, "c");
  EXPECT_EQ(&f.tensors(), &f.layout().tensors);
  EXPECT_EQ(conflux_test::to_string(f.view(ts[0]).bytes), "0");
  EXPECT_EQ(conflux_test::to_string(f.view(ts[1]).bytes), "123");
  EXPECT_EQ(conflux_test::to_string(f.view(ts[2]).bytes), "45");
}

TEST_F(Safetensors, FindAndAt) {
  auto f = accept(st("{" + entry_json("model.layers.0.w", "F32", {1}, 0, 4) + "," +
                         entry_json("model.layers.1.w", "F32", {1}, 4, 8) + "," +
                         entry_json("lm_head.weight", "F32", {1}, 8, 12) + "}",
                     bytes_of<float>({1, 2, 3})));
  for (const char* name : {"model.layers.0.w", "model.layers.1.w", "lm_head.weight"}) {
    const TensorInfo* t = f.find(name);
    ASSERT_NE(t, nullptr) << name;
    EXPECT_EQ(t->name, name);
    EXPECT_EQ(&f.at(name), t);
  }
  EXPECT_EQ(f.view(f.at("model.layers.1.w")).as<float>()[0], 2.0f);
  EXPECT_EQ(f.find("model.layers.2.w"), nullptr);
  EXPECT_EQ(f.find(""), nullptr);
  EXPECT_EQ(f.find("model.layers.0"), nullptr);
  auto e = expect_error(Errc::not_found, [&] { (void)f.at("missing.weight"); });
  ASSERT_TRUE(e);
  EXPECT_EQ(e->tensor(), "missing.weight");
  EXPECT_TRUE(contains(e->what(), "missing.weight")) << e->what();
  EXPECT_TRUE(contains(e->what(), f.path().string())) << e->what();
}

TEST_F(Safetensors, MetadataPreservedInHeaderOrder) {
  auto f = accept(st("{" + entry_json("a", "U8", {1}, 0, 1) +
                         ",\"__metadata__\":{\"z\":\"1\",\"a\":\"2\",\"m\":\"3\",\"format\":\"pt\"}," +
                         entry_json("b", "U8", {1}, 1, 2) + "}",
                     "xy"));
  const conflux::Metadata expected = {{"z", "1"}, {"a", "2"}, {"m", "3"}, {"format", "pt"}};
  EXPECT_EQ(f.metadata(), expected);
  EXPECT_EQ(f.layout().metadata, expected);
  EXPECT_EQ(f.tensors().size(), 2u);
}

TEST_F(Safetensors, HeaderBytesAndSizes) {
  const std::string header = pad8(one("I32", {2}, 0, 8));
  const std::string bytes = make_safetensors(header, bytes_of<std::int32_t>({-7, 9}));
  auto f = accept(bytes);
  EXPECT_EQ(conflux_test::to_string(f.header_bytes()), header);
  EXPECT_EQ(f.layout().header_size, header.size());
  EXPECT_EQ(f.layout().data_offset(), 8 + header.size());
  EXPECT_EQ(f.file_size(), bytes.size());
  auto v = f.view(f.at("t")).as<std::int32_t>();
  EXPECT_EQ(v[0], -7);
  EXPECT_EQ(v[1], 9);
}

TEST_F(Safetensors, AsWithWrongElementSizeThrowsInvalidArgument) {
  auto f = accept(st("{" + entry_json("f", "F32", {2}, 0, 8) + "," + entry_json("h", "F16", {2}, 8, 12) + "," +
                         entry_json("b", "BOOL", {1}, 12, 13) + "}",
                     bytes_of<float>({1, 2}) + bytes_of<std::uint16_t>({0x3C00, 0x4000}) + "\x01"));
  TensorView fv = f.view(f.at("f"));
  EXPECT_THROW((void)fv.as<double>(), std::invalid_argument);
  EXPECT_THROW((void)fv.as<std::uint16_t>(), std::invalid_argument);
  EXPECT_THROW((void)fv.as<std::uint8_t>(), std::invalid_argument);
  EXPECT_NO_THROW((void)fv.as<float>());
  EXPECT_NO_THROW((void)fv.as<std::uint32_t>());  // same size: allowed by the rule
  TensorView hv = f.view(f.at("h"));
  EXPECT_THROW((void)hv.as<float>(), std::invalid_argument);
  EXPECT_NO_THROW((void)hv.as<std::uint16_t>());
  TensorView bv = f.view(f.at("b"));
  EXPECT_THROW((void)bv.as<std::uint16_t>(), std::invalid_argument);
  EXPECT_EQ(bv.as<std::uint8_t>()[0], 1);
}

TEST_F(Safetensors, TypedViewIsBoundsChecked) {
  auto f = accept(st(one("F32", {3}, 0, 12), bytes_of<float>({1, 2, 3})));
  auto v = f.view(f.at("t")).as<float>();
  EXPECT_EQ(v.size(), 3u);
  EXPECT_EQ(v[2], 3.0f);
  EXPECT_THROW(v[3], std::out_of_range);
  EXPECT_THROW(v[std::numeric_limits<std::size_t>::max()], std::out_of_range);
}

TEST_F(Safetensors, ElementWidensF16) {
  const std::vector<std::pair<std::uint16_t, double>> cases = {
      {0x3C00, 1.0},           {0xC000, -2.0},       {0x3800, 0.5},
      {0x3555, 0.333251953125}, {0x7BFF, 65504.0},    {0x0001, std::ldexp(1.0, -24)},
      {0x0400, std::ldexp(1.0, -14)}, {0x03FF, std::ldexp(1023.0, -24)}, {0x0000, 0.0},
  };
  std::string data;
  for (const auto& c : cases) data += bytes_of<std::uint16_t>({c.first});
  data += bytes_of<std::uint16_t>({0x7C00, 0xFC00, 0x8000, 0x7E00});
  const std::uint64_t n = cases.size() + 4;
  auto f = accept(st(one("F16", {n}, 0, 2 * n), data));
  TensorView v = f.view(f.at("t"));
  for (std::size_t i = 0; i < cases.size(); ++i) EXPECT_EQ(v.element(i), cases[i].second) << "bits " << cases[i].first;
  EXPECT_TRUE(std::isinf(v.element(cases.size())));
  EXPECT_GT(v.element(cases.size()), 0.0);
  EXPECT_TRUE(std::isinf(v.element(cases.size() + 1)));
  EXPECT_LT(v.element(cases.size() + 1), 0.0);
  EXPECT_EQ(v.element(cases.size() + 2), 0.0);
  EXPECT_TRUE(std::signbit(v.element(cases.size() + 2)));
  EXPECT_TRUE(std::isnan(v.element(cases.size() + 3)));
}

TEST_F(Safetensors, ElementWidensBF16) {
  const std::vector<std::pair<std::uint16_t, double>> cases = {
      {0x3F80, 1.0}, {0xC000, -2.0}, {0x4049, 3.140625}, {0x3F00, 0.5},
      {0x0001, std::ldexp(1.0, -133)}, {0x7F7F, std::ldexp(255.0, 120)}, {0x0000, 0.0},
  };
  std::string data;
  for (const auto& c : cases) data += bytes_of<std::uint16_t>({c.first});
  data += bytes_of<std::uint16_t>({0x7F80, 0xFF80, 0x7FC0});
  const std::uint64_t n = cases.size() + 3;
  auto f = accept(st(one("BF16", {n}, 0, 2 * n), data));
  TensorView v = f.view(f.at("t"));
  for (std::size_t i = 0; i < cases.size(); ++i) EXPECT_EQ(v.element(i), cases[i].second) << "bits " << cases[i].first;
  EXPECT_TRUE(std::isinf(v.element(cases.size())));
  EXPECT_TRUE(std::isinf(v.element(cases.size() + 1)));
  EXPECT_LT(v.element(cases.size() + 1), 0.0);
  EXPECT_TRUE(std::isnan(v.element(cases.size() + 2)));
}

TEST_F(Safetensors, ElementWidensF32AndF64) {
  const float fvals[] = {0.1f, -3.0e38f, 1.0e-45f, 42.0f};
  const double dvals[] = {0.1, -1.0e300, 5e-324, 42.0};
  auto f = accept(st("{" + entry_json("f", "F32", {4}, 0, 16) + "," + entry_json("d", "F64", {4}, 16, 48) + "}",
                     bytes_of<float>({fvals[0], fvals[1], fvals[2], fvals[3]}) +
                         bytes_of<double>({dvals[0], dvals[1], dvals[2], dvals[3]})));
  TensorView fv = f.view(f.at("f"));
  TensorView dv = f.view(f.at("d"));
  for (std::size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(fv.element(i), static_cast<double>(fvals[i]));
    EXPECT_EQ(dv.element(i), dvals[i]);
  }
}

TEST_F(Safetensors, ViewSpansExactlyTheTensorBytes) {
  const std::string data = conflux_test::pattern_bytes(40, 7);
  auto f = accept(st("{" + entry_json("a", "U16", {3, 2}, 0, 12) + "," + entry_json("b", "I64", {2}, 12, 28) + "," +
                         entry_json("c", "C64", {1}, 28, 36) + "," + entry_json("d", "I8", {2, 2}, 36, 40) + "}",
                     data));
  std::uint64_t expect_begin = 0;
  for (const auto& t : f.tensors()) {
    TensorView v = f.view(t);
    EXPECT_EQ(v.info, &t);
    EXPECT_EQ(v.bytes.size(), t.nbytes());
    EXPECT_EQ(conflux_test::to_string(v.bytes), data.substr(t.begin, t.nbytes()));
    EXPECT_EQ(t.begin, expect_begin);
    expect_begin = t.end;
  }
  EXPECT_EQ(expect_begin, data.size());
}

TEST_F(Safetensors, MovedFileStaysValid) {
  auto f = accept(st(one("F64", {2}, 0, 16), bytes_of<double>({1.5, -0.25})));
  SafetensorsFile g(std::move(f));
  EXPECT_EQ(g.view(g.at("t")).element(1), -0.25);
  SafetensorsFile h = accept(st("{}"));
  h = std::move(g);
  EXPECT_EQ(h.view(h.at("t")).element(0), 1.5);
  EXPECT_EQ(h.tensors().size(), 1u);
}


TEST_F(Safetensors, ReadCopiesTheSameBytesAsTheMapping) {
  const std::string data = conflux_test::pattern_bytes(40, 11);
  auto f = accept(st("{" + entry_json("a", "U8", {13}, 0, 13) + "," + entry_json("b", "U8", {27}, 13, 40) + "}",
                     data));
  for (const auto& t : f.tensors()) {
    std::vector<std::byte> copy(t.nbytes());
    f.read(t.begin, t.end, copy.data());
    const TensorView v = f.view(t);
    EXPECT_EQ(std::memcmp(copy.data(), v.bytes.data(), copy.size()), 0) << t.name;
  }
  // An inner range, and an empty one that touches nothing.
  std::vector<std::byte> part(5, std::byte{0x55});
  f.read(20, 25, part.data());
  EXPECT_EQ(conflux_test::to_string(part), data.substr(20, 5));
  f.read(7, 7, nullptr);
  EXPECT_THROW(f.read(35, 41, part.data()), std::out_of_range);
}

TEST_F(Safetensors, ReadOfAFileTruncatedUnderTheMergeNamesIt) {
  const std::string data = conflux_test::pattern_bytes(4096 * 3, 5);
  auto f = accept(st(one("U8", {4096 * 3}, 0, 4096 * 3), data));
  // Another process truncates the checkpoint while it is open: a read past the new end must be an
  // error naming the file, never a silent short copy.
  std::filesystem::resize_file(f.path(), f.file_size() - 4096);
  std::vector<std::byte> buf(4096 * 3);
  auto e = expect_error(Errc::io, [&] { f.read(0, 4096 * 3, buf.data()); });
  if (e) {
    EXPECT_TRUE(contains(e->what(), f.path().string())) << e->what();
    EXPECT_TRUE(contains(e->what(), "truncated")) << e->what();
  }
}
TEST_F(Safetensors, ParseHeaderDirectly) {
  const std::string json = "{" + entry_json("b", "U8", {2}, 2, 4) + "," + entry_json("a", "U8", {2}, 0, 2) +
                           ",\"__metadata__\":{\"format\":\"pt\"}}";
  Layout l = conflux::parse_header(json, 4, "direct.safetensors");
  ASSERT_EQ(l.tensors.size(), 2u);
  EXPECT_EQ(l.tensors[0].name, "a");
  EXPECT_EQ(l.tensors[1].name, "b");
  EXPECT_EQ(l.tensors[1].numel, 2u);
  EXPECT_EQ(l.metadata, (conflux::Metadata{{"format", "pt"}}));

  auto e = expect_error(Errc::trailing_bytes, [&] { (void)conflux::parse_header(json, 5, "direct.safetensors"); });
  if (e) {
    EXPECT_TRUE(contains(e->what(), "direct.safetensors")) << e->what();
  }
  e = expect_error(Errc::invalid_offsets, [&] { (void)conflux::parse_header(json, 3, "direct.safetensors"); });
  if (e) {
    EXPECT_TRUE(contains(e->what(), "direct.safetensors")) << e->what();
  }
  expect_error(Errc::not_json, [&] { (void)conflux::parse_header("{", 0, "direct.safetensors"); });
}

TEST_F(Safetensors, OpenMissingFileIsIoError) {
  const auto path = dir / "does-not-exist.safetensors";
  auto e = expect_error(Errc::io, [&] { (void)SafetensorsFile::open(path); });
  if (e) {
    EXPECT_TRUE(contains(e->what(), path.string())) << e->what();
    EXPECT_EQ(e->file().string(), path.string());
  }
}

TEST_F(Safetensors, OpenDirectoryIsIoError) {
  const auto path = dir / "a-directory.safetensors";
  std::filesystem::create_directory(path);
  auto e = expect_error(Errc::io, [&] { (void)SafetensorsFile::open(path); });
  if (e) {
    EXPECT_TRUE(contains(e->what(), path.string())) << e->what();
  }
}

TEST(Errors, ErrcNamesAndMessageFormat) {
  EXPECT_EQ(conflux::errc_name(Errc::header_too_large), "header_too_large");
  EXPECT_EQ(conflux::errc_name(Errc::nul_padding), "nul_padding");
  EXPECT_EQ(conflux::errc_name(Errc::invalid_argument), "invalid_argument");
  Error e(Errc::size_mismatch, "/x/y.safetensors", "some detail", "w.0");
  EXPECT_EQ(e.code(), Errc::size_mismatch);
  EXPECT_EQ(e.file().string(), "/x/y.safetensors");
  EXPECT_EQ(e.detail(), "some detail");
  EXPECT_EQ(e.tensor(), "w.0");
  const std::string what = e.what();
  EXPECT_TRUE(contains(what, "/x/y.safetensors")) << what;
  EXPECT_TRUE(contains(what, "some detail")) << what;
  EXPECT_TRUE(contains(what, "w.0")) << what;
  EXPECT_EQ(what.find('\n'), std::string::npos) << what;
}

}  // namespace
