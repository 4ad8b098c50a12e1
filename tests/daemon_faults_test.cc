// confluxd when things go wrong (ARCHITECTURE §7, the crash-isolation issue): every merge runs in
// a worker process, so a strategy plugin that segfaults or aborts, an input truncated under the
// worker's mapping (SIGBUS), a file-size limit or a full filesystem (EFBIG / ENOSPC) and a memory
// limit fail that one run, with the reason in `conflux status` and the log, the partial output
// removed, and the daemon still serving. Also: the sd_notify sequence a service manager sees
// (READY, STATUS, WATCHDOG, RELOADING + MONOTONIC_USEC, STOPPING) on a fake NOTIFY_SOCKET, and the
// plugin trust rules (plugin files and directories writable by group/others or owned by another
// user are refused; CONFLUX_PLUGIN_PATH is ignored by the daemon).
//
// The daemon is a child process (its own process group, so its workers die with it) with its
// configuration, state and control socket in a temporary directory; the tests talk to it with
// `conflux status --json` and signals, and poll with deadlines.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <functional>
#include <iostream>
#include <optional>
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

const fs::path kTestPlugins = CONFLUX_TEST_PLUGIN_DIR;
const fs::path kCrashPluginDir = kTestPlugins / "crash";
const fs::path kSlowPluginDir = kTestPlugins / "slow";

std::string bin(const std::string& tool) { return std::string(CONFLUX_BIN_DIR) + "/" + tool; }

long long millis(Clock::duration d) { return std::chrono::duration_cast<std::chrono::milliseconds>(d).count(); }

// Polls `pred` every `poll` until it holds (true) or `timeout` passes (false).
template <class Pred>
bool eventually(Pred&& pred, Clock::duration timeout, Clock::duration poll = 30ms) {
  const auto deadline = Clock::now() + timeout;
  for (;;) {
    if (pred()) return true;
    if (Clock::now() >= deadline) return false;
    std::this_thread::sleep_for(poll);
  }
}

// ------------------------------------------------------------------------------------------------
// Child processes
// ------------------------------------------------------------------------------------------------

// A program to start: its argv and environment, prepared before fork so that the child only makes
// async-signal-safe calls. The environment is ours without the variables these tests control
// (plugin path, systemd's), plus `extra_env`.
struct Launch {
  std::vector<std::string> args, env;
  std::optional<rlim_t> file_size_limit;  // RLIMIT_FSIZE of the child
  bool own_group = false;                 // lead a new process group

  explicit Launch(std::vector<std::string> a, const std::vector<std::string>& extra_env = {}) : args(std::move(a)) {
    static constexpr std::string_view kControlled[] = {"CONFLUX_PLUGIN_PATH=", "NOTIFY_SOCKET=", "WATCHDOG_USEC=",
                                                       "WATCHDOG_PID=",        "JOURNAL_STREAM=", "LISTEN_FDS="};
    for (char** e = environ; *e != nullptr; ++e) {
      const std::string_view v(*e);
      if (std::none_of(std::begin(kControlled), std::end(kControlled), [&](std::string_view p) { return v.starts_with(p); }))
        env.emplace_back(v);
    }
    env.insert(env.end(), extra_env.begin(), extra_env.end());
  }

  // Forks and execs with stdin from /dev/null and stdout/stderr appended to `out`/`err`, from /.
  pid_t spawn(const fs::path& out, const fs::path& err) {
    std::vector<char*> argv, envp;
    for (auto& s : args) argv.push_back(s.data());
    argv.push_back(nullptr);
    for (auto& s : env) envp.push_back(s.data());
    envp.push_back(nullptr);
    const std::string out_s = out.string(), err_s = err.string();
    const pid_t pid = ::fork();
    if (pid < 0) throw std::runtime_error("fork failed");
    if (pid == 0) {
      if (own_group) ::setpgid(0, 0);
      constexpr int kFlags = O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC;
      const int o = ::open(out_s.c_str(), kFlags, 0644);
      const int e = out_s == err_s ? o : ::open(err_s.c_str(), kFlags, 0644);
      const int in = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
      if (o < 0 || e < 0 || in < 0) ::_exit(126);
      ::dup2(in, STDIN_FILENO);
      ::dup2(o, STDOUT_FILENO);
      ::dup2(e, STDERR_FILENO);
      if (file_size_limit) {
        const rlimit lim{*file_size_limit, *file_size_limit};
        if (::setrlimit(RLIMIT_FSIZE, &lim) != 0) ::_exit(125);
      }
      sigset_t none;
      sigemptyset(&none);
      ::sigprocmask(SIG_SETMASK, &none, nullptr);
      if (::chdir("/") != 0) ::_exit(126);
      ::execve(argv[0], argv.data(), envp.data());
      ::_exit(127);
    }
    return pid;
  }
};

struct Finished {
  int exit_code = -1;  // -1: killed by a signal
  std::string out, err;
};

// Runs a program to completion; its output passes through files in `scratch`.
Finished run_program(std::vector<std::string> args, const fs::path& scratch,
                     const std::vector<std::string>& extra_env = {}) {
  Launch l(std::move(args), extra_env);
  const fs::path out = scratch / "run.out", err = scratch / "run.err";
  fs::remove(out);
  fs::remove(err);
  const pid_t pid = l.spawn(out, err);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  Finished r;
  if (WIFEXITED(status)) r.exit_code = WEXITSTATUS(status);
  r.out = fs::exists(out) ? read_file(out) : "";
  r.err = fs::exists(err) ? read_file(err) : "";
  return r;
}

// confluxd as a child process leading its own process group (its merge workers are in it).
class Confluxd {
 public:
  Confluxd() = default;
  Confluxd(const Confluxd&) = delete;
  Confluxd& operator=(const Confluxd&) = delete;
  ~Confluxd() { kill_group(); }

