// Progress display for long merges: a redrawn bar on a terminal, a plain line every 10% when
// stderr is a pipe or a file (logs stay readable), or machine lines "progress <percent>" on a
// file descriptor (how confluxd follows its worker processes).
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "conflux/engine.h"

namespace conflux::cli {

class ProgressDisplay {
 public:
  ProgressDisplay(const Progress& progress, bool enabled, int machine_fd = -1);
  ~ProgressDisplay();  // stops the display thread and finishes the line

 private:
  void loop();
  void draw(bool final);

  const Progress& progress_;
  bool tty_ = false;
  int machine_fd_ = -1;
  bool enabled_;
  int last_decile_ = -1;
  std::chrono::steady_clock::time_point start_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace conflux::cli
