// `conflux merge` and `conflux plugins` as a user runs them: real processes, exit codes, stdout,
// the stderr line and what ends up on disk (ARCHITECTURE §2, §3).
#include <sys/wait.h>

#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include <boost/json.hpp>
#include <gtest/gtest.h>

#include "test_util.h"

namespace {

namespace fs = std::filesystem;
namespace json = boost::json;
using conflux_test::contains;

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

std::string bin(const std::string& tool) { return std::string(CONFLUX_BIN_DIR) + "/" + tool; }

// Runs `conflux ARGS` from / (so relative paths in job files must be resolved against the file's
// directory), without any CONFLUX_PLUGIN_PATH from the environment: the built-in plugins beside
// the executable are the only ones found. stdout and stderr go to files, so neither is a TTY.
RunResult run(const std::string& args, const fs::path& scratch) {
  const fs::path out = scratch / "stdout", err = scratch / "stderr";
  const std::string cmd = "cd / && env -u CONFLUX_PLUGIN_PATH " + quote(bin("conflux")) + " " + args + " >" +
                          quote(out.string()) + " 2>" + quote(err.string());
  const int status = std::system(cmd.c_str());
  RunResult r;
  if (WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) r.signal = WTERMSIG(status);
  if (r.exit_code > 128) r.signal = r.exit_code - 128;
  r.out = conflux_test::read_file(out);
  r.err = conflux_test::read_file(err);
  return r;
}

std::size_t lines(const std::string& s) { return static_cast<std::size_t>(std::count(s.begin(), s.end(), '\n')); }

// Every regular file under `dir` (relative name -> bytes).
std::map<std::string, std::string> snapshot(const fs::path& dir) {
  std::map<std::string, std::string> files;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.is_regular_file()) files[fs::relative(e.path(), dir).string()] = conflux_test::read_file(e.path());
  return files;
}

// Hidden entries a publish could leave behind: ".<name>.partial-..." and ".<name>.old-...".
std::vector<std::string> leftovers(const fs::path& parent) {
  std::vector<std::string> names;
  if (!fs::exists(parent)) return names;
  for (const auto& e : fs::directory_iterator(parent)) {
    const std::string name = e.path().filename().string();
    if (name.starts_with(".") && (contains(name, "partial") || contains(name, ".old-"))) names.push_back(name);
  }
  return names;
}

// The model weights of a checkpoint directory: every *.safetensors file and the index.
std::map<std::string, std::string> weights(const fs::path& dir) {
  std::map<std::string, std::string> files;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json"))
      files[name] = conflux_test::read_file(e.path());
  }
  return files;
}

// A [[job]] table. `models` are TOML string literals' contents, joined into an array.
std::string job_table(const std::string& name, const std::string& strategy, const std::string& base,
                      const std::vector<std::string>& models, const std::string& output,
                      const std::string& extra = "") {
  std::string t = "[[job]]\nname = \"" + name + "\"\nstrategy = \"" + strategy + "\"\n";
  if (!base.empty()) t += "base = \"" + base + "\"\n";
  t += "models = [";
  for (std::size_t i = 0; i < models.size(); ++i) t += (i ? ", \"" : "\"") + models[i] + "\"";
  t += "]\noutput = \"" + output + "\"\n" + extra;
  return t;
}

