// confluxd as an operator runs it: the daemon is a child process with its own configuration,
// state directory and control socket in a temporary directory; checkpoints "land" in the watched
// directories the ways trainers write them; the tests talk to it with `conflux status --json`,
// `conflux run|reload`, stop it with SIGTERM (exit 0) or kill it (and its merge worker) with
// SIGKILL. Every wait polls with a deadline (ARCHITECTURE §3, §7).
//
// The delay from a checkpoint becoming complete (its last byte written, or the rename that made
// it visible) to its merge starting is measured from the daemon's log line "merge N started",
// watched every 2 ms, and printed as "[ delay ]" lines (and a summary at the end).
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <functional>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <boost/json.hpp>
#include <gtest/gtest.h>

#include "test_util.h"

extern char** environ;

namespace {

namespace fs = std::filesystem;
namespace json = boost::json;
using namespace std::chrono_literals;
using Clock = std::chrono::steady_clock;
using conflux_test::contains;
using conflux_test::read_file;
using conflux_test::write_file;

std::string bin(const std::string& tool) { return std::string(CONFLUX_BIN_DIR) + "/" + tool; }

long long ms(Clock::duration d) { return std::chrono::duration_cast<std::chrono::milliseconds>(d).count(); }

// The landing-to-merge delays measured by the tests, printed once more at the end.
std::vector<std::string>& delay_report() {
  static std::vector<std::string> lines;
  return lines;
}

class DelaySummary : public ::testing::Environment {
 public:
  void TearDown() override {
    if (delay_report().empty()) return;
    std::printf("[ delays ] landing -> merge started:\n");
    for (const auto& l : delay_report()) std::printf("[ delays ]   %s\n", l.c_str());
  }
};
[[maybe_unused]] const auto* const kDelaySummary = ::testing::AddGlobalTestEnvironment(new DelaySummary);

// ------------------------------------------------------------------------------------------------
// Processes
// ------------------------------------------------------------------------------------------------

// argv and environment prepared before fork (the child only makes async-signal-safe calls): our
// environment without CONFLUX_PLUGIN_PATH, so only the plugins beside the binaries are found.
struct ExecArgs {
  std::vector<std::string> args, env;
  std::vector<char*> argv, envp;
  explicit ExecArgs(std::vector<std::string> a) : args(std::move(a)) {
    for (char** e = environ; *e != nullptr; ++e)
      if (!std::string_view(*e).starts_with("CONFLUX_PLUGIN_PATH=")) env.emplace_back(*e);
    for (auto& s : args) argv.push_back(s.data());
    argv.push_back(nullptr);
    for (auto& s : env) envp.push_back(s.data());
    envp.push_back(nullptr);
  }
};

// Starts `args` with stdout and stderr appended to / written to the given files, from /.
// `new_group`: the child leads a new process group (so the daemon and its workers can be killed
// together).
pid_t spawn(ExecArgs& ex, const fs::path& out, const fs::path& err, bool append, bool new_group) {
  const int flags = O_WRONLY | O_CREAT | O_CLOEXEC | (append ? O_APPEND : O_TRUNC);
  const std::string out_s = out.string(), err_s = err.string();
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid == 0) {
    if (new_group) ::setpgid(0, 0);
    const int o = ::open(out_s.c_str(), flags, 0644);
    const int e = out_s == err_s ? o : ::open(err_s.c_str(), flags, 0644);
    const int in = ::open("/dev/null", O_RDONLY);
    if (o < 0 || e < 0 || in < 0) ::_exit(126);
    ::dup2(in, STDIN_FILENO);
    ::dup2(o, STDOUT_FILENO);
    ::dup2(e, STDERR_FILENO);
    if (::chdir("/") != 0) ::_exit(126);
    ::execve(ex.argv[0], ex.argv.data(), ex.envp.data());
    ::_exit(127);
  }
  return pid;
}

struct ToolResult {
  int exit_code = -1;  // -1: killed by a signal
  std::string out, err;
};

// Runs a tool to completion; its output goes through files in `scratch`.
ToolResult run_tool(std::vector<std::string> args, const fs::path& scratch) {
  ExecArgs ex(std::move(args));
  const fs::path out = scratch / "tool.out", err = scratch / "tool.err";
  const pid_t pid = spawn(ex, out, err, false, false);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  ToolResult r;
  if (WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
  r.out = read_file(out);
  r.err = read_file(err);
  return r;
}

// Polls `pred` until it holds or `timeout` passes; true when it held.
template <class Pred>
bool wait_until(Pred&& pred, Clock::duration timeout, Clock::duration poll = 25ms) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    if (pred()) return true;
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(poll);
  }
}

// confluxd as a child process: `confluxd --config FILE`, stdout and stderr appended to `log`.
class DaemonProcess {
 public:
  DaemonProcess(fs::path config, fs::path log) : config_(std::move(config)), log_(std::move(log)) {}
  DaemonProcess(const DaemonProcess&) = delete;
  DaemonProcess& operator=(const DaemonProcess&) = delete;
  ~DaemonProcess() {
    if (pid_ > 0) kill_all();
  }

  void start() {
    ExecArgs ex({bin("confluxd"), "--config", config_.string()});
    pid_ = spawn(ex, log_, log_, true, true);
  }

  // False (and the exit status recorded) once the process has exited.
  bool alive() {
    if (pid_ <= 0) return false;
    int status = 0;
    if (::waitpid(pid_, &status, WNOHANG) == pid_) {
      status_ = status;
      pid_ = -1;
      return false;
    }
    return true;
  }

  // SIGTERM, then waits: the exit code, 128+N when killed by signal N, -1 when it did not stop.
  int terminate(Clock::duration timeout = 20s) {
    if (pid_ > 0) ::kill(pid_, SIGTERM);
    if (!wait_until([&] { return !alive(); }, timeout, 10ms)) {
      kill_all();
      return -1;
    }
    return exit_code();
  }

  // SIGKILL to the daemon and everything in its process group (its merge workers).
  void kill_all() {
    if (pid_ <= 0) return;
    ::kill(-pid_, SIGKILL);
    int status = 0;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
    status_ = status;
    pid_ = -1;
  }

