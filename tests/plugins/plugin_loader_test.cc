// The plugin loader: refusal of malformed plugins (built on purpose in tests/plugins/), loading of
// the good ones beside them, id lookup errors, the built-in plugins' schemas, the search path, and
// validate_plugin on hand-made descriptors, one schema rule at a time.
#include <gtest/gtest.h>

#include <stdlib.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "../test_util.h"
#include "conflux/config.h"
#include "conflux/merge.h"
#include "conflux/plugin.h"
#include "conflux/plugin_context.h"
#include "conflux/plugin_registry.h"

namespace {

namespace fs = std::filesystem;
using conflux::LoadedPlugin;
using conflux::PluginError;
using conflux::PluginProblem;
using conflux::PluginRegistry;
using conflux_test::contains;

const fs::path kTestPlugins = CONFLUX_TEST_PLUGIN_DIR;
const fs::path kBuiltins = CONFLUX_PLUGIN_DIR;

// Every case directory of tests/plugins/ (the malformed ones and the good ones).
const std::vector<std::string> kCases = {"bad_abi",           "no_entry",      "null_entry",
                                         "bad_default_range", "bad_dup_param", "bad_last_not_map",
                                         "bad_no_combine",    "dup",           "c_plugin",
                                         "fails"};

fs::path case_dir(const std::string& name) { return kTestPlugins / name; }
fs::path case_file(const std::string& name) { return case_dir(name) / (name + ".so"); }

// Loads one case directory alone and returns its single problem.
PluginProblem only_problem(const std::string& name) {
  PluginRegistry reg;
  reg.load_dirs({case_dir(name)});
  EXPECT_TRUE(reg.plugins().empty()) << name;
  EXPECT_EQ(reg.problems().size(), 1u) << name;
  if (reg.problems().empty()) return {};
  return reg.problems().front();
}

// The message of the PluginError that f throws ("" after a failure when it throws none).
template <class F>
std::string plugin_error(F&& f) {
  try {
    f();
  } catch (const PluginError& e) {
    return e.what();
  }
  ADD_FAILURE() << "no PluginError thrown";
  return "";
}

// ---------------------------------------------------------------------------------------------
// Malformed plugins are refused, each with a message naming the file and the rule.

TEST(PluginLoader, TestPluginsWereBuilt) {
  for (const auto& name : kCases) {
    if (name == "dup") continue;
    EXPECT_TRUE(fs::exists(case_file(name))) << case_file(name);
  }
  EXPECT_TRUE(fs::exists(case_dir("dup") / "dup_a.so"));
  EXPECT_TRUE(fs::exists(case_dir("dup") / "dup_b.so"));
}

TEST(PluginLoader, RefusesAnotherAbiMajor) {
  const PluginProblem p = only_problem("bad_abi");
  EXPECT_EQ(p.file, case_file("bad_abi"));
  EXPECT_TRUE(contains(p.message, case_file("bad_abi").string())) << p.message;
  EXPECT_TRUE(contains(p.message, "ABI " + std::to_string(CFX_ABI_MAJOR + 1) + ".0")) << p.message;
  EXPECT_TRUE(contains(p.message, "ABI " + std::to_string(CFX_ABI_MAJOR) + "." + std::to_string(CFX_ABI_MINOR)))
      << p.message;
  EXPECT_TRUE(contains(p.message, "rebuild")) << p.message;
}

TEST(PluginLoader, RefusesSharedObjectWithoutEntrySymbol) {
  const PluginProblem p = only_problem("no_entry");
  EXPECT_TRUE(contains(p.message, case_file("no_entry").string())) << p.message;
  EXPECT_TRUE(contains(p.message, "entry symbol")) << p.message;
  EXPECT_TRUE(contains(p.message, CFX_PLUGIN_ENTRY_SYMBOL)) << p.message;
}

TEST(PluginLoader, RefusesEntryReturningNull) {
  const PluginProblem p = only_problem("null_entry");
  EXPECT_TRUE(contains(p.message, case_file("null_entry").string())) << p.message;
  EXPECT_TRUE(contains(p.message, "entry point returned NULL")) << p.message;
}

TEST(PluginLoader, RefusesDefaultOutsideRange) {
  const PluginProblem p = only_problem("bad_default_range");
  EXPECT_TRUE(contains(p.message, case_file("bad_default_range").string())) << p.message;
  EXPECT_TRUE(contains(p.message, "'bad_default_range'")) << p.message;
  EXPECT_TRUE(contains(p.message, "parameter 'alpha'")) << p.message;
  EXPECT_TRUE(contains(p.message, "outside its range")) << p.message;
}

TEST(PluginLoader, RefusesDuplicateParameterNames) {
  const PluginProblem p = only_problem("bad_dup_param");
  EXPECT_TRUE(contains(p.message, case_file("bad_dup_param").string())) << p.message;
  EXPECT_TRUE(contains(p.message, "parameter 'alpha'")) << p.message;
  EXPECT_TRUE(contains(p.message, "twice")) << p.message;
}

TEST(PluginLoader, RefusesLastPassNotMap) {
  const PluginProblem p = only_problem("bad_last_not_map");
  EXPECT_TRUE(contains(p.message, case_file("bad_last_not_map").string())) << p.message;
  EXPECT_TRUE(contains(p.message, "map pass, the last one")) << p.message;
}

TEST(PluginLoader, RefusesReducePassWithoutCombine) {
  const PluginProblem p = only_problem("bad_no_combine");
  EXPECT_TRUE(contains(p.message, case_file("bad_no_combine").string())) << p.message;
  EXPECT_TRUE(contains(p.message, "pass 0")) << p.message;
  EXPECT_TRUE(contains(p.message, "combine")) << p.message;
}

TEST(PluginLoader, SameIdFromTwoFilesIsAnErrorNamingBoth) {
  PluginRegistry reg;
  reg.load_dirs({case_dir("dup")});
  ASSERT_EQ(reg.problems().size(), 1u);
  const std::string& m = reg.problems()[0].message;
  EXPECT_EQ(reg.problems()[0].file, case_dir("dup") / "dup_b.so");
  EXPECT_TRUE(contains(m, "two plugins")) << m;
  EXPECT_TRUE(contains(m, "'dup_id'")) << m;
  EXPECT_TRUE(contains(m, (case_dir("dup") / "dup_a.so").string())) << m;
  EXPECT_TRUE(contains(m, (case_dir("dup") / "dup_b.so").string())) << m;
  // The id is unusable, whichever file came first.
  const std::string e = plugin_error([&] { (void)reg.get("dup_id"); });
  EXPECT_TRUE(contains(e, "two plugins")) << e;
  EXPECT_TRUE(contains(e, "dup_a.so")) << e;
  EXPECT_TRUE(contains(e, "dup_b.so")) << e;
}

// ---------------------------------------------------------------------------------------------
// A directory tree of good and bad plugins together.

class MixedRegistry : public ::testing::Test {
 protected:
  void SetUp() override {
    std::vector<fs::path> dirs;
    for (const auto& name : kCases) dirs.push_back(case_dir(name));
    dirs.push_back(kBuiltins);
    reg_.load_dirs(dirs);
  }
  std::vector<std::string> ids() const {
    std::vector<std::string> out;
    for (const auto& p : reg_.plugins()) out.push_back(p->id());
    return out;
  }
  PluginRegistry reg_;
};

TEST_F(MixedRegistry, LoadsTheGoodOnesAndKeepsEveryProblem) {
  const auto v = ids();
  for (const char* id : {"c_plugin", "fails", "linear", "task_arithmetic", "passthrough"})
    EXPECT_NE(std::find(v.begin(), v.end(), id), v.end()) << id;
  for (const char* id : {"bad_abi", "bad_default_range", "bad_dup_param", "bad_last_not_map", "bad_no_combine"})
    EXPECT_EQ(std::find(v.begin(), v.end(), id), v.end()) << id;
  // bad_abi, no_entry, null_entry, four bad schemas, dup_b.
  EXPECT_EQ(reg_.problems().size(), 8u);
  for (const auto& p : reg_.problems()) EXPECT_TRUE(contains(p.message, p.file.string())) << p.message;
  EXPECT_EQ(reg_.searched().size(), kCases.size() + 1);
  EXPECT_EQ(reg_.get("c_plugin").file, case_file("c_plugin"));
  EXPECT_EQ(reg_.get("linear").file, kBuiltins / "linear.so");
}

TEST_F(MixedRegistry, RefusedIdExplainsWhy) {
  std::string e = plugin_error([&] { (void)reg_.get("bad_default_range"); });
  EXPECT_TRUE(contains(e, "unknown strategy 'bad_default_range'")) << e;
  EXPECT_TRUE(contains(e, "parameter 'alpha'")) << e;
  EXPECT_TRUE(contains(e, case_file("bad_default_range").string())) << e;
  e = plugin_error([&] { (void)reg_.get("bad_abi"); });
  EXPECT_TRUE(contains(e, case_file("bad_abi").string())) << e;
  EXPECT_TRUE(contains(e, "ABI")) << e;
  e = plugin_error([&] { (void)reg_.get("dup_id"); });
  EXPECT_TRUE(contains(e, "two plugins")) << e;
}

TEST_F(MixedRegistry, UnknownIdListsAvailableIds) {
  const std::string e = plugin_error([&] { (void)reg_.get("no_such_strategy"); });
  EXPECT_TRUE(contains(e, "unknown strategy 'no_such_strategy'")) << e;
  EXPECT_TRUE(contains(e, "available:")) << e;
  for (const char* id : {"c_plugin", "fails", "linear", "task_arithmetic", "passthrough"})
    EXPECT_TRUE(contains(e, id)) << e;
}

TEST(PluginLoader, UnknownIdWithNoPluginsNamesTheSearchedDirectories) {
  conflux_test::TempDir empty;
  PluginRegistry reg;
  reg.load_dirs({empty.path(), empty / "missing"});
  EXPECT_TRUE(reg.plugins().empty());
  EXPECT_TRUE(reg.problems().empty());
  const std::string e = plugin_error([&] { (void)reg.get("linear"); });
  EXPECT_TRUE(contains(e, "no plugins found")) << e;
  EXPECT_TRUE(contains(e, empty.path().string())) << e;
  EXPECT_TRUE(contains(e, (empty / "missing").string())) << e;
}

TEST(PluginLoader, IgnoresFilesThatAreNotSharedObjects) {
  conflux_test::TempDir dir;
  conflux_test::write_file(dir / "README.txt", "not a plugin");
  conflux_test::write_file(dir / "libfoo.so.1", "not a plugin either");
  PluginRegistry reg;
  reg.load_dirs({dir.path()});
  EXPECT_TRUE(reg.plugins().empty());
  EXPECT_TRUE(reg.problems().empty());
}

TEST(PluginLoader, GarbageSoIsAProblemNotACrash) {
  conflux_test::TempDir dir;
  conflux_test::write_file(dir / "garbage.so", "this is not an ELF file");
  PluginRegistry reg;
  reg.load_dirs({dir.path()});
  ASSERT_EQ(reg.problems().size(), 1u);
  EXPECT_TRUE(contains(reg.problems()[0].message, (dir / "garbage.so").string())) << reg.problems()[0].message;
  EXPECT_TRUE(contains(reg.problems()[0].message, "cannot load")) << reg.problems()[0].message;
}

// ---------------------------------------------------------------------------------------------
// Loading each file once.

TEST(PluginLoader, SameFileTwiceLoadsOnce) {
  PluginRegistry reg;
  EXPECT_FALSE(reg.load_file(case_file("c_plugin")).has_value());
  EXPECT_FALSE(reg.load_file(case_file("c_plugin")).has_value());
  // Another spelling of the same path.
  EXPECT_FALSE(reg.load_file(case_dir("c_plugin") / ".." / "c_plugin" / "." / "c_plugin.so").has_value());
  reg.load_dirs({case_dir("c_plugin"), case_dir("c_plugin")});
  EXPECT_EQ(reg.plugins().size(), 1u);
  EXPECT_TRUE(reg.problems().empty());
  EXPECT_NO_THROW((void)reg.get("c_plugin"));
}

TEST(PluginLoader, SameFileThroughASymlinkLoadsOnce) {
  conflux_test::TempDir dir;
  fs::create_directory_symlink(case_dir("c_plugin"), dir / "link");
  PluginRegistry reg;
  reg.load_dirs({case_dir("c_plugin"), dir / "link"});
  EXPECT_EQ(reg.plugins().size(), 1u);
  EXPECT_TRUE(reg.problems().empty());
}

TEST(PluginLoader, CopyOfAPluginIsADuplicate) {
  conflux_test::TempDir dir;
  fs::copy_file(case_file("c_plugin"), dir / "c_plugin.so");
  PluginRegistry reg;
  reg.load_dirs({case_dir("c_plugin"), dir.path()});
  ASSERT_EQ(reg.problems().size(), 1u);
  EXPECT_TRUE(contains(reg.problems()[0].message, "two plugins")) << reg.problems()[0].message;
  EXPECT_THROW((void)reg.get("c_plugin"), PluginError);
}

// ---------------------------------------------------------------------------------------------
// The built-in plugins and their schemas.

TEST(BuiltinPlugins, LoadWithTheirSchemas) {
  PluginRegistry reg;
  reg.load_dirs({kBuiltins});
  EXPECT_TRUE(reg.problems().empty()) << (reg.problems().empty() ? "" : reg.problems()[0].message);

  const LoadedPlugin& linear = reg.get("linear");
  EXPECT_EQ(linear.file, kBuiltins / "linear.so");
  EXPECT_EQ(linear.desc.struct_size, sizeof(cfx_plugin));
  EXPECT_EQ(linear.desc.base, CFX_BASE_UNUSED);
  EXPECT_EQ(linear.desc.min_models, 1u);
  EXPECT_EQ(linear.desc.max_models, 0u);
  ASSERT_EQ(linear.passes.size(), 1u);
  EXPECT_EQ(linear.passes[0].kind, CFX_PASS_MAP);
  const cfx_param_spec* weights = linear.param("weights");
  ASSERT_NE(weights, nullptr);
  EXPECT_EQ(weights->type, CFX_PARAM_FLOAT_LIST);
  EXPECT_TRUE(weights->flags & CFX_PARAM_PER_MODEL);
  EXPECT_EQ(weights->default_number, 1.0);
  const cfx_param_spec* normalize = linear.param("normalize");
  ASSERT_NE(normalize, nullptr);
  EXPECT_EQ(normalize->type, CFX_PARAM_BOOL);
  EXPECT_EQ(normalize->default_number, 1.0);
  EXPECT_EQ(linear.param("nope"), nullptr);

  const LoadedPlugin& ta = reg.get("task_arithmetic");
  EXPECT_EQ(ta.desc.base, CFX_BASE_REQUIRED);
  const cfx_param_spec* lambda = ta.param("lambda");
  ASSERT_NE(lambda, nullptr);
  EXPECT_EQ(lambda->type, CFX_PARAM_FLOAT);
  EXPECT_EQ(lambda->default_number, 1.0);
  EXPECT_FALSE(lambda->flags & CFX_PARAM_REQUIRED);

  const LoadedPlugin& pt = reg.get("passthrough");
  EXPECT_EQ(pt.desc.min_models, 1u);
  EXPECT_EQ(pt.desc.max_models, 1u);

  // Host-owned copies: the descriptor points at the registry's own arrays.
  EXPECT_EQ(linear.desc.params, linear.params.data());
  EXPECT_EQ(linear.desc.passes, linear.passes.data());
}

// ---------------------------------------------------------------------------------------------
// The search path.

class EnvGuard {
 public:
  explicit EnvGuard(const char* name) : name_(name) {
    if (const char* v = std::getenv(name)) old_ = v;
  }
  ~EnvGuard() {
    if (old_) ::setenv(name_, old_->c_str(), 1);
    else ::unsetenv(name_);
  }
  EnvGuard(const EnvGuard&) = delete;
  EnvGuard& operator=(const EnvGuard&) = delete;

