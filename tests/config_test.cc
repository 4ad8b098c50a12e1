// Tests of the TOML job configuration (include/conflux/config.h, daemon/core/config.cc) and of the
// binding of [job.params] to a plugin's parameter schema (include/conflux/params.h,
// daemon/core/params.cc): every accepted form, every default and every error path. Errors must be
// a conflux::ConfigError whose one-line message names the file, the job, the key and the line.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <boost/json.hpp>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <filesystem>
#include <initializer_list>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "conflux/config.h"
#include "conflux/dtype.h"
#include "conflux/params.h"
#include "conflux/plugin.h"
#include "conflux/plugin_registry.h"
#include "test_util.h"

namespace {

namespace fs = std::filesystem;
namespace json = boost::json;
using conflux::Config;
using conflux::ConfigError;
using conflux::DType;
using conflux::JobConfig;
using conflux::LoadedPlugin;
using conflux::ParamSet;
using conflux::RawParam;
using conflux_test::TempDir;
using conflux_test::write_file;
using std::chrono::milliseconds;
using ::testing::HasSubstr;
using ::testing::Not;

const fs::path kFile = "/cfg/job.toml";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

// Runs f, expects a ConfigError and returns its message ("" after recording a failure otherwise).
template <class F>
std::string config_error_of(F&& f) {
  try {
    std::forward<F>(f)();
  } catch (const ConfigError& e) {
    return e.what();
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected conflux::ConfigError, got another exception: " << e.what();
    return {};
  }
  ADD_FAILURE() << "expected conflux::ConfigError, nothing was thrown";
  return {};
}

std::string config_error(std::string_view text, const fs::path& file = kFile) {
  SCOPED_TRACE(std::string("config text:\n") + std::string(text));
  return config_error_of([&] { (void)conflux::parse_config(text, file); });
}

// Every part must occur in the message.
void expect_mentions(const std::string& msg, std::initializer_list<std::string> parts) {
  for (const auto& part : parts) EXPECT_THAT(msg, HasSubstr(part));
}

// A message is one line for a user's terminal.
void expect_one_line(const std::string& msg) { EXPECT_EQ(msg.find('\n'), std::string::npos) << msg; }

std::string at_line(int line) { return kFile.string() + ":" + std::to_string(line); }

// A valid job named 'agents' (strategy "ram", two absolute models, an output), with the key `omit`
// left out and `extra` appended as the job's last line. `line` is the number of that last line.
struct JobText {
  std::string text;
  int line;
};

JobText job_text(std::string_view omit = {}, std::string_view extra = {}) {
  static const std::pair<std::string_view, std::string_view> kHead[] = {
      {"name", "name = \"agents\""},
      {"strategy", "strategy = \"ram\""},
      {"models", "models = [\"/m/a\", \"/m/b\"]"},
      {"output", "output = \"/out/agents\""},
  };
  std::string t = "[[job]]\n";
  int line = 1;
  for (const auto& [key, text] : kHead) {
    if (key == omit) continue;
    t.append(text);
    t += '\n';
    ++line;
  }
  if (!extra.empty()) {
    t.append(extra);
    t += '\n';
    ++line;
  }
  return {t, line};
}

Config parse_ok(std::string_view text, const fs::path& file = kFile) {
  try {
    return conflux::parse_config(text, file);
  } catch (const std::exception& e) {
    ADD_FAILURE() << "parse_config threw: " << e.what() << "\nconfig text:\n" << text;
    throw;
  }
}

JobConfig job_ok(std::string_view extra) {
  Config c = parse_ok(job_text({}, extra).text);
  EXPECT_EQ(c.jobs.size(), 1u);
  return c.jobs.at(0);
}

const RawParam* find_param(const JobConfig& j, std::string_view key) {
  for (const auto& p : j.params)
    if (p.key == key) return &p;
  return nullptr;
}

// ---------------------------------------------------------------------------------------------
// Accepted forms
// ---------------------------------------------------------------------------------------------

// The example of ARCHITECTURE §3 verbatim, plus the daemon-only job keys.
constexpr std::string_view kArchitectureExample = R"toml([daemon]
control_socket = "/run/conflux/control.sock"
state_dir      = "/var/lib/conflux"
plugin_dirs    = ["/usr/lib/conflux/plugins"]   # searched after CONFLUX_PLUGIN_PATH
threads        = 0                               # 0 = all cores

[[job]]
name       = "agents"               # [A-Za-z0-9_.-]+, unique
strategy   = "ram"                  # a plugin id
base       = "/models/base"         # checkpoint directory (strategies that need no base may omit it)
models     = ["/ckpt/coder", "/ckpt/tool", "/ckpt/memory"]
output     = "/models/merged/agents"
out_dtype  = "bf16"                 # bf16 | f16 | f32; default: the base's dtype
shard_size = "5GB"                  # largest output shard; default 5GB
threads    = 0
seed       = 0                      # for stochastic strategies (DARE, DELLA, IMM with drop)
trigger      = "manual"
settle       = "30s"
ready_marker = "DONE"
output_name  = "v{n}-{checkpoint}-{time}"
keep         = 5
memory_limit = "8GB"
[job.params]                        # strategy parameters, validated against the plugin's schema
r = 0.1
alpha = 2.0
)toml";