  int exit_code() const {
    if (!status_) return -1;
    if (WIFEXITED(*status_)) return WEXITSTATUS(*status_);
    if (WIFSIGNALED(*status_)) return 128 + WTERMSIG(*status_);
    return -1;
  }
  pid_t pid() const { return pid_; }

 private:
  fs::path config_, log_;
  pid_t pid_ = -1;
  std::optional<int> status_;
};

// ------------------------------------------------------------------------------------------------
// Files
// ------------------------------------------------------------------------------------------------

bool is_weight_file(const std::string& name) {
  return name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json");
}

// The model weights of a checkpoint directory: every *.safetensors file and the index.
std::map<std::string, std::string> weights(const fs::path& dir) {
  std::map<std::string, std::string> files;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (is_weight_file(name)) files[name] = read_file(e.path());
  }
  return files;
}

// Hidden entries a crash or a publish could leave behind in an output directory.
std::vector<std::string> leftovers(const fs::path& output) {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(output, ec)) {
    const std::string name = e.path().filename().string();
    if (name.starts_with(".") && (contains(name, "partial") || contains(name, ".old-") || contains(name, ".tmp")))
      names.push_back(name);
  }
  return names;
}

std::string join(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

// Writes `bytes` to `path` in `pieces` writes `pause` apart through one descriptor, closed at the
// end; with `preallocate`, the file is first created at its full size (holes), as some writers do.
void write_in_pieces(const fs::path& path, const std::string& bytes, int pieces, Clock::duration pause,
                     bool preallocate) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw std::runtime_error("cannot create " + path.string());
  if (preallocate && ::ftruncate(fd, static_cast<off_t>(bytes.size())) != 0)
    throw std::runtime_error("ftruncate " + path.string());
  const std::size_t step = (bytes.size() + static_cast<std::size_t>(pieces) - 1) / static_cast<std::size_t>(pieces);
  for (std::size_t off = 0; off < bytes.size(); off += step) {
    if (off > 0) std::this_thread::sleep_for(pause);
    const std::size_t n = std::min(step, bytes.size() - off);
    if (::pwrite(fd, bytes.data() + off, n, static_cast<off_t>(off)) != static_cast<ssize_t>(n))
      throw std::runtime_error("write " + path.string());
  }
  ::close(fd);
}

// Copies the files of checkpoint `from` that are not weights (config, tokenizer) into `to`.
void copy_auxiliary(const fs::path& from, const fs::path& to) {
  fs::create_directories(to);
  for (const auto& e : fs::directory_iterator(from))
    if (!is_weight_file(e.path().filename().string())) fs::copy_file(e.path(), to / e.path().filename());
}

// The shard files of a sharded checkpoint, in name order.
std::vector<fs::path> shards_of(const fs::path& dir) {
  std::vector<fs::path> v;
  for (const auto& e : fs::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name.ends_with(".safetensors")) v.push_back(e.path());
  }
  std::sort(v.begin(), v.end());
  return v;
}

std::string str(const json::object& o, std::string_view key) {
  const json::value* v = o.if_contains(key);
  return v && v->is_string() ? std::string(v->as_string()) : std::string();
}

std::uint64_t runs_of(const json::object& job) {
  const json::value* v = job.if_contains("runs");
  return v ? v->to_number<std::uint64_t>() : 0;
}

std::vector<std::string> published_of(const json::object& job) {
  std::vector<std::string> names;
  if (const json::value* v = job.if_contains("published"))
    for (const auto& p : v->as_array()) names.emplace_back(p.as_string());
  return names;
}

// ------------------------------------------------------------------------------------------------
// Fixture
// ------------------------------------------------------------------------------------------------

class DaemonTest : public ::testing::Test {
 protected:
  void SetUp() override {
    fs::create_directories(scratch());
    fs::create_directories(dir / "staging");
  }

  void TearDown() override {
    if (daemon_) daemon_->kill_all();
    if (HasFailure() && fs::exists(log_path()))
      std::cerr << "---- confluxd log (" << log_path().string() << ") ----\n"
                << read_file(log_path()) << "---- end of log ----\n";
  }

  fs::path scratch() const { return dir / "tool"; }
  fs::path config_path() const { return dir / "confluxd.toml"; }
  fs::path socket_path() const { return dir / "ctl.sock"; }
  fs::path log_path() const { return dir / "confluxd.log"; }

  // conflux-synth --out DIR/name ARGS...
  void synth(const std::string& name, std::vector<std::string> args) {
    std::vector<std::string> argv{bin("conflux-synth"), "--out", (dir / name).string()};
    argv.insert(argv.end(), args.begin(), args.end());
    const ToolResult r = run_tool(argv, scratch());
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }

  // A [[job]] table; paths are absolute.
  static std::string job_table(const std::string& name, const std::string& strategy, const fs::path& base,
                               const std::vector<fs::path>& models, const fs::path& output, const std::string& extra) {
    std::string t = "[[job]]\nname = \"" + name + "\"\nstrategy = \"" + strategy + "\"\n";
    if (!base.empty()) t += "base = \"" + base.string() + "\"\n";
    t += "models = [";
    for (std::size_t i = 0; i < models.size(); ++i) t += (i ? ", \"" : "\"") + models[i].string() + "\"";
    t += "]\noutput = \"" + output.string() + "\"\n" + extra + "\n";
    return t;
  }

  // The [daemon] table (socket, state and a 1 s rescan unless `rescan` says otherwise) and `jobs`.
  void write_config(const std::string& jobs, const std::string& rescan = "1s") {
    write_file(config_path(), "[daemon]\ncontrol_socket = \"" + socket_path().string() + "\"\nstate_dir = \"" +
                                  (dir / "state").string() + "\"\nrescan = \"" + rescan + "\"\n\n" + jobs);
  }

  ToolResult conflux(std::vector<std::string> args) {
    args.insert(args.begin(), bin("conflux"));
    return run_tool(std::move(args), scratch());
  }

