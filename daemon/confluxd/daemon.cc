#include "daemon.h"

#include <sys/inotify.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <fstream>
#include <functional>

#include <boost/json.hpp>
#include <openssl/evp.h>

#include "conflux/log.h"
#include "conflux/publish.h"

namespace conflux::daemon {

namespace fs = std::filesystem;
namespace json = boost::json;
namespace asio = boost::asio;
using namespace std::chrono_literals;

namespace {

const char* state_name(JobRuntime::State s) {
  switch (s) {
    case JobRuntime::State::idle: return "idle";
    case JobRuntime::State::waiting: return "waiting";
    case JobRuntime::State::queued: return "queued";
    case JobRuntime::State::running: return "running";
    case JobRuntime::State::failed: return "failed";
  }
  return "?";
}

std::string sha256_hex(const std::string& text) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(text.data(), text.size(), digest, &len, EVP_sha256(), nullptr);
  static constexpr char kHex[] = "0123456789abcdef";
  std::string s;
  for (unsigned i = 0; i < len; ++i) s += kHex[digest[i] >> 4], s += kHex[digest[i] & 15];
  return s;
}

// What identifies the inputs of a run: checkpoint paths and their fingerprints.
std::string signature_of(const std::vector<ResolvedInput>& inputs) {
  std::string text;
  for (const auto& in : inputs) {
    text += in.checkpoint.string() + "\n";
    for (const auto& f : in.fingerprint.files)
      text += f.name + " " + std::to_string(f.size) + " " + std::to_string(f.mtime_ns) + "\n";
  }
  return sha256_hex(text);
}

std::string toml_string(const std::string& s) {
  std::string out = "\"";
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') out += '\\', out += static_cast<char>(c);
    else if (c < 0x20 || c == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", c);
      out += buf;
    } else out += static_cast<char>(c);
  }
  return out + "\"";
}

std::string toml_number(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  std::string s = buf;
  if (s.find_first_of(".eEn") == std::string::npos) s += ".0";  // stays a float
  return s;
}

std::string utc_stamp() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  ::gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y%m%dT%H%M%SZ", &tm);
  return buf;
}

std::string job_log_prefix(const std::string& name) { return "job '" + name + "': "; }

}  // namespace

Daemon::Daemon(asio::io_context& io, fs::path config_file, Config config)
    : io_(io),
      config_file_(std::move(config_file)),
      config_(std::move(config)),
      state_(config_.daemon.state_dir),
      notifier_(io),
      inotify_buf_(64 * 1024),
      evaluate_timer_(io),
      rescan_timer_(io),
      signals_(io, SIGHUP, SIGTERM, SIGINT),
      child_signals_(io, SIGCHLD) {
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  worker_program_ = exe.parent_path() / "conflux";
  for (const auto& j : config_.jobs) jobs_[j.name].config = j;
}

void Daemon::start() {
  std::error_code ec;
  fs::create_directories(config_.daemon.state_dir, ec);
  if (ec) throw std::runtime_error(config_.daemon.state_dir.string() + ": cannot create the state directory: " + ec.message());
  fs::create_directories(config_.daemon.state_dir / "runs", ec);
  if (!fs::is_regular_file(worker_program_, ec))
    throw std::runtime_error(worker_program_.string() + ": the merge program (conflux) is not installed beside confluxd");
  state_.load();
  for (auto& [name, job] : jobs_) cleanup_leftovers(job.config);

  control_ = std::make_unique<ControlServer>(io_, config_.daemon.control_socket, config_.daemon.socket_group,
                                             [this](const json::object& r) { return handle(r); });
  control_->start();

  inotify_fd_ = ::inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  if (inotify_fd_ < 0) {
    log_warning(std::string("inotify unavailable (") + std::strerror(errno) + "); relying on the periodic rescan");
  } else {
    inotify_ = std::make_unique<asio::posix::stream_descriptor>(io_, inotify_fd_);
    read_inotify();
  }
  signals_.async_wait([this](const boost::system::error_code& e, int sig) {
    if (!e) on_signal(sig);
  });
  child_signals_.async_wait([this](const boost::system::error_code& e, int) {
    if (!e) reap_children();
  });

  // Periodic rescan: network filesystems send no inotify events.
  struct Rescan {
    Daemon* d;
    void operator()(const boost::system::error_code& e) const {
      if (e || d->stopping_) return;
      d->evaluate_all();
      d->rescan_timer_.expires_after(d->config_.daemon.rescan);
      d->rescan_timer_.async_wait(*this);
    }
  };
  rescan_timer_.expires_after(config_.daemon.rescan);
  rescan_timer_.async_wait(Rescan{this});

  log_info("confluxd " CONFLUX_VERSION " started: " + std::to_string(jobs_.size()) + " job(s), control socket " +
           config_.daemon.control_socket.string());
  notifier_.ready();
  notifier_.start_watchdog();
  evaluate_all();
}