  void start(const fs::path& config, const fs::path& log, const std::vector<std::string>& extra_env,
             std::optional<rlim_t> file_size_limit) {
    Launch l({bin("confluxd"), "--config", config.string()}, extra_env);
    l.own_group = true;
    l.file_size_limit = file_size_limit;
    pid_ = l.spawn(log, log);
  }

  bool alive() {
    if (pid_ <= 0) return false;
    int status = 0;
    const pid_t r = ::waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      status_ = status;
      pid_ = -1;
      return false;
    }
    return true;
  }

  void signal(int sig) const {
    if (pid_ > 0) ::kill(pid_, sig);
  }

  // SIGTERM, then waits: the exit code, 128+N after signal N, -1 if it did not stop in time.
  int terminate(Clock::duration timeout = 15s) {
    signal(SIGTERM);
    if (!eventually([&] { return !alive(); }, timeout, 10ms)) {
      kill_group();
      return -1;
    }
    return exit_code();
  }

  // SIGKILL to the daemon and its workers.
  void kill_group() {
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
  pid_t pid_ = -1;
  std::optional<int> status_;
};

// ------------------------------------------------------------------------------------------------
// Small helpers
// ------------------------------------------------------------------------------------------------

std::string text_of(const json::object& o, std::string_view key) {
  const json::value* v = o.if_contains(key);
  return v && v->is_string() ? std::string(v->as_string()) : std::string();
}

double number_of(const json::object& o, std::string_view key) {
  const json::value* v = o.if_contains(key);
  return v && v->is_number() ? v->to_number<double>() : 0.0;
}

// Hidden entries a dead worker or a publish could leave in an output directory.
std::vector<std::string> partial_entries(const fs::path& output) {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(output, ec)) {
    const std::string name = e.path().filename().string();
    if (name.starts_with(".") && (contains(name, "partial") || contains(name, ".old-") || contains(name, ".tmp")))
      names.push_back(name);
  }
  return names;
}

// Published versions (visible entries) in an output directory.
std::vector<std::string> visible_entries(const fs::path& output) {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(output, ec)) {
    const std::string name = e.path().filename().string();
    if (!name.starts_with(".")) names.push_back(name);
  }
  return names;
}

std::string joined(const std::vector<std::string>& v) {
  std::string s;
  for (const auto& x : v) s += (s.empty() ? "" : ", ") + x;
  return s;
}

std::string toml_quoted(const fs::path& p) { return "\"" + p.string() + "\""; }

// A [[job]] table over one model (paths absolute); `extra` holds further keys and tables.
std::string job_toml(const std::string& name, const std::string& strategy, const fs::path& model,
                     const fs::path& output, const std::string& extra = "") {
  return "[[job]]\nname = \"" + name + "\"\nstrategy = \"" + strategy + "\"\nmodels = [" + toml_quoted(model) +
         "]\noutput = " + toml_quoted(output) + "\nsettle = \"200ms\"\n" + extra + "\n";
}

std::uint64_t monotonic_usec() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<std::uint64_t>(ts.tv_sec) * 1000000u + static_cast<std::uint64_t>(ts.tv_nsec) / 1000u;
}

// ------------------------------------------------------------------------------------------------
// Fixture
// ------------------------------------------------------------------------------------------------

class DaemonFaults : public ::testing::Test {
 protected:
  // A synthetic tiny checkpoint (about 400 KB) shared by the tests of a suite (read-only).
  static void SetUpTestSuite() {
    models_ = new conflux_test::TempDir();
    fs::create_directories(models_->path() / "tool");
    const Finished r = run_program(
        {bin("conflux-synth"), "--out", (models_->path() / "tiny").string(), "--preset", "tiny"}, models_->path() / "tool");
    ASSERT_EQ(r.exit_code, 0) << r.err;
  }
  static void TearDownTestSuite() {
    delete models_;
    models_ = nullptr;
  }
  static fs::path tiny() { return models_->path() / "tiny" / "base"; }

  void SetUp() override {
    ASSERT_TRUE(models_ != nullptr && fs::exists(tiny() / "model.safetensors")) << "the synthetic inputs are missing";
    // The test plugins must themselves pass the trust check (a build tree made under umask 002
    // would be refused).
    for (const fs::path& p : {kCrashPluginDir, kCrashPluginDir / "crash.so", kSlowPluginDir, kSlowPluginDir / "slow.so"}) {
      struct stat st {};
      ASSERT_EQ(::stat(p.c_str(), &st), 0) << p << ": " << std::strerror(errno);
      ASSERT_EQ(st.st_mode & (S_IWGRP | S_IWOTH), 0u) << p << " is group/other-writable: confluxd would refuse it";
    }
    fs::create_directories(scratch());
  }

  void TearDown() override {
    daemon_.kill_group();
    for (auto it = mounts_.rbegin(); it != mounts_.rend(); ++it) ::umount2(it->c_str(), MNT_DETACH);
    if (HasFailure() && fs::exists(log_path()))
      std::cerr << "---- confluxd log ----\n" << read_file(log_path()) << "---- end of log ----\n";
  }

  fs::path scratch() const { return dir / "tool"; }
  fs::path config_path() const { return dir / "confluxd.toml"; }
  fs::path log_path() const { return dir / "confluxd.log"; }
  std::string log_text() const { return fs::exists(log_path()) ? read_file(log_path()) : std::string(); }

  // The [daemon] table (socket and state in the temporary directory, 1 s rescan) and `jobs`.
  void write_config(const std::vector<fs::path>& plugin_dirs, const std::string& jobs) {
    std::string dirs;
    for (const auto& d : plugin_dirs) dirs += (dirs.empty() ? "" : ", ") + toml_quoted(d);
    write_file(config_path(), "[daemon]\ncontrol_socket = " + toml_quoted(dir / "ctl.sock") +
                                  "\nstate_dir = " + toml_quoted(dir / "state") + "\nplugin_dirs = [" + dirs +
                                  "]\nrescan = \"1s\"\n\n" + jobs);
  }