 private:
  const char* name_;
  std::optional<std::string> old_;
};

std::ptrdiff_t position(const std::vector<fs::path>& v, const fs::path& p) {
  const fs::path key = fs::weakly_canonical(p);
  const auto it = std::find(v.begin(), v.end(), key);
  return it == v.end() ? -1 : it - v.begin();
}

TEST(SearchPath, EnvThenConfigThenExecutableRelative) {
  EnvGuard guard("CONFLUX_PLUGIN_PATH");
  conflux_test::TempDir tmp;
  fs::create_directories(tmp / "env1");
  fs::create_directories(tmp / "cfg");
  const std::string env = (tmp / "env1").string() + "::" + (tmp / "env2").string() + ":";
  ASSERT_EQ(::setenv("CONFLUX_PLUGIN_PATH", env.c_str(), 1), 0);
  const auto path = PluginRegistry::search_path({tmp / "cfg"});
  ASSERT_GE(path.size(), 4u);
  EXPECT_EQ(position(path, tmp / "env1"), 0);
  EXPECT_EQ(position(path, tmp / "env2"), 1);  // missing directories are kept
  EXPECT_EQ(position(path, tmp / "cfg"), 2);
  // The test binary lives in <build>/bin, so <exe>/../lib/conflux/plugins is the built-in dir.
  EXPECT_EQ(position(path, kBuiltins), 3);
  for (const auto& p : path) EXPECT_FALSE(p.empty());
}

TEST(SearchPath, WithoutEnvTheConfigComesFirst) {
  EnvGuard guard("CONFLUX_PLUGIN_PATH");
  ASSERT_EQ(::unsetenv("CONFLUX_PLUGIN_PATH"), 0);
  conflux_test::TempDir tmp;
  const auto path = PluginRegistry::search_path({tmp / "a", tmp / "b"});
  ASSERT_GE(path.size(), 3u);
  EXPECT_EQ(position(path, tmp / "a"), 0);
  EXPECT_EQ(position(path, tmp / "b"), 1);
  EXPECT_EQ(position(path, kBuiltins), 2);
}

TEST(SearchPath, ADirectoryIsListedOnce) {
  EnvGuard guard("CONFLUX_PLUGIN_PATH");
  ASSERT_EQ(::setenv("CONFLUX_PLUGIN_PATH", kBuiltins.c_str(), 1), 0);
  const auto path = PluginRegistry::search_path({kBuiltins});
  EXPECT_EQ(std::count(path.begin(), path.end(), fs::weakly_canonical(kBuiltins)), 1);
  EXPECT_EQ(position(path, kBuiltins), 0);
}

TEST(SearchPath, EnvDirectoryIsLoadedFirst) {
  // A plugin from CONFLUX_PLUGIN_PATH loads first, together with the built-ins.
  EnvGuard guard("CONFLUX_PLUGIN_PATH");
  ASSERT_EQ(::setenv("CONFLUX_PLUGIN_PATH", case_dir("c_plugin").c_str(), 1), 0);
  PluginRegistry reg;
  reg.load_dirs(PluginRegistry::search_path({}));
  EXPECT_EQ(reg.plugins().front()->id(), "c_plugin");
  EXPECT_NO_THROW((void)reg.get("linear"));
}

// ---------------------------------------------------------------------------------------------
// The C plugin and the failing plugin, driven through the ABI by hand and through a whole job.

struct Harness {
  explicit Harness(const LoadedPlugin& p, const std::vector<const float*>& models, std::uint64_t count)
      : plugin(p), model_ptrs(models) {
    ctx.job = "test";
    ctx.strategy = p.id();
    for (const cfx_param_spec& s : p.params) {
      cfx_param_value v{};
      v.struct_size = sizeof v;
      v.type = s.type;
      v.number = s.default_number;
      v.string = s.default_string;
      values.push_back(v);
    }
    shape = count;
    tensor.struct_size = sizeof tensor;
    tensor.rank = 1;
    tensor.name = "w";
    tensor.shape = &shape;
    tensor.numel = count;
    tensor.row_length = count;
    job.struct_size = sizeof job;
    job.model_count = static_cast<std::uint32_t>(models.size());
    job.host = conflux::host_table();
    job.ctx = &ctx;
    job.param_count = static_cast<std::uint32_t>(values.size());
    job.params = values.data();
    job.tensor_count = 1;
    job.tensors = &tensor;
    chunk.struct_size = sizeof chunk;
    chunk.model_count = job.model_count;
    chunk.tensor = &tensor;
    chunk.count = count;
    chunk.models = model_ptrs.data();
  }
  const LoadedPlugin& plugin;
  std::vector<const float*> model_ptrs;
  std::vector<cfx_param_value> values;
  std::uint64_t shape = 0;
  cfx_tensor tensor{};
  cfx_job job{};
  cfx_chunk chunk{};
  cfx_context ctx;
};

TEST(CPlugin, RunsThroughTheCAbi) {
  PluginRegistry reg;
  ASSERT_FALSE(reg.load_file(case_file("c_plugin")).has_value());
  const LoadedPlugin& p = reg.get("c_plugin");
  EXPECT_EQ(p.desc.max_models, 0u);
  ASSERT_NE(p.param("scale"), nullptr);
  EXPECT_EQ(p.param("scale")->default_number, 1.0);

  const float a[5] = {1, -2, 3.5f, 0, 1e-3f};
  const float b[5] = {9, 9, 9, 9, 9};
  Harness h(p, {a, b}, 5);
  void* instance = nullptr;
  ASSERT_EQ(p.desc.create(&h.job, &instance), 0);
  alignas(16) float out[5] = {};
  EXPECT_EQ(p.passes[0].map(instance, &h.chunk, out), 0);
  p.desc.destroy(instance);
  EXPECT_EQ(std::memcmp(out, a, sizeof a), 0);
  EXPECT_FALSE(h.ctx.failed());
}

TEST(FailsPlugin, MapReportsTheFailureThroughTheHost) {
  PluginRegistry reg;
  ASSERT_FALSE(reg.load_file(case_file("fails")).has_value());
  const LoadedPlugin& p = reg.get("fails");
  const float a[3] = {1, 2, 3};
  Harness h(p, {a}, 3);
  void* instance = nullptr;
  ASSERT_EQ(p.desc.create(&h.job, &instance), 0);
  alignas(16) float out[3] = {};
  EXPECT_NE(p.passes[0].map(instance, &h.chunk, out), 0);
  p.desc.destroy(instance);
  EXPECT_TRUE(h.ctx.failed());
  EXPECT_EQ(h.ctx.failure(), "deliberate failure");
}

// Two one-tensor checkpoints and a job over them.
class PluginJob : public ::testing::Test {
 protected:
  void SetUp() override {
    for (int m = 0; m < 2; ++m) {
      std::vector<float> v(12);
      for (std::size_t k = 0; k < v.size(); ++k) v[k] = static_cast<float>(m * 100) + 0.25f * static_cast<float>(k);
      data_[m] = std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
      fs::create_directories(dir_ / ("m" + std::to_string(m)));
      conflux_test::StBuilder().add("w", "F32", {4, 3}, data_[m]).write(dir_ / ("m" + std::to_string(m)) / "model.safetensors");
    }
    reg_.load_dirs({case_dir("c_plugin"), case_dir("fails")});
    ASSERT_TRUE(reg_.problems().empty());
  }

