// Tests of checkpoint directories (include/conflux/checkpoint.h): the three layouts transformers
// accepts, a single file, index validation, pickle refusal and locate_weights().
#include <gtest/gtest.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "conflux/checkpoint.h"
#include "conflux/error.h"
#include "conflux/safetensors.h"
#include "test_util.h"

namespace {

namespace fs = std::filesystem;
using conflux::Checkpoint;
using conflux::Errc;
using conflux::TensorRef;
using conflux_test::bytes_of;
using conflux_test::contains;
using conflux_test::expect_error;
using conflux_test::StBuilder;
using conflux_test::TempDir;
using conflux_test::write_file;

const std::string kShard1 = "model-00001-of-00003.safetensors";
const std::string kShard2 = "model-00002-of-00003.safetensors";
const std::string kShard3 = "model-00003-of-00003.safetensors";

struct Expected {
  std::string name;
  std::string shard_file;
  std::string data;
};

std::string index_json(const std::vector<std::pair<std::string, std::string>>& weight_map,
                       std::uint64_t total_size = 0) {
  std::string s = "{\"metadata\":{\"total_size\":" + std::to_string(total_size) + "},\"weight_map\":{";
  for (std::size_t i = 0; i < weight_map.size(); ++i) {
    if (i) s += ",";
    s += "\"" + weight_map[i].first + "\":\"" + weight_map[i].second + "\"";
  }
  return s + "}}";
}

bool same_file(const fs::path& a, const fs::path& b) {
  std::error_code ec;
  return fs::equivalent(a, b, ec);
}

class CheckpointTest : public ::testing::Test {
 protected:
  TempDir tmp;
  fs::path dir;

  void SetUp() override {
    dir = tmp / "ckpt";
    fs::create_directory(dir);
  }

  // A single-file checkpoint with three tensors (header listed in reverse offset order).
  std::vector<Expected> write_single(const fs::path& file) {
    std::vector<Expected> ts = {
        {"model.embed_tokens.weight", file.filename().string(), bytes_of<float>({1, 2, 3, 4})},
        {"model.norm.weight", file.filename().string(), bytes_of<std::uint16_t>({0x3C00, 0x4000})},
        {"lm_head.weight", file.filename().string(), bytes_of<double>({0.5, -0.5})},
    };
    StBuilder()
        .add(ts[0].name, "F32", {2, 2}, ts[0].data)
        .add(ts[1].name, "F16", {2}, ts[1].data)
        .add(ts[2].name, "F64", {2}, ts[2].data)
        .meta("format", "pt")
        .reverse_header()
        .write(file);
    return ts;
  }

  // Three shards plus the index; returns the tensors in storage order.
  std::vector<Expected> write_sharded() {
    std::vector<Expected> ts = {
        {"model.embed_tokens.weight", kShard1, bytes_of<float>({1, 2, 3, 4, 5, 6})},
        {"model.layers.0.input_layernorm.weight", kShard1, bytes_of<std::uint16_t>({0x3F80, 0x4000, 0x4040})},
        {"model.layers.0.mlp.down_proj.weight", kShard2, bytes_of<float>({-1, -2})},
        {"model.layers.0.self_attn.q_proj.weight", kShard2, bytes_of<double>({3.25})},
        {"model.layers.1.mlp.down_proj.weight", kShard2, bytes_of<std::uint16_t>({0x3C00})},
        {"lm_head.weight", kShard3, bytes_of<float>({9, 8, 7})},
    };
    StBuilder()
        .add(ts[0].name, "F32", {3, 2}, ts[0].data)
        .add(ts[1].name, "BF16", {3}, ts[1].data)
        .meta("format", "pt")
        .reverse_header()
        .write(dir / kShard1);
    StBuilder()
        .add(ts[2].name, "F32", {2}, ts[2].data)
        .add(ts[3].name, "F64", {}, ts[3].data)
        .add(ts[4].name, "F16", {1, 1}, ts[4].data)
        .reverse_header()
        .write(dir / kShard2);
    StBuilder().add(ts[5].name, "F32", {3}, ts[5].data).write(dir / kShard3);
    // The map lists each shard's tensors in reverse storage order.
    std::vector<std::pair<std::string, std::string>> map;
    for (std::size_t s : {std::size_t{1}, std::size_t{0}, std::size_t{4}, std::size_t{3}, std::size_t{2},
                          std::size_t{5}})
      map.emplace_back(ts[s].name, ts[s].shard_file);
    write_file(dir / conflux::kIndexFileName, index_json(map, total_bytes(ts)));
    return ts;
  }