class MergeCli : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string cmd = quote(bin("conflux-synth")) + " --out " + quote((dir / "m").string()) +
                            " --preset tiny --agents 3 >/dev/null";
    ASSERT_EQ(std::system(cmd.c_str()), 0);
  }

  // Writes `text` to DIR/NAME and returns the quoted absolute path for a command line.
  std::string job_file(const std::string& name, const std::string& text) {
    conflux_test::write_file(dir / name, text);
    return quote((dir / name).string());
  }

  // The standard job: task_arithmetic over the three agents, with paths relative to the file.
  std::string agents_job(const std::string& extra = "") {
    return job_table("agents", "task_arithmetic", "m/base", {"m/agent-1", "m/agent-2", "m/agent-3"}, "out/merged",
                     extra);
  }

  // Expects a failed merge that published nothing at `output` and left no partial directory.
  void expect_nothing_published(const fs::path& output) {
    EXPECT_FALSE(fs::exists(output)) << output;
    EXPECT_TRUE(leftovers(output.parent_path()).empty()) << leftovers(output.parent_path()).front();
  }

  // A configuration error: exit 2, one stderr line naming the file, the job and `key`, and
  // nothing written.
  void expect_config_error(const std::string& text, const std::string& key, const std::string& also = "") {
    SCOPED_TRACE(text);
    const std::string file = job_file("bad.toml", text);
    const RunResult r = run("merge " + file, dir.path());
    EXPECT_EQ(r.exit_code, 2) << r.err;
    EXPECT_EQ(lines(r.err), 1u) << r.err;
    EXPECT_TRUE(contains(r.err, (dir / "bad.toml").string())) << r.err;
    EXPECT_TRUE(contains(r.err, "job 'j'")) << r.err;
    EXPECT_TRUE(contains(r.err, "'" + key + "'")) << r.err;
    if (!also.empty()) {
      EXPECT_TRUE(contains(r.err, also)) << r.err;
    }
    EXPECT_TRUE(r.out.empty()) << r.out;
    expect_nothing_published(dir / "out" / "x");
  }

  conflux_test::TempDir dir;
};

TEST_F(MergeCli, TaskArithmeticPublishesACompleteCheckpoint) {
  const std::string file = job_file("job.toml", agents_job());
  const RunResult r = run("merge " + file, dir.path());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const fs::path output = dir / "out" / "merged";

  // The summary: job, strategy, tensors, throughput, peak RSS, where the output went.
  EXPECT_TRUE(contains(r.out, "'agents'")) << r.out;
  EXPECT_TRUE(contains(r.out, "task_arithmetic")) << r.out;
  EXPECT_TRUE(contains(r.out, "26 tensors")) << r.out;
  EXPECT_TRUE(contains(r.out, "GB/s")) << r.out;
  EXPECT_TRUE(contains(r.out, "peak RSS")) << r.out;
  EXPECT_TRUE(contains(r.out, output.string())) << r.out;

  // stderr is a file, not a TTY: no carriage returns or escape sequences, only whole lines.
  EXPECT_FALSE(contains(r.err, "\r")) << r.err;
  EXPECT_FALSE(contains(r.err, "\x1b")) << r.err;

  // The files of a checkpoint directory.
  ASSERT_TRUE(fs::is_directory(output));
  const bool single = fs::exists(output / "model.safetensors");
  const bool sharded = fs::exists(output / "model.safetensors.index.json");
  EXPECT_TRUE(single || sharded);
  EXPECT_TRUE(fs::exists(output / "generation_config.json"));
  EXPECT_TRUE(fs::exists(output / "tokenizer_config.json"));
  const json::value config = json::parse(conflux_test::read_file(output / "config.json"));
  EXPECT_EQ(config.at("torch_dtype").as_string(), "bfloat16");
  EXPECT_EQ(config.at("num_hidden_layers").to_number<int>(), 2);  // the rest is the base's
  EXPECT_EQ(conflux_test::read_file(output / "generation_config.json"),
            conflux_test::read_file(dir / "m" / "base" / "generation_config.json"));
  EXPECT_EQ(conflux_test::read_file(output / "tokenizer_config.json"),
            conflux_test::read_file(dir / "m" / "base" / "tokenizer_config.json"));

  const json::value manifest = json::parse(conflux_test::read_file(output / "conflux-manifest.json"));
  EXPECT_EQ(manifest.at("job").as_string(), "agents");
  EXPECT_EQ(manifest.at("strategy").at("id").as_string(), "task_arithmetic");
  EXPECT_EQ(manifest.at("output").at("tensors").to_number<int>(), 26);
  EXPECT_EQ(manifest.at("inputs").as_array().size(), 4u);  // base + 3 models

  // Nothing hidden left beside it.
  EXPECT_TRUE(leftovers(dir / "out").empty()) << leftovers(dir / "out").front();

  // The output is a valid checkpoint with the base's tensors, and not simply a copy of the base.
  const RunResult ins = run("inspect --json " + quote(output.string()), dir.path());
  ASSERT_EQ(ins.exit_code, 0) << ins.err;
  const json::value doc = json::parse(ins.out);
  EXPECT_TRUE(doc.at("valid").as_bool());
  ASSERT_EQ(doc.at("tensors").as_array().size(), 26u);
  for (const auto& t : doc.at("tensors").as_array()) EXPECT_EQ(t.at("dtype").as_string(), "BF16");
  if (single) {
    EXPECT_NE(conflux_test::read_file(output / "model.safetensors"),
              conflux_test::read_file(dir / "m" / "base" / "model.safetensors"));
  }
}

