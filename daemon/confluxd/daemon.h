// confluxd's event loop (Boost.Asio, one thread): inotify and a periodic rescan find new
// checkpoints, a settle timer waits until they stop changing, the scheduler runs merges in
// worker processes (one per job at a time, at most max_parallel_jobs at once), the publisher
// renames finished versions into place and swaps `latest`, and a control socket answers
// status/run/cancel/reload. See ARCHITECTURE §7 and README "Run the daemon".
#pragma once

#include <chrono>
#include <deque>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/json/object.hpp>

#include "conflux/config.h"
#include "conflux/scan.h"
#include "control.h"
#include "notify.h"
#include "state.h"
#include "worker.h"

namespace conflux::daemon {

using Clock = std::chrono::steady_clock;

// A checkpoint seen on disk and when its fingerprint last changed.
struct Observation {
  Fingerprint fingerprint;
  Clock::time_point since;
  std::optional<Completeness> completeness;  // checked once the fingerprint has settled
};

struct ResolvedInput {
  std::filesystem::path checkpoint;
  Fingerprint fingerprint;
};

struct JobRuntime {
  JobConfig config;
  enum class State { idle, waiting, queued, running, failed } state = State::idle;
  std::string waiting_for;                   // why it is not running (for status)
  std::vector<ResolvedInput> inputs;         // what the next/current run uses
  std::string signature;                     // of `inputs`
  std::shared_ptr<Worker> worker;
  std::string run_name;                      // version being produced
  std::string run_signature;
  double progress = 0;
  bool follow_up = false;                    // inputs changed during the run
  bool forced = false;                       // `conflux run`: run even if up to date
  bool cancel_requested = false;
  Clock::time_point queued_at;
};

class Daemon {
 public:
  Daemon(boost::asio::io_context& io, std::filesystem::path config_file, Config config);
  // Cleans up crash leftovers, binds the control socket, starts watching, evaluates every job.
  // Throws on a fatal start-up error (e.g. the socket cannot be bound).
  void start();
  // True once a stop was requested and every worker has exited.
  bool stopped() const { return stopped_; }

 private:
  // Watching.
  void watch_inputs();
  void read_inotify();
  void schedule_evaluation(std::chrono::milliseconds delay);
  void evaluate_all();
  void evaluate(JobRuntime& job);
  std::optional<ResolvedInput> resolve(const std::filesystem::path& input, const JobConfig& cfg,
                                       std::string& waiting_for, Clock::time_point& next_check);

  // Scheduling and runs.
  void request_run(JobRuntime& job);
  void dispatch();
  void start_run(JobRuntime& job);
  void finish_run(const std::string& name, const WorkerResult& r);
  std::string render_output_name(const JobRuntime& job, std::uint64_t n) const;
  std::filesystem::path write_run_file(const JobRuntime& job, const std::filesystem::path& target) const;
  void publish_latest(const JobConfig& cfg, const std::string& version);
  void prune(const JobConfig& cfg, JobRecord& rec);
  void cleanup_leftovers(const JobConfig& cfg);
  void reap_children();

  // Control and signals.
  boost::json::object handle(const boost::json::object& request);
  boost::json::object status_of(const JobRuntime& job);
  boost::json::object reload();
  void on_signal(int sig);
  void stop();
  void update_status_line();
  void save_state();

  boost::asio::io_context& io_;
  std::filesystem::path config_file_;
  Config config_;
  StateStore state_;
  std::map<std::string, JobRuntime> jobs_;
  std::deque<std::string> queue_;
  std::map<std::filesystem::path, Observation> seen_;
  std::unique_ptr<ControlServer> control_;
  Notifier notifier_;
  std::filesystem::path worker_program_;

  int inotify_fd_ = -1;
  std::unique_ptr<boost::asio::posix::stream_descriptor> inotify_;
  std::vector<char> inotify_buf_;
  std::set<std::filesystem::path> watched_;
  boost::asio::steady_timer evaluate_timer_, rescan_timer_;
  bool evaluation_pending_ = false;
  Clock::time_point evaluation_due_{};
  boost::asio::signal_set signals_, child_signals_;
  bool stopping_ = false, stopped_ = false;
};

}  // namespace conflux::daemon