  Finished conflux(std::vector<std::string> args) {
    args.insert(args.begin(), bin("conflux"));
    return run_program(std::move(args), scratch());
  }

  std::optional<json::object> status() {
    const Finished r = conflux({"status", "--config", config_path().string(), "--json"});
    if (r.exit_code != 0) return std::nullopt;
    boost::system::error_code ec;
    json::value v = json::parse(r.out, ec);
    if (ec || !v.is_object()) {
      ADD_FAILURE() << "conflux status --json printed no JSON object: " << r.out;
      return std::nullopt;
    }
    return std::move(v.as_object());
  }

  json::object job_status(const std::string& name) {
    if (const auto s = status())
      for (const auto& j : s->at("jobs").as_array())
        if (j.as_object().at("name").as_string() == name) return j.as_object();
    return {};
  }

  // Polls a job's status until `pred` holds: the status then, or empty (with a failure) on timeout.
  json::object await_job(const std::string& name, const std::function<bool(const json::object&)>& pred,
                         Clock::duration timeout, const std::string& what) {
    json::object last;
    if (eventually(
            [&] {
              last = job_status(name);
              return !last.empty() && pred(last);
            },
            timeout, 50ms))
      return last;
    ADD_FAILURE() << "job '" << name << "': timed out waiting for " << what << "; last status: " << json::serialize(last);
    return {};
  }

  // Waits for the job's run to fail: its status then.
  json::object await_failure(const std::string& name, Clock::duration timeout = 20s) {
    return await_job(
        name, [](const json::object& j) { return text_of(j, "state") == "failed" && !text_of(j, "last_error").empty(); },
        timeout, "state failed with a last_error");
  }

  // Waits for a published version and state idle.
  json::object await_success(const std::string& name, Clock::duration timeout = 20s) {
    return await_job(
        name,
        [](const json::object& j) {
          const json::value* p = j.if_contains("published");
          return text_of(j, "state") == "idle" && p && p->is_array() && !p->as_array().empty();
        },
        timeout, "a published version and state idle");
  }

  void start_daemon(const std::vector<std::string>& extra_env = {}, std::optional<rlim_t> file_size_limit = {}) {
    daemon_.start(config_path(), log_path(), extra_env, file_size_limit);
    const bool up = eventually([&] { return !daemon_.alive() || status().has_value(); }, 10s, 20ms);
    ASSERT_TRUE(up && daemon_.alive()) << "confluxd did not come up (exit " << daemon_.exit_code() << ")";
  }

  // After a failed run: the daemon still answers, nothing partial or published is left in `output`.
  void expect_clean_failure(const fs::path& output) {
    EXPECT_TRUE(daemon_.alive()) << "confluxd died (exit " << daemon_.exit_code() << ")";
    EXPECT_TRUE(status().has_value()) << "confluxd no longer answers status";
    EXPECT_TRUE(partial_entries(output).empty()) << "left behind in " << output << ": " << joined(partial_entries(output));
    EXPECT_TRUE(visible_entries(output).empty()) << "published despite the failure: " << joined(visible_entries(output));
  }

  // Mounts a tmpfs of `size` at `at`; false when this process may not mount.
  bool mount_tmpfs(const fs::path& at, const std::string& size) {
    fs::create_directories(at);
    const std::string opts = "size=" + size + ",mode=0755";
    if (::mount("tmpfs", at.c_str(), "tmpfs", MS_NOSUID | MS_NODEV, opts.c_str()) != 0) return false;
    mounts_.push_back(at);
    return true;
  }

  conflux_test::TempDir dir;
  Confluxd daemon_;
  std::vector<fs::path> mounts_;
  static conflux_test::TempDir* models_;
};

conflux_test::TempDir* DaemonFaults::models_ = nullptr;

// ------------------------------------------------------------------------------------------------
// Crash isolation
// ------------------------------------------------------------------------------------------------

TEST_F(DaemonFaults, PluginThatCrashesFailsItsRunAndTheDaemonKeepsServing) {
  const fs::path out = dir / "out";
  write_config({kCrashPluginDir, kSlowPluginDir},
               job_toml("segv", "crash_on_purpose", tiny(), out / "segv", "[job.params]\nmode = \"segv\"") +
                   job_toml("abort", "crash_on_purpose", tiny(), out / "abort", "[job.params]\nmode = \"abort\"") +
                   job_toml("copy", "passthrough", tiny(), out / "copy", "trigger = \"manual\""));
  ASSERT_NO_FATAL_FAILURE(start_daemon());

  const json::object segv = await_failure("segv");
  const json::object abrt = await_failure("abort");
  ASSERT_FALSE(segv.empty());
  ASSERT_FALSE(abrt.empty());
  EXPECT_TRUE(contains(text_of(segv, "last_error"), "SIGSEGV")) << json::serialize(segv);
  EXPECT_TRUE(contains(text_of(abrt, "last_error"), "SIGABRT")) << json::serialize(abrt);
  std::printf("[ observed ] segv: %s\n[ observed ] abort: %s\n", text_of(segv, "last_error").c_str(),
              text_of(abrt, "last_error").c_str());
  const json::value& last = segv.at("last_result");
  ASSERT_TRUE(last.is_object()) << json::serialize(segv);
  EXPECT_FALSE(last.as_object().at("ok").as_bool());
  expect_clean_failure(out / "segv");
  expect_clean_failure(out / "abort");
  const std::string log = log_text();
  EXPECT_TRUE(contains(log, "job 'segv': merge failed: merge worker crashed (SIGSEGV")) << log;
  EXPECT_TRUE(contains(log, "job 'abort': merge failed: merge worker aborted (SIGABRT")) << log;
  // The dead workers' partial directories existed and were removed by the daemon.
  EXPECT_TRUE(contains(log, "removed leftover " + (out / "segv").string() + "/.")) << log;
  EXPECT_TRUE(contains(log, "removed leftover " + (out / "abort").string() + "/.")) << log;

  // The daemon still merges: another job runs to completion afterwards.
  const Finished run = conflux({"run", "copy", "--config", config_path().string()});
  EXPECT_EQ(run.exit_code, 0) << run.err;
  const json::object copy = await_success("copy");
  ASSERT_FALSE(copy.empty());
  EXPECT_TRUE(fs::is_symlink(out / "copy" / "latest"));
  EXPECT_TRUE(fs::exists(out / "copy" / "latest" / "model.safetensors"));
  // A failed job is not retried on its own (its inputs did not change).
  EXPECT_EQ(number_of(job_status("segv"), "runs"), 1.0);
  EXPECT_EQ(daemon_.terminate(), 0);
}