// ----------------------------------------------------------------------------------------------
// Watching and readiness
// ----------------------------------------------------------------------------------------------

void Daemon::watch_inputs() {
  if (inotify_fd_ < 0) return;
  std::set<fs::path> wanted;
  for (const auto& [name, job] : jobs_) {
    std::vector<fs::path> inputs = job.config.models;
    if (job.config.base) inputs.push_back(*job.config.base);
    for (const auto& in : inputs) {
      std::error_code ec;
      // The input itself (new checkpoints, renames into place) and its parent (the input
      // appearing or being replaced), and each candidate checkpoint (files closed after writing).
      if (fs::is_directory(in, ec)) wanted.insert(in);
      if (fs::is_directory(in.parent_path(), ec)) wanted.insert(in.parent_path());
      for (const auto& c : candidate_checkpoints(in)) wanted.insert(c);
      if (fs::is_directory(in, ec) && !holds_weights(in))
        for (const auto& e : fs::directory_iterator(in, ec))
          if (e.is_directory(ec) && !is_ignored_name(e.path().filename().string())) wanted.insert(e.path());
    }
  }
  constexpr std::uint32_t kMask = IN_CREATE | IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE |
                                  IN_DELETE_SELF | IN_MOVE_SELF | IN_ATTRIB | IN_ONLYDIR;
  for (const auto& p : wanted)
    if (!watched_.count(p)) {
      if (::inotify_add_watch(inotify_fd_, p.c_str(), kMask) >= 0) watched_.insert(p);
    }
  // Watches of directories that went away are dropped by the kernel (IN_IGNORED); forget them.
  for (auto it = watched_.begin(); it != watched_.end();) {
    std::error_code ec;
    it = fs::is_directory(*it, ec) ? std::next(it) : watched_.erase(it);
  }
}

void Daemon::read_inotify() {
  inotify_->async_read_some(asio::buffer(inotify_buf_), [this](const boost::system::error_code& ec, std::size_t n) {
    if (ec) {
      if (ec != asio::error::operation_aborted) log_warning("inotify read failed: " + ec.message() + "; relying on rescans");
      return;
    }
    bool overflow = false;
    for (std::size_t off = 0; off + sizeof(inotify_event) <= n;) {
      const auto* ev = reinterpret_cast<const inotify_event*>(inotify_buf_.data() + off);
      if (ev->mask & IN_Q_OVERFLOW) overflow = true;
      if (ev->mask & IN_IGNORED) {
        // The watched directory is gone; a rescan re-adds what exists.
      }
      off += sizeof(inotify_event) + ev->len;
    }
    if (overflow) log_warning("inotify queue overflowed: rescanning everything");
    // Bursts coalesce: one evaluation shortly after the events stop arriving.
    schedule_evaluation(overflow ? 0ms : 100ms);
    read_inotify();
  });
}

void Daemon::schedule_evaluation(std::chrono::milliseconds delay) {
  const auto due = Clock::now() + delay;
  if (evaluation_pending_ && evaluation_due_ <= due) return;
  evaluation_pending_ = true;
  evaluation_due_ = due;
  evaluate_timer_.expires_at(due);
  evaluate_timer_.async_wait([this](const boost::system::error_code& ec) {
    if (ec) return;
    evaluation_pending_ = false;
    evaluate_all();
  });
}