  // `conflux status --json` (through --config, or --socket when the file may be invalid).
  std::optional<json::object> status(bool via_socket = false) {
    const ToolResult r = via_socket ? conflux({"status", "--socket", socket_path().string(), "--json"})
                                    : conflux({"status", "--config", config_path().string(), "--json"});
    if (r.exit_code != 0) return std::nullopt;
    boost::system::error_code ec;
    json::value v = json::parse(r.out, ec);
    if (ec || !v.is_object()) {
      ADD_FAILURE() << "conflux status --json printed no JSON object: " << r.out;
      return std::nullopt;
    }
    return std::move(v.as_object());
  }

  // One job's status object (empty when the daemon or the job cannot be found).
  json::object job(const std::string& name, bool via_socket = false) {
    const auto s = status(via_socket);
    if (!s) return {};
    for (const auto& j : s->at("jobs").as_array())
      if (j.as_object().at("name").as_string() == name) return j.as_object();
    return {};
  }

  std::vector<std::string> job_names(bool via_socket = false) {
    std::vector<std::string> names;
    if (const auto s = status(via_socket))
      for (const auto& j : s->at("jobs").as_array()) names.emplace_back(j.as_object().at("name").as_string());
    return names;
  }

  // Polls a job's status until `pred` holds; returns the last status seen (empty on timeout, with
  // a failure naming `what`).
  json::object wait_job(const std::string& name, const std::function<bool(const json::object&)>& pred,
                        Clock::duration timeout, const std::string& what) {
    json::object last;
    if (wait_until(
            [&] {
              last = job(name);
              return !last.empty() && pred(last);
            },
            timeout, 40ms))
      return last;
    ADD_FAILURE() << "job '" << name << "': timed out waiting for " << what << "; last status: " << json::serialize(last);
    return {};
  }

  // Waits until the job has `n` published versions and is idle.
  json::object wait_published(const std::string& name, std::size_t n, Clock::duration timeout = 15s) {
    return wait_job(
        name, [&](const json::object& j) { return published_of(j).size() >= n && str(j, "state") == "idle"; }, timeout,
        std::to_string(n) + " published version(s) and state idle");
  }

  void start_daemon() {
    daemon_.emplace(config_path(), log_path());
    daemon_->start();
    const bool up = wait_until([&] { return !daemon_->alive() || status().has_value(); }, 10s, 20ms);
    ASSERT_TRUE(up && daemon_->alive()) << "confluxd did not come up (exit " << daemon_->exit_code() << ")";
  }

  void stop_daemon() {
    ASSERT_TRUE(daemon_);
    EXPECT_EQ(daemon_->terminate(), 0) << "confluxd did not exit 0 on SIGTERM";
    daemon_.reset();
  }

  std::size_t log_size() const {
    std::error_code ec;
    const auto n = fs::file_size(log_path(), ec);
    return ec ? 0 : static_cast<std::size_t>(n);
  }
  std::string log_text() const { return fs::exists(log_path()) ? read_file(log_path()) : std::string(); }

  // Watches the log (from byte `from`) every 2 ms for `needle`: when it appeared.
  std::optional<Clock::time_point> wait_log(const std::string& needle, std::size_t from, Clock::duration timeout) {
    std::optional<Clock::time_point> seen;
    wait_until(
        [&] {
          const std::string text = log_text();
          if (text.size() > from && text.find(needle, from) != std::string::npos) seen = Clock::now();
          return seen.has_value();
        },
        timeout, 2ms);
    return seen;
  }

  // The weights `conflux merge` produces from these inputs directly (same job name and strategy).
  std::map<std::string, std::string> reference(const std::string& name, const std::string& strategy, const fs::path& base,
                                               const std::vector<fs::path>& models, const std::string& extra = "") {
    const fs::path out = dir / ("ref-" + std::to_string(++refs_));
    const fs::path file = dir / ("ref-" + std::to_string(refs_) + ".toml");
    write_file(file, job_table(name, strategy, base, models, out, extra));
    const ToolResult r = conflux({"merge", file.string(), "--quiet"});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    return weights(out);
  }

  // The paths of a published version's inputs with role "model", from its manifest.
  static std::vector<std::string> manifest_models(const fs::path& version) {
    std::vector<std::string> paths;
    const json::value m = json::parse(read_file(version / "conflux-manifest.json"));
    for (const auto& in : m.at("inputs").as_array())
      if (in.at("role").as_string() == "model") paths.emplace_back(in.at("path").as_string());
    return paths;
  }

  // Waits (polling every 1 ms) until a merge worker's partial directory appears in `output`.
  static bool wait_for_partial(const fs::path& output, Clock::duration timeout = 20s) {
    return wait_until(
        [&] {
          std::error_code ec;
          for (const auto& e : fs::directory_iterator(output, ec))
            if (contains(e.path().filename().string(), ".partial-")) return true;
          return false;
        },
        timeout, 1ms);
  }

  // A copy of `src` at `dst` that appears in one rename (staged outside the watched directories).
  void land_by_rename(const fs::path& src, const fs::path& dst) {
    const fs::path stage = dir / "staging" / ("s" + std::to_string(++stages_));
    fs::copy(src, stage, fs::copy_options::recursive);
    fs::rename(stage, dst);
  }

  conflux_test::TempDir dir;
  std::optional<DaemonProcess> daemon_;
  int refs_ = 0, stages_ = 0;
};

// ------------------------------------------------------------------------------------------------
// Landing patterns: each yields exactly one merge, of the complete data
// ------------------------------------------------------------------------------------------------

class Landing : public DaemonTest {
 protected:
  void SetUp() override {
    DaemonTest::SetUp();
    synth("m", {"--preset", "tiny", "--agents", "1"});
    synth("ms", {"--preset", "tiny", "--agents", "1", "--shard-size", "150KB"});
    fs::create_directories(dir / "runs" / "a");
  }

  struct Landed {
    fs::path checkpoint;
    Clock::time_point complete;                    // last byte written, or the final rename done
    std::optional<Clock::time_point> last_write{};  // when earlier than `complete` (renames)
  };