TEST_F(DaemonFaults, InputTruncatedDuringTheMergeFailsTheRun) {
  // A small checkpoint (about 10 MB of BF16) of this test's own: it gets damaged.
  const Finished synth =
      run_program({bin("conflux-synth"), "--out", (dir / "in").string(), "--preset", "small"}, scratch());
  ASSERT_EQ(synth.exit_code, 0) << synth.err;
  const fs::path input = dir / "in" / "base";
  const fs::path weights = input / "model.safetensors";
  const auto size = fs::file_size(weights);
  const fs::path out = dir / "out" / "slow";
  // One thread, 8 ms per 32 Ki-element chunk: ~150 chunks, over a second of merging.
  write_config({kCrashPluginDir, kSlowPluginDir},
               job_toml("slow", "slow_copy", input, out, "threads = 1\n[job.params]\nsleep_ms = 8"));
  ASSERT_NO_FATAL_FAILURE(start_daemon());

  // Running, with progress reported: the worker has mapped the input and is reading it.
  const json::object running = await_job(
      "slow", [](const json::object& j) { return text_of(j, "state") == "running" && number_of(j, "progress") > 0; }, 15s,
      "the merge to run and report progress");
  ASSERT_FALSE(running.empty());
  const double at = number_of(running, "progress");
  ASSERT_EQ(::truncate(weights.c_str(), static_cast<off_t>(size / 2)), 0) << std::strerror(errno);
  const auto truncated = Clock::now();

  const json::object failed = await_failure("slow");
  ASSERT_FALSE(failed.empty());
  const std::string error = text_of(failed, "last_error");
  std::printf("[ observed ] truncated %s from %llu to %llu bytes at %.1f%% progress; the run failed %lld ms later: %s\n",
              weights.c_str(), static_cast<unsigned long long>(size), static_cast<unsigned long long>(size / 2), at,
              millis(Clock::now() - truncated), error.c_str());
  EXPECT_TRUE(contains(error, "SIGBUS") || contains(error, "model.safetensors")) << error;
  expect_clean_failure(out);
  // The truncated checkpoint is incomplete now: no new run starts from it.
  std::this_thread::sleep_for(1200ms);
  const json::object later = job_status("slow");
  EXPECT_EQ(text_of(later, "state"), "failed") << json::serialize(later);
  EXPECT_EQ(number_of(later, "runs"), 1.0) << json::serialize(later);
  EXPECT_EQ(daemon_.terminate(), 0);
}

// The children of `parent` (from /proc/<pid>/stat's ppid field).
std::vector<pid_t> children_of(pid_t parent) {
  std::vector<pid_t> kids;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator("/proc", ec)) {
    const std::string name = e.path().filename().string();
    if (name.empty() || !std::all_of(name.begin(), name.end(), [](char c) { return c >= '0' && c <= '9'; })) continue;
    std::string stat;
    try {
      stat = read_file(e.path() / "stat");
    } catch (const std::exception&) {
      continue;  // exited meanwhile
    }
    // pid (comm) state ppid ...: comm may contain spaces and parentheses, so parse after the last ')'.
    const auto close = stat.rfind(')');
    if (close == std::string::npos) continue;
    char state = 0;
    long long ppid = 0;
    if (std::sscanf(stat.c_str() + close + 1, " %c %lld", &state, &ppid) == 2 && ppid == parent)
      kids.push_back(static_cast<pid_t>(std::stoll(name)));
  }
  return kids;
}

TEST_F(DaemonFaults, WorkerKilledMidRunLikeTheOomKillerFailsTheRun) {
  const fs::path out = dir / "out" / "killed";
  // One thread, 200 ms per chunk: the tiny model's ~30 chunks keep the worker busy for seconds.
  write_config({kCrashPluginDir, kSlowPluginDir},
               job_toml("killed", "slow_copy", tiny(), out, "threads = 1\n[job.params]\nsleep_ms = 200"));
  ASSERT_NO_FATAL_FAILURE(start_daemon());
  ASSERT_FALSE(await_job(
                   "killed", [](const json::object& j) { return text_of(j, "state") == "running"; }, 15s,
                   "the merge to run")
                   .empty());
  std::vector<pid_t> workers;
  ASSERT_TRUE(eventually([&] { return (workers = children_of(daemon_.pid())).size() == 1; }, 5s))
      << workers.size() << " children of confluxd";
  // Let it create its partial directory, then kill it as the OOM killer would.
  ASSERT_TRUE(eventually([&] { return !partial_entries(out).empty(); }, 5s)) << "no partial directory appeared";
  ASSERT_EQ(::kill(workers[0], SIGKILL), 0);
  const json::object failed = await_failure("killed");
  ASSERT_FALSE(failed.empty());
  const std::string error = text_of(failed, "last_error");
  std::printf("[ observed ] worker SIGKILLed: %s\n", error.c_str());
  EXPECT_TRUE(contains(error, "SIGKILL")) << error;
  EXPECT_TRUE(contains(error, "out of memory")) << error;
  expect_clean_failure(out);
  EXPECT_EQ(daemon_.terminate(), 0);
}