void Daemon::evaluate_all() {
  if (stopping_) return;
  watch_inputs();
  for (auto& [name, job] : jobs_) evaluate(job);
  dispatch();
  update_status_line();
}

std::optional<ResolvedInput> Daemon::resolve(const fs::path& input, const JobConfig& cfg, std::string& waiting_for,
                                             Clock::time_point& next_check) {
  const auto now = Clock::now();
  const auto candidates = candidate_checkpoints(input);
  if (candidates.empty()) {
    std::error_code ec;
    waiting_for = fs::exists(input, ec) ? "no checkpoint in " + input.string() + " yet"
                                        : input.string() + " does not exist yet";
    return std::nullopt;
  }
  // The newest complete checkpoint: one whose files have not changed for `settle` and that
  // validates (index, every shard, the ready marker).
  for (const auto& c : candidates) {
    Fingerprint fp = fingerprint(c);
    auto& obs = seen_[c];
    if (!(obs.fingerprint == fp) || obs.since == Clock::time_point{}) {
      obs.fingerprint = std::move(fp);
      obs.since = now;
      obs.completeness.reset();
    }
    const auto settled_at = obs.since + cfg.settle;
    if (now < settled_at) {
      next_check = std::min(next_check, settled_at);
      if (waiting_for.empty())
        waiting_for = c.string() + " is still changing (settle " + std::to_string(cfg.settle.count()) + " ms)";
      continue;
    }
    if (!obs.completeness || !obs.completeness->complete) obs.completeness = check_complete(c, cfg.ready_marker);
    if (obs.completeness->complete) return ResolvedInput{c, obs.fingerprint};
    if (waiting_for.empty()) waiting_for = "incomplete: " + obs.completeness->reason;
  }
  return std::nullopt;
}

void Daemon::evaluate(JobRuntime& job) {
  const JobConfig& cfg = job.config;
  if (cfg.trigger == "manual" && !job.forced) {
    if (job.state == JobRuntime::State::waiting) job.state = JobRuntime::State::idle;
    std::string why;
    auto nc = Clock::time_point::max();
    if (cfg.base) (void)resolve(*cfg.base, cfg, why, nc);
    for (const auto& in : cfg.models) (void)resolve(in, cfg, why, nc);
    return;
  }
  std::vector<ResolvedInput> inputs;
  std::string waiting_for;
  auto next_check = Clock::time_point::max();
  std::vector<fs::path> wanted;
  if (cfg.base) wanted.push_back(*cfg.base);
  wanted.insert(wanted.end(), cfg.models.begin(), cfg.models.end());
  bool ready = true;
  std::string note;
  for (const auto& in : wanted) {
    std::string why;
    auto r = resolve(in, cfg, why, next_check);
    if (!r) {
      ready = false;
      if (waiting_for.empty()) waiting_for = why;
      continue;
    }
    if (why.starts_with("incomplete: ") && note.empty()) note = why;
    inputs.push_back(std::move(*r));
  }
  if (next_check != Clock::time_point::max())
    schedule_evaluation(std::chrono::duration_cast<std::chrono::milliseconds>(next_check - Clock::now()) + 10ms);
  if (job.state == JobRuntime::State::running) {
    // A change during a run queues exactly one follow-up.
    if (ready && signature_of(inputs) != job.run_signature) job.follow_up = true;
    return;
  }
  if (job.state == JobRuntime::State::queued) {
    // Waiting for a slot: the run will take the inputs as they are now, not as they were queued
    // (a checkpoint landing meanwhile is merged in this run, not in a second one).
    if (ready) {
      job.inputs = std::move(inputs);
      job.signature = signature_of(job.inputs);
      job.waiting_for = note;
    }
    return;
  }
  if (!ready) {
    job.state = job.state == JobRuntime::State::failed ? job.state : JobRuntime::State::waiting;
    job.waiting_for = waiting_for;
    return;
  }
  job.inputs = std::move(inputs);
  job.signature = signature_of(job.inputs);
  job.waiting_for = note;
  const JobRecord& rec = state_.job(cfg.name);
  if (job.signature == rec.finished_inputs && !job.forced) {
    job.state = rec.last_ok ? JobRuntime::State::idle : JobRuntime::State::failed;
    return;
  }
  request_run(job);
}