  // A job watching the empty run directory runs/a; `land` puts a checkpoint there. Expects one
  // merge, started no sooner than settle after the checkpoint's last write and no later than
  // settle + 1 s after it became complete, equal to a direct `conflux merge` of the complete
  // checkpoint, and no second one (not even after a rescan).
  void expect_one_merge(const std::string& pattern, std::chrono::milliseconds settle,
                        const std::function<Landed()>& land, const std::string& rescan = "1s") {
    const fs::path output = dir / "out" / "land";
    write_config(job_table("land", "task_arithmetic", dir / "m" / "base", {dir / "runs" / "a"}, output,
                           "settle = \"" + std::to_string(settle.count()) + "ms\""),
                 rescan);
    ASSERT_NO_FATAL_FAILURE(start_daemon());
    // The base settles first; then the job waits for a checkpoint in the empty run directory.
    const json::object before = wait_job(
        "land",
        [](const json::object& j) { return str(j, "state") == "waiting" && contains(str(j, "waiting_for"), "no checkpoint"); },
        5s, "state waiting for a checkpoint");
    ASSERT_FALSE(before.empty());

    const std::size_t log_from = log_size();
    const Landed landed = land();
    if (HasFatalFailure()) return;
    const auto started = wait_log("job 'land': merge 1 started", log_from, settle + 4s);
    if (!started) {
      delay_report().push_back(pattern + ": no merge started within " + std::to_string((settle + 4s).count()) +
                               " ms (settle " + std::to_string(settle.count()) + " ms)");
      FAIL() << "no merge started within settle + 4 s after the " << pattern << " landing";
    }
    const auto delay = *started - landed.complete;
    const std::string figure = pattern + ": " + std::to_string(ms(delay)) + " ms (settle " +
                               std::to_string(settle.count()) + " ms, target <= " +
                               std::to_string(settle.count() + 1000) + " ms)";
    std::printf("[ delay    ] %s\n", figure.c_str());
    delay_report().push_back(figure);
    RecordProperty("landing_to_merge_ms", std::to_string(ms(delay)));
    // Not merged before its bytes had stopped changing for settle (a rename of data that has
    // been stable for longer than settle may be merged at once).
    EXPECT_GE(*started - landed.last_write.value_or(landed.complete), settle)
        << "merged before the checkpoint's files had been stable for settle";
    EXPECT_LE(delay, settle + 1s) << "landing-to-merge delay above settle + 1 s";

    const json::object done = wait_published("land", 1);
    ASSERT_FALSE(done.empty());
    EXPECT_EQ(runs_of(done), 1u) << json::serialize(done);
    ASSERT_EQ(published_of(done), std::vector<std::string>{"000001"});
    EXPECT_TRUE(done.at("last_error").is_null()) << json::serialize(done);
    EXPECT_EQ(manifest_models(output / "000001"), std::vector<std::string>{landed.checkpoint.string()});
    const auto merged = weights(output / "000001");
    ASSERT_FALSE(merged.empty());
    EXPECT_TRUE(merged == reference("land", "task_arithmetic", dir / "m" / "base", {landed.checkpoint}))
        << "the published merge differs from `conflux merge` of the complete checkpoint";
    EXPECT_TRUE(fs::is_symlink(output / "latest"));
    EXPECT_EQ(fs::read_symlink(output / "latest"), fs::path("000001"));

    // Nothing changes any more: no second merge, even after a rescan.
    std::this_thread::sleep_for(1200ms);
    const json::object after = job("land");
    EXPECT_EQ(runs_of(after), 1u) << json::serialize(after);
    EXPECT_EQ(str(after, "state"), "idle");
    EXPECT_FALSE(contains(log_text(), "job 'land': merge 2 started"));
    EXPECT_TRUE(leftovers(output).empty()) << join(leftovers(output));
    stop_daemon();
  }
};

TEST_F(Landing, AtomicRenameOfAFinishedDirectory) {
  expect_one_merge("atomic rename", 500ms, [&] {
    // Copied into a hidden directory beside the checkpoints (ignored, even once it is stable for
    // longer than settle), then renamed into place.
    const fs::path stage = dir / "runs" / "a" / ".checkpoint-100.incoming";
    fs::copy(dir / "m" / "agent-1", stage, fs::copy_options::recursive);
    const auto written = Clock::now();
    std::this_thread::sleep_for(800ms);
    const fs::path target = dir / "runs" / "a" / "checkpoint-100";
    fs::rename(stage, target);
    return Landed{target, Clock::now(), written};
  });
}

TEST_F(Landing, ShardsWrittenInPlaceSlowly) {
  expect_one_merge("shards written in place", 1000ms, [&] {
    // save_pretrained's order: config files, each shard in pieces (150 ms pauses, shorter than
    // settle), then the index.
    const fs::path src = dir / "ms" / "agent-1", target = dir / "runs" / "a" / "checkpoint-1";
    copy_auxiliary(src, target);
    const auto shards = shards_of(src);
    EXPECT_GE(shards.size(), 2u);
    for (const auto& s : shards) {
      write_in_pieces(target / s.filename(), read_file(s), 3, 150ms, false);
      std::this_thread::sleep_for(150ms);
    }
    write_file(target / "model.safetensors.index.json", read_file(src / "model.safetensors.index.json"));
    return Landed{target, Clock::now()};
  });
}

TEST_F(Landing, FileCreatedAtFullSizeThenFilledInPieces) {
  expect_one_merge("preallocated, filled in pieces", 1000ms, [&] {
    // model.safetensors appears at its final size (all zeros), then the real bytes arrive in 4
    // pieces 150 ms apart: the size never changes, only the contents and mtime.
    const fs::path src = dir / "m" / "agent-1", target = dir / "runs" / "a" / "checkpoint-1";
    copy_auxiliary(src, target);
    write_in_pieces(target / "model.safetensors", read_file(src / "model.safetensors"), 4, 150ms, true);
    return Landed{target, Clock::now()};
  });
}

