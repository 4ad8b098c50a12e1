#include "worker.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <istream>
#include <stdexcept>

#include <boost/asio/read_until.hpp>

namespace conflux::daemon {

namespace asio = boost::asio;

Worker::Worker(asio::io_context& io, std::vector<std::string> argv, std::optional<std::uint64_t> memory_limit,
               ProgressFn progress, LineFn line, DoneFn done)
    : io_(io),
      argv_(std::move(argv)),
      memory_limit_(memory_limit),
      progress_(std::move(progress)),
      line_(std::move(line)),
      done_(std::move(done)),
      progress_pipe_(io),
      stderr_pipe_(io),
      kill_timer_(io) {}

void Worker::start() {
  int prog[2], err[2];
  if (::pipe2(prog, O_CLOEXEC) != 0) throw std::runtime_error(std::string("pipe: ") + std::strerror(errno));
  if (::pipe2(err, O_CLOEXEC) != 0) {
    ::close(prog[0]), ::close(prog[1]);
    throw std::runtime_error(std::string("pipe: ") + std::strerror(errno));
  }
  std::vector<char*> args;
  for (auto& a : argv_) args.push_back(a.data());
  args.push_back(nullptr);
  started_ = std::chrono::steady_clock::now();
  const pid_t pid = ::fork();
  if (pid < 0) {
    const int e = errno;
    for (int fd : {prog[0], prog[1], err[0], err[1]}) ::close(fd);
    throw std::runtime_error(std::string("fork: ") + std::strerror(e));
  }
  if (pid == 0) {
    // The child: only async-signal-safe calls until exec.
    ::dup2(prog[1], 3);
    ::dup2(err[1], STDERR_FILENO);
    const int devnull = ::open("/dev/null", O_RDWR);
    if (devnull >= 0) ::dup2(devnull, STDIN_FILENO), ::dup2(devnull, STDOUT_FILENO);
    ::close_range(4, ~0U, 0);
    // Signals the daemon handles through its event loop are blocked there; the worker must
    // start with default dispositions and an empty mask.
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    if (memory_limit_) {
      // RLIMIT_DATA caps heap and private memory, not the shared read-only file mappings a merge
      // streams through, so a large model does not count against it.
      const rlimit lim{static_cast<rlim_t>(*memory_limit_), static_cast<rlim_t>(*memory_limit_)};
      ::setrlimit(RLIMIT_DATA, &lim);
    }
    ::execv(args[0], args.data());
    const char msg[] = "confluxd worker: cannot execute the merge program\n";
    (void)!::write(STDERR_FILENO, msg, sizeof msg - 1);
    ::_exit(127);
  }
  pid_ = pid;
  ::close(prog[1]);
  ::close(err[1]);
  progress_pipe_.assign(prog[0]);
  stderr_pipe_.assign(err[0]);
  read_progress();
  read_stderr();
}

void Worker::read_progress() {
  asio::async_read_until(progress_pipe_, progress_buf_, '\n',
                         [self = shared_from_this()](const boost::system::error_code& ec, std::size_t) {
                           if (ec) {
                             self->progress_eof_ = true;
                             return self->maybe_finish();
                           }
                           std::istream in(&self->progress_buf_);
                           std::string line;
                           std::getline(in, line);
                           double pct = 0;
                           if (std::sscanf(line.c_str(), "progress %lf", &pct) == 1 && self->progress_) self->progress_(pct);
                           self->read_progress();
                         });
}

void Worker::read_stderr() {
  asio::async_read_until(stderr_pipe_, stderr_buf_, '\n',
                         [self = shared_from_this()](const boost::system::error_code& ec, std::size_t) {
                           if (ec) {
                             self->stderr_eof_ = true;
                             return self->maybe_finish();
                           }
                           std::istream in(&self->stderr_buf_);
                           std::string line;
                           std::getline(in, line);
                           if (!line.empty()) {
                             self->last_error_ = line;
                             if (self->line_) self->line_(line);
                           }
                           self->read_stderr();
                         });
}

void Worker::cancel(std::chrono::milliseconds grace) {
  if (pid_ <= 0 || status_) return;
  cancelled_ = true;
  ::kill(pid_, SIGTERM);
  kill_timer_.expires_after(grace);
  kill_timer_.async_wait([self = shared_from_this()](const boost::system::error_code& ec) {
    if (!ec && !self->status_ && self->pid_ > 0) ::kill(self->pid_, SIGKILL);
  });
}

void Worker::exited(int status) {
  status_ = status;
  kill_timer_.cancel();
  maybe_finish();
}

void Worker::maybe_finish() {
  if (finished_ || !status_ || !progress_eof_ || !stderr_eof_) return;
  finished_ = true;
  WorkerResult r;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
  r.cancelled = cancelled_;
  const int s = *status_;
  if (WIFEXITED(s) && WEXITSTATUS(s) == 0) {
    r.ok = true;
  } else if (WIFSIGNALED(s)) {
    const int sig = WTERMSIG(s);
    std::string why = sig == SIGSEGV  ? "crashed (SIGSEGV: invalid memory access, e.g. in a strategy plugin)"
                      : sig == SIGBUS ? "crashed (SIGBUS: an input file was truncated or removed while being read)"
                      : sig == SIGKILL ? "was killed (SIGKILL: out of memory, or did not stop when cancelled)"
                      : sig == SIGABRT ? "aborted (SIGABRT, e.g. a failed assertion in a strategy plugin)"
                                       : std::string("died from signal ") + ::strsignal(sig);
    r.error = "merge worker " + why;
  } else {
    r.error = last_error_.empty() ? "merge worker exited with status " + std::to_string(WEXITSTATUS(s)) : last_error_;
    if (r.error.starts_with("conflux merge: ")) r.error.erase(0, 15);
  }
  // RLIMIT_DATA shows up as whatever allocation failed first (a thread, a buffer): say so.
  if (!r.ok && memory_limit_ &&
      (r.error.find("bad_alloc") != std::string::npos || r.error.find("Resource temporarily unavailable") != std::string::npos ||
       r.error.find("Cannot allocate memory") != std::string::npos))
    r.error += " (the job's memory_limit of " + std::to_string(*memory_limit_) +
               " bytes was reached; each worker thread also reserves its stack against it)";
  if (r.cancelled && !r.ok) r.error = "cancelled";
  progress_pipe_.close();
  stderr_pipe_.close();
  if (done_) done_(r);
}

}  // namespace conflux::daemon