// ------------------------------------------------------------------------------------------------
// Disk limits: RLIMIT_FSIZE and a full filesystem
// ------------------------------------------------------------------------------------------------

TEST_F(DaemonFaults, FileSizeLimitFailsTheRunWithFileTooLarge) {
  const fs::path out = dir / "out" / "big";
  ASSERT_GT(fs::file_size(tiny() / "model.safetensors"), 64u * 1024u) << "the tiny model must exceed the limit";
  write_config({kCrashPluginDir, kSlowPluginDir}, job_toml("big", "passthrough", tiny(), out));
  // 64 KiB: enough for state.json, the run's job file and the log, not for the merged model.
  ASSERT_NO_FATAL_FAILURE(start_daemon({}, rlim_t{64 * 1024}));
  const json::object failed = await_failure("big");
  ASSERT_FALSE(failed.empty());
  const std::string error = text_of(failed, "last_error");
  std::printf("[ observed ] RLIMIT_FSIZE 64 KiB: %s\n", error.c_str());
  EXPECT_TRUE(contains(error, "File too large")) << error;
  EXPECT_TRUE(contains(log_text(), "job 'big': merge failed: ")) << log_text();
  expect_clean_failure(out);
  EXPECT_TRUE(fs::exists(dir / "state" / "state.json"));
  EXPECT_EQ(daemon_.terminate(), 0);
}

TEST_F(DaemonFaults, FullFilesystemFailsTheRunAndFreesTheSpace) {
  const fs::path mnt = dir / "small-fs";
  if (!mount_tmpfs(mnt, "128k")) GTEST_SKIP() << "cannot mount a tmpfs here (" << std::strerror(errno) << ")";
  const fs::path out = mnt / "out";
  write_config({kCrashPluginDir, kSlowPluginDir}, job_toml("full", "passthrough", tiny(), out));
  ASSERT_NO_FATAL_FAILURE(start_daemon());
  const json::object failed = await_failure("full");
  ASSERT_FALSE(failed.empty());
  const std::string error = text_of(failed, "last_error");
  std::printf("[ observed ] 128 KiB tmpfs: %s\n", error.c_str());
  EXPECT_TRUE(contains(error, "No space left on device")) << error;
  expect_clean_failure(out);
  // The partial output's space is given back.
  struct statvfs st {};
  ASSERT_EQ(::statvfs(mnt.c_str(), &st), 0);
  EXPECT_GE(st.f_bfree * st.f_frsize, 120u * 1024u) << "the failed run's files still use the small filesystem";
  EXPECT_EQ(daemon_.terminate(), 0);
}

// ------------------------------------------------------------------------------------------------
// A queued job takes its inputs as they are when it starts
// ------------------------------------------------------------------------------------------------

TEST_F(DaemonFaults, QueuedJobMergesTheCheckpointThatLandedWhileItWaited) {
  // One slot (max_parallel_jobs = 1, the default), held for seconds by a slow run; job q queues
  // behind it for checkpoint-1, then checkpoint-2 lands. q must run once, on checkpoint-2.
  const fs::path runs = dir / "runs" / "q";
  fs::create_directories(runs);
  fs::create_directories(dir / "staging");
  auto land = [&](const std::string& name) {
    fs::copy(tiny(), dir / "staging" / name, fs::copy_options::recursive);
    fs::rename(dir / "staging" / name, runs / name);
  };
  write_config({kSlowPluginDir}, job_toml("slow", "slow_copy", tiny(), dir / "out" / "slow",
                                          "threads = 1\n[job.params]\nsleep_ms = 200") +
                                     job_toml("q", "linear", runs, dir / "out" / "q"));
  ASSERT_NO_FATAL_FAILURE(start_daemon());
  ASSERT_FALSE(await_job("slow", [](const json::object& j) { return text_of(j, "state") == "running"; }, 15s,
                         "the slow run to start")
                   .empty());
  land("checkpoint-1");
  ASSERT_FALSE(await_job("q", [](const json::object& j) { return text_of(j, "state") == "queued"; }, 10s,
                         "q to queue behind the slow run")
                   .empty());
  land("checkpoint-2");
  std::this_thread::sleep_for(1500ms);  // past settle and a rescan, still queued
  ASSERT_EQ(text_of(job_status("slow"), "state"), "running") << "the slow run ended too early for this test";
  const json::object done = await_success("q", 60s);
  ASSERT_FALSE(done.empty());
  std::this_thread::sleep_for(1500ms);  // a stale first run would be followed by a second by now
  const json::object q = job_status("q");
  EXPECT_EQ(number_of(q, "runs"), 1.0) << json::serialize(q);
  const json::array& published = q.at("published").as_array();
  ASSERT_EQ(published.size(), 1u) << json::serialize(q);
  const std::string manifest =
      read_file(dir / "out" / "q" / std::string(published[0].as_string()) / "conflux-manifest.json");
  EXPECT_TRUE(contains(manifest, (runs / "checkpoint-2").string())) << manifest;
  EXPECT_FALSE(contains(manifest, (runs / "checkpoint-1").string())) << manifest;
  EXPECT_EQ(daemon_.terminate(), 0);
}

// ------------------------------------------------------------------------------------------------
// memory_limit
// ------------------------------------------------------------------------------------------------