TEST_F(Landing, IndexWrittenLast) {
  expect_one_merge("index written last", 500ms, [&] {
    // Every shard complete, then a pause longer than settle, then the index: shards without
    // their index are not a checkpoint yet.
    const fs::path src = dir / "ms" / "agent-1", target = dir / "runs" / "a" / "checkpoint-1";
    copy_auxiliary(src, target);
    for (const auto& s : shards_of(src)) fs::copy_file(s, target / s.filename());
    std::this_thread::sleep_for(1300ms);
    const json::object j = job("land");
    EXPECT_EQ(str(j, "state"), "waiting") << json::serialize(j);
    EXPECT_TRUE(contains(str(j, "waiting_for"), "model.safetensors.index.json")) << json::serialize(j);
    EXPECT_EQ(runs_of(j), 0u);
    write_file(target / "model.safetensors.index.json", read_file(src / "model.safetensors.index.json"));
    return Landed{target, Clock::now()};
  });
}

TEST_F(Landing, TmpCheckpointRenamedAtTheEnd) {
  expect_one_merge("tmp-checkpoint renamed", 500ms, [&] {
    // Written in place as tmp-checkpoint-7 (ignored, even once stable for longer than settle),
    // then renamed.
    const fs::path src = dir / "m" / "agent-1", tmp = dir / "runs" / "a" / "tmp-checkpoint-7";
    copy_auxiliary(src, tmp);
    write_in_pieces(tmp / "model.safetensors", read_file(src / "model.safetensors"), 3, 150ms, false);
    const auto written = Clock::now();
    std::this_thread::sleep_for(800ms);
    const fs::path target = dir / "runs" / "a" / "checkpoint-7";
    fs::rename(tmp, target);
    return Landed{target, Clock::now(), written};
  });
}

TEST_F(Landing, WrittenInPlaceIntoANewDirectoryWithoutWaitingForTheRescan) {
  // The periodic rescan is a fallback for filesystems without inotify: with the default-like
  // rescan of 30 s, a checkpoint written in place into a directory created a moment before must
  // still be noticed through inotify, so the delay stays within settle + 1 s.
  expect_one_merge(
      "written in place into a new directory (rescan 30 s)", 500ms,
      [&] {
        const fs::path src = dir / "m" / "agent-1", target = dir / "runs" / "a" / "checkpoint-1";
        fs::create_directories(target);
        std::this_thread::sleep_for(300ms);
        copy_auxiliary(src, target);
        fs::copy_file(src / "model.safetensors", target / "model.safetensors");
        return Landed{target, Clock::now()};
      },
      "30s");
}

// ------------------------------------------------------------------------------------------------
// A burst of checkpoints over several jobs
// ------------------------------------------------------------------------------------------------

TEST_F(DaemonTest, BurstOfTwentyCheckpointsOverThreeJobs) {
  constexpr int kCheckpoints = 20, kJobs = 3;
  synth("m", {"--preset", "tiny", "--agents", std::to_string(kCheckpoints)});
  std::string jobs;
  for (int k = 0; k < kJobs; ++k) {
    fs::create_directories(dir / "runs" / ("j" + std::to_string(k)));
    jobs += job_table("j" + std::to_string(k), "task_arithmetic", dir / "m" / "base",
                      {dir / "runs" / ("j" + std::to_string(k))}, dir / "out" / ("j" + std::to_string(k)),
                      "settle = \"300ms\"");
  }
  write_config(jobs);
  ASSERT_NO_FATAL_FAILURE(start_daemon());

  // 20 checkpoints, each renamed into one of the jobs' run directories 30-100 ms apart, in an
  // irregular job order; steps grow per job.
  std::map<int, std::vector<fs::path>> landed;
  std::uint32_t x = 12345;
  const auto t0 = Clock::now();
  for (int i = 0; i < kCheckpoints; ++i) {
    x = x * 1103515245u + 12345u;
    const int k = static_cast<int>((x >> 16) % kJobs);
    const fs::path run = dir / "runs" / ("j" + std::to_string(k));
    const fs::path target = run / ("checkpoint-" + std::to_string(100 * (landed[k].size() + 1)));
    land_by_rename(dir / "m" / ("agent-" + std::to_string(i + 1)), target);
    landed[k].push_back(target);
    std::this_thread::sleep_for(std::chrono::milliseconds(30 + (x >> 8) % 70));
  }
  const auto burst = Clock::now() - t0;

  for (int k = 0; k < kJobs; ++k) {
    const std::string name = "j" + std::to_string(k);
    SCOPED_TRACE(name);
    const fs::path output = dir / "out" / name;
    if (landed[k].empty()) continue;
    const std::string newest = landed[k].back().string();
    // Settled: idle on the newest checkpoint and its merge published.
    const json::object j = wait_job(
        name,
        [&](const json::object& s) {
          if (str(s, "state") != "idle" || published_of(s).empty()) return false;
          std::error_code ec;
          const fs::path latest = output / fs::read_symlink(output / "latest", ec);
          return !ec && manifest_models(latest) == std::vector<std::string>{newest};
        },
        30s, "the newest checkpoint " + newest + " merged and published");
    ASSERT_FALSE(j.empty());
    const auto published = published_of(j);
    std::printf("[ burst    ] %s: %zu checkpoints landed in %lld ms, %zu runs\n", name.c_str(), landed[k].size(),
                ms(burst), published.size());
    // None lost: every run started was published (no failure); none duplicated: no two runs
    // merged the same checkpoint; the runs follow the checkpoints' order.
    EXPECT_EQ(runs_of(j), published.size()) << json::serialize(j);
    EXPECT_LE(published.size(), landed[k].size());
    std::vector<std::string> merged;
    for (const auto& v : published) {
      ASSERT_TRUE(fs::is_directory(output / v)) << v;
      const auto models = manifest_models(output / v);
      ASSERT_EQ(models.size(), 1u);
      merged.push_back(models[0]);
    }
    EXPECT_EQ(std::set<std::string>(merged.begin(), merged.end()).size(), merged.size())
        << "a checkpoint was merged twice: " << join(merged);
    std::vector<std::size_t> order;
    for (const auto& m : merged) {
      const auto it = std::find(landed[k].begin(), landed[k].end(), fs::path(m));
      EXPECT_NE(it, landed[k].end()) << m << " is not one of this job's checkpoints";
      order.push_back(static_cast<std::size_t>(it - landed[k].begin()));
    }
    EXPECT_TRUE(std::is_sorted(order.begin(), order.end())) << join(merged);
    EXPECT_EQ(fs::read_symlink(output / "latest"), fs::path(published.back()));
    EXPECT_TRUE(weights(output / published.back()) ==
                reference(name, "task_arithmetic", dir / "m" / "base", {landed[k].back()}))
        << "the final output is not the merge of the newest checkpoint";
    EXPECT_TRUE(leftovers(output).empty()) << join(leftovers(output));
  }
  stop_daemon();
}

