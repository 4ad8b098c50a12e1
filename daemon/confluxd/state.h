// What confluxd remembers across restarts, per job, in <state_dir>/state.json (written
// atomically: a temporary file, fsync, rename).
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

namespace conflux::daemon {

struct JobRecord {
  std::uint64_t runs = 0;              // runs started, for {n}
  std::string finished_inputs;         // signature of the inputs of the last finished run (ok or failed)
  std::string running_inputs;          // signature of a run in progress (set when it starts)
  bool last_ok = false;
  std::string last_error;              // why the last run failed
  std::string last_output;             // name of the last published version
  std::int64_t last_finished = 0;      // unix seconds
  double last_seconds = 0;
  std::vector<std::string> published;  // version names under output/, oldest first
};

class StateStore {
 public:
  explicit StateStore(std::filesystem::path dir);
  // Reads the state; a missing file is an empty state, a corrupt one is moved aside (with a
  // warning) and the daemon starts afresh rather than refusing to run.
  void load();
  // Throws conflux::Error(io) when the state cannot be written.
  void save() const;

  JobRecord& job(const std::string& name) { return jobs_[name]; }
  const std::filesystem::path& dir() const { return dir_; }

 private:
  std::filesystem::path dir_;
  std::map<std::string, JobRecord> jobs_;
};

}  // namespace conflux::daemon