  static std::uint64_t total_bytes(const std::vector<Expected>& ts) {
    std::uint64_t n = 0;
    for (const auto& t : ts) n += t.data.size();
    return n;
  }

  // Checks order, lookup, views and sizes of an opened checkpoint against `ts` (storage order).
  static void expect_contents(const Checkpoint& c, const std::vector<Expected>& ts) {
    ASSERT_EQ(c.size(), ts.size());
    ASSERT_EQ(c.tensors().size(), ts.size());
    for (std::size_t i = 0; i < ts.size(); ++i) {
      SCOPED_TRACE(ts[i].name);
      const TensorRef& r = c.tensors()[i];
      EXPECT_EQ(r.name(), ts[i].name);
      ASSERT_LT(r.shard, c.shards().size());
      EXPECT_EQ(c.shards()[r.shard].path().filename().string(), ts[i].shard_file);
      EXPECT_EQ(conflux_test::to_string(c.view(r).bytes), ts[i].data);
      const TensorRef* f = c.find(ts[i].name);
      ASSERT_NE(f, nullptr);
      EXPECT_EQ(f, &r);
      EXPECT_EQ(&c.at(ts[i].name), &r);
      EXPECT_EQ(r.info, c.shards()[r.shard].find(ts[i].name));
    }
    EXPECT_EQ(c.data_bytes(), total_bytes(ts));
    EXPECT_EQ(c.find("no.such.tensor"), nullptr);
  }

  // Writes the 2-shard checkpoint used by the index error tests: shard A holds a and b, shard B
  // holds c. Returns nothing; tests then write their own index.
  void write_two_shards(bool c_also_has_a = false) {
    StBuilder().add("a", "U8", {4}, "aaaa").add("b", "F32", {2}, bytes_of<float>({1, 2})).write(dir / shard_a);
    StBuilder b;
    if (c_also_has_a) b.add("a", "U8", {4}, "AAAA");
    b.add("c", "F16", {2}, bytes_of<std::uint16_t>({1, 2})).write(dir / shard_b);
  }
  const std::string shard_a = "model-00001-of-00002.safetensors";
  const std::string shard_b = "model-00002-of-00002.safetensors";