// ------------------------------------------------------------------------------------------------
// kill -9 during a merge
// ------------------------------------------------------------------------------------------------

TEST_F(DaemonTest, KillDuringAMergeThenRestart) {
  // Large enough (about 70 MB per checkpoint) and single-threaded, so the merge is caught while
  // it writes its partial directory.
  synth("big", {"--preset", "small", "--layers", "40", "--agents", "1"});
  const fs::path output = dir / "out" / "big";
  write_config(job_table("big", "task_arithmetic", dir / "big" / "base", {dir / "big" / "agent-1"}, output,
                         "settle = \"300ms\"\nthreads = 1"));
  ASSERT_NO_FATAL_FAILURE(start_daemon());

  // Kill the daemon and its worker (one process group) as soon as the worker's partial
  // directory appears.
  ASSERT_TRUE(wait_for_partial(output)) << "the merge never started";
  daemon_->kill_all();
  const std::vector<std::string> partial = leftovers(output);
  ASSERT_FALSE(partial.empty()) << "the merge finished before it could be killed";
  EXPECT_FALSE(fs::exists(output / "latest"));
  std::printf("[ crash    ] killed with %s in %s\n", join(partial).c_str(), output.string().c_str());

  // Restart: the leftovers go, the owed run is done and published; nothing partial is visible.
  const std::size_t log_from = log_size();
  ASSERT_NO_FATAL_FAILURE(start_daemon());
  const json::object j = wait_published("big", 1, 30s);
  ASSERT_FALSE(j.empty());
  EXPECT_TRUE(contains(log_text().substr(log_from), "removed leftover")) << log_text().substr(log_from);
  EXPECT_TRUE(leftovers(output).empty()) << join(leftovers(output));
  const auto published = published_of(j);
  ASSERT_EQ(published.size(), 1u) << json::serialize(j);
  EXPECT_TRUE(j.at("last_error").is_null()) << json::serialize(j);
  EXPECT_EQ(fs::read_symlink(output / "latest"), fs::path(published.back()));
  std::vector<std::string> visible;
  for (const auto& e : fs::directory_iterator(output)) visible.push_back(e.path().filename().string());
  std::sort(visible.begin(), visible.end());
  EXPECT_EQ(visible, (std::vector<std::string>{published.back(), "latest"})) << join(visible);
  EXPECT_EQ(manifest_models(output / published.back()), std::vector<std::string>{(dir / "big" / "agent-1").string()});
  EXPECT_TRUE(weights(output / published.back()) ==
              reference("big", "task_arithmetic", dir / "big" / "base", {dir / "big" / "agent-1"}, "threads = 1"));
  stop_daemon();
}

// ------------------------------------------------------------------------------------------------
// Bad inputs
// ------------------------------------------------------------------------------------------------