TEST_F(DaemonFaults, MemoryLimitTooSmallFailsTheRunWithAReason) {
  const fs::path out = dir / "out";
  write_config({kCrashPluginDir, kSlowPluginDir},
               job_toml("starved", "passthrough", tiny(), out / "starved", "memory_limit = \"1MB\"") +
                   job_toml("roomy", "passthrough", tiny(), out / "roomy", "memory_limit = \"2GB\"") +
                   job_toml("free", "passthrough", tiny(), out / "free"));
  ASSERT_NO_FATAL_FAILURE(start_daemon());
  const json::object starved = await_failure("starved");
  ASSERT_FALSE(starved.empty());
  const std::string error = text_of(starved, "last_error");
  std::printf("[ observed ] memory_limit 1MB: %s\n", error.c_str());
  // What an allocation failure under RLIMIT_DATA looks like: thread creation (EAGAIN), operator
  // new, mmap, or the dynamic loader failing to map a library.
  EXPECT_TRUE(contains(error, "Resource temporarily unavailable") || contains(error, "bad_alloc") ||
              contains(error, "Cannot allocate memory") || contains(error, "memory") ||
              contains(error, "shared libraries"))
      << error;
  expect_clean_failure(out / "starved");
  EXPECT_TRUE(contains(log_text(), "job 'starved': merge failed: ")) << log_text();
  // The same merge without a limit, and with a limit it fits in, succeeds.
  EXPECT_FALSE(await_success("free").empty());
  const json::object roomy = await_success("roomy");
  EXPECT_FALSE(roomy.empty());
  EXPECT_TRUE(fs::exists(out / "free" / "latest" / "model.safetensors"));
  EXPECT_TRUE(fs::exists(out / "roomy" / "latest" / "model.safetensors"));
  EXPECT_EQ(daemon_.terminate(), 0);
}

// ------------------------------------------------------------------------------------------------
// sd_notify
// ------------------------------------------------------------------------------------------------

// A Unix datagram socket standing in for systemd's notification socket.
class NotifySocket {
 public:
  explicit NotifySocket(const fs::path& path) : path_(path) {
    fd_ = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd_ < 0) throw std::runtime_error("socket failed");
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (path.string().size() >= sizeof addr.sun_path) throw std::runtime_error("socket path too long: " + path.string());
    std::strncpy(addr.sun_path, path.c_str(), sizeof addr.sun_path - 1);
    if (::bind(fd_, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) != 0)
      throw std::runtime_error("bind " + path.string() + ": " + std::strerror(errno));
  }
  NotifySocket(const NotifySocket&) = delete;
  NotifySocket& operator=(const NotifySocket&) = delete;
  ~NotifySocket() { ::close(fd_); }

  struct Message {
    Clock::time_point at;
    std::uint64_t monotonic_usec;
    std::string text;
  };

  // Receives datagrams until `done(messages)` holds or `timeout` passes; true when it held.
  bool receive_until(const std::function<bool(const std::vector<Message>&)>& done, Clock::duration timeout) {
    const auto deadline = Clock::now() + timeout;
    while (!done(messages)) {
      const auto left = deadline - Clock::now();
      if (left <= 0s) return false;
      pollfd p{fd_, POLLIN, 0};
      const int n = ::poll(&p, 1, static_cast<int>(std::max<long long>(1, millis(left))));
      if (n <= 0) continue;
      char buf[4096];
      const ssize_t got = ::recv(fd_, buf, sizeof buf, 0);
      if (got > 0) messages.push_back({Clock::now(), monotonic_usec(), std::string(buf, static_cast<std::size_t>(got))});
    }
    return true;
  }

  std::vector<Message> messages;

 private:
  fs::path path_;
  int fd_ = -1;
};

// The first line of a datagram that starts with `key=`, e.g. field(m, "MONOTONIC_USEC").
std::optional<std::string> field(const std::string& datagram, const std::string& key) {
  std::size_t pos = 0;
  while (pos <= datagram.size()) {
    const std::size_t end = std::min(datagram.find('\n', pos), datagram.size());
    const std::string line = datagram.substr(pos, end - pos);
    if (line.starts_with(key + "=")) return line.substr(key.size() + 1);
    pos = end + 1;
  }
  return std::nullopt;
}

bool has(const NotifySocket::Message& m, const std::string& assignment) {
  const auto eq = assignment.find('=');
  const auto v = field(m.text, assignment.substr(0, eq));
  return v && *v == assignment.substr(eq + 1);
}

