#include "notify.h"

#include <systemd/sd-daemon.h>
#include <time.h>

#include <chrono>

namespace conflux::daemon {

Notifier::Notifier(boost::asio::io_context& io) : timer_(io) {}

void Notifier::ready() { sd_notify(0, "READY=1"); }

void Notifier::reloading() {
  timespec ts{};
  ::clock_gettime(CLOCK_MONOTONIC, &ts);
  const auto usec = static_cast<unsigned long long>(ts.tv_sec) * 1000000ull + static_cast<unsigned long long>(ts.tv_nsec) / 1000;
  sd_notifyf(0, "RELOADING=1\nMONOTONIC_USEC=%llu", usec);
}

void Notifier::stopping() { sd_notify(0, "STOPPING=1"); }

void Notifier::status(const std::string& line) {
  if (line == last_status_) return;
  last_status_ = line;
  sd_notifyf(0, "STATUS=%s", line.c_str());
}

void Notifier::start_watchdog() {
  std::uint64_t usec = 0;
  if (sd_watchdog_enabled(0, &usec) <= 0 || usec == 0) return;
  interval_usec_ = usec / 2;
  sd_notify(0, "WATCHDOG=1");
  arm();
}

void Notifier::stop_watchdog() {
  interval_usec_ = 0;
  timer_.cancel();
}

void Notifier::arm() {
  timer_.expires_after(std::chrono::microseconds(interval_usec_));
  timer_.async_wait([this](const boost::system::error_code& ec) {
    if (ec || interval_usec_ == 0) return;
    sd_notify(0, "WATCHDOG=1");
    arm();
  });
}

}  // namespace conflux::daemon
