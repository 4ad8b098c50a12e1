// A merge run in its own process: `conflux merge` on a job file the daemon wrote, with the
// progress on a pipe (fd 3) and stderr on another. A plugin that crashes, an input that vanishes
// (SIGBUS) or the OOM killer takes down the worker, never the daemon.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <boost/asio/io_context.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/streambuf.hpp>

namespace conflux::daemon {

struct WorkerResult {
  bool ok = false;
  bool cancelled = false;
  std::string error;  // one line: the worker's last error line, or how it died
  double seconds = 0;
};

class Worker : public std::enable_shared_from_this<Worker> {
 public:
  using ProgressFn = std::function<void(double percent)>;
  using LineFn = std::function<void(const std::string& line)>;
  using DoneFn = std::function<void(const WorkerResult&)>;

  Worker(boost::asio::io_context& io, std::vector<std::string> argv, std::optional<std::uint64_t> memory_limit,
         ProgressFn progress, LineFn line, DoneFn done);

  // Forks and execs. Throws std::runtime_error when the process cannot be started.
  void start();
  // SIGTERM (the worker removes its partial output and exits), SIGKILL after `grace`.
  void cancel(std::chrono::milliseconds grace = std::chrono::seconds(10));
  // Called by the daemon's SIGCHLD handler with the wait status.
  void exited(int status);
  pid_t pid() const { return pid_; }

 private:
  void read_progress();
  void read_stderr();
  void maybe_finish();

  boost::asio::io_context& io_;
  std::vector<std::string> argv_;
  std::optional<std::uint64_t> memory_limit_;
  ProgressFn progress_;
  LineFn line_;
  DoneFn done_;
  pid_t pid_ = -1;
  boost::asio::posix::stream_descriptor progress_pipe_, stderr_pipe_;
  boost::asio::streambuf progress_buf_, stderr_buf_;
  boost::asio::steady_timer kill_timer_;
  std::chrono::steady_clock::time_point started_;
  std::optional<int> status_;
  bool progress_eof_ = false, stderr_eof_ = false, cancelled_ = false, finished_ = false;
  std::string last_error_;
};

}  // namespace conflux::daemon
