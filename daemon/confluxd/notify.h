// The systemd notification protocol (sd_notify): READY, RELOADING, STOPPING, STATUS, and the
// watchdog keep-alive from an event-loop timer at half of WATCHDOG_USEC, so a stuck loop is
// noticed. Without NOTIFY_SOCKET every call is a no-op.
#pragma once

#include <string>

#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

namespace conflux::daemon {

class Notifier {
 public:
  explicit Notifier(boost::asio::io_context& io);
  void ready();
  void reloading();  // RELOADING=1 with MONOTONIC_USEC, as systemd 253+ asks (252 ignores it)
  void stopping();
  void status(const std::string& line);
  // Starts the watchdog timer when the service manager asked for one.
  void start_watchdog();
  void stop_watchdog();

 private:
  void arm();
  boost::asio::steady_timer timer_;
  std::uint64_t interval_usec_ = 0;
  std::string last_status_;
};

}  // namespace conflux::daemon
