// Tests of the checkpoint writer (include/conflux/writer.h): round trips through Checkpoint::open,
// header padding and metadata, alignment, sharding and the index, errors and parse_byte_size().
#include <gtest/gtest.h>

#include <boost/json.hpp>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <limits>
#include <map>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "conflux/checkpoint.h"
#include "conflux/dtype.h"
#include "conflux/error.h"
#include "conflux/safetensors.h"
#include "conflux/writer.h"
#include "test_util.h"

namespace {

namespace fs = std::filesystem;
namespace json = boost::json;
using conflux::Checkpoint;
using conflux::CheckpointWriter;
using conflux::DType;
using conflux::Errc;
using conflux::OutputTensor;
using conflux::WriterOptions;
using conflux_test::as_bytes;
using conflux_test::contains;
using conflux_test::expect_error;
using conflux_test::pattern_bytes;
using conflux_test::read_file;
using conflux_test::read_le64;
using conflux_test::TempDir;

struct Spec {
  std::string name;
  DType dtype;
  std::vector<std::uint64_t> shape;
  std::size_t elem_size;  // bytes per element
};

std::uint64_t numel(const std::vector<std::uint64_t>& shape) {
  std::uint64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

std::size_t nbytes(const Spec& s) { return static_cast<std::size_t>(numel(s.shape)) * s.elem_size; }

std::vector<OutputTensor> outputs(const std::vector<Spec>& specs) {
  std::vector<OutputTensor> out;
  for (const auto& s : specs) out.push_back({s.name, s.dtype, s.shape});
  return out;
}

std::vector<std::string> make_data(const std::vector<Spec>& specs) {
  std::vector<std::string> data;
  for (std::size_t i = 0; i < specs.size(); ++i)
    data.push_back(pattern_bytes(nbytes(specs[i]), static_cast<std::uint32_t>(i + 1)));
  return data;
}

// Writes all of `data[i]` for tensor i in one call.
void write_all(CheckpointWriter& w, const std::vector<std::string>& data) {
  for (std::size_t i = 0; i < data.size(); ++i)
    if (!data[i].empty()) w.write_at(i, 0, as_bytes(data[i]));
}

// Every shard file exists with its planned size, its header length is a multiple of 8 padded with
// spaces, and (when sharded) the index exists.
void expect_shard_files(const fs::path& dir, const CheckpointWriter& w) {
  for (const auto& s : w.shards()) {
    SCOPED_TRACE(s.file_name);
    const fs::path p = dir / s.file_name;
    ASSERT_TRUE(fs::exists(p));
    EXPECT_EQ(fs::file_size(p), s.file_size());
    EXPECT_EQ(s.header_size % 8, 0u);
    const std::string bytes = read_file(p);
    ASSERT_GE(bytes.size(), 8u);
    const std::uint64_t n = read_le64(bytes);
    EXPECT_EQ(n % 8, 0u) << "header length " << n;
    EXPECT_EQ(n, s.header_size);
    ASSERT_LE(8 + n, bytes.size());
    ASSERT_GT(n, 0u);
    const char last = bytes[static_cast<std::size_t>(8 + n - 1)];
    EXPECT_TRUE(last == ' ' || last == '}') << "last header byte " << static_cast<int>(last);
    const std::string header = bytes.substr(8, static_cast<std::size_t>(n));
    const std::size_t close = header.find_last_of('}');
    ASSERT_NE(close, std::string::npos);
    EXPECT_EQ(header.find_first_not_of(' ', close + 1), std::string::npos)
        << "header padded with something other than spaces";
    EXPECT_EQ(header.front(), '{');
  }
}

class Writer : public ::testing::Test {
 protected:
  TempDir tmp;
  fs::path dir;
  void SetUp() override {
    dir = tmp / "out";
    fs::create_directory(dir);
  }

  // Opens the written checkpoint and checks every tensor's dtype, shape and bytes.
  void expect_read_back(const std::vector<Spec>& specs, const std::vector<std::string>& data) {
    Checkpoint c = Checkpoint::open(dir);
    ASSERT_EQ(c.size(), specs.size());
    std::uint64_t total = 0;
    for (std::size_t i = 0; i < specs.size(); ++i) {
      SCOPED_TRACE(specs[i].name);
      const conflux::TensorRef* r = c.find(specs[i].name);
      ASSERT_NE(r, nullptr);
      EXPECT_EQ(r->info->dtype, specs[i].dtype);
      EXPECT_EQ(r->info->shape, specs[i].shape);
      EXPECT_EQ(r->info->numel, numel(specs[i].shape));
      EXPECT_EQ(conflux_test::to_string(c.view(*r).bytes), data[i]);
      total += data[i].size();
    }
    EXPECT_EQ(c.data_bytes(), total);
  }
};

const std::vector<Spec>& round_trip_specs() {
  static const std::vector<Spec> v = {
      {"model.f16", DType::F16, {3, 5}, 2},    {"model.bf16", DType::BF16, {7}, 2},
      {"model.f32.scalar", DType::F32, {}, 4}, {"model.f64.empty", DType::F64, {0}, 8},
      {"model.i64", DType::I64, {3, 5}, 8},    {"model.u8", DType::U8, {7}, 1},
      {"model.f32", DType::F32, {3, 5}, 4},    {"model.f64", DType::F64, {7}, 8},
      {"model.bf16.scalar", DType::BF16, {}, 2}, {"model.f16.empty", DType::F16, {2, 0}, 2},
  };
  return v;
}

enum class Mode { forward_pieces, reverse_pieces, threads };
constexpr std::size_t kThreads = 4;
constexpr std::size_t kChunk = 3;

void run_round_trip(const fs::path& dir, Mode mode, std::vector<std::string>& data_out) {
  const auto& specs = round_trip_specs();
  const auto data = make_data(specs);
  data_out = data;
  CheckpointWriter w(dir, outputs(specs));
  ASSERT_EQ(w.tensors().size(), specs.size());
  ASSERT_EQ(w.plan().size(), specs.size());
  std::uint64_t total = 0;
  for (std::size_t i = 0; i < specs.size(); ++i) {
    EXPECT_EQ(w.tensors()[i].name, specs[i].name);
    EXPECT_EQ(w.plan()[i].nbytes, data[i].size()) << specs[i].name;
    EXPECT_EQ(w.plan()[i].shard, 0u);
    total += data[i].size();
  }
  EXPECT_EQ(w.data_bytes(), total);
  ASSERT_EQ(w.shards().size(), 1u);
  EXPECT_EQ(w.shards()[0].file_name, "model.safetensors");
  EXPECT_EQ(w.shards()[0].data_size, total);
  // Created at full size before any data is written.
  EXPECT_EQ(fs::file_size(dir / "model.safetensors"), w.shards()[0].file_size());

  static const std::size_t pieces[] = {1, 2, 3, 5, 7};
  switch (mode) {
    case Mode::forward_pieces:
      for (std::size_t i = 0; i < data.size(); ++i) {
        std::size_t off = 0, k = 0;
        while (off < data[i].size()) {
          const std::size_t n = std::min(pieces[k++ % 5], data[i].size() - off);
          w.write_at(i, off, as_bytes(std::string_view(data[i]).substr(off, n)));
          off += n;
        }
      }
      break;
    case Mode::reverse_pieces:
      for (std::size_t i = data.size(); i-- > 0;) {
        std::size_t end = data[i].size(), k = 0;
        while (end > 0) {
          const std::size_t n = std::min(pieces[k++ % 5], end);
          w.write_at(i, end - n, as_bytes(std::string_view(data[i]).substr(end - n, n)));
          end -= n;
        }
      }
      break;
    case Mode::threads: {
      std::vector<std::thread> threads;
      for (std::size_t t = 0; t < kThreads; ++t) {
        threads.emplace_back([&w, &data, t] {
          for (std::size_t i = 0; i < data.size(); ++i) {
            for (std::size_t j = 0; j * kChunk < data[i].size(); ++j) {
              if ((i + j) % kThreads != t) continue;
              const std::size_t off = j * kChunk;
              const std::size_t n = std::min(kChunk, data[i].size() - off);
              w.write_at(i, off, as_bytes(std::string_view(data[i]).substr(off, n)));
            }
          }
        });
      }
      for (auto& th : threads) th.join();
      break;
    }
  }
  w.finish();
  expect_shard_files(dir, w);
  EXPECT_FALSE(fs::exists(dir / conflux::kIndexFileName));
}

// ---------------------------------------------------------------------------------------------
// Round trips

TEST_F(Writer, RoundTripInPieces) {
  std::vector<std::string> data;
  run_round_trip(dir, Mode::forward_pieces, data);
  expect_read_back(round_trip_specs(), data);
}

TEST_F(Writer, RoundTripInReverseOrder) {
  std::vector<std::string> data;
  run_round_trip(dir, Mode::reverse_pieces, data);
  expect_read_back(round_trip_specs(), data);
}

TEST_F(Writer, RoundTripFromSeveralThreads) {
  std::vector<std::string> data;
  run_round_trip(dir, Mode::threads, data);
  expect_read_back(round_trip_specs(), data);
}

TEST_F(Writer, RoundTripFloatValues) {
  const std::vector<Spec> specs = {{"w", DType::F32, {2, 2}, 4}, {"d", DType::F64, {3}, 8}};
  const std::vector<std::string> data = {conflux_test::bytes_of<float>({1.5f, -2.0f, 0.25f, 1e30f}),
                                         conflux_test::bytes_of<double>({3.0, -1e-300, 42.0})};
  {
    CheckpointWriter w(dir, outputs(specs));
    write_all(w, data);
    w.finish();
  }
  Checkpoint c = Checkpoint::open(dir);
  auto wv = c.view(c.at("w"));
  EXPECT_EQ(wv.as<float>()[3], 1e30f);
  EXPECT_EQ(wv.element(1), -2.0);
  auto dv = c.view(c.at("d"));
  EXPECT_EQ(dv.element(1), -1e-300);
}

// ---------------------------------------------------------------------------------------------
// Header and metadata

TEST_F(Writer, MetadataHasFormatPtFirstThenOptions) {
  const std::vector<Spec> specs = {{"a", DType::F32, {3}, 4}, {"b", DType::U8, {5}, 1}};
  WriterOptions opt;
  opt.metadata = {{"merge_method", "ties"}, {"conflux_version", "0.1.0"}, {"note", "a \"quoted\" \\ value"}};
  const auto data = make_data(specs);
  {
    CheckpointWriter w(dir, outputs(specs), opt);
    write_all(w, data);
    w.finish();
    expect_shard_files(dir, w);
  }
  Checkpoint c = Checkpoint::open(dir);
  ASSERT_EQ(c.shards().size(), 1u);
  const conflux::Metadata expected = {{"format", "pt"},
                                      {"merge_method", "ties"},
                                      {"conflux_version", "0.1.0"},
                                      {"note", "a \"quoted\" \\ value"}};
  EXPECT_EQ(c.shards()[0].metadata(), expected);
  expect_read_back(specs, data);
}

TEST_F(Writer, DefaultMetadataIsFormatPt) {
  const std::vector<Spec> specs = {{"a", DType::BF16, {4}, 2}};
  const auto data = make_data(specs);
  {
    CheckpointWriter w(dir, outputs(specs));
    write_all(w, data);
    w.finish();
  }
  Checkpoint c = Checkpoint::open(dir);
  EXPECT_EQ(c.shards()[0].metadata(), (conflux::Metadata{{"format", "pt"}}));
}

TEST_F(Writer, HeaderPaddedToMultipleOf8ForManyNameLengths) {
  // Vary the header length through all residues mod 8.
  for (std::size_t len = 1; len <= 9; ++len) {
    SCOPED_TRACE(len);
    const fs::path d = tmp / ("pad" + std::to_string(len));
    fs::create_directory(d);
    const std::vector<Spec> specs = {{std::string(len, 'x'), DType::F16, {1}, 2}};
    const auto data = make_data(specs);
    CheckpointWriter w(d, outputs(specs));
    write_all(w, data);
    w.finish();
    expect_shard_files(d, w);
    Checkpoint c = Checkpoint::open(d);
    EXPECT_EQ(conflux_test::to_string(c.view(c.at(specs[0].name)).bytes), data[0]);
  }
}

TEST_F(Writer, TensorsAlignedToElementSize) {
  // Given in an order that would misalign: U8 x3 first, then wider types.
  const std::vector<Spec> specs = {
      {"small", DType::U8, {3}, 1}, {"f", DType::F32, {2}, 4},   {"h", DType::F16, {3}, 2},
      {"d", DType::F64, {1}, 8},    {"f2", DType::F32, {1}, 4},  {"b", DType::BOOL, {1}, 1},
  };
  const auto data = make_data(specs);
  {
    CheckpointWriter w(dir, outputs(specs));
    ASSERT_EQ(w.plan().size(), specs.size());
    for (std::size_t i = 0; i < specs.size(); ++i) {
      SCOPED_TRACE(specs[i].name);
      EXPECT_EQ(w.plan()[i].begin % specs[i].elem_size, 0u);
      EXPECT_EQ(w.plan()[i].nbytes, nbytes(specs[i]));
    }
    // Descending element size, stable: d, f, f2, h, small, b.
    EXPECT_EQ(w.plan()[3].begin, 0u);   // d
    EXPECT_EQ(w.plan()[1].begin, 8u);   // f
    EXPECT_EQ(w.plan()[4].begin, 16u);  // f2
    EXPECT_EQ(w.plan()[2].begin, 20u);  // h
    EXPECT_EQ(w.plan()[0].begin, 26u);  // small
    EXPECT_EQ(w.plan()[5].begin, 29u);  // b
    // Written in the given order; the offsets come from the plan.
    write_all(w, data);
    w.finish();
  }
  Checkpoint c = Checkpoint::open(dir);
  std::vector<std::string> order;
  for (const auto& r : c.tensors()) {
    order.push_back(r.name());
    EXPECT_EQ(r.info->begin % static_cast<std::uint64_t>(conflux::dtype_bits(r.info->dtype) / 8), 0u)
        << r.name();
  }
  EXPECT_EQ(order, (std::vector<std::string>{"d", "f", "f2", "h", "small", "b"}));
  const conflux::TensorInfo& f = c.shards()[0].at("f");
  EXPECT_EQ(f.begin % 4, 0u);
  EXPECT_EQ((c.shards()[0].layout().data_offset() + f.begin) % 4, 0u)
      << "F32 data not 4-byte aligned in the file";
  expect_read_back(specs, data);
}

// ---------------------------------------------------------------------------------------------
// Sharding

std::vector<Spec> sixteen_byte_tensors(std::size_t n) {
  std::vector<Spec> v;
  for (std::size_t i = 0; i < n; ++i) v.push_back({"layer." + std::to_string(i) + ".weight", DType::F32, {4}, 4});
  return v;
}

json::value read_index(const fs::path& dir) {
  return json::parse(read_file(dir / conflux::kIndexFileName));
}

TEST_F(Writer, ShardsByShardSize) {
  const auto specs = sixteen_byte_tensors(6);
  const auto data = make_data(specs);
  WriterOptions opt;
  opt.shard_size = 32;  // two 16-byte tensors fit exactly
  const std::vector<std::string> names = {"model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
                                          "model-00003-of-00003.safetensors"};
  {
    CheckpointWriter w(dir, outputs(specs), opt);
    ASSERT_EQ(w.shards().size(), 3u);
    for (std::size_t s = 0; s < 3; ++s) {
      EXPECT_EQ(w.shards()[s].file_name, names[s]);
      EXPECT_EQ(w.shards()[s].data_size, 32u);
    }
    for (std::size_t i = 0; i < specs.size(); ++i) EXPECT_EQ(w.plan()[i].shard, i / 2) << i;
    EXPECT_EQ(w.data_bytes(), 96u);
    // Written from the last tensor to the first.
    for (std::size_t i = specs.size(); i-- > 0;) w.write_at(i, 0, as_bytes(data[i]));
    w.finish();
    expect_shard_files(dir, w);
  }
  EXPECT_FALSE(fs::exists(dir / "model.safetensors"));

  const json::value index = read_index(dir);
  ASSERT_TRUE(index.is_object());
  EXPECT_EQ(index.at("metadata").at("total_size").to_number<std::uint64_t>(), 96u);
  const json::object& wm = index.at("weight_map").as_object();
  EXPECT_EQ(wm.size(), specs.size());
  for (std::size_t i = 0; i < specs.size(); ++i) {
    SCOPED_TRACE(specs[i].name);
    ASSERT_TRUE(wm.contains(specs[i].name));
    EXPECT_EQ(json::value_to<std::string>(wm.at(specs[i].name)), names[i / 2]);
  }

  Checkpoint c = Checkpoint::open(dir);
  EXPECT_TRUE(c.has_index());
  ASSERT_EQ(c.shards().size(), 3u);
  ASSERT_EQ(c.size(), specs.size());
  for (std::size_t i = 0; i < specs.size(); ++i) {
    EXPECT_EQ(c.tensors()[i].name(), specs[i].name);
    EXPECT_EQ(c.shards()[c.tensors()[i].shard].path().filename().string(), names[i / 2]);
  }
  for (const auto& s : c.shards()) EXPECT_EQ(s.metadata().at(0), (std::pair<std::string, std::string>{"format", "pt"}));
  expect_read_back(specs, data);
}

TEST_F(Writer, ShardSizeJustBelowTwoTensors) {
  const auto specs = sixteen_byte_tensors(6);
  const auto data = make_data(specs);
  WriterOptions opt;
  opt.shard_size = 31;
  {
    CheckpointWriter w(dir, outputs(specs), opt);
    ASSERT_EQ(w.shards().size(), 6u);
    EXPECT_EQ(w.shards()[0].file_name, "model-00001-of-00006.safetensors");
    EXPECT_EQ(w.shards()[5].file_name, "model-00006-of-00006.safetensors");
    write_all(w, data);
    w.finish();
  }
  expect_read_back(specs, data);
  EXPECT_TRUE(Checkpoint::open(dir).has_index());
}

TEST_F(Writer, TensorLargerThanShardSizeGetsItsOwnShard) {
  const std::vector<Spec> specs = {{"a", DType::F32, {4}, 4},
                                   {"big", DType::F32, {25}, 4},  // 100 bytes > shard_size
                                   {"b", DType::F32, {4}, 4},
                                   {"c", DType::F32, {4}, 4}};
  const auto data = make_data(specs);
  WriterOptions opt;
  opt.shard_size = 32;
  {
    CheckpointWriter w(dir, outputs(specs), opt);
    ASSERT_EQ(w.shards().size(), 3u);
    EXPECT_EQ(w.plan()[0].shard, 0u);
    EXPECT_EQ(w.plan()[1].shard, 1u);
    EXPECT_EQ(w.plan()[2].shard, 2u);
    EXPECT_EQ(w.plan()[3].shard, 2u);
    EXPECT_EQ(w.shards()[1].data_size, 100u);
    write_all(w, data);
    w.finish();
    expect_shard_files(dir, w);
  }
  const json::value index = read_index(dir);
  EXPECT_EQ(index.at("metadata").at("total_size").to_number<std::uint64_t>(), 148u);
  EXPECT_EQ(json::value_to<std::string>(index.at("weight_map").at("big")), "model-00002-of-00003.safetensors");
  expect_read_back(specs, data);
}

TEST_F(Writer, LargeFirstTensorDoesNotLeaveAnEmptyShard) {
  const std::vector<Spec> specs = {{"big", DType::F64, {20}, 8},  // 160 bytes
                                   {"a", DType::F32, {4}, 4},
                                   {"b", DType::F32, {4}, 4}};
  const auto data = make_data(specs);
  WriterOptions opt;
  opt.shard_size = 32;
  {
    CheckpointWriter w(dir, outputs(specs), opt);
    ASSERT_EQ(w.shards().size(), 2u);
    EXPECT_EQ(w.plan()[0].shard, 0u);
    EXPECT_EQ(w.plan()[1].shard, 1u);
    EXPECT_EQ(w.plan()[2].shard, 1u);
    EXPECT_EQ(w.shards()[0].file_name, "model-00001-of-00002.safetensors");
    for (const auto& s : w.shards()) EXPECT_GT(s.data_size, 0u);
    write_all(w, data);
    w.finish();
  }
  expect_read_back(specs, data);
}

TEST_F(Writer, ShardingKeepsAlignmentWithinEachShard) {
  const std::vector<Spec> specs = {{"u", DType::U8, {3}, 1}, {"f", DType::F32, {2}, 4},
                                   {"h", DType::F16, {1}, 2}, {"d", DType::F64, {2}, 8},
                                   {"u2", DType::U8, {5}, 1}, {"f2", DType::F32, {3}, 4}};
  const auto data = make_data(specs);
  WriterOptions opt;
  opt.shard_size = 16;  // u+f = 11; +h = 13; d would make 29 -> new shard; d = 16; u2 -> new; u2+f2 = 17 -> new
  {
    CheckpointWriter w(dir, outputs(specs), opt);
    ASSERT_EQ(w.shards().size(), 4u);
    EXPECT_EQ(w.plan()[0].shard, 0u);
    EXPECT_EQ(w.plan()[1].shard, 0u);
    EXPECT_EQ(w.plan()[2].shard, 0u);
    EXPECT_EQ(w.plan()[3].shard, 1u);
    EXPECT_EQ(w.plan()[4].shard, 2u);
    EXPECT_EQ(w.plan()[5].shard, 3u);
    for (std::size_t i = 0; i < specs.size(); ++i)
      EXPECT_EQ(w.plan()[i].begin % specs[i].elem_size, 0u) << specs[i].name;
    EXPECT_EQ(w.plan()[1].begin, 0u);  // f first in shard 0
    write_all(w, data);
    w.finish();
    expect_shard_files(dir, w);
  }
  expect_read_back(specs, data);
}

TEST_F(Writer, SingleShardHasNoIndex) {
  const auto specs = sixteen_byte_tensors(3);
  const auto data = make_data(specs);
  WriterOptions opt;
  opt.shard_size = 48;  // exactly fits
  {
    CheckpointWriter w(dir, outputs(specs), opt);
    ASSERT_EQ(w.shards().size(), 1u);
    EXPECT_EQ(w.shards()[0].file_name, "model.safetensors");
    write_all(w, data);
    w.finish();
  }
  EXPECT_TRUE(fs::exists(dir / "model.safetensors"));
  EXPECT_FALSE(fs::exists(dir / conflux::kIndexFileName));
  Checkpoint c = Checkpoint::open(dir);
  EXPECT_FALSE(c.has_index());
  expect_read_back(specs, data);
}

// ---------------------------------------------------------------------------------------------
// Errors

TEST_F(Writer, DuplicateNameIsInvalidArgument) {
  const std::vector<Spec> specs = {{"dup.weight", DType::F32, {1}, 4}, {"x", DType::F32, {1}, 4},
                                   {"dup.weight", DType::F16, {1}, 2}};
  auto e = expect_error(Errc::invalid_argument, [&] { CheckpointWriter w(dir, outputs(specs)); });
  if (e) {
    EXPECT_TRUE(contains(e->what(), "dup.weight")) << e->what();
  }
}

TEST_F(Writer, EmptyNameIsInvalidArgument) {
  const std::vector<Spec> specs = {{"a", DType::F32, {1}, 4}, {"", DType::F32, {1}, 4}};
  expect_error(Errc::invalid_argument, [&] { CheckpointWriter w(dir, outputs(specs)); });
}

TEST_F(Writer, SizeOverflowIsInvalidArgument) {
  expect_error(Errc::invalid_argument, [&] {
    CheckpointWriter w(dir, {{"u8", DType::U8, {1ull << 32, 1ull << 32}}});
  });
  expect_error(Errc::invalid_argument, [&] { CheckpointWriter w(dir, {{"i64", DType::I64, {1ull << 61}}}); });
}

TEST_F(Writer, WriteOutsideTensorIsInvalidArgument) {
  const std::vector<Spec> specs = {{"a", DType::F32, {2}, 4}, {"b", DType::U8, {3}, 1}};
  CheckpointWriter w(dir, outputs(specs));
  const std::string eight(8, 'x'), one(1, 'y');
  EXPECT_NO_THROW(w.write_at(0, 0, as_bytes(eight)));
  EXPECT_NO_THROW(w.write_at(0, 7, as_bytes(one)));
  expect_error(Errc::invalid_argument, [&] { w.write_at(0, 1, as_bytes(eight)); });
  expect_error(Errc::invalid_argument, [&] { w.write_at(0, 8, as_bytes(one)); });
  expect_error(Errc::invalid_argument, [&] { w.write_at(1, 0, as_bytes(eight)); });
  expect_error(Errc::invalid_argument,
               [&] { w.write_at(0, std::numeric_limits<std::uint64_t>::max(), as_bytes(eight)); });
  expect_error(Errc::invalid_argument, [&] { w.write_at(2, 0, as_bytes(one)); });  // no tensor 2
  // A rejected write did not touch the neighbouring tensor.
  w.write_at(1, 0, as_bytes("abc"));
  w.finish();
  Checkpoint c = Checkpoint::open(dir);
  EXPECT_EQ(conflux_test::to_string(c.view(c.at("a")).bytes), "xxxxxxxy");
  EXPECT_EQ(conflux_test::to_string(c.view(c.at("b")).bytes), "abc");
}

TEST_F(Writer, MissingDirectoryIsIoError) {
  const fs::path missing = tmp / "does" / "not" / "exist";
  auto e = expect_error(Errc::io, [&] {
    CheckpointWriter w(missing, {{"a", DType::F32, {1}}});
  });
  if (e) {
    EXPECT_TRUE(contains(e->what(), missing.string())) << e->what();
  }
}

// ---------------------------------------------------------------------------------------------
// parse_byte_size

TEST(ParseByteSize, Valid) {
  EXPECT_EQ(conflux::parse_byte_size("5GB"), 5'000'000'000u);
  EXPECT_EQ(conflux::parse_byte_size("500MB"), 500'000'000u);
  EXPECT_EQ(conflux::parse_byte_size("1.5GiB"), 1'610'612'736u);
  EXPECT_EQ(conflux::parse_byte_size("1000"), 1000u);
  EXPECT_EQ(conflux::parse_byte_size("1000000"), 1'000'000u);
  EXPECT_EQ(conflux::parse_byte_size("1KiB"), 1024u);
  EXPECT_EQ(conflux::parse_byte_size("1MiB"), 1'048'576u);
  EXPECT_EQ(conflux::parse_byte_size("2GiB"), 2'147'483'648u);
  EXPECT_EQ(conflux::parse_byte_size("1TiB"), 1'099'511'627'776u);
  EXPECT_EQ(conflux::parse_byte_size("1KB"), 1000u);
  EXPECT_EQ(conflux::parse_byte_size("1TB"), 1'000'000'000'000u);
  EXPECT_EQ(conflux::parse_byte_size("2GB"), 2'000'000'000u);
  EXPECT_EQ(conflux::parse_byte_size("0.5GB"), 500'000'000u);
}

TEST(ParseByteSize, Invalid) {
  for (const char* s : {"", "abc", "-1GB", "5XB", "1e3", "GB", "1.2.3GB", "5 XB", "0x10"}) {
    SCOPED_TRACE(s);
    EXPECT_THROW((void)conflux::parse_byte_size(s), std::invalid_argument);
  }
}

}  // namespace
