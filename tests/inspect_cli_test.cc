// `conflux inspect` as a user runs it: real processes, exit codes, stdout and the stderr line.
#include <sys/wait.h>

#include <algorithm>
#include <fstream>
#include <random>
#include <sstream>
#include <string>

#include <boost/json.hpp>
#include <gtest/gtest.h>

#include "test_util.h"

namespace {

namespace fs = std::filesystem;

struct RunResult {
  int exit_code = -1;  // -1 when killed by a signal
  int signal = 0;
  std::string out, err;
};


std::string quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

RunResult run(const std::string& args, const fs::path& scratch) {
  const fs::path out = scratch / "stdout", err = scratch / "stderr";
  const std::string cmd = std::string(CONFLUX_BIN_DIR) + "/conflux " + args + " >" + quote(out.string()) +
                          " 2>" + quote(err.string());
  const int status = std::system(cmd.c_str());
  RunResult r;
  if (WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
  // std::system runs /bin/sh: a child killed by a signal shows as exit 128+N.
  if (WIFSIGNALED(status)) r.signal = WTERMSIG(status);
  if (r.exit_code > 128) r.signal = r.exit_code - 128;
  r.out = conflux_test::read_file(out);
  r.err = conflux_test::read_file(err);
  return r;
}

RunResult inspect(const std::string& args, const fs::path& scratch) { return run("inspect " + args, scratch); }

class InspectCli : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string cmd = std::string(CONFLUX_BIN_DIR) + "/conflux-synth --out " + quote(dir.path().string()) +
                            " --preset tiny --agents 1 --shard-size 300KB";
    ASSERT_EQ(std::system(cmd.c_str()), 0);
  }
  conflux_test::TempDir dir;
};

TEST_F(InspectCli, ValidShardedCheckpointListsTensors) {
  const RunResult r = inspect(quote((dir.path() / "base").string()), dir.path());
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_NE(r.out.find("valid"), std::string::npos);
  EXPECT_NE(r.out.find("model.embed_tokens.weight"), std::string::npos);
  EXPECT_NE(r.out.find("BF16"), std::string::npos);
  EXPECT_NE(r.out.find("[1003, 72]"), std::string::npos);
  EXPECT_TRUE(r.err.empty());
}

TEST_F(InspectCli, JsonOutputDescribesEveryTensor) {
  const RunResult r = inspect(quote((dir.path() / "base").string()) + " --json", dir.path());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const boost::json::value doc = boost::json::parse(r.out);
  EXPECT_TRUE(doc.at("valid").as_bool());
  const auto& tensors = doc.at("tensors").as_array();
  // tiny preset: embedding + 2 layers x 12 tensors + final norm
  EXPECT_EQ(tensors.size(), 26u);
  EXPECT_GT(doc.at("shards").as_array().size(), 1u);
  bool found = false;
  for (const auto& t : tensors)
    if (t.at("name").as_string() == "model.norm.weight") {
      found = true;
      EXPECT_EQ(t.at("dtype").as_string(), "BF16");
      EXPECT_EQ(t.at("shape").as_array().at(0).to_number<std::uint64_t>(), 72u);
    }
  EXPECT_TRUE(found);
}

TEST_F(InspectCli, SingleShardFileIsAccepted) {
  const fs::path one = dir.path() / "one";
  const std::string cmd = std::string(CONFLUX_BIN_DIR) + "/conflux-synth --out " + quote(one.string()) + " --preset tiny";
  ASSERT_EQ(std::system(cmd.c_str()), 0);
  const RunResult r = inspect(quote((one / "base" / "model.safetensors").string()), dir.path());
  EXPECT_EQ(r.exit_code, 0) << r.err;
}