TEST_F(DaemonTest, BadInputsFailTheJobOthersKeepMergingThenRecovery) {
  synth("m", {"--preset", "tiny", "--agents", "4"});
  synth("l3", {"--preset", "tiny", "--layers", "3", "--agents", "1"});
  const fs::path bad_runs = dir / "runs" / "bad", good_runs = dir / "runs" / "good", fresh_runs = dir / "runs" / "fresh";
  for (const auto& d : {bad_runs, good_runs, fresh_runs}) fs::create_directories(d);
  land_by_rename(dir / "m" / "agent-1", bad_runs / "checkpoint-1");
  land_by_rename(dir / "m" / "agent-2", good_runs / "checkpoint-1");
  const fs::path bad_out = dir / "out" / "bad", good_out = dir / "out" / "good", fresh_out = dir / "out" / "fresh";
  const fs::path base = dir / "m" / "base";
  write_config(job_table("bad", "task_arithmetic", base, {bad_runs}, bad_out, "settle = \"300ms\"") +
               job_table("good", "task_arithmetic", base, {good_runs}, good_out, "settle = \"300ms\"") +
               job_table("fresh", "task_arithmetic", base, {fresh_runs}, fresh_out, "settle = \"300ms\""));
  ASSERT_NO_FATAL_FAILURE(start_daemon());
  ASSERT_FALSE(wait_published("bad", 1).empty());
  ASSERT_FALSE(wait_published("good", 1).empty());

  // 1. A malformed shard (truncated by 1000 bytes) lands, as the newest checkpoint of "bad" (which
  //    has an older good one, already merged) and as the only checkpoint of "fresh". It is never
  //    merged, and status says why (the readiness check validates shards before a merge starts).
  const auto land_truncated = [&](const fs::path& target) {
    const fs::path stage = dir / "staging" / ("truncated-" + target.parent_path().filename().string());
    fs::copy(dir / "m" / "agent-3", stage, fs::copy_options::recursive);
    fs::resize_file(stage / "model.safetensors", fs::file_size(stage / "model.safetensors") - 1000);
    fs::rename(stage, target);
  };
  land_truncated(fresh_runs / "checkpoint-1");
  land_truncated(bad_runs / "checkpoint-2");
  const std::string fresh_file = (fresh_runs / "checkpoint-1" / "model.safetensors").string();
  const json::object fresh = wait_job(
      "fresh",
      [&](const json::object& j) { return str(j, "state") == "waiting" && contains(str(j, "waiting_for"), fresh_file); },
      3s, "state waiting, waiting_for naming " + fresh_file);
  std::printf("[ bad      ] malformed shard, only checkpoint: state '%s', waiting_for \"%s\", last_error \"%s\"\n",
              str(fresh, "state").c_str(), str(fresh, "waiting_for").c_str(), str(fresh, "last_error").c_str());
  const std::string bad_file = (bad_runs / "checkpoint-2" / "model.safetensors").string();
  const json::object malformed = wait_job(
      "bad",
      [&](const json::object& j) {
        return contains(str(j, "last_error"), bad_file) || contains(str(j, "waiting_for"), bad_file);
      },
      3s, "the truncated " + bad_file + " reported in status (last_error or waiting_for)");
  const json::object bad_now = job("bad");
  std::printf("[ bad      ] malformed shard over an older good checkpoint: state '%s', waiting_for \"%s\", "
              "last_error \"%s\"\n",
              str(bad_now, "state").c_str(), str(bad_now, "waiting_for").c_str(), str(bad_now, "last_error").c_str());
  EXPECT_EQ(runs_of(bad_now), 1u) << "the truncated checkpoint was merged";
  EXPECT_EQ(runs_of(job("fresh")), 0u) << "the truncated checkpoint was merged";

  // 2. A checkpoint with a different architecture (3 layers, the base has 2): the merge fails
  //    and status names a tensor.
  land_by_rename(dir / "l3" / "agent-1", bad_runs / "checkpoint-3");
  const json::object failed = wait_job(
      "bad", [](const json::object& j) { return str(j, "state") == "failed" && runs_of(j) == 2; }, 10s,
      "state failed after merging checkpoint-3");
  ASSERT_FALSE(failed.empty());
  EXPECT_TRUE(contains(str(failed, "last_error"), "'model.layers.2.")) << json::serialize(failed);
  EXPECT_TRUE(contains(str(failed, "last_error"), "checkpoint-3")) << json::serialize(failed);
  EXPECT_EQ(published_of(failed), std::vector<std::string>{"000001"});
  EXPECT_EQ(fs::read_symlink(bad_out / "latest"), fs::path("000001"));
  EXPECT_FALSE(fs::exists(bad_out / "000002"));
  EXPECT_TRUE(leftovers(bad_out).empty()) << join(leftovers(bad_out));

  // 3. The daemon keeps serving the other job.
  land_by_rename(dir / "m" / "agent-4", good_runs / "checkpoint-2");
  const json::object good = wait_published("good", 2);
  ASSERT_FALSE(good.empty());
  EXPECT_EQ(manifest_models(good_out / "000002"), std::vector<std::string>{(good_runs / "checkpoint-2").string()});
  EXPECT_EQ(str(job("bad"), "state"), "failed");  // still failed: nothing new for it

  // 4. Good checkpoints land: the jobs recover.
  land_by_rename(dir / "m" / "agent-4", fresh_runs / "checkpoint-2");
  const json::object fresh_ok = wait_published("fresh", 1);
  ASSERT_FALSE(fresh_ok.empty());
  EXPECT_EQ(manifest_models(fresh_out / "000001"), std::vector<std::string>{(fresh_runs / "checkpoint-2").string()});

  land_by_rename(dir / "m" / "agent-3", bad_runs / "checkpoint-4");
  const json::object recovered = wait_published("bad", 2);
  ASSERT_FALSE(recovered.empty());
  EXPECT_TRUE(recovered.at("last_error").is_null()) << json::serialize(recovered);
  ASSERT_TRUE(recovered.at("last_result").is_object()) << json::serialize(recovered);
  EXPECT_TRUE(recovered.at("last_result").at("ok").as_bool());
  const auto published = published_of(recovered);
  EXPECT_EQ(fs::read_symlink(bad_out / "latest"), fs::path(published.back()));
  EXPECT_EQ(manifest_models(bad_out / published.back()), std::vector<std::string>{(bad_runs / "checkpoint-4").string()});
  for (const auto& v : published)
    EXPECT_NE(manifest_models(bad_out / v), std::vector<std::string>{(bad_runs / "checkpoint-2").string()});
  stop_daemon();
}

// ------------------------------------------------------------------------------------------------
// Reload
// ------------------------------------------------------------------------------------------------

TEST_F(DaemonTest, ReloadKeepsTheOldConfigWhenInvalidAndAppliesAValidOne) {
  synth("m", {"--preset", "tiny", "--agents", "2"});
  const std::string a = job_table("a", "task_arithmetic", dir / "m" / "base", {dir / "m" / "agent-1"},
                                  dir / "out" / "a", "settle = \"300ms\"");
  write_config(a);
  ASSERT_NO_FATAL_FAILURE(start_daemon());
  ASSERT_FALSE(wait_published("a", 1).empty());

  // Invalid: an unknown key. The daemon says why and keeps its jobs.
  write_config(a + job_table("b", "linear", "", {dir / "m" / "agent-1", dir / "m" / "agent-2"}, dir / "out" / "b",
                             "settle = \"300ms\"\ncolour = \"blue\""));
  const ToolResult bad = conflux({"reload", "--socket", socket_path().string()});
  EXPECT_EQ(bad.exit_code, 1) << bad.out << bad.err;
  EXPECT_TRUE(contains(bad.err, "keeping the running configuration")) << bad.err;
  EXPECT_TRUE(contains(bad.err, "colour")) << bad.err;
  EXPECT_TRUE(contains(bad.err, config_path().string())) << bad.err;
  EXPECT_EQ(job_names(true), std::vector<std::string>{"a"});
  const json::object still = job("a", true);
  EXPECT_EQ(str(still, "state"), "idle");
  EXPECT_EQ(runs_of(still), 1u);

  // Valid: adds job b, which then merges; job a is not merged again.
  write_config(a + job_table("b", "linear", "", {dir / "m" / "agent-1", dir / "m" / "agent-2"}, dir / "out" / "b",
                             "settle = \"300ms\""));
  const ToolResult good = conflux({"reload", "--config", config_path().string()});
  EXPECT_EQ(good.exit_code, 0) << good.err;
  EXPECT_TRUE(contains(good.out, "2 job(s)")) << good.out;
  EXPECT_EQ(job_names(), (std::vector<std::string>{"a", "b"}));
  const json::object b = wait_published("b", 1);
  ASSERT_FALSE(b.empty());
  EXPECT_TRUE(weights(dir / "out" / "b" / "000001") ==
              reference("b", "linear", "", {dir / "m" / "agent-1", dir / "m" / "agent-2"}));
  EXPECT_EQ(runs_of(job("a")), 1u);
  stop_daemon();
}