TEST_F(MergeCli, ProgressOnAFileHasNoControlCharacters) {
  // Small chunks and one thread make the merge take as long as it can on tiny inputs.
  const std::string file = job_file("job.toml", agents_job());
  const RunResult r = run("merge " + file + " --threads 1 --chunk-elements 64", dir.path());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_FALSE(contains(r.err, "\r")) << r.err;
  EXPECT_FALSE(contains(r.err, "\x1b")) << r.err;
  EXPECT_TRUE(r.err.empty() || r.err.back() == '\n') << r.err;
}

TEST_F(MergeCli, ShardedF32OutputWithOutDtype) {
  const std::string file =
      job_file("job.toml", job_table("lin", "linear", "", {"m/agent-1", "m/agent-2"}, "out/lin",
                                     "out_dtype = \"f32\"\nshard_size = \"100KB\"\n[job.params]\nweights = [1, 3]\n"));
  const RunResult r = run("merge --quiet " + file, dir.path());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const fs::path output = dir / "out" / "lin";
  EXPECT_TRUE(fs::exists(output / "model.safetensors.index.json"));
  EXPECT_FALSE(fs::exists(output / "model.safetensors"));
  EXPECT_GT(weights(output).size(), 2u);
  const json::value config = json::parse(conflux_test::read_file(output / "config.json"));
  EXPECT_EQ(config.at("torch_dtype").as_string(), "float32");
  const RunResult ins = run("inspect --json " + quote(output.string()), dir.path());
  ASSERT_EQ(ins.exit_code, 0) << ins.err;
  const json::value doc = json::parse(ins.out);
  ASSERT_EQ(doc.at("tensors").as_array().size(), 26u);
  for (const auto& t : doc.at("tensors").as_array()) EXPECT_EQ(t.at("dtype").as_string(), "F32");
  // A linear job has no base: config and tokenizer files come from the first model.
  EXPECT_EQ(conflux_test::read_file(output / "tokenizer_config.json"),
            conflux_test::read_file(dir / "m" / "agent-1" / "tokenizer_config.json"));
}

TEST_F(MergeCli, OutputOverrideThreadsAndQuiet) {
  const std::string file = job_file("job.toml", agents_job());
  const fs::path one = dir / "elsewhere" / "t1", two = dir / "elsewhere" / "t2", chunked = dir / "elsewhere" / "t2c";

  const RunResult r1 = run("merge " + file + " --output " + quote(one.string()) + " --threads 1", dir.path());
  ASSERT_EQ(r1.exit_code, 0) << r1.err;
  EXPECT_TRUE(contains(r1.out, one.string())) << r1.out;
  EXPECT_FALSE(fs::exists(dir / "out" / "merged"));  // the job's own output is not written

  const RunResult r2 = run("merge " + file + " --output " + quote(two.string()) + " --threads 2 --quiet", dir.path());
  ASSERT_EQ(r2.exit_code, 0) << r2.err;
  EXPECT_TRUE(r2.err.empty()) << r2.err;
  EXPECT_TRUE(contains(r2.out, "26 tensors")) << r2.out;  // --quiet drops progress, not the summary

  const RunResult r3 =
      run("merge " + file + " --output " + quote(chunked.string()) + " --threads 2 --chunk-elements 1000 -q", dir.path());
  ASSERT_EQ(r3.exit_code, 0) << r3.err;
  EXPECT_TRUE(r3.err.empty()) << r3.err;

  const auto w1 = weights(one);
  ASSERT_FALSE(w1.empty());
  EXPECT_TRUE(w1 == weights(two)) << "--threads 1 and --threads 2 differ";
  EXPECT_TRUE(w1 == weights(chunked)) << "the chunk size changed the result";
  EXPECT_TRUE(leftovers(dir / "elsewhere").empty());
}