  conflux::MergeOutcome run(const std::string& strategy) {
    const std::string toml = "[[job]]\nname = \"t\"\nstrategy = \"" + strategy + "\"\nmodels = [\"" +
                             (dir_ / "m0").string() + "\", \"" + (dir_ / "m1").string() + "\"]\noutput = \"" +
                             (dir_ / "out").string() + "\"\nthreads = 2\n";
    config_ = conflux::parse_config(toml, dir_ / "job.toml");
    conflux::MergeRequest req;
    req.config = &config_;
    req.job = &config_.jobs.at(0);
    return conflux::run_job(req, reg_);
  }

  conflux_test::TempDir dir_;
  std::string data_[2];
  PluginRegistry reg_;
  conflux::Config config_;
};

TEST_F(PluginJob, CPluginMergesAJob) {
  const conflux::MergeOutcome o = run("c_plugin");
  ASSERT_TRUE(fs::exists(dir_ / "out" / "model.safetensors"));
  const std::string bytes = conflux_test::read_file(dir_ / "out" / "model.safetensors");
  ASSERT_GE(bytes.size(), data_[0].size());
  // One tensor: the file ends with its data, a copy of model 0.
  EXPECT_EQ(bytes.substr(bytes.size() - data_[0].size()), data_[0]);
}

TEST_F(PluginJob, FailingPluginFailsTheJobAndPublishesNothing) {
  try {
    (void)run("fails");
    ADD_FAILURE() << "the job succeeded";
  } catch (const std::exception& e) {
    EXPECT_TRUE(contains(e.what(), "deliberate failure")) << e.what();
  }
  EXPECT_FALSE(fs::exists(dir_ / "out"));
}

// ---------------------------------------------------------------------------------------------
// validate_plugin on hand-made descriptors: one rule at a time.

int create_fn(const cfx_job*, void** instance) {
  *instance = nullptr;
  return 0;
}
void destroy_fn(void*) {}
int map_fn(void*, const cfx_chunk*, float*) { return 0; }
int reduce_fn(void*, const cfx_chunk*, void*) { return 0; }
int combine_fn(void*, const cfx_tensor*, void*, const void*) { return 0; }
int done_fn(void*, const cfx_tensor*, const void*, std::int32_t* repeat) {
  *repeat = 0;
  return 0;
}

cfx_pass map_pass(std::uint32_t flags = 0) {
  cfx_pass p{};
  p.struct_size = sizeof p;
  p.kind = CFX_PASS_MAP;
  p.flags = flags;
  p.map = map_fn;
  return p;
}

cfx_pass reduce_pass(std::uint32_t flags = 0) {
  cfx_pass p{};
  p.struct_size = sizeof p;
  p.kind = CFX_PASS_TENSOR_REDUCE;
  p.flags = flags;
  p.stats_size = 8;
  p.reduce = reduce_fn;
  p.combine = combine_fn;
  p.reduce_done = done_fn;
  return p;
}

cfx_param_spec param(cfx_param_type type, const char* name, double def) {
  cfx_param_spec s{};
  s.struct_size = sizeof s;
  s.type = type;
  s.name = name;
  s.doc = "doc";
  s.default_number = def;
  return s;
}

// A valid descriptor whose parts the tests break one at a time.
struct Desc {
  std::vector<cfx_param_spec> params{param(CFX_PARAM_FLOAT, "alpha", 0.5)};
  std::vector<cfx_pass> passes{reduce_pass(), map_pass()};
  cfx_plugin d{};
  Desc() {
    d.struct_size = sizeof d;
    d.abi_major = CFX_ABI_MAJOR;
    d.abi_minor = CFX_ABI_MINOR;
    d.id = "hand_made";
    d.version = "1.0.0";
    d.description = "a hand-made descriptor";
    d.min_models = 1;
    d.max_models = 0;
    d.base = CFX_BASE_OPTIONAL;
    d.create = create_fn;
    d.destroy = destroy_fn;
  }
  const cfx_plugin* get() {
    d.param_count = static_cast<std::uint32_t>(params.size());
    d.params = params.empty() ? nullptr : params.data();
    d.pass_count = static_cast<std::uint32_t>(passes.size());
    d.passes = passes.empty() ? nullptr : passes.data();
    return &d;
  }
};

const fs::path kFile = "/plugins/hand_made.so";

// validate_plugin's error for this descriptor; checks it names the file.
std::string rejection(Desc& desc) {
  LoadedPlugin out;
  const std::string e = plugin_error([&] { conflux::validate_plugin(desc.get(), kFile, out); });
  EXPECT_TRUE(contains(e, kFile.string())) << e;
  return e;
}

TEST(ValidatePlugin, AcceptsAValidDescriptor) {
  Desc desc;
  LoadedPlugin out;
  ASSERT_NO_THROW(conflux::validate_plugin(desc.get(), kFile, out));
  EXPECT_EQ(out.id(), "hand_made");
  EXPECT_EQ(out.file, kFile);
  EXPECT_EQ(out.params.size(), 1u);
  EXPECT_EQ(out.passes.size(), 2u);
  EXPECT_EQ(out.desc.params, out.params.data());
  EXPECT_EQ(out.desc.passes, out.passes.data());
}

TEST(ValidatePlugin, NullDescriptor) {
  LoadedPlugin out;
  const std::string e = plugin_error([&] { conflux::validate_plugin(nullptr, kFile, out); });
  EXPECT_TRUE(contains(e, "NULL")) << e;
}

TEST(ValidatePlugin, StructSizeTooSmall) {
  Desc desc;
  desc.d.struct_size = 16;
  const std::string e = rejection(desc);
  EXPECT_TRUE(contains(e, "struct_size 16")) << e;
}

TEST(ValidatePlugin, AbiMajor) {
  Desc desc;
  desc.d.abi_major = CFX_ABI_MAJOR + 1;
  EXPECT_TRUE(contains(rejection(desc), "ABI"));
}

// A plugin of another major is refused for its ABI, even when its descriptor has another size.
TEST(ValidatePlugin, AbiMajorIsCheckedBeforeTheDescriptorSize) {
  Desc desc;
  desc.d.abi_major = CFX_ABI_MAJOR + 1;
  desc.d.struct_size = 16;
  const std::string e = rejection(desc);
  EXPECT_TRUE(contains(e, "built for plugin ABI " + std::to_string(CFX_ABI_MAJOR + 1))) << e;
}

TEST(ValidatePlugin, NewerMinorIsAccepted) {
  Desc desc;
  desc.d.abi_minor = CFX_ABI_MINOR + 1;
  LoadedPlugin out;
  EXPECT_NO_THROW(conflux::validate_plugin(desc.get(), kFile, out));
}

TEST(ValidatePlugin, BadId) {
  Desc desc;
  desc.d.id = "Bad-Id";
  EXPECT_TRUE(contains(rejection(desc), "id must match"));
  desc.d.id = "";
  EXPECT_TRUE(contains(rejection(desc), "id must match"));
  desc.d.id = nullptr;
  EXPECT_TRUE(contains(rejection(desc), "id must match"));
}

TEST(ValidatePlugin, MissingVersionOrCallbacks) {
  Desc a;
  a.d.version = nullptr;
  EXPECT_TRUE(contains(rejection(a), "version"));
  Desc b;
  b.d.create = nullptr;
  EXPECT_TRUE(contains(rejection(b), "create"));
}

TEST(ValidatePlugin, MinModelsZero) {
  Desc desc;
  desc.d.min_models = 0;
  EXPECT_TRUE(contains(rejection(desc), "min_models"));
}

TEST(ValidatePlugin, MaxBelowMin) {
  Desc desc;
  desc.d.min_models = 3;
  desc.d.max_models = 2;
  EXPECT_TRUE(contains(rejection(desc), "max_models is below min_models"));
}

TEST(ValidatePlugin, PassCountZero) {
  Desc desc;
  desc.passes.clear();
  EXPECT_TRUE(contains(rejection(desc), "pass_count"));
}

TEST(ValidatePlugin, MapNotLast) {
  Desc desc;
  desc.passes = {map_pass(), reduce_pass()};
  EXPECT_TRUE(contains(rejection(desc), "map pass, the last one"));
}

TEST(ValidatePlugin, TwoMaps) {
  Desc desc;
  desc.passes = {map_pass(), map_pass()};
  EXPECT_TRUE(contains(rejection(desc), "exactly one map pass"));
}

TEST(ValidatePlugin, ReducePassWithoutCombine) {
  Desc desc;
  desc.passes[0].combine = nullptr;
  EXPECT_TRUE(contains(rejection(desc), "combine"));
}

TEST(ValidatePlugin, ReducePassWithoutStatsSize) {
  Desc desc;
  desc.passes[0].stats_size = 0;
  EXPECT_TRUE(contains(rejection(desc), "stats_size"));
}

TEST(ValidatePlugin, PassStructSizeTooSmall) {
  Desc desc;
  desc.passes[0].struct_size = 8;
  EXPECT_TRUE(contains(rejection(desc), "pass struct_size 8"));
}

TEST(ValidatePlugin, TaskVectorsNeedABase) {
  Desc desc;
  desc.d.base = CFX_BASE_UNUSED;
  desc.passes = {map_pass(CFX_PASS_TASK_VECTORS)};
  EXPECT_TRUE(contains(rejection(desc), "need a base"));
  desc.passes = {map_pass(CFX_PASS_OUTPUT_DELTA)};
  EXPECT_TRUE(contains(rejection(desc), "need a base"));
  desc.d.base = CFX_BASE_REQUIRED;
  LoadedPlugin out;
  EXPECT_NO_THROW(conflux::validate_plugin(desc.get(), kFile, out));
}

// ABI 1.2: stored BF16 inputs reach the plugin as they are, so the host cannot form task vectors
// from them nor add a float32 base to a delta: either combination is refused, naming the pass.
TEST(ValidatePlugin, Bf16InputsExcludeTaskVectorsAndDeltaOutput) {
  Desc desc;
  desc.d.base = CFX_BASE_REQUIRED;
  for (const std::uint32_t other : {std::uint32_t{CFX_PASS_TASK_VECTORS}, std::uint32_t{CFX_PASS_OUTPUT_DELTA}}) {
    SCOPED_TRACE(other);
    desc.passes = {reduce_pass(), map_pass(CFX_PASS_BF16_INPUTS | other)};
    const std::string e = rejection(desc);
    EXPECT_TRUE(contains(e, "pass 1:")) << e;
    EXPECT_TRUE(contains(e, "BF16")) << e;
    EXPECT_TRUE(contains(e, other == CFX_PASS_TASK_VECTORS ? "task vectors" : "delta output")) << e;
  }
  // A reduce pass too (pass 0), the map pass being fine.
  desc.passes = {reduce_pass(CFX_PASS_BF16_INPUTS | CFX_PASS_TASK_VECTORS), map_pass(CFX_PASS_BF16_INPUTS)};
  const std::string e = rejection(desc);
  EXPECT_TRUE(contains(e, "pass 0:")) << e;
  EXPECT_TRUE(contains(e, "BF16")) << e;
}

TEST(ValidatePlugin, Bf16InputsAloneAreAccepted) {
  for (const cfx_base_use base : {CFX_BASE_UNUSED, CFX_BASE_OPTIONAL, CFX_BASE_REQUIRED}) {
    SCOPED_TRACE(base);
    Desc desc;
    desc.d.base = base;
    desc.passes = {reduce_pass(CFX_PASS_BF16_INPUTS), map_pass(CFX_PASS_BF16_INPUTS | CFX_PASS_WHOLE_ROWS)};
    LoadedPlugin out;
    ASSERT_NO_THROW(conflux::validate_plugin(desc.get(), kFile, out));
    ASSERT_EQ(out.passes.size(), 2u);
    EXPECT_EQ(out.passes[0].flags, std::uint32_t{CFX_PASS_BF16_INPUTS});
    EXPECT_EQ(out.passes[1].flags, std::uint32_t{CFX_PASS_BF16_INPUTS | CFX_PASS_WHOLE_ROWS});
  }
  // The flag after the last one (ABI 1.3's speculative output) is unknown.
  Desc desc;
  desc.passes = {reduce_pass(), map_pass(CFX_PASS_SPECULATIVE_OUTPUT << 1)};
  const std::string e = rejection(desc);
  EXPECT_TRUE(contains(e, "unknown flags " + std::to_string(CFX_PASS_SPECULATIVE_OUTPUT << 1))) << e;
}

TEST(ValidatePlugin, SpeculativeOutputOnlyFromATensorReduce) {
  {
    Desc desc;
    desc.passes = {reduce_pass(CFX_PASS_SPECULATIVE_OUTPUT | CFX_PASS_BF16_INPUTS), map_pass()};
    LoadedPlugin out;
    ASSERT_NO_THROW(conflux::validate_plugin(desc.get(), kFile, out));
    EXPECT_EQ(out.passes[0].flags, std::uint32_t{CFX_PASS_SPECULATIVE_OUTPUT | CFX_PASS_BF16_INPUTS});
  }
  {
    Desc desc;
    desc.passes = {reduce_pass(), map_pass(CFX_PASS_SPECULATIVE_OUTPUT)};
    const std::string e = rejection(desc);
    EXPECT_TRUE(contains(e, "pass 1:") && contains(e, "only a tensor-scope reduce pass")) << e;
  }
  {
    Desc desc;
    desc.passes = {reduce_pass(CFX_PASS_SPECULATIVE_OUTPUT), map_pass()};
    desc.passes[0].kind = CFX_PASS_MODEL_REDUCE;
    const std::string e = rejection(desc);
    EXPECT_TRUE(contains(e, "pass 0:") && contains(e, "only a tensor-scope reduce pass")) << e;
  }
  {
    Desc desc;
    desc.d.base = CFX_BASE_REQUIRED;
    desc.passes = {reduce_pass(CFX_PASS_SPECULATIVE_OUTPUT | CFX_PASS_TASK_VECTORS), map_pass()};
    const std::string e = rejection(desc);
    EXPECT_TRUE(contains(e, "pass 0:") && contains(e, "task vectors")) << e;
  }
}

TEST(ValidatePlugin, DeltaOutputOnlyFromAMap) {
  Desc desc;
  desc.passes[0].flags = CFX_PASS_OUTPUT_DELTA;
  EXPECT_TRUE(contains(rejection(desc), "only a map pass"));
}

TEST(ValidatePlugin, StringDefaultNotInChoices) {
  static const char* const choices[] = {"sum", "mean"};
  Desc desc;
  cfx_param_spec s = param(CFX_PARAM_STRING, "method", 0);
  s.choices = choices;
  s.choice_count = 2;
  s.default_string = "max";
  desc.params.push_back(s);
  const std::string e = rejection(desc);
  EXPECT_TRUE(contains(e, "parameter 'method'")) << e;
  EXPECT_TRUE(contains(e, "not one of its choices")) << e;
  desc.params.back().default_string = "mean";
  LoadedPlugin out;
  EXPECT_NO_THROW(conflux::validate_plugin(desc.get(), kFile, out));
}

TEST(ValidatePlugin, BoolDefaultNotZeroOrOne) {
  Desc desc;
  desc.params.push_back(param(CFX_PARAM_BOOL, "flag", 2));
  const std::string e = rejection(desc);
  EXPECT_TRUE(contains(e, "parameter 'flag'")) << e;
  EXPECT_TRUE(contains(e, "0 or 1")) << e;
}

TEST(ValidatePlugin, IntDefaultNotWhole) {
  Desc desc;
  desc.params.push_back(param(CFX_PARAM_INT, "k", 1.5));
  const std::string e = rejection(desc);
  EXPECT_TRUE(contains(e, "parameter 'k'")) << e;
  EXPECT_TRUE(contains(e, "whole")) << e;
}

TEST(ValidatePlugin, RangeMinAboveMax) {
  Desc desc;
  cfx_param_spec s = param(CFX_PARAM_FLOAT, "r", 0.5);
  s.flags = CFX_PARAM_HAS_MIN | CFX_PARAM_HAS_MAX;
  s.min = 1;
  s.max = 0;
  desc.params.push_back(s);
  const std::string e = rejection(desc);
  EXPECT_TRUE(contains(e, "parameter 'r'")) << e;
  EXPECT_TRUE(contains(e, "exceeds max")) << e;
}

TEST(ValidatePlugin, DefaultOutsideExclusiveRange) {
  Desc desc;
  cfx_param_spec s = param(CFX_PARAM_FLOAT, "density", 0);
  s.flags = CFX_PARAM_HAS_MIN | CFX_PARAM_MIN_EXCLUSIVE;
  s.min = 0;
  desc.params.push_back(s);
  EXPECT_TRUE(contains(rejection(desc), "outside its range"));
  desc.params.back().default_number = 0.1;
  LoadedPlugin out;
  EXPECT_NO_THROW(conflux::validate_plugin(desc.get(), kFile, out));
}

TEST(ValidatePlugin, RequiredParameterNeedsNoDefault) {
  Desc desc;
  cfx_param_spec s = param(CFX_PARAM_STRING, "path", 0);
  s.flags = CFX_PARAM_REQUIRED;
  desc.params.push_back(s);
  LoadedPlugin out;
  EXPECT_NO_THROW(conflux::validate_plugin(desc.get(), kFile, out));
}

TEST(ValidatePlugin, BadParameterNameAndDuplicates) {
  Desc a;
  a.params.push_back(param(CFX_PARAM_FLOAT, "1abc", 0));
  EXPECT_TRUE(contains(rejection(a), "name must match"));
  Desc b;
  b.params.push_back(param(CFX_PARAM_FLOAT, "alpha", 0));
  const std::string e = rejection(b);
  EXPECT_TRUE(contains(e, "parameter 'alpha'")) << e;
  EXPECT_TRUE(contains(e, "twice")) << e;
}

TEST(ValidatePlugin, RangeOnANonNumericType) {
  Desc desc;
  cfx_param_spec s = param(CFX_PARAM_BOOL, "flag", 0);
  s.flags = CFX_PARAM_HAS_MIN;
  desc.params.push_back(s);
  EXPECT_TRUE(contains(rejection(desc), "numeric"));
}

TEST(ValidatePlugin, ParamStructSizeTooSmall) {
  Desc desc;
  desc.params[0].struct_size = 8;
  EXPECT_TRUE(contains(rejection(desc), "parameter struct_size 8"));
}

// A plugin built against a future minor version: larger structs with unknown trailing fields.
// The host reads its own prefix of each element, stepping by the plugin's stride.
TEST(ValidatePlugin, LargerStructsFromANewerMinor) {
  struct BigParam {
    cfx_param_spec spec;
    double future;
  };
  struct BigPass {
    cfx_pass pass;
    void* future;
  };
  struct BigPlugin {
    cfx_plugin plugin;
    void* future;
  };
  BigParam params[2]{};
  params[0].spec = param(CFX_PARAM_FLOAT, "alpha", 0.5);
  params[1].spec = param(CFX_PARAM_INT, "k", 3);
  params[0].future = params[1].future = 42;
  for (auto& p : params) p.spec.struct_size = sizeof(BigParam);
  BigPass passes[2]{};
  passes[0].pass = reduce_pass();
  passes[1].pass = map_pass();
  for (auto& p : passes) p.pass.struct_size = sizeof(BigPass);
  BigPlugin big{};
  Desc base;
  big.plugin = *base.get();
  big.plugin.struct_size = sizeof(BigPlugin);
  big.plugin.abi_minor = CFX_ABI_MINOR + 1;
  big.plugin.param_count = 2;
  big.plugin.params = &params[0].spec;
  big.plugin.pass_count = 2;
  big.plugin.passes = &passes[0].pass;
  LoadedPlugin out;
  ASSERT_NO_THROW(conflux::validate_plugin(&big.plugin, kFile, out));
  ASSERT_EQ(out.params.size(), 2u);
  EXPECT_STREQ(out.params[1].name, "k");
  EXPECT_EQ(out.params[1].default_number, 3.0);
  EXPECT_EQ(out.params[1].struct_size, sizeof(cfx_param_spec));
  ASSERT_EQ(out.passes.size(), 2u);
  EXPECT_EQ(out.passes[1].kind, CFX_PASS_MAP);
  EXPECT_EQ(out.desc.struct_size, sizeof(cfx_plugin));
}

}  // namespace