// ----------------------------------------------------------------------------------------------
// Scheduling and runs
// ----------------------------------------------------------------------------------------------

void Daemon::request_run(JobRuntime& job) {
  if (job.state == JobRuntime::State::running) {
    job.follow_up = true;
    return;
  }
  if (job.state == JobRuntime::State::queued) return;
  job.state = JobRuntime::State::queued;
  job.queued_at = Clock::now();
  queue_.push_back(job.config.name);
}

void Daemon::dispatch() {
  if (stopping_) return;
  std::size_t running = 0;
  for (const auto& [name, job] : jobs_) running += job.state == JobRuntime::State::running;
  while (running < config_.daemon.max_parallel_jobs && !queue_.empty()) {
    const std::string name = queue_.front();
    queue_.pop_front();
    auto it = jobs_.find(name);
    if (it == jobs_.end() || it->second.state != JobRuntime::State::queued) continue;
    start_run(it->second);
    running += it->second.state == JobRuntime::State::running;
  }
}

std::string Daemon::render_output_name(const JobRuntime& job, std::uint64_t n) const {
  // {checkpoint}: the name of the most recently written input checkpoint.
  std::string checkpoint;
  std::int64_t newest = -1;
  for (const auto& in : job.inputs)
    if (in.fingerprint.newest_mtime_ns() > newest) {
      newest = in.fingerprint.newest_mtime_ns();
      checkpoint = in.checkpoint.filename().string();
    }
  char counter[32];
  std::snprintf(counter, sizeof counter, "%06llu", static_cast<unsigned long long>(n));
  std::string out;
  const std::string& t = job.config.output_name;
  for (std::size_t i = 0; i < t.size();) {
    if (t.compare(i, 3, "{n}") == 0) out += counter, i += 3;
    else if (t.compare(i, 12, "{checkpoint}") == 0) out += checkpoint, i += 12;
    else if (t.compare(i, 6, "{time}") == 0) out += utc_stamp(), i += 6;
    else out += t[i++];
  }
  if (out.empty() || out == "latest" || out.starts_with(".")) out = counter;
  return out;
}

fs::path Daemon::write_run_file(const JobRuntime& job, const fs::path& target) const {
  const JobConfig& c = job.config;
  std::string t = "# Written by confluxd for one run of job '" + c.name + "': the inputs it resolved.\n[daemon]\nplugin_dirs = [";
  for (std::size_t i = 0; i < config_.daemon.plugin_dirs.size(); ++i)
    t += (i ? ", " : "") + toml_string(config_.daemon.plugin_dirs[i].string());
  t += "]\n\n[[job]]\nname = " + toml_string(c.name) + "\nstrategy = " + toml_string(c.strategy) + "\n";
  std::size_t k = 0;
  if (c.base) t += "base = " + toml_string(job.inputs[k++].checkpoint.string()) + "\n";
  t += "models = [";
  for (std::size_t i = 0; k < job.inputs.size(); ++k, ++i) t += (i ? ", " : "") + toml_string(job.inputs[k].checkpoint.string());
  t += "]\noutput = " + toml_string(target.string()) + "\n";
  if (c.out_dtype) {
    const char* name = *c.out_dtype == DType::BF16 ? "bf16" : *c.out_dtype == DType::F16 ? "f16" : "f32";
    t += "out_dtype = " + toml_string(name) + "\n";
  }
  t += "shard_size = " + std::to_string(c.shard_size) + "\nseed = " + std::to_string(c.seed) + "\n";
  const unsigned threads = c.threads ? c.threads : config_.daemon.threads;
  t += "threads = " + std::to_string(threads) + "\n[job.params]\n";
  for (const RawParam& p : c.params) {
    t += p.key + " = ";
    switch (p.kind) {
      case RawParam::Kind::integer: t += std::to_string(p.integer); break;
      case RawParam::Kind::floating: t += toml_number(p.number); break;
      case RawParam::Kind::boolean: t += p.number != 0 ? "true" : "false"; break;
      case RawParam::Kind::string: t += toml_string(p.string); break;
      case RawParam::Kind::array: {
        t += "[";
        for (std::size_t i = 0; i < p.list.size(); ++i) t += (i ? ", " : "") + toml_number(p.list[i]);
        t += "]";
        break;
      }
      default: t += "\"\""; break;
    }
    t += "\n";
  }
  const fs::path file = config_.daemon.state_dir / "runs" / (c.name + ".toml");
  std::ofstream out(file, std::ios::trunc);
  out << t;
  out.close();
  if (!out) throw std::runtime_error(file.string() + ": cannot write the run's job file");
  return file;
}