TEST(ConfigAccept, ArchitectureExampleWithEveryKey) {
  const Config c = parse_ok(kArchitectureExample);
  EXPECT_EQ(c.file.string(), kFile.string());
  EXPECT_TRUE(c.has_daemon_table);
  EXPECT_EQ(c.daemon.control_socket.string(), "/run/conflux/control.sock");
  EXPECT_EQ(c.daemon.state_dir.string(), "/var/lib/conflux");
  ASSERT_EQ(c.daemon.plugin_dirs.size(), 1u);
  EXPECT_EQ(c.daemon.plugin_dirs[0].string(), "/usr/lib/conflux/plugins");
  EXPECT_EQ(c.daemon.threads, 0u);
  EXPECT_EQ(c.daemon.rescan, milliseconds(30'000));
  EXPECT_EQ(c.daemon.max_parallel_jobs, 1u);
  EXPECT_EQ(c.daemon.socket_group, "");

  ASSERT_EQ(c.jobs.size(), 1u);
  const JobConfig& j = c.jobs[0];
  EXPECT_EQ(j.name, "agents");
  EXPECT_EQ(j.line, 7);
  EXPECT_EQ(j.strategy, "ram");
  ASSERT_TRUE(j.base.has_value());
  EXPECT_EQ(j.base->string(), "/models/base");
  ASSERT_EQ(j.models.size(), 3u);
  EXPECT_EQ(j.models[0].string(), "/ckpt/coder");
  EXPECT_EQ(j.models[1].string(), "/ckpt/tool");
  EXPECT_EQ(j.models[2].string(), "/ckpt/memory");
  EXPECT_EQ(j.output.string(), "/models/merged/agents");
  EXPECT_EQ(j.out_dtype, std::optional<DType>(DType::BF16));
  EXPECT_EQ(j.shard_size, 5'000'000'000u);
  EXPECT_EQ(j.threads, 0u);
  EXPECT_EQ(j.seed, 0u);
  EXPECT_EQ(j.trigger, "manual");
  EXPECT_EQ(j.settle, milliseconds(30'000));
  EXPECT_EQ(j.ready_marker, "DONE");
  EXPECT_EQ(j.output_name, "v{n}-{checkpoint}-{time}");
  EXPECT_EQ(j.keep, std::optional<std::uint64_t>(5));
  EXPECT_EQ(j.memory_limit, std::optional<std::uint64_t>(8'000'000'000u));

  ASSERT_EQ(j.params.size(), 2u);
  const RawParam* r = find_param(j, "r");
  const RawParam* alpha = find_param(j, "alpha");
  ASSERT_NE(r, nullptr);
  ASSERT_NE(alpha, nullptr);
  EXPECT_EQ(r->kind, RawParam::Kind::floating);
  EXPECT_DOUBLE_EQ(r->number, 0.1);
  EXPECT_EQ(r->line, 24);
  EXPECT_EQ(alpha->kind, RawParam::Kind::floating);
  EXPECT_DOUBLE_EQ(alpha->number, 2.0);
  EXPECT_EQ(alpha->line, 25);

  EXPECT_EQ(&c.job("agents"), &c.jobs[0]);
}

TEST(ConfigAccept, DefaultsWhenKeysAreAbsent) {
  const Config c = parse_ok(job_text().text);
  EXPECT_FALSE(c.has_daemon_table);
  // daemon defaults
  EXPECT_EQ(c.daemon.control_socket.string(), "/run/conflux/control.sock");
  EXPECT_EQ(c.daemon.state_dir.string(), "/var/lib/conflux");
  EXPECT_TRUE(c.daemon.plugin_dirs.empty());
  EXPECT_EQ(c.daemon.threads, 0u);
  EXPECT_EQ(c.daemon.rescan, milliseconds(30'000));
  EXPECT_EQ(c.daemon.max_parallel_jobs, 1u);
  EXPECT_EQ(c.daemon.socket_group, "");
  // job defaults
  ASSERT_EQ(c.jobs.size(), 1u);
  const JobConfig& j = c.jobs[0];
  EXPECT_EQ(j.line, 1);
  EXPECT_FALSE(j.base.has_value());
  EXPECT_FALSE(j.out_dtype.has_value());
  EXPECT_EQ(j.shard_size, 5'000'000'000u);
  EXPECT_EQ(j.threads, 0u);
  EXPECT_EQ(j.seed, 0u);
  EXPECT_TRUE(j.params.empty());
  EXPECT_EQ(j.trigger, "watch");
  EXPECT_EQ(j.settle, milliseconds(10'000));
  EXPECT_EQ(j.ready_marker, "");
  EXPECT_EQ(j.output_name, "{n}");
  EXPECT_FALSE(j.keep.has_value());
  EXPECT_FALSE(j.memory_limit.has_value());
}

TEST(ConfigAccept, DaemonTableWithEveryKey) {
  const Config c = parse_ok(R"toml([daemon]
control_socket    = "/run/x/ctl.sock"
state_dir         = "/srv/state"
plugin_dirs       = ["/p/one", "/p/two"]
threads           = 8
rescan            = "5s"
max_parallel_jobs = 4
socket_group      = "conflux"
)toml");
  EXPECT_TRUE(c.has_daemon_table);
  EXPECT_TRUE(c.jobs.empty());
  EXPECT_EQ(c.daemon.control_socket.string(), "/run/x/ctl.sock");
  EXPECT_EQ(c.daemon.state_dir.string(), "/srv/state");
  ASSERT_EQ(c.daemon.plugin_dirs.size(), 2u);
  EXPECT_EQ(c.daemon.plugin_dirs[0].string(), "/p/one");
  EXPECT_EQ(c.daemon.plugin_dirs[1].string(), "/p/two");
  EXPECT_EQ(c.daemon.threads, 8u);
  EXPECT_EQ(c.daemon.rescan, milliseconds(5'000));
  EXPECT_EQ(c.daemon.max_parallel_jobs, 4u);
  EXPECT_EQ(c.daemon.socket_group, "conflux");
}

TEST(ConfigAccept, DaemonRescanForms) {
  const std::pair<std::string_view, milliseconds> cases[] = {
      {"\"100ms\"", milliseconds(100)},  // the smallest allowed
      {"\"2m\"", milliseconds(120'000)},
      {"60", milliseconds(60'000)},      // integer seconds
      {"0.5", milliseconds(500)},        // float seconds
  };
  for (const auto& [value, expected] : cases) {
    SCOPED_TRACE(std::string(value));
    const Config c = parse_ok("[daemon]\nrescan = " + std::string(value) + "\n");
    EXPECT_EQ(c.daemon.rescan, expected);
  }
}

TEST(ConfigAccept, RelativePathsResolveAgainstTheConfigDirectory) {
  const Config c = parse_ok(R"toml([daemon]
control_socket = "run/ctl.sock"
state_dir      = "state"
plugin_dirs    = ["plugins", "/abs/plugins"]

[[job]]
name     = "rel"
strategy = "linear"
base     = "base"
models   = ["ckpt/a", "./b", "../shared/c", "/abs/d"]
output   = "out/rel"
)toml");
  EXPECT_EQ(c.daemon.control_socket.string(), "/cfg/run/ctl.sock");
  EXPECT_EQ(c.daemon.state_dir.string(), "/cfg/state");
  ASSERT_EQ(c.daemon.plugin_dirs.size(), 2u);
  EXPECT_EQ(c.daemon.plugin_dirs[0].string(), "/cfg/plugins");
  EXPECT_EQ(c.daemon.plugin_dirs[1].string(), "/abs/plugins");
  const JobConfig& j = c.job("rel");
  ASSERT_TRUE(j.base.has_value());
  EXPECT_EQ(j.base->string(), "/cfg/base");
  ASSERT_EQ(j.models.size(), 4u);
  EXPECT_EQ(j.models[0].string(), "/cfg/ckpt/a");
  EXPECT_EQ(j.models[1].string(), "/cfg/b");
  EXPECT_EQ(j.models[2].string(), "/shared/c");
  EXPECT_EQ(j.models[3].string(), "/abs/d");
  EXPECT_EQ(j.output.string(), "/cfg/out/rel");
  for (const auto& m : j.models) EXPECT_TRUE(m.is_absolute()) << m.string();
}

TEST(ConfigAccept, ConfigNamedWithoutDirectoryAnchorsAtTheCurrentDirectory) {
  const Config c = parse_ok(job_text("models", "models = [\"ckpt\"]").text, "job.toml");
  ASSERT_EQ(c.jobs.size(), 1u);
  ASSERT_EQ(c.jobs[0].models.size(), 1u);
  EXPECT_EQ(c.jobs[0].models[0].string(), (fs::current_path() / "ckpt").lexically_normal().string());
}

TEST(ConfigAccept, OutDtypeNamesAndAliases) {
  const std::pair<std::string_view, DType> cases[] = {
      {"bf16", DType::BF16},     {"f16", DType::F16},         {"f32", DType::F32},
      {"bfloat16", DType::BF16}, {"float16", DType::F16},     {"float32", DType::F32},
  };
  for (const auto& [text, expected] : cases) {
    SCOPED_TRACE(std::string(text));
    const JobConfig j = job_ok("out_dtype = \"" + std::string(text) + "\"");
    EXPECT_EQ(j.out_dtype, std::optional<DType>(expected));
    EXPECT_EQ(conflux::parse_out_dtype(text), std::optional<DType>(expected));
  }
  EXPECT_EQ(conflux::parse_out_dtype("fp8"), std::nullopt);
  EXPECT_EQ(conflux::parse_out_dtype(""), std::nullopt);
  EXPECT_EQ(conflux::parse_out_dtype("f64"), std::nullopt);
}

TEST(ConfigAccept, ShardSizeForms) {
  const std::pair<std::string_view, std::uint64_t> cases[] = {
      {"\"5GB\"", 5'000'000'000u},
      {"\"500MB\"", 500'000'000u},
      {"\"1.5GB\"", 1'500'000'000u},
      {"\"2GiB\"", 2ull << 30},
      {"123456789", 123'456'789u},  // integer bytes
      {"1", 1u},
  };
  for (const auto& [value, expected] : cases) {
    SCOPED_TRACE(std::string(value));
    EXPECT_EQ(job_ok("shard_size = " + std::string(value)).shard_size, expected);
  }
}

TEST(ConfigAccept, MemoryLimitForms) {
  EXPECT_EQ(job_ok("memory_limit = \"16GB\"").memory_limit, std::optional<std::uint64_t>(16'000'000'000u));
  EXPECT_EQ(job_ok("memory_limit = \"512MiB\"").memory_limit, std::optional<std::uint64_t>(512ull << 20));
  EXPECT_EQ(job_ok("memory_limit = 1048576").memory_limit, std::optional<std::uint64_t>(1'048'576u));
}

TEST(ConfigAccept, SettleForms) {
  const std::pair<std::string_view, milliseconds> cases[] = {
      {"\"10s\"", milliseconds(10'000)}, {"\"500ms\"", milliseconds(500)},
      {"\"2m\"", milliseconds(120'000)}, {"\"1h\"", milliseconds(3'600'000)},
      {"\"1.5s\"", milliseconds(1'500)}, {"30", milliseconds(30'000)},  // integer seconds
      {"2.5", milliseconds(2'500)},      {"0", milliseconds(0)},
  };
  for (const auto& [value, expected] : cases) {
    SCOPED_TRACE(std::string(value));
    EXPECT_EQ(job_ok("settle = " + std::string(value)).settle, expected);
  }
}

TEST(ConfigAccept, ParseDuration) {
  EXPECT_EQ(conflux::parse_duration("10s"), milliseconds(10'000));
  EXPECT_EQ(conflux::parse_duration("500ms"), milliseconds(500));
  EXPECT_EQ(conflux::parse_duration("2m"), milliseconds(120'000));
  EXPECT_EQ(conflux::parse_duration("1h"), milliseconds(3'600'000));
  EXPECT_EQ(conflux::parse_duration("1.5s"), milliseconds(1'500));
  EXPECT_EQ(conflux::parse_duration("0.25s"), milliseconds(250));
  for (std::string_view bad : {"", "ten", "s", "10x", "-1s", "10 s", "1.2.3s", "ms"}) {
    SCOPED_TRACE(std::string(bad));
    EXPECT_THROW((void)conflux::parse_duration(bad), std::invalid_argument);
  }
}

TEST(ConfigAccept, TriggerValues) {
  EXPECT_EQ(job_ok("trigger = \"watch\"").trigger, "watch");
  EXPECT_EQ(job_ok("trigger = \"manual\"").trigger, "manual");
}

TEST(ConfigAccept, OutputNameTemplates) {
  for (std::string_view name : {"{n}", "{checkpoint}", "{time}", "v{n}-{checkpoint}-{time}", "merged", "run_{n}.x"}) {
    SCOPED_TRACE(std::string(name));
    EXPECT_EQ(job_ok("output_name = \"" + std::string(name) + "\"").output_name, name);
  }
}

TEST(ConfigAccept, ReadyMarkerKeepThreadsSeed) {
  EXPECT_EQ(job_ok("ready_marker = \"COMPLETE\"").ready_marker, "COMPLETE");
  EXPECT_EQ(job_ok("ready_marker = \".done\"").ready_marker, ".done");
  EXPECT_EQ(job_ok("keep = 1").keep, std::optional<std::uint64_t>(1));
  EXPECT_EQ(job_ok("keep = 12").keep, std::optional<std::uint64_t>(12));
  EXPECT_EQ(job_ok("threads = 16").threads, 16u);
  EXPECT_EQ(job_ok("seed = 12345678901").seed, 12'345'678'901u);
  EXPECT_EQ(job_ok("seed = 9223372036854775807").seed, 9'223'372'036'854'775'807u);
}

TEST(ConfigAccept, ValidJobNames) {
  for (std::string_view name : {"agents", "A-z_0.9", "x", "1", "a..b", "-lead"}) {
    SCOPED_TRACE(std::string(name));
    const JobText t = job_text("name", "name = \"" + std::string(name) + "\"");
    const Config c = parse_ok(t.text);
    ASSERT_EQ(c.jobs.size(), 1u);
    EXPECT_EQ(c.jobs[0].name, name);
  }
}

TEST(ConfigAccept, SeveralJobs) {
  const Config c = parse_ok(R"toml([[job]]
name = "first"
strategy = "linear"
models = ["/m/a"]
output = "/out/first"

[[job]]
name = "second"
strategy = "ties"
base = "/m/base"
models = ["/m/a", "/m/b"]
output = "/out/second"
out_dtype = "f32"
[job.params]
density = 0.5

[[job]]
name = "third"
strategy = "slerp"
models = ["/m/c", "/m/d"]
output = "/out/third"
params = { t = 0.3 }
)toml");
  ASSERT_EQ(c.jobs.size(), 3u);
  EXPECT_EQ(c.jobs[0].name, "first");
  EXPECT_EQ(c.jobs[1].name, "second");
  EXPECT_EQ(c.jobs[2].name, "third");
  EXPECT_EQ(c.jobs[0].line, 1);
  EXPECT_EQ(c.jobs[1].line, 7);
  EXPECT_EQ(c.jobs[2].line, 17);
  EXPECT_EQ(c.jobs[0].strategy, "linear");
  EXPECT_EQ(c.jobs[1].strategy, "ties");
  EXPECT_EQ(c.jobs[2].strategy, "slerp");
  EXPECT_TRUE(c.jobs[0].params.empty());
  EXPECT_FALSE(c.jobs[0].out_dtype.has_value());
  EXPECT_EQ(c.jobs[1].out_dtype, std::optional<DType>(DType::F32));
  ASSERT_EQ(c.jobs[1].params.size(), 1u);
  EXPECT_EQ(c.jobs[1].params[0].key, "density");
  EXPECT_EQ(c.jobs[1].params[0].line, 15);
  ASSERT_EQ(c.jobs[2].params.size(), 1u);
  EXPECT_EQ(c.jobs[2].params[0].key, "t");
  EXPECT_DOUBLE_EQ(c.jobs[2].params[0].number, 0.3);
  EXPECT_EQ(c.job("second").output.string(), "/out/second");
  EXPECT_EQ(&c.job("third"), &c.jobs[2]);
}

TEST(ConfigAccept, RawParamKinds) {
  const JobText t = job_text({}, R"toml([job.params]
f = 0.25
i = -7
b = true
s = "tensor"
l = [1, 2.5, -3]
mixed = [1, "x"]
empty = []
sub = { a = 1 })toml");
  const Config c = parse_ok(t.text);
  const JobConfig& j = c.jobs.at(0);
  ASSERT_EQ(j.params.size(), 8u);

  const RawParam* f = find_param(j, "f");
  ASSERT_NE(f, nullptr);
  EXPECT_EQ(f->kind, RawParam::Kind::floating);
  EXPECT_DOUBLE_EQ(f->number, 0.25);
  EXPECT_EQ(f->line, 7);

  const RawParam* i = find_param(j, "i");
  ASSERT_NE(i, nullptr);
  EXPECT_EQ(i->kind, RawParam::Kind::integer);
  EXPECT_EQ(i->integer, -7);
  EXPECT_DOUBLE_EQ(i->number, -7.0);
  EXPECT_EQ(i->line, 8);

  const RawParam* b = find_param(j, "b");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->kind, RawParam::Kind::boolean);
  EXPECT_DOUBLE_EQ(b->number, 1.0);

  const RawParam* s = find_param(j, "s");
  ASSERT_NE(s, nullptr);
  EXPECT_EQ(s->kind, RawParam::Kind::string);
  EXPECT_EQ(s->string, "tensor");

  const RawParam* l = find_param(j, "l");
  ASSERT_NE(l, nullptr);
  EXPECT_EQ(l->kind, RawParam::Kind::array);
  EXPECT_TRUE(l->list_numeric);
  EXPECT_EQ(l->list, (std::vector<double>{1.0, 2.5, -3.0}));
  EXPECT_EQ(l->line, 11);

  const RawParam* mixed = find_param(j, "mixed");
  ASSERT_NE(mixed, nullptr);
  EXPECT_EQ(mixed->kind, RawParam::Kind::array);
  EXPECT_FALSE(mixed->list_numeric);

  const RawParam* empty = find_param(j, "empty");
  ASSERT_NE(empty, nullptr);
  EXPECT_EQ(empty->kind, RawParam::Kind::array);
  EXPECT_TRUE(empty->list_numeric);
  EXPECT_TRUE(empty->list.empty());

  const RawParam* sub = find_param(j, "sub");
  ASSERT_NE(sub, nullptr);
  EXPECT_EQ(sub->kind, RawParam::Kind::other);
}

TEST(ConfigAccept, LoadConfigFromFileResolvesAgainstItsDirectory) {
  TempDir dir;
  fs::create_directories(dir / "etc");
  const fs::path file = dir / "etc" / "merge.toml";
  write_file(file, "[[job]]\nname = \"j\"\nstrategy = \"linear\"\nmodels = [\"../ckpt/a\", \"b\"]\noutput = \"out\"\n");
  const Config c = conflux::load_config(file);
  EXPECT_EQ(c.file.string(), file.string());
  ASSERT_EQ(c.jobs.size(), 1u);
  const JobConfig& j = c.jobs[0];
  ASSERT_EQ(j.models.size(), 2u);
  EXPECT_EQ(j.models[0].string(), (dir.path() / "ckpt" / "a").lexically_normal().string());
  EXPECT_EQ(j.models[1].string(), (dir.path() / "etc" / "b").lexically_normal().string());
  EXPECT_EQ(j.output.string(), (dir.path() / "etc" / "out").lexically_normal().string());
}

// `conflux status --config`: the socket of a configuration that no longer checks (a running
// daemon keeps the one it loaded), but not of a file that is not TOML or names it wrongly.
TEST(ConfigAccept, ControlSocketOfAnEditedConfiguration) {
  TempDir dir;
  const fs::path file = dir / "confluxd.toml";
  write_file(file, "[daemon]\ncontrol_socket = \"run/c.sock\"\n[[job]]\nname = \"j\"\nstrategy = \"linear\"\n"
                   "models = [\"a\"]\noutput = \"out\"\n");
  const fs::path expected = (dir.path() / "run" / "c.sock").lexically_normal();
  EXPECT_EQ(conflux::control_socket_of(file), expected);
  write_file(file, "[daemon]\ncontrol_socket = \"run/c.sock\"\nthreads = -3\n[[job]]\nname = \"j\"\n");  // fails its checks
  EXPECT_EQ(conflux::control_socket_of(file), expected);
  write_file(file, "[[job]]\nname = \"j\"\n");
  EXPECT_EQ(conflux::control_socket_of(file), conflux::DaemonConfig{}.control_socket);
  write_file(file, "[daemon]\ncontrol_socket = 3\nthreads = -3\n");
  expect_mentions(config_error_of([&] { (void)conflux::control_socket_of(file); }), {file.string(), "control_socket"});
  write_file(file, "[daemon\ncontrol_socket = \"x\"\n");
  expect_mentions(config_error_of([&] { (void)conflux::control_socket_of(file); }), {file.string(), "TOML"});
}

// ---------------------------------------------------------------------------------------------
// File-level and top-level errors
// ---------------------------------------------------------------------------------------------

TEST(ConfigReject, MissingFileIsNamed) {
  TempDir dir;
  const fs::path file = dir / "does-not-exist.toml";
  const std::string msg = config_error_of([&] { (void)conflux::load_config(file); });
  expect_mentions(msg, {file.string()});
  expect_one_line(msg);
}

TEST(ConfigReject, LoadConfigErrorsNameTheRealFileAndLine) {
  TempDir dir;
  const fs::path file = dir / "bad.toml";
  write_file(file, job_text({}, "out_dtype = \"fp8\"").text);
  const std::string msg = config_error_of([&] { (void)conflux::load_config(file); });
  expect_mentions(msg, {file.string() + ":6", "job 'agents'", "key 'out_dtype'", "fp8"});
}

TEST(ConfigReject, NotTomlNamesFileAndLine) {
  const std::string msg = config_error("[[job]]\nname = \"a\"\nstrategy = = \"x\"\n");
  expect_mentions(msg, {at_line(3), "TOML"});
  expect_one_line(msg);

  const std::string msg2 = config_error("# comment\n\n[daemon\n");
  expect_mentions(msg2, {at_line(3), "TOML"});

  // a key defined twice is a TOML error too
  const std::string msg3 = config_error("[daemon]\nthreads = 1\nthreads = 2\n");
  expect_mentions(msg3, {at_line(3), "TOML"});
}

TEST(ConfigReject, UnknownTopLevelKey) {
  const std::string msg1 = config_error("title = \"x\"\n" + job_text().text);
  expect_mentions(msg1, {at_line(1), "key 'title'", "unknown top-level key"});
  expect_one_line(msg1);

  const std::string msg2 = config_error("[jobs]\nname = \"a\"\n");
  expect_mentions(msg2, {at_line(1), "key 'jobs'", "unknown top-level key"});
}

TEST(ConfigReject, JobNotAnArrayOfTables) {
  const std::string msg = config_error("[job]\nname = \"a\"\nstrategy = \"x\"\nmodels = [\"/a\"]\noutput = \"/o\"\n");
  expect_mentions(msg, {at_line(1), "key 'job'", "[[job]]"});

  const std::string msg2 = config_error("job = 3\n");
  expect_mentions(msg2, {at_line(1), "key 'job'", "[[job]]"});

  const std::string msg3 = config_error("job = [1, 2]\n");
  expect_mentions(msg3, {at_line(1), "key 'job'", "[[job]]"});
}

TEST(ConfigReject, DaemonNotATable) {
  const std::string msg = config_error("daemon = 1\n");
  expect_mentions(msg, {at_line(1), "key 'daemon'", "table"});

  const std::string msg2 = config_error("\n[[daemon]]\nthreads = 1\n");
  expect_mentions(msg2, {at_line(2), "key 'daemon'", "table"});
}

TEST(ConfigReject, UnknownDaemonKey) {
  const std::string msg = config_error("[daemon]\nsocket = \"/x\"\n");
  expect_mentions(msg, {at_line(2), "key 'daemon.socket'", "unknown key", "control_socket"});
  EXPECT_THAT(msg, Not(HasSubstr("job '")));
  expect_one_line(msg);
}

struct BadValue {
  std::string_view line;      // the offending line (key = value)
  std::string_view key;       // as the message names it
  std::string_view fragment;  // part of the explanation
};

TEST(ConfigReject, DaemonKeysWrongTypeOrRange) {
  const BadValue cases[] = {
      {"control_socket = 1", "daemon.control_socket", "must be a string"},
      {"control_socket = \"\"", "daemon.control_socket", "must not be empty"},
      {"state_dir = true", "daemon.state_dir", "must be a string"},
      {"state_dir = \"\"", "daemon.state_dir", "must not be empty"},
      {"plugin_dirs = \"/p\"", "daemon.plugin_dirs", "must be an array"},
      {"plugin_dirs = [1]", "daemon.plugin_dirs", "must be a string"},
      {"plugin_dirs = [\"/p\", \"\"]", "daemon.plugin_dirs", "must not be empty"},
      {"threads = \"4\"", "daemon.threads", "must be an integer"},
      {"threads = 1.5", "daemon.threads", "must be an integer"},
      {"threads = -1", "daemon.threads", "at least 0"},
      {"rescan = true", "daemon.rescan", "duration"},
      {"rescan = \"soon\"", "daemon.rescan", "invalid duration"},
      {"rescan = -1", "daemon.rescan", "duration"},
      {"rescan = \"99ms\"", "daemon.rescan", "at least 100ms"},
      {"rescan = 0.05", "daemon.rescan", "at least 100ms"},
      {"rescan = 0", "daemon.rescan", "at least 100ms"},
      {"max_parallel_jobs = 0", "daemon.max_parallel_jobs", "at least 1"},
      {"max_parallel_jobs = -3", "daemon.max_parallel_jobs", "at least 1"},
      {"max_parallel_jobs = \"2\"", "daemon.max_parallel_jobs", "must be an integer"},
      {"socket_group = 5", "daemon.socket_group", "must be a string"},
      {"socket_group = [\"g\"]", "daemon.socket_group", "must be a string"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(std::string(c.line));
    const std::string msg = config_error("[daemon]\n" + std::string(c.line) + "\n" + job_text().text);
    expect_mentions(msg, {at_line(2), "key '" + std::string(c.key) + "'", std::string(c.fragment)});
    EXPECT_THAT(msg, Not(HasSubstr("job '")));
    expect_one_line(msg);
  }
}

// Values that do not fit the field's type must not wrap around silently (an out-of-range value is
// an error, ARCHITECTURE §3).
TEST(ConfigReject, DaemonIntegersTooLargeForTheirField) {
  {
    // 2^32 would wrap to 0 in an unsigned field: "0 parallel jobs", which is rejected otherwise
    const std::string msg = config_error("[daemon]\nmax_parallel_jobs = 4294967296\n");
    expect_mentions(msg, {at_line(2), "key 'daemon.max_parallel_jobs'"});
  }
  {
    const std::string msg = config_error("[daemon]\nthreads = 4294967297\n");
    expect_mentions(msg, {at_line(2), "key 'daemon.threads'"});
  }
}

// ---------------------------------------------------------------------------------------------
// Job errors
// ---------------------------------------------------------------------------------------------

TEST(ConfigReject, JobWithoutName) {
  const JobText t = job_text("name");
  const std::string msg = config_error(t.text);
  expect_mentions(msg, {at_line(1), "key 'name'", "job #1", "no name"});
  expect_one_line(msg);

  // the second job lacks the name: its number and its line are given
  const std::string msg2 = config_error(job_text().text + "\n" + t.text);
  expect_mentions(msg2, {at_line(7), "key 'name'", "job #2"});
}

TEST(ConfigReject, InvalidJobNames) {
  for (std::string_view name : {"a b", "../x", "", "a/b", ".", "..", "caf\xc3\xa9", "x!"}) {
    SCOPED_TRACE(std::string(name));
    const JobText t = job_text("name", "name = \"" + std::string(name) + "\"");
    const std::string msg = config_error(t.text);
    expect_mentions(msg, {at_line(t.line), "key 'name'", "\"" + std::string(name) + "\"", "[A-Za-z0-9_.-]+"});
    expect_one_line(msg);
  }
  // longer than the 128 characters a name may have
  const std::string long_name(129, 'a');
  const JobText t = job_text("name", "name = \"" + long_name + "\"");
  expect_mentions(config_error(t.text), {at_line(t.line), "key 'name'"});
  EXPECT_NO_THROW((void)conflux::parse_config(job_text("name", "name = \"" + std::string(128, 'a') + "\"").text, kFile));
}

TEST(ConfigReject, JobNameNotAString) {
  const JobText t = job_text("name", "name = 5");
  expect_mentions(config_error(t.text), {at_line(t.line), "key 'name'", "must be a string"});
}

TEST(ConfigReject, DuplicateJobNames) {
  const std::string text = job_text().text + "\n" + job_text().text;
  const std::string msg = config_error(text);
  expect_mentions(msg, {at_line(7), "job 'agents'", "key 'name'", "two jobs"});
  expect_one_line(msg);
}

TEST(ConfigReject, UnknownJobKey) {
  const JobText t = job_text({}, "modles = [\"/m/c\"]");
  const std::string msg = config_error(t.text);
  expect_mentions(msg, {at_line(t.line), "job 'agents'", "key 'modles'", "unknown key", "models"});
  expect_one_line(msg);

  // a misspelt sub-table is an unknown key as well
  const JobText t2 = job_text({}, "[job.param]\nr = 1");
  expect_mentions(config_error(t2.text), {"job 'agents'", "key 'param'", "unknown key"});
}

TEST(ConfigReject, MissingRequiredJobKeys) {
  for (std::string_view key : {"strategy", "models", "output"}) {
    SCOPED_TRACE(std::string(key));
    const std::string msg = config_error(job_text(key).text);
    expect_mentions(msg, {at_line(1), "job 'agents'", "key '" + std::string(key) + "'", "missing"});
    expect_one_line(msg);
  }
  // the line is the one of the job at fault
  std::string second = job_text("output").text;
  second.replace(second.find("agents"), 6, "broken");
  const std::string msg = config_error(job_text().text + "\n" + second);
  expect_mentions(msg, {at_line(7), "job 'broken'", "key 'output'", "missing"});
}

TEST(ConfigReject, JobKeysWrongTypeOrRange) {
  struct Case {
    std::string_view replaces;  // head key the line replaces (or empty: appended)
    BadValue bad;
  };
  const Case cases[] = {
      {"strategy", {"strategy = \"\"", "strategy", "must not be empty"}},
      {"strategy", {"strategy = 1", "strategy", "must be a string"}},
      {"models", {"models = []", "models", "at least one"}},
      {"models", {"models = \"/m/a\"", "models", "must be an array"}},
      {"models", {"models = { a = \"/m/a\" }", "models", "must be an array"}},
      {"models", {"models = [\"/m/a\", 3]", "models", "must be a string"}},
      {"models", {"models = [\"/m/a\", [\"/m/b\"]]", "models", "must be a string"}},
      {"models", {"models = [\"/m/a\", \"\"]", "models", "must not be empty"}},
      {"output", {"output = \"\"", "output", "must not be empty"}},
      {"output", {"output = [\"/o\"]", "output", "must be a string"}},
      {{}, {"base = 1", "base", "must be a string"}},
      {{}, {"base = [\"/b\"]", "base", "must be a string"}},
      {{}, {"base = \"\"", "base", "must not be empty"}},
      {{}, {"out_dtype = \"fp8\"", "out_dtype", "\"fp8\""}},
      {{}, {"out_dtype = \"BF16x\"", "out_dtype", "bf16"}},
      {{}, {"out_dtype = 16", "out_dtype", "must be a string"}},
      {{}, {"shard_size = \"5XB\"", "shard_size", "5XB"}},
      {{}, {"shard_size = 0", "shard_size", "positive"}},
      {{}, {"shard_size = -1", "shard_size", "positive"}},
      {{}, {"shard_size = \"abc\"", "shard_size", "abc"}},
      {{}, {"shard_size = \"0GB\"", "shard_size", "positive"}},
      {{}, {"shard_size = 5.5", "shard_size", "5GB"}},
      {{}, {"shard_size = \"99999999999TB\"", "shard_size", "too large"}},
      {{}, {"threads = -1", "threads", "at least 0"}},
      {{}, {"threads = \"2\"", "threads", "must be an integer"}},
      {{}, {"threads = 2.0", "threads", "must be an integer"}},
      {{}, {"seed = -1", "seed", "at least 0"}},
      {{}, {"seed = 1.5", "seed", "must be an integer"}},
      {{}, {"seed = \"42\"", "seed", "must be an integer"}},
      {{}, {"trigger = \"sometimes\"", "trigger", "\"sometimes\""}},
      {{}, {"trigger = \"\"", "trigger", "\"watch\" or \"manual\""}},
      {{}, {"trigger = true", "trigger", "must be a string"}},
      {{}, {"settle = \"ten\"", "settle", "\"ten\""}},
      {{}, {"settle = \"10 seconds\"", "settle", "invalid duration"}},
      {{}, {"settle = -5", "settle", "duration"}},
      {{}, {"settle = true", "settle", "duration"}},
      {{}, {"ready_marker = \"a/b\"", "ready_marker", "not a path"}},
      {{}, {"ready_marker = \"..\"", "ready_marker", "not a path"}},
      {{}, {"ready_marker = 1", "ready_marker", "must be a string"}},
      {{}, {"output_name = \"a/b\"", "output_name", "no '/'"}},
      {{}, {"output_name = \".hidden\"", "output_name", "not starting with '.'"}},
      {{}, {"output_name = \"\"", "output_name", "template"}},
      {{}, {"output_name = \"{nope}\"", "output_name", "{nope}"}},
      {{}, {"output_name = \"v{n}-{x}\"", "output_name", "unknown placeholder"}},
      {{}, {"output_name = \"v{n\"", "output_name", "unknown placeholder"}},
      {{}, {"output_name = 3", "output_name", "must be a string"}},
      {{}, {"keep = 0", "keep", "at least 1"}},
      {{}, {"keep = -2", "keep", "at least 1"}},
      {{}, {"keep = \"5\"", "keep", "must be an integer"}},
      {{}, {"memory_limit = 0", "memory_limit", "positive"}},
      {{}, {"memory_limit = \"lots\"", "memory_limit", "lots"}},
      {{}, {"params = 1", "params", "must be a table"}},
      {{}, {"params = [1, 2]", "params", "must be a table"}},
      {{}, {"params = \"r=1\"", "params", "must be a table"}},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(std::string(c.bad.line));
    const JobText t = job_text(c.replaces, c.bad.line);
    const std::string msg = config_error(t.text);
    expect_mentions(msg, {at_line(t.line), "job 'agents'", "key '" + std::string(c.bad.key) + "'",
                          std::string(c.bad.fragment)});
    expect_one_line(msg);
  }
}

TEST(ConfigReject, JobIntegersTooLargeForTheirField) {
  // threads is unsigned: 2^32 + 1 must not silently become 1 thread
  const JobText t = job_text({}, "threads = 4294967297");
  const std::string msg = config_error(t.text);
  expect_mentions(msg, {at_line(t.line), "job 'agents'", "key 'threads'"});
}

// Integer seconds beyond 2^53 are not representable as a double; they are far above the largest
// duration accepted (1e9 s) and must be rejected, not read through an empty optional.
TEST(ConfigReject, SettleHugeIntegerIsRejected) {
  const JobText t = job_text({}, "settle = 9007199254740993");
  const std::string msg = config_error(t.text);
  expect_mentions(msg, {at_line(t.line), "job 'agents'", "key 'settle'"});
}

TEST(ConfigReject, RawParamListWithHugeIntegerIsReadSafely) {
  // Either the element is taken as the nearest double, or the list is flagged as non-numeric so
  // that binding rejects it; reading it through an empty optional is neither.
  const JobConfig j = job_ok("[job.params]\nl = [9007199254740993]");
  const RawParam* l = find_param(j, "l");
  ASSERT_NE(l, nullptr);
  if (l->list_numeric) {
    ASSERT_EQ(l->list.size(), 1u);
    EXPECT_NEAR(l->list[0], 9007199254740992.0, 4.0);
  }
}

TEST(ConfigReject, JobLookupListsTheNames) {
  const Config c = parse_ok(job_text().text + "\n" + job_text("name", "name = \"other\"").text);
  const std::string msg = config_error_of([&] { (void)c.job("missing"); });
  expect_mentions(msg, {kFile.string(), "'missing'", "agents", "other"});
  expect_one_line(msg);
}

// ---------------------------------------------------------------------------------------------
// Parameter binding (ParamSet::bind) against a hand-built plugin
// ---------------------------------------------------------------------------------------------

constexpr const char* const kScopeChoices[] = {"model", "tensor"};

std::uint32_t flags(std::initializer_list<cfx_param_flags> fs_) {
  std::uint32_t f = 0;
  for (auto x : fs_) f |= static_cast<std::uint32_t>(x);
  return f;
}

cfx_param_spec make_spec(const char* name, cfx_param_type type, std::uint32_t spec_flags, double def = 0,
                         double lo = 0, double hi = 0) {
  cfx_param_spec s{};
  s.struct_size = static_cast<std::uint32_t>(sizeof(cfx_param_spec));
  s.type = static_cast<std::uint32_t>(type);
  s.flags = spec_flags;
  s.name = name;
  s.doc = "a test parameter";
  s.default_number = def;
  s.min = lo;
  s.max = hi;
  return s;
}

// Index of each parameter in the plugin's schema (and in ParamSet::values()).
enum ParamIndex : std::size_t { kWeight, kIterations, kNormalize, kScope, kWeights, kLambda, kExtra, kParamCount };

LoadedPlugin make_plugin(std::uint32_t min_models = 2, std::uint32_t max_models = 3,
                         cfx_base_use base = CFX_BASE_REQUIRED) {
  LoadedPlugin p;
  p.file = "/plugins/libtestmerge.so";
  p.desc.struct_size = static_cast<std::uint32_t>(sizeof(cfx_plugin));
  p.desc.id = "testmerge";
  p.desc.version = "1.2.3";
  p.desc.description = "a strategy built by the test";
  p.desc.min_models = min_models;
  p.desc.max_models = max_models;
  p.desc.base = static_cast<std::uint32_t>(base);
  // weight: float in (0, 1]
  p.params.push_back(make_spec("weight", CFX_PARAM_FLOAT,
                               flags({CFX_PARAM_HAS_MIN, CFX_PARAM_MIN_EXCLUSIVE, CFX_PARAM_HAS_MAX}), 0.5, 0.0, 1.0));
  // iterations: int >= 1
  p.params.push_back(make_spec("iterations", CFX_PARAM_INT, flags({CFX_PARAM_HAS_MIN}), 3, 1));
  // normalize: bool
  p.params.push_back(make_spec("normalize", CFX_PARAM_BOOL, 0, 1));
  // scope: "model" | "tensor"
  cfx_param_spec scope = make_spec("scope", CFX_PARAM_STRING, 0);
  scope.default_string = "model";
  scope.choices = kScopeChoices;
  scope.choice_count = 2;
  p.params.push_back(scope);
  // weights: one value >= 0 per model, default 1
  p.params.push_back(make_spec("weights", CFX_PARAM_FLOAT_LIST, flags({CFX_PARAM_PER_MODEL, CFX_PARAM_HAS_MIN}), 1.0, 0.0));
  // lambda: required float, no range
  p.params.push_back(make_spec("lambda", CFX_PARAM_FLOAT, flags({CFX_PARAM_REQUIRED})));
  // extra: a plain list of any length
  p.params.push_back(make_spec("extra", CFX_PARAM_FLOAT_LIST, 0));
  p.desc.param_count = static_cast<std::uint32_t>(p.params.size());
  return p;
}

// A job 'agents' of strategy "testmerge" with `n_models` models and (optionally) a base whose
// [job.params] table starts at line 8 with `params`:
//   1 [[job]]  2 name  3 strategy  4 base (or a comment)  5 models  6 output  7 [job.params]
constexpr int kFirstParamLine = 8;

JobConfig bind_job(std::string_view params, std::size_t n_models = 2, bool with_base = true) {
  std::string t = "[[job]]\nname = \"agents\"\nstrategy = \"testmerge\"\n";
  t += with_base ? "base = \"/m/base\"\n" : "# no base\n";
  t += "models = [";
  for (std::size_t i = 0; i < n_models; ++i) t += (i ? ", \"/m/" : "\"/m/") + std::to_string(i) + "\"";
  t += "]\noutput = \"/out\"\n[job.params]\n";
  t.append(params);
  t += '\n';
  Config c = parse_ok(t);
  EXPECT_EQ(c.jobs.size(), 1u);
  return c.jobs.at(0);
}

std::string bind_error(const LoadedPlugin& plugin, const JobConfig& job) {
  return config_error_of([&] { (void)ParamSet::bind(plugin, job, kFile); });
}

std::vector<double> list_of(const cfx_param_value& v) {
  if (v.list_length == 0) return {};
  return std::vector<double>(v.list, v.list + v.list_length);
}

TEST(ParamBind, DefaultsAreFilledAndAlignedWithTheSchema) {
  const LoadedPlugin plugin = make_plugin();
  const ParamSet set = ParamSet::bind(plugin, bind_job("lambda = 0.25"), kFile);
  const auto& v = set.values();
  ASSERT_EQ(v.size(), static_cast<std::size_t>(kParamCount));
  for (std::size_t i = 0; i < v.size(); ++i) {
    SCOPED_TRACE(plugin.params[i].name);
    EXPECT_EQ(v[i].type, plugin.params[i].type);
    EXPECT_EQ(v[i].struct_size, sizeof(cfx_param_value));
  }
  EXPECT_DOUBLE_EQ(v[kWeight].number, 0.5);
  EXPECT_DOUBLE_EQ(v[kIterations].number, 3.0);
  EXPECT_DOUBLE_EQ(v[kNormalize].number, 1.0);
  ASSERT_NE(v[kScope].string, nullptr);
  EXPECT_STREQ(v[kScope].string, "model");
  EXPECT_EQ(v[kWeights].list_length, 2u);
  EXPECT_EQ(list_of(v[kWeights]), (std::vector<double>{1.0, 1.0}));
  EXPECT_DOUBLE_EQ(v[kLambda].number, 0.25);
  EXPECT_EQ(v[kExtra].list_length, 0u);
}

TEST(ParamBind, PerModelDefaultIsBroadcastToTheModelCount) {
  const LoadedPlugin plugin = make_plugin();
  const ParamSet set = ParamSet::bind(plugin, bind_job("lambda = 1", 3), kFile);
  EXPECT_EQ(list_of(set.values()[kWeights]), (std::vector<double>{1.0, 1.0, 1.0}));
}

TEST(ParamBind, EveryTypeAccepted) {
  const LoadedPlugin plugin = make_plugin();
  const ParamSet set = ParamSet::bind(plugin,
                                      bind_job("weight = 0.75\n"
                                               "iterations = 7\n"
                                               "normalize = false\n"
                                               "scope = \"tensor\"\n"
                                               "weights = [0.0, 2.5]\n"
                                               "lambda = -4.5\n"
                                               "extra = [1, -2.5, 3e2]"),
                                      kFile);
  const auto& v = set.values();
  ASSERT_EQ(v.size(), static_cast<std::size_t>(kParamCount));
  EXPECT_DOUBLE_EQ(v[kWeight].number, 0.75);
  EXPECT_DOUBLE_EQ(v[kIterations].number, 7.0);
  EXPECT_DOUBLE_EQ(v[kNormalize].number, 0.0);
  EXPECT_STREQ(v[kScope].string, "tensor");
  EXPECT_EQ(list_of(v[kWeights]), (std::vector<double>{0.0, 2.5}));
  EXPECT_DOUBLE_EQ(v[kLambda].number, -4.5);
  EXPECT_EQ(list_of(v[kExtra]), (std::vector<double>{1.0, -2.5, 300.0}));
}

TEST(ParamBind, FloatAcceptsIntegerValues) {
  const LoadedPlugin plugin = make_plugin();
  const ParamSet set = ParamSet::bind(plugin, bind_job("weight = 1\nlambda = -3"), kFile);
  EXPECT_DOUBLE_EQ(set.values()[kWeight].number, 1.0);
  EXPECT_DOUBLE_EQ(set.values()[kLambda].number, -3.0);
}

TEST(ParamBind, UnknownParameterListsTheKnownNames) {
  const LoadedPlugin plugin = make_plugin();
  const std::string msg = bind_error(plugin, bind_job("lambda = 1\nwieght = 0.5"));
  expect_mentions(msg, {at_line(kFirstParamLine + 1), "job 'agents'", "key 'params.wieght'", "unknown parameter",
                        "testmerge", "weight, iterations, normalize, scope, weights, lambda, extra"});
  expect_one_line(msg);
}

TEST(ParamBind, UnknownParameterOfAPluginWithoutParameters) {
  LoadedPlugin plugin = make_plugin();
  plugin.params.clear();
  plugin.desc.param_count = 0;
  const std::string msg = bind_error(plugin, bind_job("r = 0.1"));
  expect_mentions(msg, {at_line(kFirstParamLine), "job 'agents'", "key 'params.r'", "takes none"});
}

TEST(ParamBind, WrongTypePerKind) {
  const LoadedPlugin plugin = make_plugin();
  const BadValue cases[] = {
      {"weight = \"0.5\"", "params.weight", "must be a number"},
      {"weight = true", "params.weight", "must be a number"},
      {"weight = [0.5]", "params.weight", "must be a number"},
      {"weight = { v = 0.5 }", "params.weight", "must be a number"},
      {"iterations = 2.0", "params.iterations", "must be an integer"},
      {"iterations = \"3\"", "params.iterations", "must be an integer"},
      {"iterations = true", "params.iterations", "must be an integer"},
      {"normalize = 1", "params.normalize", "true or false"},
      {"normalize = \"yes\"", "params.normalize", "true or false"},
      {"scope = 1", "params.scope", "must be a string"},
      {"scope = [\"model\"]", "params.scope", "must be a string"},
      {"weights = \"1\"", "params.weights", "one per model"},
      {"weights = true", "params.weights", "one per model"},
      {"extra = 1.0", "params.extra", "must be a list of numbers"},
      {"extra = \"1,2\"", "params.extra", "must be a list of numbers"},
      {"lambda = \"big\"", "params.lambda", "must be a number"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(std::string(c.line));
    // lambda (required) first so that the case's own key is the one at fault
    const bool is_lambda = std::string_view(c.key) == "params.lambda";
    const std::string params = is_lambda ? std::string(c.line) : "lambda = 1\n" + std::string(c.line);
    const int line = is_lambda ? kFirstParamLine : kFirstParamLine + 1;
    const std::string msg = bind_error(plugin, bind_job(params));
    expect_mentions(msg, {at_line(line), "job 'agents'", "key '" + std::string(c.key) + "'", std::string(c.fragment)});
    expect_one_line(msg);
  }
}

TEST(ParamBind, OutOfRangeBothEnds) {
  const LoadedPlugin plugin = make_plugin();
  const BadValue cases[] = {
      {"weight = 0", "params.weight", "(0, 1]"},           // exclusive minimum, exactly at the bound
      {"weight = 0.0", "params.weight", "not 0"},
      {"weight = -0.1", "params.weight", "not -0.1"},
      {"weight = 1.0000001", "params.weight", "(0, 1]"},  // above the inclusive maximum
      {"weight = 2", "params.weight", "not 2"},
      {"weight = inf", "params.weight", "finite"},
      {"weight = nan", "params.weight", "finite"},
      {"iterations = 0", "params.iterations", ">= 1"},
      {"iterations = -5", "params.iterations", "not -5"},
      {"weights = [1.0, -0.5]", "params.weights", ">= 0"},
      {"weights = [-1, 1]", "params.weights", "not -1"},
      {"weights = -0.25", "params.weights", "not -0.25"},  // a scalar broadcast is checked too
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(std::string(c.line));
    const std::string msg = bind_error(plugin, bind_job("lambda = 1\n" + std::string(c.line)));
    expect_mentions(msg, {at_line(kFirstParamLine + 1), "job 'agents'", "key '" + std::string(c.key) + "'",
                          std::string(c.fragment)});
    expect_one_line(msg);
  }
}

TEST(ParamBind, InRangeAtInclusiveBoundsAccepted) {
  const LoadedPlugin plugin = make_plugin();
  const ParamSet set =
      ParamSet::bind(plugin, bind_job("lambda = 1\nweight = 1.0\niterations = 1\nweights = [0, 0]"), kFile);
  EXPECT_DOUBLE_EQ(set.values()[kWeight].number, 1.0);
  EXPECT_DOUBLE_EQ(set.values()[kIterations].number, 1.0);
  EXPECT_EQ(list_of(set.values()[kWeights]), (std::vector<double>{0.0, 0.0}));
  // just above the exclusive minimum
  const ParamSet tiny = ParamSet::bind(plugin, bind_job("lambda = 1\nweight = 1e-300"), kFile);
  EXPECT_DOUBLE_EQ(tiny.values()[kWeight].number, 1e-300);
}

TEST(ParamBind, ExclusiveMaximum) {
  LoadedPlugin plugin = make_plugin();
  plugin.params[kWeight].flags = flags({CFX_PARAM_HAS_MIN, CFX_PARAM_HAS_MAX, CFX_PARAM_MAX_EXCLUSIVE});
  const std::string msg = bind_error(plugin, bind_job("lambda = 1\nweight = 1"));
  expect_mentions(msg, {at_line(kFirstParamLine + 1), "key 'params.weight'", "[0, 1)"});
  const ParamSet set = ParamSet::bind(plugin, bind_job("lambda = 1\nweight = 0"), kFile);  // inclusive min
  EXPECT_DOUBLE_EQ(set.values()[kWeight].number, 0.0);
}

TEST(ParamBind, StringNotOneOfTheChoices) {
  const LoadedPlugin plugin = make_plugin();
  const std::string msg = bind_error(plugin, bind_job("lambda = 1\nscope = \"layer\""));
  expect_mentions(msg, {at_line(kFirstParamLine + 1), "job 'agents'", "key 'params.scope'", "\"model\", \"tensor\"",
                        "\"layer\""});
  expect_one_line(msg);
  // choices are case-sensitive
  expect_mentions(bind_error(plugin, bind_job("lambda = 1\nscope = \"Model\"")), {"key 'params.scope'"});
}

TEST(ParamBind, StringWithoutChoicesAcceptsAnything) {
  LoadedPlugin plugin = make_plugin();
  plugin.params[kScope].choice_count = 0;
  plugin.params[kScope].choices = nullptr;
  const ParamSet set = ParamSet::bind(plugin, bind_job("lambda = 1\nscope = \"anything at all\""), kFile);
  EXPECT_STREQ(set.values()[kScope].string, "anything at all");
}

TEST(ParamBind, PerModelListOfTheWrongLength) {
  const LoadedPlugin plugin = make_plugin();
  const std::pair<std::string_view, std::string_view> cases[] = {
      {"weights = [1.0]", "has 1 values"},
      {"weights = [1, 2, 3]", "has 3 values"},
      {"weights = []", "has 0 values"},
  };
  for (const auto& [line, fragment] : cases) {
    SCOPED_TRACE(std::string(line));
    const std::string msg = bind_error(plugin, bind_job("lambda = 1\n" + std::string(line)));
    expect_mentions(msg, {at_line(kFirstParamLine + 1), "job 'agents'", "key 'params.weights'", std::string(fragment),
                          "lists 2 models"});
    expect_one_line(msg);
  }
}

TEST(ParamBind, ScalarForPerModelIsBroadcast) {
  const LoadedPlugin plugin = make_plugin();
  const ParamSet two = ParamSet::bind(plugin, bind_job("lambda = 1\nweights = 0.7"), kFile);
  EXPECT_EQ(list_of(two.values()[kWeights]), (std::vector<double>{0.7, 0.7}));
  const ParamSet three = ParamSet::bind(plugin, bind_job("lambda = 1\nweights = 2", 3), kFile);
  EXPECT_EQ(list_of(three.values()[kWeights]), (std::vector<double>{2.0, 2.0, 2.0}));
  EXPECT_EQ(three.values()[kWeights].list_length, 3u);
}

TEST(ParamBind, PlainListHasAnyLength) {
  const LoadedPlugin plugin = make_plugin();
  const ParamSet empty = ParamSet::bind(plugin, bind_job("lambda = 1\nextra = []"), kFile);
  EXPECT_EQ(empty.values()[kExtra].list_length, 0u);
  const ParamSet five = ParamSet::bind(plugin, bind_job("lambda = 1\nextra = [1, 2, 3, 4, 5]"), kFile);
  EXPECT_EQ(list_of(five.values()[kExtra]), (std::vector<double>{1, 2, 3, 4, 5}));
}

TEST(ParamBind, ListWithANonNumberElement) {
  const LoadedPlugin plugin = make_plugin();
  const BadValue cases[] = {
      {"weights = [1.0, \"x\"]", "params.weights", "list of numbers"},
      {"weights = [true, 1.0]", "params.weights", "list of numbers"},
      {"extra = [1, \"2\"]", "params.extra", "list of numbers"},
      {"extra = [[1], [2]]", "params.extra", "list of numbers"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(std::string(c.line));
    const std::string msg = bind_error(plugin, bind_job("lambda = 1\n" + std::string(c.line)));
    expect_mentions(msg, {at_line(kFirstParamLine + 1), "job 'agents'", "key '" + std::string(c.key) + "'",
                          std::string(c.fragment)});
  }
}

TEST(ParamBind, RequiredParameterMissing) {
  const LoadedPlugin plugin = make_plugin();
  const std::string msg = bind_error(plugin, bind_job("weight = 0.5"));
  // named at the job's line: the key is absent, so it has no line of its own
  expect_mentions(msg, {at_line(1), "job 'agents'", "key 'params.lambda'", "missing", "required", "testmerge"});
  expect_one_line(msg);
}

// A parameter without a declared range still rejects non-finite values, but the message must not
// invent a bound the schema does not have.
TEST(ParamBind, NonFiniteValueWithoutRangeHasAClearMessage) {
  const LoadedPlugin plugin = make_plugin();
  for (std::string_view line : {"lambda = inf", "lambda = -inf", "lambda = nan"}) {
    SCOPED_TRACE(std::string(line));
    const std::string msg = bind_error(plugin, bind_job(line));
    expect_mentions(msg, {at_line(kFirstParamLine), "job 'agents'", "key 'params.lambda'"});
    EXPECT_THAT(msg, Not(HasSubstr("<= 0"))) << "the schema declares no maximum";
    EXPECT_THAT(msg, HasSubstr("finite"));
  }
  const std::string msg = bind_error(plugin, bind_job("lambda = 1\nextra = [1, nan]"));
  expect_mentions(msg, {at_line(kFirstParamLine + 1), "key 'params.extra'"});
  EXPECT_THAT(msg, Not(HasSubstr("<= 0"))) << "the schema declares no maximum";
}

TEST(ParamBind, ModelCountBelowMinimumOrAboveMaximum) {
  const LoadedPlugin plugin = make_plugin(2, 3);
  {
    const std::string msg = bind_error(plugin, bind_job("lambda = 1", 1));
    expect_mentions(msg, {at_line(1), "job 'agents'", "key 'models'", "testmerge", "2 to 3", "lists 1"});
    expect_one_line(msg);
  }
  {
    const std::string msg = bind_error(plugin, bind_job("lambda = 1", 4));
    expect_mentions(msg, {at_line(1), "job 'agents'", "key 'models'", "2 to 3", "lists 4"});
  }
  EXPECT_NO_THROW((void)ParamSet::bind(plugin, bind_job("lambda = 1", 2), kFile));
  EXPECT_NO_THROW((void)ParamSet::bind(plugin, bind_job("lambda = 1", 3), kFile));

  const LoadedPlugin unbounded = make_plugin(2, 0);
  expect_mentions(bind_error(unbounded, bind_job("lambda = 1", 1)), {"key 'models'", "at least 2", "lists 1"});
  const LoadedPlugin many = make_plugin(2, 0);
  EXPECT_NO_THROW((void)ParamSet::bind(many, bind_job("weights = 1\nlambda = 1", 9), kFile));

  const LoadedPlugin single = make_plugin(1, 1);
  expect_mentions(bind_error(single, bind_job("lambda = 1", 2)), {"key 'models'", "exactly 1 model", "lists 2"});
}

TEST(ParamBind, BaseRequiredButAbsent) {
  const LoadedPlugin plugin = make_plugin(2, 3, CFX_BASE_REQUIRED);
  const std::string msg = bind_error(plugin, bind_job("lambda = 1", 2, /*with_base=*/false));
  expect_mentions(msg, {at_line(1), "job 'agents'", "key 'base'", "testmerge"});
  expect_one_line(msg);

  for (cfx_base_use use : {CFX_BASE_OPTIONAL, CFX_BASE_UNUSED}) {
    SCOPED_TRACE(static_cast<int>(use));
    const LoadedPlugin p = make_plugin(2, 3, use);
    EXPECT_NO_THROW((void)ParamSet::bind(p, bind_job("lambda = 1", 2, false), kFile));
    EXPECT_NO_THROW((void)ParamSet::bind(p, bind_job("lambda = 1", 2, true), kFile));
  }
}

TEST(ParamBind, ConfigFileNamedInMessages) {
  const LoadedPlugin plugin = make_plugin();
  const std::string msg =
      config_error_of([&] { (void)ParamSet::bind(plugin, bind_job("lambda = 1\nweight = 5"), "/elsewhere/other.toml"); });
  expect_mentions(msg, {"/elsewhere/other.toml:" + std::to_string(kFirstParamLine + 1), "key 'params.weight'"});
}

TEST(ParamBind, PointersSurviveAMove) {
  const LoadedPlugin plugin = make_plugin();
  ParamSet first = ParamSet::bind(plugin, bind_job("lambda = 1\nscope = \"tensor\"\nweights = [3, 4]"), kFile);
  ParamSet moved = std::move(first);
  EXPECT_STREQ(moved.values()[kScope].string, "tensor");
  EXPECT_EQ(list_of(moved.values()[kWeights]), (std::vector<double>{3.0, 4.0}));
  ParamSet assigned = ParamSet::bind(plugin, bind_job("lambda = 2"), kFile);
  assigned = std::move(moved);
  EXPECT_STREQ(assigned.values()[kScope].string, "tensor");
  EXPECT_DOUBLE_EQ(assigned.values()[kLambda].number, 1.0);
}

TEST(ParamBind, ToJsonRoundTrip) {
  const LoadedPlugin plugin = make_plugin();
  const ParamSet set =
      ParamSet::bind(plugin, bind_job("lambda = 0.25\niterations = 12\nscope = \"tensor\"\nweights = 0.5\nextra = [1.5, -2]"),
                     kFile);
  const json::object o = set.to_json(plugin);
  ASSERT_EQ(o.size(), static_cast<std::size_t>(kParamCount));
  // insertion order follows the schema
  std::size_t i = 0;
  for (const auto& kv : o) EXPECT_EQ(std::string(kv.key()), plugin.params[i++].name);

  ASSERT_TRUE(o.at("weight").is_double());
  EXPECT_DOUBLE_EQ(o.at("weight").as_double(), 0.5);  // default
  ASSERT_TRUE(o.at("iterations").is_int64());
  EXPECT_EQ(o.at("iterations").as_int64(), 12);
  ASSERT_TRUE(o.at("normalize").is_bool());
  EXPECT_TRUE(o.at("normalize").as_bool());  // default
  ASSERT_TRUE(o.at("scope").is_string());
  EXPECT_EQ(o.at("scope").as_string(), "tensor");
  ASSERT_TRUE(o.at("weights").is_array());
  EXPECT_EQ(o.at("weights").as_array(), (json::array{0.5, 0.5}));
  ASSERT_TRUE(o.at("lambda").is_double());
  EXPECT_DOUBLE_EQ(o.at("lambda").as_double(), 0.25);
  EXPECT_EQ(o.at("extra").as_array(), (json::array{1.5, -2.0}));

  // serialised and parsed back: the same object
  const json::value back = json::parse(json::serialize(o));
  ASSERT_TRUE(back.is_object());
  EXPECT_EQ(back.as_object(), o);

  // the values recorded are the values bound
  const auto& v = set.values();
  EXPECT_DOUBLE_EQ(back.as_object().at("lambda").to_number<double>(), v[kLambda].number);
  EXPECT_DOUBLE_EQ(back.as_object().at("weight").to_number<double>(), v[kWeight].number);
  EXPECT_EQ(back.as_object().at("iterations").to_number<std::int64_t>(), static_cast<std::int64_t>(v[kIterations].number));
}

}  // namespace