  void write_index(const std::string& text) { write_file(dir / conflux::kIndexFileName, text); }
};

// ---------------------------------------------------------------------------------------------
// Layouts

TEST_F(CheckpointTest, SingleModelSafetensorsDirectory) {
  auto ts = write_single(dir / "model.safetensors");
  write_file(dir / "config.json", "{}");
  write_file(dir / "tokenizer.json", "{}");
  Checkpoint c = Checkpoint::open(dir);
  EXPECT_EQ(c.path().string(), dir.string());
  EXPECT_FALSE(c.has_index());
  ASSERT_EQ(c.shards().size(), 1u);
  EXPECT_EQ(c.shards()[0].path().filename().string(), "model.safetensors");
  expect_contents(c, ts);
  EXPECT_EQ(c.shards()[0].metadata(), (conflux::Metadata{{"format", "pt"}}));
}

TEST_F(CheckpointTest, SingleFilePath) {
  const fs::path file = tmp / "weights.safetensors";
  auto ts = write_single(file);
  Checkpoint c = Checkpoint::open(file);
  EXPECT_EQ(c.path().string(), file.string());
  EXPECT_FALSE(c.has_index());
  ASSERT_EQ(c.shards().size(), 1u);
  EXPECT_TRUE(same_file(c.shards()[0].path(), file));
  expect_contents(c, ts);
}

TEST_F(CheckpointTest, ShardedWithIndex) {
  auto ts = write_sharded();
  Checkpoint c = Checkpoint::open(dir);
  EXPECT_EQ(c.path().string(), dir.string());
  EXPECT_TRUE(c.has_index());
  ASSERT_EQ(c.shards().size(), 3u);
  EXPECT_EQ(c.shards()[0].path().filename().string(), kShard1);
  EXPECT_EQ(c.shards()[1].path().filename().string(), kShard2);
  EXPECT_EQ(c.shards()[2].path().filename().string(), kShard3);
  expect_contents(c, ts);
  EXPECT_EQ(c.view(c.at("model.layers.0.self_attn.q_proj.weight")).element(0), 3.25);
  EXPECT_EQ(c.view(c.at("lm_head.weight")).as<float>()[2], 7.0f);
}

TEST_F(CheckpointTest, ShardedWithTwoShards) {
  write_two_shards();
  write_index(index_json({{"a", shard_a}, {"b", shard_a}, {"c", shard_b}}, 14));
  Checkpoint c = Checkpoint::open(dir);
  EXPECT_TRUE(c.has_index());
  ASSERT_EQ(c.shards().size(), 2u);
  expect_contents(c, {{"a", shard_a, "aaaa"}, {"b", shard_a, bytes_of<float>({1, 2})},
                      {"c", shard_b, bytes_of<std::uint16_t>({1, 2})}});
}

TEST_F(CheckpointTest, AtThrowsNotFoundNamingTensor) {
  write_sharded();
  Checkpoint c = Checkpoint::open(dir);
  auto e = expect_error(Errc::not_found, [&] { (void)c.at("model.layers.99.weight"); });
  ASSERT_TRUE(e);
  EXPECT_EQ(e->tensor(), "model.layers.99.weight");
  EXPECT_TRUE(contains(e->what(), "model.layers.99.weight")) << e->what();
  EXPECT_TRUE(contains(e->what(), dir.string())) << e->what();
}

TEST_F(CheckpointTest, MovedCheckpointStaysValid) {
  auto ts = write_sharded();
  Checkpoint c = Checkpoint::open(dir);
  Checkpoint d(std::move(c));
  expect_contents(d, ts);
  Checkpoint e = Checkpoint::open(dir);
  e = std::move(d);
  expect_contents(e, ts);
}

TEST_F(CheckpointTest, OtherSingleSafetensorsFileIsAccepted) {
  auto ts = write_single(dir / "consolidated.safetensors");
  write_file(dir / "config.json", "{}");
  Checkpoint c = Checkpoint::open(dir);
  EXPECT_FALSE(c.has_index());
  ASSERT_EQ(c.shards().size(), 1u);
  EXPECT_EQ(c.shards()[0].path().filename().string(), "consolidated.safetensors");
  expect_contents(c, ts);
}

TEST_F(CheckpointTest, TwoOtherSafetensorsFilesWithoutIndexAreNoCheckpoint) {
  write_single(dir / "consolidated.safetensors");
  write_single(dir / "adapter.safetensors");
  auto e = expect_error(Errc::no_checkpoint, [&] { (void)Checkpoint::open(dir); });
  if (e) {
    EXPECT_TRUE(contains(e->what(), dir.string())) << e->what();
  }
}

// The first shard of several, without the index (writers save it last): not yet a checkpoint, so
// the daemon waits instead of merging half a model. A shard "of 1", or a plain file, is one.
TEST_F(CheckpointTest, LoneShardOfSeveralWithoutIndexIsIncomplete) {
  write_single(dir / "model-00001-of-00002.safetensors");
  auto e = expect_error(Errc::no_checkpoint, [&] { (void)Checkpoint::open(dir); });
  if (e) {
    EXPECT_TRUE(contains(e->what(), "model-00001-of-00002.safetensors")) << e->what();
    EXPECT_TRUE(contains(e->what(), "incomplete")) << e->what();
  }
  fs::remove(dir / "model-00001-of-00002.safetensors");
  auto ts = write_single(dir / "model-00001-of-00001.safetensors");
  expect_contents(Checkpoint::open(dir), ts);
  fs::remove(dir / "model-00001-of-00001.safetensors");
  ts = write_single(dir / "weights-of-2.safetensors");  // not a shard name
  expect_contents(Checkpoint::open(dir), ts);
}

TEST_F(CheckpointTest, ModelSafetensorsWinsOverIndex) {
  auto ts = write_single(dir / "model.safetensors");
  write_sharded();  // a valid index and shards beside it
  Checkpoint c = Checkpoint::open(dir);
  EXPECT_FALSE(c.has_index());
  ASSERT_EQ(c.shards().size(), 1u);
  EXPECT_EQ(c.shards()[0].path().filename().string(), "model.safetensors");
  expect_contents(c, ts);
}

TEST_F(CheckpointTest, ModelSafetensorsWinsOverOtherFiles) {
  auto ts = write_single(dir / "model.safetensors");
  write_single(dir / "adapter_model.safetensors");
  write_file(dir / "pytorch_model.bin", "PK\x03\x04 not really a zip");
  Checkpoint c = Checkpoint::open(dir);
  ASSERT_EQ(c.shards().size(), 1u);
  EXPECT_EQ(c.shards()[0].path().filename().string(), "model.safetensors");
  expect_contents(c, ts);
}

// ---------------------------------------------------------------------------------------------
// Directories that are not safetensors checkpoints

TEST_F(CheckpointTest, PickleBinIsRefused) {
  write_file(dir / "pytorch_model.bin", "PK\x03\x04 not really a zip");
  write_file(dir / "config.json", "{}");
  auto e = expect_error(Errc::pickle_checkpoint, [&] { (void)Checkpoint::open(dir); });
  if (e) {
    EXPECT_TRUE(contains(e->what(), "convert")) << e->what();
  }
}

TEST_F(CheckpointTest, PickleIndexIsRefused) {
  write_file(dir / "pytorch_model.bin.index.json",
             "{\"metadata\":{},\"weight_map\":{\"a\":\"pytorch_model-00001-of-00002.bin\"}}");
  write_file(dir / "pytorch_model-00001-of-00002.bin", "x");
  write_file(dir / "pytorch_model-00002-of-00002.bin", "x");
  auto e = expect_error(Errc::pickle_checkpoint, [&] { (void)Checkpoint::open(dir); });
  if (e) {
    EXPECT_TRUE(contains(e->what(), "convert")) << e->what();
  }
}

TEST_F(CheckpointTest, PickleIndexAloneIsRefused) {
  write_file(dir / "pytorch_model.bin.index.json", "{\"metadata\":{},\"weight_map\":{}}");
  auto e = expect_error(Errc::pickle_checkpoint, [&] { (void)Checkpoint::open(dir); });
  if (e) {
    EXPECT_TRUE(contains(e->what(), "convert")) << e->what();
  }
}

TEST_F(CheckpointTest, PtAndPthFilesAreRefused) {
  write_file(dir / "consolidated.00.pth", "x");
  auto e = expect_error(Errc::pickle_checkpoint, [&] { (void)Checkpoint::open(dir); });
  if (e) {
    EXPECT_TRUE(contains(e->what(), "convert")) << e->what();
  }
  const fs::path pt = tmp / "model.pt";
  write_file(pt, "x");
  e = expect_error(Errc::pickle_checkpoint, [&] { (void)Checkpoint::open(pt); });
  if (e) {
    EXPECT_TRUE(contains(e->what(), "convert")) << e->what();
  }
  const fs::path bin = tmp / "pytorch_model.bin";
  write_file(bin, "x");
  e = expect_error(Errc::pickle_checkpoint, [&] { (void)Checkpoint::open(bin); });
  if (e) {
    EXPECT_TRUE(contains(e->what(), "convert")) << e->what();
  }
}

TEST_F(CheckpointTest, EmptyDirectoryIsNoCheckpoint) {
  auto e = expect_error(Errc::no_checkpoint, [&] { (void)Checkpoint::open(dir); });
  if (e) {
    EXPECT_TRUE(contains(e->what(), dir.string())) << e->what();
  }
}

TEST_F(CheckpointTest, DirectoryWithoutWeightsIsNoCheckpoint) {
  write_file(dir / "config.json", "{}");
  write_file(dir / "tokenizer.json", "{}");
  write_file(dir / "README.md", "hello");
  expect_error(Errc::no_checkpoint, [&] { (void)Checkpoint::open(dir); });
}

TEST_F(CheckpointTest, NonexistentPathIsNotFound) {
  const fs::path missing = tmp / "no-such-model";
  auto e = expect_error(Errc::not_found, [&] { (void)Checkpoint::open(missing); });
  if (e) {
    EXPECT_TRUE(contains(e->what(), missing.string())) << e->what();
  }
  expect_error(Errc::not_found, [&] { (void)Checkpoint::open(tmp / "no-such-model" / "model.safetensors"); });
  expect_error(Errc::not_found, [&] { (void)Checkpoint::open(tmp / "missing.safetensors"); });
}

TEST_F(CheckpointTest, InvalidSingleFileSurfacesItsOwnError) {
  write_file(dir / "model.safetensors", "abc");
  auto e = expect_error(Errc::header_too_small, [&] { (void)Checkpoint::open(dir); });
  if (e) {
    EXPECT_TRUE(contains(e->what(), (dir / "model.safetensors").string())) << e->what();
  }
}

// ---------------------------------------------------------------------------------------------
// Index validation

TEST_F(CheckpointTest, IndexNotJson) {
  write_two_shards();
  write_index("{\"weight_map\": {\"a\": ");
  auto e = expect_error(Errc::invalid_index, [&] { (void)Checkpoint::open(dir); });
  if (e) {
    EXPECT_TRUE(contains(e->what(), std::string(conflux::kIndexFileName))) << e->what();
  }
  write_index("");
  expect_error(Errc::invalid_index, [&] { (void)Checkpoint::open(dir); });
  write_index("not json at all");
  expect_error(Errc::invalid_index, [&] { (void)Checkpoint::open(dir); });
}

TEST_F(CheckpointTest, IndexNotAnObject) {
  write_two_shards();
  write_index("[]");
  expect_error(Errc::invalid_index, [&] { (void)Checkpoint::open(dir); });
  write_index("\"model-00001-of-00002.safetensors\"");
  expect_error(Errc::invalid_index, [&] { (void)Checkpoint::open(dir); });
}

TEST_F(CheckpointTest, IndexWeightMapMissingOrNotAnObject) {
  write_two_shards();
  write_index("{\"metadata\":{\"total_size\":14}}");
  expect_error(Errc::invalid_index, [&] { (void)Checkpoint::open(dir); });
  write_index("{\"metadata\":{},\"weight_map\":[\"a\",\"b\"]}");
  expect_error(Errc::invalid_index, [&] { (void)Checkpoint::open(dir); });
  write_index("{\"weight_map\":\"" + shard_a + "\"}");
  expect_error(Errc::invalid_index, [&] { (void)Checkpoint::open(dir); });
  write_index("{\"weight_map\":null}");
  expect_error(Errc::invalid_index, [&] { (void)Checkpoint::open(dir); });
}

TEST_F(CheckpointTest, IndexValuesNotStrings) {
  write_two_shards();
  write_index("{\"weight_map\":{\"a\":\"" + shard_a + "\",\"b\":1,\"c\":\"" + shard_b + "\"}}");
  expect_error(Errc::invalid_index, [&] { (void)Checkpoint::open(dir); });
  write_index("{\"weight_map\":{\"a\":\"" + shard_a + "\",\"b\":[\"" + shard_a + "\"],\"c\":\"" + shard_b + "\"}}");
  expect_error(Errc::invalid_index, [&] { (void)Checkpoint::open(dir); });
  write_index("{\"weight_map\":{\"a\":\"" + shard_a + "\",\"b\":null,\"c\":\"" + shard_b + "\"}}");
  expect_error(Errc::invalid_index, [&] { (void)Checkpoint::open(dir); });
}

TEST_F(CheckpointTest, IndexNamesTensorMissingFromItsShard) {
  write_two_shards();
  write_index(index_json({{"a", shard_a}, {"b", shard_a}, {"c", shard_b}, {"ghost", shard_a}}));
  auto e = expect_error(Errc::index_mismatch, [&] { (void)Checkpoint::open(dir); });
  if (e) {
    EXPECT_EQ(e->tensor(), "ghost");
    EXPECT_TRUE(contains(e->what(), "ghost")) << e->what();
  }
}

TEST_F(CheckpointTest, IndexPutsTensorInTheWrongShard) {
  write_two_shards();
  write_index(index_json({{"a", shard_a}, {"b", shard_b}, {"c", shard_b}}));
  auto e = expect_error(Errc::index_mismatch, [&] { (void)Checkpoint::open(dir); });
  if (e) {
    EXPECT_EQ(e->tensor(), "b");
    EXPECT_TRUE(contains(e->what(), "b")) << e->what();
  }
}

TEST_F(CheckpointTest, TensorInTwoShards) {
  write_two_shards(/*c_also_has_a=*/true);
  write_index(index_json({{"a", shard_a}, {"b", shard_a}, {"c", shard_b}}));
  auto e = expect_error(Errc::index_mismatch, [&] { (void)Checkpoint::open(dir); });
  if (e) {
    EXPECT_EQ(e->tensor(), "a");
    EXPECT_TRUE(contains(e->what(), "'a'")) << e->what();
  }
}

TEST_F(CheckpointTest, ShardTensorMissingFromMap) {
  write_two_shards();
  write_index(index_json({{"a", shard_a}, {"c", shard_b}}));
  auto e = expect_error(Errc::index_mismatch, [&] { (void)Checkpoint::open(dir); });
  if (e) {
    EXPECT_EQ(e->tensor(), "b");
  }
}

TEST_F(CheckpointTest, IndexNamesMissingShardFile) {
  write_two_shards();
  const std::string missing = "model-00003-of-00003.safetensors";
  write_index(index_json({{"a", shard_a}, {"b", shard_a}, {"c", missing}}));
  auto e = expect_error(Errc::not_found, [&] { (void)Checkpoint::open(dir); });
  if (e) {
    EXPECT_TRUE(contains(e->what(), missing)) << e->what();
  }
}

TEST_F(CheckpointTest, ShardNameWithParentDirectoryIsInvalid) {
  write_two_shards();
  StBuilder().add("c", "F16", {2}, bytes_of<std::uint16_t>({1, 2})).write(tmp / "x.safetensors");
  write_index(index_json({{"a", shard_a}, {"b", shard_a}, {"c", "../x.safetensors"}}));
  auto e = expect_error(Errc::invalid_index, [&] { (void)Checkpoint::open(dir); });
  if (e) {
    EXPECT_TRUE(contains(e->what(), "../x.safetensors")) << e->what();
  }
}

TEST_F(CheckpointTest, ShardNameWithSubdirectoryIsInvalid) {
  write_two_shards();
  fs::create_directory(dir / "a");
  StBuilder().add("c", "F16", {2}, bytes_of<std::uint16_t>({1, 2})).write(dir / "a" / "b.safetensors");
  write_index(index_json({{"a", shard_a}, {"b", shard_a}, {"c", "a/b.safetensors"}}));
  expect_error(Errc::invalid_index, [&] { (void)Checkpoint::open(dir); });
}

TEST_F(CheckpointTest, AbsoluteShardNameIsInvalid) {
  write_two_shards();
  const fs::path abs = tmp / "abs.safetensors";
  StBuilder().add("c", "F16", {2}, bytes_of<std::uint16_t>({1, 2})).write(abs);
  write_index(index_json({{"a", shard_a}, {"b", shard_a}, {"c", abs.string()}}));
  expect_error(Errc::invalid_index, [&] { (void)Checkpoint::open(dir); });
}

TEST_F(CheckpointTest, DotDotShardNameIsInvalid) {
  write_two_shards();
  write_index(index_json({{"a", shard_a}, {"b", shard_a}, {"c", ".."}}));
  expect_error(Errc::invalid_index, [&] { (void)Checkpoint::open(dir); });
}

TEST_F(CheckpointTest, InvalidShardSurfacesItsOwnError) {
  write_two_shards();
  write_file(dir / shard_b, "tiny");
  write_index(index_json({{"a", shard_a}, {"b", shard_a}, {"c", shard_b}}));
  auto e = expect_error(Errc::header_too_small, [&] { (void)Checkpoint::open(dir); });
  if (e) {
    EXPECT_TRUE(contains(e->what(), (dir / shard_b).string())) << e->what();
  }
}

TEST_F(CheckpointTest, ShardWithTrailingBytesSurfacesItsOwnError) {
  write_two_shards();
  write_file(dir / shard_b,
             StBuilder().add("c", "F16", {2}, bytes_of<std::uint16_t>({1, 2})).build() + "junk");
  write_index(index_json({{"a", shard_a}, {"b", shard_a}, {"c", shard_b}}));
  auto e = expect_error(Errc::trailing_bytes, [&] { (void)Checkpoint::open(dir); });
  if (e) {
    EXPECT_TRUE(contains(e->what(), shard_b)) << e->what();
  }
}

// ---------------------------------------------------------------------------------------------
// locate_weights

TEST_F(CheckpointTest, LocateWeightsSingleFile) {
  write_single(dir / "model.safetensors");
  const fs::path p = conflux::locate_weights(dir);
  EXPECT_EQ(p.filename().string(), "model.safetensors");
  EXPECT_TRUE(same_file(p, dir / "model.safetensors"));
}

TEST_F(CheckpointTest, LocateWeightsIndex) {
  write_sharded();
  const fs::path p = conflux::locate_weights(dir);
  EXPECT_EQ(p.filename().string(), conflux::kIndexFileName);
  EXPECT_TRUE(same_file(p, dir / conflux::kIndexFileName));
}

TEST_F(CheckpointTest, LocateWeightsPrefersModelSafetensorsOverIndex) {
  write_sharded();
  write_single(dir / "model.safetensors");
  EXPECT_EQ(conflux::locate_weights(dir).filename().string(), "model.safetensors");
}

TEST_F(CheckpointTest, LocateWeightsOtherSingleFile) {
  write_single(dir / "consolidated.safetensors");
  const fs::path p = conflux::locate_weights(dir);
  EXPECT_EQ(p.filename().string(), "consolidated.safetensors");
  EXPECT_TRUE(same_file(p, dir / "consolidated.safetensors"));
}

TEST_F(CheckpointTest, LocateWeightsDoesNotOpenTheWeights) {
  // locate_weights only finds files: an invalid model.safetensors is still located.
  write_file(dir / "model.safetensors", "abc");
  EXPECT_EQ(conflux::locate_weights(dir).filename().string(), "model.safetensors");
}

TEST_F(CheckpointTest, LocateWeightsErrors) {
  expect_error(Errc::no_checkpoint, [&] { (void)conflux::locate_weights(dir); });
  expect_error(Errc::not_found, [&] { (void)conflux::locate_weights(tmp / "nope"); });
  write_single(dir / "one.safetensors");
  write_single(dir / "two.safetensors");
  expect_error(Errc::no_checkpoint, [&] { (void)conflux::locate_weights(dir); });

  const fs::path pk = tmp / "pickle";
  fs::create_directory(pk);
  write_file(pk / "pytorch_model.bin", "x");
  auto e = expect_error(Errc::pickle_checkpoint, [&] { (void)conflux::locate_weights(pk); });
  if (e) {
    EXPECT_TRUE(contains(e->what(), "convert")) << e->what();
  }
}

}  // namespace