void Daemon::start_run(JobRuntime& job) {
  JobRecord& rec = state_.job(job.config.name);
  const std::uint64_t n = rec.runs + 1;
  job.run_name = render_output_name(job, n);
  job.run_signature = job.signature;
  job.progress = 0;
  job.follow_up = false;
  job.cancel_requested = false;
  const fs::path target = job.config.output / job.run_name;
  try {
    std::error_code ec;
    fs::create_directories(job.config.output, ec);
    const fs::path run_file = write_run_file(job, target);
    std::vector<std::string> argv{worker_program_.string(), "merge", run_file.string(), "--job", job.config.name,
                                  "--force", "--quiet", "--progress-fd", "3"};
    const std::string name = job.config.name;
    job.worker = std::make_shared<Worker>(
        io_, argv, job.config.memory_limit,
        [this, name](double pct) {
          auto it = jobs_.find(name);
          if (it != jobs_.end()) it->second.progress = pct;
          update_status_line();
        },
        [name](const std::string& line) { log_info(job_log_prefix(name) + "worker: " + line); },
        [this, name](const WorkerResult& r) { finish_run(name, r); });
    job.worker->start();
  } catch (const std::exception& e) {
    job.worker.reset();
    job.state = JobRuntime::State::failed;
    rec.finished_inputs = job.signature;
    rec.last_ok = false;
    rec.last_error = std::string("cannot start the merge: ") + e.what();
    log_error(job_log_prefix(job.config.name) + rec.last_error);
    save_state();
    return;
  }
  rec.runs = n;
  rec.running_inputs = job.signature;
  save_state();
  job.state = JobRuntime::State::running;
  job.forced = false;
  std::string inputs;
  for (const auto& in : job.inputs) inputs += (inputs.empty() ? "" : ", ") + in.checkpoint.string();
  log_info(job_log_prefix(job.config.name) + "merge " + std::to_string(n) + " started (" + job.config.strategy +
           " -> " + target.string() + "; inputs: " + inputs + ")");
}