TEST_F(MergeCli, ExistingOutputNeedsForce) {
  // A different checkpoint already sits at the output: a passthrough copy of agent-1 plus a file
  // of the user's.
  const std::string first = job_file("first.toml", job_table("copy", "passthrough", "", {"m/agent-1"}, "out/merged"));
  ASSERT_EQ(run("merge -q " + first, dir.path()).exit_code, 0);
  const fs::path output = dir / "out" / "merged";
  conflux_test::write_file(output / "notes.txt", "mine");
  const auto before = snapshot(output);

  const std::string file = job_file("job.toml", agents_job());
  const RunResult r = run("merge " + file, dir.path());
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_EQ(lines(r.err), 1u) << r.err;
  EXPECT_TRUE(contains(r.err, "--force")) << r.err;
  EXPECT_TRUE(contains(r.err, output.string())) << r.err;
  EXPECT_TRUE(snapshot(output) == before) << "the existing output was modified";
  EXPECT_TRUE(leftovers(dir / "out").empty());

  // --force with an input that fails: the old output is still untouched.
  const std::string broken = job_file(
      "broken.toml", job_table("agents", "task_arithmetic", "m/base", {"m/agent-1", "m/missing"}, "out/merged"));
  const RunResult b = run("merge --force " + broken, dir.path());
  EXPECT_EQ(b.exit_code, 1) << b.err;
  EXPECT_TRUE(snapshot(output) == before) << "a failed --force merge modified the existing output";
  EXPECT_TRUE(leftovers(dir / "out").empty());

  const RunResult f = run("merge " + file + " --force", dir.path());
  ASSERT_EQ(f.exit_code, 0) << f.err;
  EXPECT_FALSE(fs::exists(output / "notes.txt"));  // replaced, not merged into
  EXPECT_NE(conflux_test::read_file(output / "model.safetensors"), before.at("model.safetensors"));
  const json::value manifest = json::parse(conflux_test::read_file(output / "conflux-manifest.json"));
  EXPECT_EQ(manifest.at("strategy").at("id").as_string(), "task_arithmetic");
  EXPECT_TRUE(leftovers(dir / "out").empty()) << leftovers(dir / "out").front();

  // The replacement is what a fresh run produces.
  const fs::path fresh = dir / "fresh";
  ASSERT_EQ(run("merge -q " + file + " --output " + quote(fresh.string()), dir.path()).exit_code, 0);
  EXPECT_TRUE(weights(output) == weights(fresh));
}