TEST_F(DaemonFaults, NotifySocketSeesReadyWatchdogReloadingAndStoppingInOrder) {
  const fs::path sock = dir / "notify.sock";
  NotifySocket notify(sock);
  write_config({kCrashPluginDir}, job_toml("idle", "passthrough", tiny(), dir / "out" / "idle", "trigger = \"manual\""));
  // WATCHDOG_USEC 200 ms: keep-alives every 100 ms. WATCHDOG_PID stays unset (sd_watchdog_enabled
  // would ignore a watchdog meant for another pid).
  ASSERT_NO_FATAL_FAILURE(start_daemon({"NOTIFY_SOCKET=" + sock.string(), "WATCHDOG_USEC=200000"}));
  using Msgs = std::vector<NotifySocket::Message>;
  auto count = [](const Msgs& ms, const std::string& a, std::size_t from = 0) {
    std::size_t n = 0;
    for (std::size_t i = from; i < ms.size(); ++i) n += has(ms[i], a);
    return n;
  };
  auto first = [](const Msgs& ms, const std::string& a, std::size_t from = 0) -> std::size_t {
    for (std::size_t i = from; i < ms.size(); ++i)
      if (has(ms[i], a)) return i;
    return ms.size();
  };

  // Start-up: READY, a STATUS line, then keep-alives.
  ASSERT_TRUE(notify.receive_until(
      [&](const Msgs& ms) { return count(ms, "READY=1") >= 1 && count(ms, "WATCHDOG=1", first(ms, "READY=1")) >= 6; }, 5s))
      << notify.messages.size() << " messages";
  const std::size_t ready = first(notify.messages, "READY=1");

  // SIGHUP: RELOADING=1 with MONOTONIC_USEC (in one datagram), then READY=1 again.
  const std::uint64_t before_hup = monotonic_usec();
  daemon_.signal(SIGHUP);
  ASSERT_TRUE(notify.receive_until(
      [&](const Msgs& ms) {
        const std::size_t r = first(ms, "RELOADING=1", ready + 1);
        return r < ms.size() && count(ms, "READY=1", r + 1) >= 1 && count(ms, "WATCHDOG=1", r + 1) >= 2;
      },
      5s))
      << "no RELOADING=1 / READY=1 / WATCHDOG=1 after SIGHUP";
  const std::uint64_t after_reload = monotonic_usec();
  const std::size_t reloading = first(notify.messages, "RELOADING=1", ready + 1);
  const std::size_t ready_again = first(notify.messages, "READY=1", reloading + 1);

  // SIGTERM: STOPPING=1, and the daemon exits 0.
  daemon_.signal(SIGTERM);
  ASSERT_TRUE(notify.receive_until([&](const Msgs& ms) { return count(ms, "STOPPING=1") >= 1; }, 5s)) << "no STOPPING=1";
  EXPECT_TRUE(eventually([&] { return !daemon_.alive(); }, 10s, 10ms));
  EXPECT_EQ(daemon_.exit_code(), 0);
  notify.receive_until([](const Msgs&) { return false; }, 300ms);  // anything sent while exiting
  const Msgs& ms = notify.messages;
  const std::size_t stopping = first(ms, "STOPPING=1");

  std::string trace;
  for (const auto& m : ms) {
    std::string t = m.text;
    std::replace(t.begin(), t.end(), '\n', ' ');
    trace += "  " + t + "\n";
  }
  SCOPED_TRACE("datagrams received:\n" + trace);
  {
    // The sequence with runs of keep-alives collapsed, for the record.
    std::string seq;
    for (std::size_t i = 0; i < ms.size();) {
      std::size_t j = i;
      while (j < ms.size() && ms[j].text == ms[i].text) ++j;
      std::string t = ms[i].text;
      std::replace(t.begin(), t.end(), '\n', ' ');
      seq += (seq.empty() ? "" : " | ") + t + (j - i > 1 ? " x" + std::to_string(j - i) : "");
      i = j;
    }
    std::printf("[ observed ] notify sequence: %s\n", seq.c_str());
  }

  // Nothing but STATUS precedes READY; the watchdog starts after it.
  for (std::size_t i = 0; i < ready; ++i) EXPECT_TRUE(field(ms[i].text, "STATUS").has_value()) << ms[i].text;
  EXPECT_GT(first(ms, "WATCHDOG=1"), ready);
  EXPECT_GE(std::count_if(ms.begin(), ms.end(), [](const auto& m) { return field(m.text, "STATUS").has_value(); }), 1);
  for (const auto& m : ms) {
    if (const auto s = field(m.text, "STATUS")) {
      EXPECT_TRUE(contains(*s, "jobs")) << *s;
    }
  }

  // Keep-alives at about half of WATCHDOG_USEC.
  std::vector<long long> gaps;
  for (std::size_t i = ready, prev = ms.size(); i < reloading; ++i) {
    if (!has(ms[i], "WATCHDOG=1")) continue;
    if (prev < ms.size()) gaps.push_back(millis(ms[i].at - ms[prev].at));
    prev = i;
  }
  ASSERT_GE(gaps.size(), 4u);
  std::sort(gaps.begin(), gaps.end());
  const long long median = gaps[gaps.size() / 2];
  std::printf("[ observed ] watchdog keep-alive gaps (ms, sorted): ");
  for (long long g : gaps) std::printf("%lld ", g);
  std::printf("\n");
  EXPECT_GE(median, 60);
  EXPECT_LE(median, 160);

  // The reload: RELOADING=1 and MONOTONIC_USEC in the same datagram, a CLOCK_MONOTONIC time taken
  // between our SIGHUP and the READY=1 that ends the reload.
  ASSERT_LT(reloading, ms.size());
  const auto usec = field(ms[reloading].text, "MONOTONIC_USEC");
  ASSERT_TRUE(usec.has_value()) << ms[reloading].text;
  ASSERT_FALSE(usec->empty());
  ASSERT_TRUE(std::all_of(usec->begin(), usec->end(), [](char c) { return c >= '0' && c <= '9'; })) << *usec;
  const std::uint64_t reload_at = std::stoull(*usec);
  EXPECT_GE(reload_at, before_hup);
  EXPECT_LE(reload_at, after_reload);
  EXPECT_GT(ready_again, reloading);
  EXPECT_LT(ready_again, ms.size());

  // STOPPING comes last: after the second READY, and no READY, RELOADING or WATCHDOG follows it.
  ASSERT_LT(stopping, ms.size());
  EXPECT_GT(stopping, ready_again);
  for (std::size_t i = stopping + 1; i < ms.size(); ++i)
    EXPECT_TRUE(!has(ms[i], "READY=1") && !has(ms[i], "RELOADING=1") && !has(ms[i], "WATCHDOG=1")) << ms[i].text;
}

// ------------------------------------------------------------------------------------------------
// Plugin trust
// ------------------------------------------------------------------------------------------------

class PluginTrust : public DaemonFaults {
 protected:
  // A copy of the slow_copy plugin in DIR/name/slow.so with the given modes (and owner).
  fs::path plugin_copy(const std::string& name, fs::perms dir_mode, fs::perms file_mode, uid_t owner = 0) {
    const fs::path d = dir / "plugins" / name;
    fs::create_directories(d);
    fs::copy_file(kSlowPluginDir / "slow.so", d / "slow.so", fs::copy_options::overwrite_existing);
    fs::permissions(d / "slow.so", file_mode);
    fs::permissions(d, dir_mode);
    if (owner != 0 && ::chown((d / "slow.so").c_str(), owner, static_cast<gid_t>(-1)) != 0)
      ADD_FAILURE() << "chown: " << std::strerror(errno);
    return d;
  }