void Daemon::finish_run(const std::string& name, const WorkerResult& r) {
  auto it = jobs_.find(name);
  if (it == jobs_.end()) return;
  JobRuntime& job = it->second;
  JobRecord& rec = state_.job(name);
  job.worker.reset();
  rec.running_inputs.clear();
  rec.last_seconds = r.seconds;
  rec.last_finished = static_cast<std::int64_t>(std::time(nullptr));
  cleanup_leftovers(job.config);  // a worker that died leaves its partial directory
  if (r.ok) {
    try {
      publish_latest(job.config, job.run_name);
      rec.finished_inputs = job.run_signature;
      rec.last_ok = true;
      rec.last_error.clear();
      rec.last_output = job.run_name;
      std::erase(rec.published, job.run_name);
      rec.published.push_back(job.run_name);
      prune(job.config, rec);
      job.state = JobRuntime::State::idle;
      log_info(job_log_prefix(name) + "merge finished in " + std::to_string(r.seconds) + " s: " +
               (job.config.output / job.run_name).string() + " (latest)");
    } catch (const std::exception& e) {
      rec.finished_inputs = job.run_signature;
      rec.last_ok = false;
      rec.last_error = std::string("publishing failed: ") + e.what();
      job.state = JobRuntime::State::failed;
      log_error(job_log_prefix(name) + rec.last_error);
    }
  } else if (r.cancelled && stopping_) {
    // Shut down mid-run: the run is still owed, so it is not recorded as finished.
    log_info(job_log_prefix(name) + "merge cancelled by shutdown; it will run again at start-up");
  } else {
    rec.finished_inputs = job.run_signature;  // not retried until the inputs change or `conflux run`
    rec.last_ok = false;
    rec.last_error = r.error;
    job.state = JobRuntime::State::failed;
    log_error(job_log_prefix(name) + "merge failed: " + r.error);
  }
  save_state();
  if (stopping_) {
    bool any = false;
    for (const auto& [n, j] : jobs_) any = any || j.worker;
    if (!any) stop();
    return;
  }
  if (std::none_of(config_.jobs.begin(), config_.jobs.end(), [&](const JobConfig& c) { return c.name == name; })) {
    std::erase(queue_, name);
    jobs_.erase(it);
    evaluate_all();
    return;
  }
  if (job.follow_up) {
    job.follow_up = false;
    log_info(job_log_prefix(name) + "inputs changed during the merge: checking again");
  }
  evaluate_all();
}

void Daemon::publish_latest(const JobConfig& cfg, const std::string& version) {
  const fs::path tmp = cfg.output / (".latest.tmp-" + std::to_string(::getpid()));
  ::unlink(tmp.c_str());
  if (::symlink(version.c_str(), tmp.c_str()) != 0)
    throw std::runtime_error(tmp.string() + ": cannot create the latest link: " + std::strerror(errno));
  if (::rename(tmp.c_str(), (cfg.output / "latest").c_str()) != 0) {
    const int e = errno;
    ::unlink(tmp.c_str());
    throw std::runtime_error((cfg.output / "latest").string() + ": cannot swap the latest link: " + std::strerror(e));
  }
  fsync_path(cfg.output);
}

void Daemon::prune(const JobConfig& cfg, JobRecord& rec) {
  if (!cfg.keep) return;
  while (rec.published.size() > *cfg.keep) {
    const std::string oldest = rec.published.front();
    rec.published.erase(rec.published.begin());
    if (oldest == rec.last_output) continue;  // never the one `latest` points to
    std::error_code ec;
    fs::remove_all(cfg.output / oldest, ec);
    if (ec) log_warning(job_log_prefix(cfg.name) + "could not remove old version " + oldest + ": " + ec.message());
    else log_info(job_log_prefix(cfg.name) + "removed old version " + oldest + " (keep = " + std::to_string(*cfg.keep) + ")");
  }
}

void Daemon::cleanup_leftovers(const JobConfig& cfg) {
  std::error_code ec;
  if (!fs::is_directory(cfg.output, ec)) return;
  for (const auto& e : fs::directory_iterator(cfg.output, ec)) {
    const std::string n = e.path().filename().string();
    const bool partial = is_partial_dir_name(n) || n.starts_with(".latest.tmp-") || n.find(".old-") != std::string::npos;
    if (!n.starts_with(".") || !partial) continue;
    // A partial directory of a worker still running belongs to it.
    bool live = false;
    for (const auto& [name, job] : jobs_)
      if (job.worker && job.config.output == cfg.output && n.starts_with("." + job.run_name + ".partial-")) live = true;
    if (live) continue;
    fs::remove_all(e.path(), ec);
    log_info(job_log_prefix(cfg.name) + "removed leftover " + e.path().string());
  }
}