TEST_F(MergeCli, JobSelection) {
  const std::string file =
      job_file("two.toml", job_table("first", "linear", "", {"m/agent-1", "m/agent-2"}, "out/first") + "\n" +
                               job_table("second", "passthrough", "", {"m/agent-3"}, "out/second"));
  const RunResult none = run("merge " + file, dir.path());
  EXPECT_EQ(none.exit_code, 2);
  EXPECT_EQ(lines(none.err), 1u) << none.err;
  EXPECT_TRUE(contains(none.err, "first")) << none.err;
  EXPECT_TRUE(contains(none.err, "second")) << none.err;
  EXPECT_TRUE(contains(none.err, "--job")) << none.err;
  EXPECT_FALSE(fs::exists(dir / "out"));

  const RunResult missing = run("merge " + file + " --job nope", dir.path());
  EXPECT_EQ(missing.exit_code, 2);
  EXPECT_EQ(lines(missing.err), 1u) << missing.err;
  EXPECT_TRUE(contains(missing.err, "'nope'")) << missing.err;
  EXPECT_FALSE(fs::exists(dir / "out"));

  const RunResult second = run("merge " + file + " --job second", dir.path());
  ASSERT_EQ(second.exit_code, 0) << second.err;
  EXPECT_TRUE(contains(second.out, "'second'")) << second.out;
  EXPECT_TRUE(contains(second.out, "passthrough")) << second.out;
  EXPECT_TRUE(fs::exists(dir / "out" / "second" / "model.safetensors"));
  EXPECT_FALSE(fs::exists(dir / "out" / "first"));
  // passthrough with scale 1 and the model's dtype is a bit-exact copy of the tensors.
  const RunResult a = run("inspect --json " + quote((dir / "out" / "second").string()), dir.path());
  const RunResult b = run("inspect --json " + quote((dir / "m" / "agent-3").string()), dir.path());
  ASSERT_EQ(a.exit_code, 0);
  ASSERT_EQ(b.exit_code, 0);
  EXPECT_EQ(json::parse(a.out).at("tensors").as_array().size(), json::parse(b.out).at("tensors").as_array().size());

  // A job named on the command line of a one-job file must still exist.
  const std::string one = job_file("one.toml", agents_job());
  EXPECT_EQ(run("merge " + one + " --job other", dir.path()).exit_code, 2);
  ASSERT_EQ(run("merge -q " + one + " --job agents", dir.path()).exit_code, 0);
}

TEST_F(MergeCli, ConfigErrorsNameFileJobAndKey) {
  const std::string good = job_table("j", "passthrough", "", {"m/agent-1"}, "out/x");
  expect_config_error(good + "colour = 1\n", "colour", "unknown key");
  expect_config_error(good + "out_dtype = \"fp8\"\n", "out_dtype", "fp8");
  expect_config_error("[[job]]\nname = \"j\"\nstrategy = \"passthrough\"\noutput = \"out/x\"\n", "models");
  expect_config_error(good + "[job.params]\nnope = 1\n", "params.nope");
  expect_config_error(good + "[job.params]\nscale = \"big\"\n", "params.scale");
  expect_config_error(job_table("j", "passthrough", "", {"m/agent-1", "m/agent-2"}, "out/x"), "models",
                      "exactly 1");
  expect_config_error(job_table("j", "task_arithmetic", "", {"m/agent-1"}, "out/x"), "base");
  expect_config_error(job_table("j", "linear", "", {"m/agent-1", "m/agent-2"}, "out/x",
                                "[job.params]\nweights = [1, 2, 3]\n"),
                      "params.weights");
  expect_config_error(good + "threads = -1\n", "threads");
}

TEST_F(MergeCli, UnknownStrategyListsTheAvailableOnes) {
  const std::string file = job_file("bad.toml", job_table("j", "ties_magic", "", {"m/agent-1"}, "out/x"));
  const RunResult r = run("merge " + file, dir.path());
  EXPECT_EQ(r.exit_code, 2) << r.err;
  EXPECT_EQ(lines(r.err), 1u) << r.err;
  EXPECT_TRUE(contains(r.err, "ties_magic")) << r.err;
  EXPECT_TRUE(contains(r.err, "'j'")) << r.err;
  for (const char* id : {"linear", "task_arithmetic", "passthrough"}) EXPECT_TRUE(contains(r.err, id)) << r.err;
  expect_nothing_published(dir / "out" / "x");
}