TEST_F(DaemonTest, ReloadRemovingARunningJobCancelsItAndDropsIt) {
  synth("m", {"--preset", "tiny", "--agents", "1"});
  synth("big", {"--preset", "small", "--layers", "40", "--agents", "1"});
  const fs::path big_out = dir / "out" / "big";
  const std::string keep = job_table("keep", "task_arithmetic", dir / "m" / "base", {dir / "m" / "agent-1"},
                                     dir / "out" / "keep", "settle = \"300ms\"");
  write_config(keep + job_table("big", "task_arithmetic", dir / "big" / "base", {dir / "big" / "agent-1"}, big_out,
                                "settle = \"300ms\"\nthreads = 1"));
  ASSERT_NO_FATAL_FAILURE(start_daemon());
  ASSERT_TRUE(wait_for_partial(big_out)) << "the merge of job 'big' never started";

  // The new configuration no longer has job 'big': its merge is cancelled, then the job goes.
  write_config(keep);
  const ToolResult r = conflux({"reload", "--config", config_path().string()});
  EXPECT_EQ(r.exit_code, 0) << r.err;
  std::vector<std::string> names;
  EXPECT_TRUE(wait_until(
      [&] {
        names = job_names();
        return names == std::vector<std::string>{"keep"};
      },
      5s, 50ms))
      << "jobs still listed after the reload: " << join(names) << "; 'big': " << json::serialize(job("big"));
  EXPECT_TRUE(leftovers(big_out).empty()) << join(leftovers(big_out));
  ASSERT_FALSE(wait_published("keep", 1).empty());
  stop_daemon();
}

// ------------------------------------------------------------------------------------------------
// Control socket, latest, keep, manual trigger
// ------------------------------------------------------------------------------------------------

TEST_F(DaemonTest, SocketModeLatestKeepAndManualTrigger) {
  synth("m", {"--preset", "tiny", "--agents", "3"});
  const fs::path runs = dir / "runs" / "w";
  fs::create_directories(runs);
  land_by_rename(dir / "m" / "agent-1", runs / "checkpoint-1");
  const fs::path w_out = dir / "out" / "w", m_out = dir / "out" / "m";
  write_config(
      job_table("w", "task_arithmetic", dir / "m" / "base", {runs}, w_out, "settle = \"300ms\"\nkeep = 2") +
      job_table("man", "linear", "", {dir / "m" / "agent-2", dir / "m" / "agent-3"}, m_out,
                "settle = \"300ms\"\ntrigger = \"manual\""));
  ASSERT_NO_FATAL_FAILURE(start_daemon());

  struct stat st {};
  ASSERT_EQ(::stat(socket_path().c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_mode & 07777, 0600u) << std::oct << (st.st_mode & 07777);

  // Three checkpoints one after the other: three versions, the oldest pruned, latest the newest.
  ASSERT_FALSE(wait_published("w", 1).empty());
  land_by_rename(dir / "m" / "agent-2", runs / "checkpoint-2");
  ASSERT_FALSE(wait_published("w", 2).empty());
  EXPECT_EQ(fs::read_symlink(w_out / "latest"), fs::path("000002"));
  land_by_rename(dir / "m" / "agent-3", runs / "checkpoint-3");
  const json::object w = wait_job(
      "w", [](const json::object& j) { return runs_of(j) == 3 && str(j, "state") == "idle"; }, 15s, "3 runs");
  ASSERT_FALSE(w.empty());
  EXPECT_EQ(published_of(w), (std::vector<std::string>{"000002", "000003"}));
  EXPECT_TRUE(fs::is_symlink(w_out / "latest"));
  EXPECT_EQ(fs::read_symlink(w_out / "latest"), fs::path("000003"));
  EXPECT_FALSE(fs::exists(w_out / "000001")) << "keep = 2 did not prune the oldest version";
  EXPECT_TRUE(fs::is_directory(w_out / "000002"));
  EXPECT_EQ(manifest_models(w_out / "latest"), std::vector<std::string>{(runs / "checkpoint-3").string()});

  // The manual job has not run (its inputs were ready all along) until `conflux run`.
  json::object man = job("man");
  EXPECT_EQ(str(man, "trigger"), "manual");
  EXPECT_EQ(str(man, "state"), "idle");
  EXPECT_EQ(runs_of(man), 0u);
  EXPECT_FALSE(fs::exists(m_out));
  const ToolResult nope = conflux({"run", "nope", "--config", config_path().string()});
  EXPECT_EQ(nope.exit_code, 1);
  EXPECT_TRUE(contains(nope.err, "nope")) << nope.err;
  // Its inputs have not changed for far longer than settle: it runs at once.
  ToolResult run = conflux({"run", "man", "--config", config_path().string()});
  EXPECT_EQ(run.exit_code, 0) << run.err;
  if (run.exit_code != 0) {
    // (Go on with the remaining checks: ask again once settle has passed.)
    std::this_thread::sleep_for(400ms);
    run = conflux({"run", "man", "--config", config_path().string()});
    ASSERT_EQ(run.exit_code, 0) << run.err;
  }
  man = wait_published("man", 1);
  ASSERT_FALSE(man.empty());
  EXPECT_EQ(runs_of(man), 1u);
  EXPECT_EQ(fs::read_symlink(m_out / "latest"), fs::path("000001"));
  EXPECT_TRUE(weights(m_out / "000001") == reference("man", "linear", "", {dir / "m" / "agent-2", dir / "m" / "agent-3"}));
  // And it does not run again by itself.
  std::this_thread::sleep_for(1200ms);
  EXPECT_EQ(runs_of(job("man")), 1u);
  stop_daemon();
  EXPECT_FALSE(fs::exists(socket_path())) << "the control socket was left behind";
}

}  // namespace