void Daemon::reap_children() {
  for (;;) {
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, WNOHANG);
    if (pid <= 0) break;
    for (auto& [name, job] : jobs_)
      if (job.worker && job.worker->pid() == pid) {
        auto w = job.worker;
        w->exited(status);
        break;
      }
  }
  if (!stopped_)
    child_signals_.async_wait([this](const boost::system::error_code& e, int) {
      if (!e) reap_children();
    });
}

// ----------------------------------------------------------------------------------------------
// Control, signals, status
// ----------------------------------------------------------------------------------------------

json::object Daemon::status_of(const JobRuntime& job) {
  const JobRecord& rec = state_.job(job.config.name);
  json::array inputs;
  for (const auto& in : job.inputs) inputs.push_back(json::string(in.checkpoint.string()));
  json::object last;
  if (rec.last_finished)
    last = json::object{{"ok", rec.last_ok},
                        {"output", rec.last_output},
                        {"finished", rec.last_finished},
                        {"seconds", rec.last_seconds}};
  json::array published;
  for (const auto& p : rec.published) published.push_back(json::string(p));
  json::object o{{"name", job.config.name},
                 {"strategy", job.config.strategy},
                 {"trigger", job.config.trigger},
                 {"state", state_name(job.state)},
                 {"progress", job.state == JobRuntime::State::running ? job.progress : 0.0},
                 {"inputs", std::move(inputs)},
                 {"runs", rec.runs},
                 {"output", job.config.output.string()},
                 {"published", std::move(published)},
                 {"last_result", last.empty() ? json::value(nullptr) : json::value(std::move(last))},
                 {"last_error", rec.last_ok || rec.last_error.empty() ? json::value(nullptr) : json::value(rec.last_error)}};
  if (!job.waiting_for.empty()) o["waiting_for"] = job.waiting_for;
  if (job.state == JobRuntime::State::running) o["running"] = job.run_name;
  return o;
}

json::object Daemon::handle(const json::object& req) {
  const json::value* cmd = req.if_contains("cmd");
  if (!cmd || !cmd->is_string()) return {{"ok", false}, {"error", "missing \"cmd\""}};
  const std::string c(cmd->as_string());
  auto find_job = [&](JobRuntime*& job) -> std::optional<json::object> {
    const json::value* j = req.if_contains("job");
    if (!j || !j->is_string()) return json::object{{"ok", false}, {"error", "missing \"job\""}};
    auto it = jobs_.find(std::string(j->as_string()));
    if (it == jobs_.end()) {
      std::string names;
      for (const auto& [n, jr] : jobs_) names += (names.empty() ? "" : ", ") + n;
      return json::object{{"ok", false}, {"error", "no job named '" + std::string(j->as_string()) + "' (jobs: " + names + ")"}};
    }
    job = &it->second;
    return std::nullopt;
  };
  if (c == "status") {
    json::array jobs;
    for (auto& [name, job] : jobs_) jobs.push_back(status_of(job));
    return {{"ok", true},
            {"version", CONFLUX_VERSION},
            {"pid", ::getpid()},
            {"config", config_file_.string()},
            {"jobs", std::move(jobs)}};
  }
  if (c == "run") {
    JobRuntime* job = nullptr;
    if (auto err = find_job(job)) return *err;
    if (job->state == JobRuntime::State::running) {
      job->follow_up = true;
      job->forced = true;
      return {{"ok", true}, {"message", "job '" + job->config.name + "' is running; it will run again when this run ends"}};
    }
    job->forced = true;
    if (job->state == JobRuntime::State::failed) job->state = JobRuntime::State::idle;
    evaluate(*job);
    dispatch();
    update_status_line();
    if (job->state == JobRuntime::State::queued || job->state == JobRuntime::State::running)
      return {{"ok", true}, {"message", "job '" + job->config.name + "' " + state_name(job->state)}};
    job->forced = false;
    return {{"ok", false}, {"error", "job '" + job->config.name + "' cannot run yet: " + job->waiting_for}};
  }
  if (c == "cancel") {
    JobRuntime* job = nullptr;
    if (auto err = find_job(job)) return *err;
    if (job->state == JobRuntime::State::queued) {
      std::erase(queue_, job->config.name);
      job->state = JobRuntime::State::idle;
      return {{"ok", true}, {"message", "job '" + job->config.name + "' removed from the queue"}};
    }
    if (job->state != JobRuntime::State::running || !job->worker)
      return {{"ok", false}, {"error", "job '" + job->config.name + "' is not running"}};
    job->cancel_requested = true;
    job->follow_up = false;
    job->worker->cancel();
    return {{"ok", true}, {"message", "cancelling job '" + job->config.name + "'"}};
  }
  if (c == "reload") return reload();
  return {{"ok", false}, {"error", "unknown command '" + c + "' (status, run, cancel, reload)"}};
}