  // `conflux plugins --json` with this configuration's plugin_dirs: the problems and plugin ids.
  struct Listing {
    std::vector<std::string> problems, ids;
  };
  Listing list_plugins(const std::vector<fs::path>& dirs) {
    write_config(dirs, job_toml("unused", "slow_copy", tiny(), dir / "out" / "unused", "trigger = \"manual\""));
    const Finished r = conflux({"plugins", "--json", "--config", config_path().string()});
    EXPECT_EQ(r.exit_code, 0) << r.err;
    Listing l;
    const json::value v = json::parse(r.out);
    for (const auto& p : v.at("problems").as_array()) l.problems.emplace_back(p.at("message").as_string());
    for (const auto& p : v.at("plugins").as_array()) l.ids.emplace_back(p.at("id").as_string());
    return l;
  }

  void expect_refused(const std::vector<fs::path>& dirs, const std::string& reason) {
    SCOPED_TRACE(reason);
    const Listing l = list_plugins(dirs);
    EXPECT_EQ(std::count(l.ids.begin(), l.ids.end(), "slow_copy"), 0) << "a refused plugin is listed: " << joined(l.ids);
    ASSERT_EQ(l.problems.size(), 1u) << joined(l.problems);
    EXPECT_TRUE(contains(l.problems[0], "refused")) << l.problems[0];
    EXPECT_TRUE(contains(l.problems[0], reason)) << l.problems[0];
    // The built-in strategies still load.
    EXPECT_EQ(std::count(l.ids.begin(), l.ids.end(), "passthrough"), 1) << joined(l.ids);
  }
};

TEST_F(PluginTrust, CliListsTrustedPluginsAndRefusesWritableOrForeignOnes) {
  constexpr auto kDir = fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                        fs::perms::others_read | fs::perms::others_exec;  // 0755
  constexpr auto kFile = fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read |
                         fs::perms::others_read;  // 0644
  // The control: a plain copy loads.
  {
    const Listing l = list_plugins({plugin_copy("trusted", kDir, kFile)});
    EXPECT_TRUE(l.problems.empty()) << joined(l.problems);
    EXPECT_EQ(std::count(l.ids.begin(), l.ids.end(), "slow_copy"), 1) << joined(l.ids);
  }
  expect_refused({plugin_copy("dir0777", fs::perms::all, kFile)}, "directory " + (dir / "plugins" / "dir0777").string() +
                                                                      " is writable by others");
  expect_refused({plugin_copy("dir0775", kDir | fs::perms::group_write, kFile)}, "is writable by its group");
  expect_refused({plugin_copy("file0666", kDir, kFile | fs::perms::group_write | fs::perms::others_write)},
                 "file " + (dir / "plugins" / "file0666" / "slow.so").string() + " is writable by others");
  if (::geteuid() != 0) GTEST_SKIP() << "not root: cannot give a plugin to another user";
  expect_refused({plugin_copy("foreign", kDir, kFile, 12345)}, "owned by uid 12345");
}

TEST_F(PluginTrust, DaemonJobWithARefusedPluginFailsWithTheReason) {
  if (::geteuid() != 0) GTEST_SKIP() << "not root: cannot give a plugin to another user";
  constexpr auto kDir = fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                        fs::perms::others_read | fs::perms::others_exec;
  constexpr auto kFile = fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read | fs::perms::others_read;
  const fs::path open_dir = plugin_copy("dir0777", fs::perms::all, kFile);
  const fs::path foreign = plugin_copy("foreign", kDir, kFile, 12345);
  const fs::path out = dir / "out" / "refused";
  write_config({open_dir, foreign}, job_toml("refused", "slow_copy", tiny(), out, "[job.params]\nsleep_ms = 0"));
  ASSERT_NO_FATAL_FAILURE(start_daemon());
  const json::object failed = await_failure("refused");
  ASSERT_FALSE(failed.empty());
  const std::string error = text_of(failed, "last_error");
  std::printf("[ observed ] refused plugin, job status: %s\n", error.c_str());
  EXPECT_TRUE(contains(error, "unknown strategy 'slow_copy'")) << error;
  EXPECT_TRUE(contains(error, "writable by others")) << error;
  EXPECT_TRUE(contains(error, "owned by uid 12345")) << error;
  EXPECT_TRUE(contains(log_text(), "owned by uid 12345")) << log_text();
  expect_clean_failure(out);
  EXPECT_EQ(daemon_.terminate(), 0);
}

TEST_F(PluginTrust, DaemonIgnoresConfluxPluginPath) {
  const fs::path out = dir / "out" / "env";
  // slow_copy is only reachable through the environment variable.
  write_config({kCrashPluginDir}, job_toml("env", "slow_copy", tiny(), out, "[job.params]\nsleep_ms = 0"));
  ASSERT_NO_FATAL_FAILURE(start_daemon({"CONFLUX_PLUGIN_PATH=" + kSlowPluginDir.string()}));
  const json::object failed = await_failure("env");
  ASSERT_FALSE(failed.empty());
  const std::string error = text_of(failed, "last_error");
  std::printf("[ observed ] CONFLUX_PLUGIN_PATH set for the daemon, job status: %s\n", error.c_str());
  EXPECT_TRUE(contains(error, "unknown strategy 'slow_copy'")) << error;
  EXPECT_TRUE(contains(log_text(), "ignoring CONFLUX_PLUGIN_PATH=" + kSlowPluginDir.string())) << log_text();
  expect_clean_failure(out);
  EXPECT_EQ(daemon_.terminate(), 0);
}

}  // namespace
