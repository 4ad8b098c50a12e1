// The host's side of a job's cfx_context: where a plugin's log lines, failure message and report
// go. One per running job; shared by every thread of the merge.
#pragma once

#include <mutex>
#include <string>

#include "conflux/plugin.h"

struct cfx_context {
  std::string job;       // prefixes log lines: "job 'agents': ..."
  std::string strategy;

  // Records the first failure; later ones are dropped (they are usually consequences).
  void fail(std::string message);
  bool failed() const;
  std::string failure() const;

  std::string report;    // JSON object text set by the plugin, or empty

 private:
  mutable std::mutex mu_;
  std::string failure_;
  bool failed_ = false;
};
