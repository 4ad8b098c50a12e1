#include "progress.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>

namespace conflux::cli {

ProgressDisplay::ProgressDisplay(const Progress& progress, bool enabled, int machine_fd)
    : progress_(progress), tty_(::isatty(STDERR_FILENO) != 0), machine_fd_(machine_fd),
      enabled_(enabled || machine_fd >= 0), start_(std::chrono::steady_clock::now()) {
  if (machine_fd_ >= 0) tty_ = false;
  if (enabled_) thread_ = std::thread([this] { loop(); });
}

ProgressDisplay::~ProgressDisplay() {
  if (!enabled_) return;
  {
    std::lock_guard lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
  if (machine_fd_ >= 0) draw(true);
  if (tty_) std::fputs("\r\033[K", stderr);
}

void ProgressDisplay::loop() {
  std::unique_lock lock(mu_);
  const auto period = std::chrono::milliseconds(tty_ || machine_fd_ >= 0 ? 200 : 1000);
  while (!cv_.wait_for(lock, period, [this] { return stop_; })) draw(false);
}

void ProgressDisplay::draw(bool) {
  const double total = static_cast<double>(std::max<std::uint64_t>(1, progress_.bytes_total.load()));
  const double frac = std::min(1.0, static_cast<double>(progress_.bytes_done.load()) / total);
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double rate = secs > 0 ? static_cast<double>(progress_.bytes_done.load()) / secs / 1e9 : 0;
  const unsigned pass = progress_.pass.load(), passes = progress_.pass_count.load();
  if (machine_fd_ >= 0) {
    char line[64];
    const int n = std::snprintf(line, sizeof line, "progress %.1f\n", frac * 100);
    if (n > 0) (void)!::write(machine_fd_, line, static_cast<std::size_t>(n));
    return;
  }
  if (tty_) {
    constexpr int kWidth = 30;
    const int filled = static_cast<int>(frac * kWidth);
    char bar[kWidth + 1];
    for (int i = 0; i < kWidth; ++i) bar[i] = i < filled ? '#' : '.';
    bar[kWidth] = '\0';
    std::fprintf(stderr, "\r\033[K[%s] %5.1f%%  pass %u/%u  %.2f GB/s read  %.0fs", bar, frac * 100, pass, passes, rate, secs);
  } else {
    const int decile = static_cast<int>(frac * 10);
    if (decile == last_decile_ || decile == 0) return;
    last_decile_ = decile;
    std::fprintf(stderr, "progress: %d%% (pass %u/%u, %.2f GB/s read, %.0fs)\n", decile * 10, pass, passes, rate, secs);
  }
  std::fflush(stderr);
}

}  // namespace conflux::cli