TEST_F(MergeCli, MissingModelFailsWithoutPublishing) {
  const std::string file = job_file(
      "job.toml", job_table("agents", "task_arithmetic", "m/base", {"m/agent-1", "m/no-such-agent"}, "out/merged"));
  const RunResult r = run("merge " + file, dir.path());
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_EQ(lines(r.err), 1u) << r.err;
  EXPECT_TRUE(contains(r.err, "no-such-agent")) << r.err;
  EXPECT_TRUE(r.out.empty()) << r.out;
  expect_nothing_published(dir / "out" / "merged");
}

TEST_F(MergeCli, TruncatedShardFailsWithoutPublishing) {
  fs::path largest;
  std::uintmax_t size = 0;
  for (const auto& e : fs::directory_iterator(dir / "m" / "agent-2"))
    if (e.path().extension() == ".safetensors" && e.file_size() > size) largest = e.path(), size = e.file_size();
  ASSERT_GT(size, 1000u);
  fs::resize_file(largest, size - 100);

  const std::string file = job_file("job.toml", agents_job());
  const RunResult r = run("merge " + file, dir.path());
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_EQ(lines(r.err), 1u) << r.err;
  EXPECT_TRUE(contains(r.err, largest.string())) << r.err;
  EXPECT_TRUE(r.out.empty()) << r.out;
  expect_nothing_published(dir / "out" / "merged");
}

TEST_F(MergeCli, ShapeMismatchNamesTheTensor) {
  const std::string cmd = quote(bin("conflux-synth")) + " --out " + quote((dir / "deep").string()) +
                          " --preset tiny --layers 3 --agents 1 >/dev/null";
  ASSERT_EQ(std::system(cmd.c_str()), 0);

  // A model with a tensor the base lacks.
  const std::string extra = job_file(
      "extra.toml", job_table("agents", "task_arithmetic", "m/base", {"m/agent-1", "deep/agent-1"}, "out/merged"));
  const RunResult r = run("merge " + extra, dir.path());
  EXPECT_EQ(r.exit_code, 1) << r.err;
  EXPECT_EQ(lines(r.err), 1u) << r.err;
  EXPECT_TRUE(contains(r.err, "model.layers.2.")) << r.err;
  EXPECT_TRUE(contains(r.err, (dir / "deep" / "agent-1").string())) << r.err;
  expect_nothing_published(dir / "out" / "merged");

  // A model missing a tensor of the base.
  const std::string missing =
      job_file("missing.toml", job_table("agents", "task_arithmetic", "deep/base", {"m/agent-1"}, "out/merged"));
  const RunResult m = run("merge " + missing, dir.path());
  EXPECT_EQ(m.exit_code, 1) << m.err;
  EXPECT_EQ(lines(m.err), 1u) << m.err;
  EXPECT_TRUE(contains(m.err, "model.layers.2.")) << m.err;
  expect_nothing_published(dir / "out" / "merged");

  // Without a base (linear), the models must still agree.
  const std::string lin =
      job_file("lin.toml", job_table("lin", "linear", "", {"m/agent-1", "deep/agent-1"}, "out/lin"));
  const RunResult l = run("merge " + lin, dir.path());
  EXPECT_EQ(l.exit_code, 1) << l.err;
  EXPECT_TRUE(contains(l.err, "model.layers.2.")) << l.err;
  expect_nothing_published(dir / "out" / "lin");
}

