// The configuration file shared by `conflux merge` and `confluxd` (ARCHITECTURE §3).
//
//   [daemon]                      daemon only; `conflux merge` reads plugin_dirs from it
//   control_socket, state_dir, plugin_dirs, threads, rescan, max_parallel_jobs, socket_group
//   [[job]]                       one or more
//   name, strategy, base, models, output, out_dtype, shard_size, threads, seed,
//   trigger, settle, ready_marker, output_name, keep, memory_limit   (the last five: daemon only)
//   [job.params]                  strategy parameters, checked against the plugin's schema
//
// Relative paths are resolved against the directory of the configuration file, so a file means
// the same thing wherever it is run from. An unknown key, a wrong type, a missing required key or
// an out-of-range value is a ConfigError naming the file, the job, the key and the line, raised
// before any tensor is read.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "conflux/dtype.h"

namespace conflux {

class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// One value of a strategy parameter as written in [job.params], before the schema is known.
struct RawParam {
  std::string key;
  enum class Kind { integer, floating, boolean, string, array, other } kind = Kind::other;
  double number = 0;                 // integer (exact up to 2^53), floating, boolean
  std::int64_t integer = 0;          // integer
  std::string string;                // string
  std::vector<double> list;          // array of numbers
  bool list_numeric = true;          // false when an array element is not a number
  int line = 0;
};

struct JobConfig {
  std::string name;
  std::string strategy;
  std::optional<std::filesystem::path> base;
  std::vector<std::filesystem::path> models;
  std::filesystem::path output;
  std::optional<DType> out_dtype;          // default: each tensor's own (the base's) dtype
  std::uint64_t shard_size = 5'000'000'000;
  unsigned threads = 0;                    // 0: the daemon's setting, or all cores
  std::uint64_t seed = 0;
  std::vector<RawParam> params;

  // Daemon-only keys (accepted and checked everywhere, used by confluxd).
  std::string trigger = "watch";           // "watch" | "manual"
  std::chrono::milliseconds settle{10'000};
  std::string ready_marker;                // empty: none
  std::string output_name = "{n}";
  std::optional<std::uint64_t> keep;       // published versions to keep; empty: all
  std::optional<std::uint64_t> memory_limit;  // bytes

  int line = 0;                            // where the [[job]] table starts
};

struct DaemonConfig {
  std::filesystem::path control_socket = "/run/conflux/control.sock";
  std::filesystem::path state_dir = "/var/lib/conflux";
  std::vector<std::filesystem::path> plugin_dirs;
  unsigned threads = 0;
  std::chrono::milliseconds rescan{30'000};
  unsigned max_parallel_jobs = 1;
  std::string socket_group;                // empty: socket mode 0600
};

struct Config {
  std::filesystem::path file;
  DaemonConfig daemon;
  bool has_daemon_table = false;
  std::vector<JobConfig> jobs;

  // The job called `name`; throws ConfigError listing the names when absent.
  const JobConfig& job(const std::string& name) const;
};

// Parses and checks a configuration file. Throws ConfigError.
Config load_config(const std::filesystem::path& file);
// The control socket a configuration file names ([daemon].control_socket, else the default).
// Lenient: the rest of the file may fail its checks (a running daemon keeps the configuration it
// loaded; `conflux status` must still reach it after an edit). Throws ConfigError when the file
// cannot be read, is not TOML, or names the socket wrongly.
std::filesystem::path control_socket_of(const std::filesystem::path& file);
// The same from text (for tests); `file` labels errors and anchors relative paths.
Config parse_config(std::string_view text, const std::filesystem::path& file);

// "10s", "500ms", "2m", "1h", "1.5s". Throws std::invalid_argument.
std::chrono::milliseconds parse_duration(std::string_view text);

// A dtype for out_dtype: "bf16" | "f16" | "f32" (also "bfloat16", "float16", "float32").
std::optional<DType> parse_out_dtype(std::string_view text);

}  // namespace conflux