json::object Daemon::reload() {
  notifier_.reloading();
  Config fresh;
  try {
    fresh = load_config(config_file_);
  } catch (const std::exception& e) {
    log_error(std::string("reload failed, keeping the running configuration: ") + e.what());
    notifier_.ready();
    return {{"ok", false}, {"error", std::string("reload failed, keeping the running configuration: ") + e.what()}};
  }
  // Jobs keep their records and running merges; removed jobs are cancelled.
  std::set<std::string> names;
  for (const auto& j : fresh.jobs) {
    names.insert(j.name);
    jobs_[j.name].config = j;
  }
  for (auto it = jobs_.begin(); it != jobs_.end();) {
    if (names.count(it->first)) {
      ++it;
      continue;
    }
    if (it->second.worker) {
      it->second.worker->cancel();
      ++it;  // dropped once its worker has exited
      continue;
    }
    std::erase(queue_, it->first);
    it = jobs_.erase(it);
  }
  const auto socket = config_.daemon.control_socket;
  config_ = std::move(fresh);
  config_.daemon.control_socket = socket;  // the socket stays where clients found it
  log_info("configuration reloaded: " + std::to_string(config_.jobs.size()) + " job(s)");
  evaluate_all();
  notifier_.ready();
  return {{"ok", true}, {"message", "reloaded " + std::to_string(config_.jobs.size()) + " job(s)"}};
}

void Daemon::on_signal(int sig) {
  if (sig == SIGHUP) {
    log_info("SIGHUP: reloading " + config_file_.string());
    reload();
  } else {
    log_info(std::string(sig == SIGTERM ? "SIGTERM" : "SIGINT") + ": stopping");
    stopping_ = true;
    notifier_.stopping();
    bool any = false;
    for (auto& [name, job] : jobs_)
      if (job.worker) {
        any = true;
        job.worker->cancel();
      }
    if (!any) stop();
  }
  if (!stopped_)
    signals_.async_wait([this](const boost::system::error_code& e, int s) {
      if (!e) on_signal(s);
    });
}

void Daemon::stop() {
  if (stopped_) return;
  stopped_ = true;
  save_state();
  notifier_.stop_watchdog();
  evaluate_timer_.cancel();
  rescan_timer_.cancel();
  signals_.cancel();
  child_signals_.cancel();
  if (inotify_) inotify_->close();
  control_.reset();
  log_info("confluxd stopped");
  io_.stop();
}

void Daemon::update_status_line() {
  std::size_t running = 0, queued = 0, failed = 0;
  std::string progress;
  for (const auto& [name, job] : jobs_) {
    running += job.state == JobRuntime::State::running;
    queued += job.state == JobRuntime::State::queued;
    failed += job.state == JobRuntime::State::failed;
    if (job.state == JobRuntime::State::running) {
      char buf[64];
      std::snprintf(buf, sizeof buf, " %.0f%%", job.progress);
      progress += (progress.empty() ? "; merging " : ", ") + name + buf;
    }
  }
  notifier_.status(std::to_string(jobs_.size()) + " jobs: " + std::to_string(running) + " running, " +
                   std::to_string(queued) + " queued, " + std::to_string(failed) + " failed" + progress);
}

void Daemon::save_state() {
  try {
    state_.save();
  } catch (const std::exception& e) {
    log_error(e.what());
  }
}

}  // namespace conflux::daemon