TEST_F(InspectCli, MalformedFileFailsWithOneLineNamingFileAndRule) {
  const fs::path bad = dir.path() / "bad.safetensors";
  conflux_test::write_file(bad, conflux_test::make_safetensors(
                                     R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})", "abcd"));
  const RunResult r = inspect(quote(bad.string()), dir.path());
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  EXPECT_NE(r.err.find("bad.safetensors"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("size_mismatch"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("'w'"), std::string::npos) << r.err;

  const RunResult j = inspect(quote(bad.string()) + " --json", dir.path());
  EXPECT_EQ(j.exit_code, 1);
  const boost::json::value doc = boost::json::parse(j.out);
  EXPECT_FALSE(doc.at("valid").as_bool());
  EXPECT_EQ(doc.at("error").as_string(), "size_mismatch");
  EXPECT_EQ(doc.at("tensor").as_string(), "w");
}

TEST_F(InspectCli, IndexNamingAMissingTensorFails) {
  const fs::path base = dir.path() / "base";
  const fs::path index = base / "model.safetensors.index.json";
  std::string text = conflux_test::read_file(index);
  const std::string from = "\"model.norm.weight\"";
  text.replace(text.find(from), from.size(), "\"model.norm.weight.renamed\"");
  std::ofstream(index) << text;
  const RunResult r = inspect(quote(base.string()), dir.path());
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("index_mismatch"), std::string::npos) << r.err;
}

TEST_F(InspectCli, UsageErrorsExitTwo) {
  EXPECT_EQ(run("inspect", dir.path()).exit_code, 2);
  EXPECT_EQ(run("inspect --bogus x", dir.path()).exit_code, 2);
  EXPECT_EQ(run("no-such-command", dir.path()).exit_code, 2);
  const RunResult help = run("inspect --help", dir.path());
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_NE(help.out.find("--json"), std::string::npos);
  EXPECT_EQ(run("--help", dir.path()).exit_code, 0);
}

TEST_F(InspectCli, MissingPathAndPickleFail) {
  EXPECT_EQ(inspect(quote((dir.path() / "nope").string()), dir.path()).exit_code, 1);
  const fs::path pickle = dir.path() / "pickle";
  fs::create_directories(pickle);
  std::ofstream(pickle / "pytorch_model.bin") << "not really a pickle";
  const RunResult r = inspect(quote(pickle.string()), dir.path());
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_NE(r.err.find("pickle_checkpoint"), std::string::npos) << r.err;
  EXPECT_NE(r.err.find("convert"), std::string::npos) << r.err;
}

// Every truncation of a small valid file, and random byte flips in its header: the tool must
// answer 0 or 1, never crash.
TEST_F(InspectCli, NeverCrashesOnDamagedFiles) {
  const std::string good = conflux_test::make_safetensors(
      R"({"__metadata__":{"format":"pt"},"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},)"
      R"("b":{"dtype":"F32","shape":[],"data_offsets":[12,16]}})",
      std::string(16, '\x01'));
  const fs::path f = dir.path() / "damaged.safetensors";
  std::mt19937 rng(7);
  int valid = 0;
  for (std::size_t len = 0; len <= good.size(); len += 7) {
    conflux_test::write_file(f, good.substr(0, len));
    const RunResult r = inspect(quote(f.string()), dir.path());
    ASSERT_EQ(r.signal, 0) << "killed at length " << len;
    ASSERT_TRUE(r.exit_code == 0 || r.exit_code == 1) << r.exit_code;
    valid += r.exit_code == 0;
  }
  for (int i = 0; i < 40; ++i) {
    std::string bad = good;
    for (int k = 0; k < 3; ++k) bad[8 + rng() % (bad.size() - 8)] = static_cast<char>(rng());
    conflux_test::write_file(f, bad);
    const RunResult r = inspect(quote(f.string()), dir.path());
    ASSERT_EQ(r.signal, 0);
    ASSERT_TRUE(r.exit_code == 0 || r.exit_code == 1) << r.exit_code;
    if (r.exit_code == 1) {
      EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    }
  }
  EXPECT_EQ(valid, good.size() % 7 == 0 ? 1 : 0);  // only the whole file is valid
}

}  // namespace