TEST_F(MergeCli, UsageErrors) {
  const RunResult bare = run("merge", dir.path());
  EXPECT_EQ(bare.exit_code, 2);
  EXPECT_EQ(lines(bare.err), 1u) << bare.err;

  const RunResult help = run("merge --help", dir.path());
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_TRUE(contains(help.out, "--force")) << help.out;
  EXPECT_TRUE(contains(help.out, "--job")) << help.out;

  const std::string file = job_file("job.toml", agents_job());
  EXPECT_EQ(run("merge " + file + " --bogus", dir.path()).exit_code, 2);
  EXPECT_EQ(run("merge " + file + " --threads abc", dir.path()).exit_code, 2);
  EXPECT_EQ(run("merge " + file + " --job", dir.path()).exit_code, 2);
  EXPECT_FALSE(fs::exists(dir / "out"));

  const RunResult absent = run("merge " + quote((dir / "absent.toml").string()), dir.path());
  EXPECT_EQ(absent.exit_code, 2);
  EXPECT_EQ(lines(absent.err), 1u) << absent.err;
  EXPECT_TRUE(contains(absent.err, (dir / "absent.toml").string())) << absent.err;

  const std::string garbage = job_file("garbage.toml", "[[job]\nname = \n");
  const RunResult g = run("merge " + garbage, dir.path());
  EXPECT_EQ(g.exit_code, 2);
  EXPECT_EQ(lines(g.err), 1u) << g.err;
  EXPECT_TRUE(contains(g.err, (dir / "garbage.toml").string())) << g.err;

  const std::string empty = job_file("empty.toml", "");
  const RunResult e = run("merge " + empty, dir.path());
  EXPECT_EQ(e.exit_code, 2);
  EXPECT_TRUE(contains(e.err, "job")) << e.err;
}

// A negative thread count is a usage error (exit 2), not "4294967295 threads".
TEST_F(MergeCli, NegativeThreadsIsAUsageError) {
  const std::string file = job_file("job.toml", agents_job());
  const RunResult r = run("merge " + file + " --threads -1", dir.path());
  EXPECT_EQ(r.exit_code, 2) << r.out << r.err;
  EXPECT_FALSE(fs::exists(dir / "out" / "merged"));
}

TEST_F(MergeCli, PluginsListsTheBuiltInStrategies) {
  const RunResult r = run("plugins", dir.path());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  for (const char* id : {"linear", "task_arithmetic", "passthrough"}) EXPECT_TRUE(contains(r.out, id)) << r.out;
  EXPECT_TRUE(contains(r.out, "weights")) << r.out;
  EXPECT_TRUE(contains(r.out, "normalize")) << r.out;
  EXPECT_TRUE(r.err.empty()) << r.err;  // the built-in plugins load without problems

  const RunResult help = run("plugins --help", dir.path());
  EXPECT_EQ(help.exit_code, 0);
  EXPECT_TRUE(contains(help.out, "--json")) << help.out;
  EXPECT_EQ(run("plugins --bogus", dir.path()).exit_code, 2);
}

TEST_F(MergeCli, PluginsJsonDescribesParameters) {
  const RunResult r = run("plugins --json", dir.path());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const json::value doc = json::parse(r.out);
  EXPECT_TRUE(doc.at("problems").as_array().empty()) << r.out;
  std::vector<std::string> ids;
  const json::object* linear = nullptr;
  for (const auto& p : doc.at("plugins").as_array()) {
    ids.emplace_back(p.at("id").as_string());
    if (p.at("id").as_string() == "linear") linear = &p.as_object();
  }
  for (const char* id : {"linear", "task_arithmetic", "passthrough"})
    EXPECT_NE(std::find(ids.begin(), ids.end(), id), ids.end()) << id;
  ASSERT_NE(linear, nullptr);
  EXPECT_EQ(linear->at("base").as_string(), "unused");
  EXPECT_EQ(linear->at("min_models").to_number<int>(), 1);
  EXPECT_TRUE(linear->at("max_models").is_null());
  bool weights_seen = false, normalize_seen = false;
  for (const auto& p : linear->at("parameters").as_array()) {
    if (p.at("name").as_string() == "weights") {
      weights_seen = true;
      EXPECT_EQ(p.at("type").as_string(), "float per model");
      EXPECT_FALSE(p.at("required").as_bool());
      EXPECT_EQ(p.at("default").to_number<double>(), 1.0);
    } else if (p.at("name").as_string() == "normalize") {
      normalize_seen = true;
      EXPECT_EQ(p.at("type").as_string(), "bool");
      EXPECT_TRUE(p.at("default").as_bool());
    }
  }
  EXPECT_TRUE(weights_seen);
  EXPECT_TRUE(normalize_seen);
}

}  // namespace
