// Finding, loading and validating strategy plugins (shared objects implementing
// sdk/include/conflux/plugin.h).
//
// Search order (first listed wins when several directories are given): the directories of
// CONFLUX_PLUGIN_PATH (colon-separated), then the configuration's [daemon].plugin_dirs, then the
// plugins beside the running executable (<exe dir>/../lib/conflux/plugins: the build tree or the
// install prefix), then the compiled-in install directory. A directory is scanned for "*.so" files
// in name order. Every descriptor is checked completely when loaded; a plugin that fails a check
// is not usable and its reason is kept for `conflux plugins` and for the error of a job that asks
// for it. Two usable plugins with the same id make that id an error naming both files.
#pragma once

#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "conflux/plugin.h"

namespace conflux {

// A plugin whose descriptor passed validation. The descriptor, parameter specs and passes are
// copied into host-owned structs of the host's size (a plugin built against an older minor ABI
// has its missing trailing fields zeroed).
struct LoadedPlugin {
  std::filesystem::path file;
  cfx_plugin desc{};
  std::vector<cfx_param_spec> params;
  std::vector<cfx_pass> passes;
  std::string id() const { return desc.id; }
  const cfx_param_spec* param(std::string_view name) const;
};

struct PluginProblem {
  std::filesystem::path file;
  std::string message;  // one line, names the file and the rule
};

class PluginError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class PluginRegistry {
 public:
  PluginRegistry() = default;
  PluginRegistry(const PluginRegistry&) = delete;
  PluginRegistry& operator=(const PluginRegistry&) = delete;
  ~PluginRegistry();  // keeps the shared objects loaded: instances may outlive nothing, but the
                      // process exits soon after; unloading code that registered atexit
                      // handlers or thread-locals is a classic crash

  // The directories to search, in order (see above). Directories that do not exist are kept
  // (scanning them is a no-op) so `conflux plugins` can show the whole path.
  static std::vector<std::filesystem::path> search_path(const std::vector<std::filesystem::path>& config_dirs);

  // Loads every *.so of each directory in order. Never throws for a bad plugin: see problems().
  void load_dirs(const std::vector<std::filesystem::path>& dirs);
  // Loads one file; returns the problem instead of throwing.
  std::optional<PluginProblem> load_file(const std::filesystem::path& file);

  const std::vector<std::unique_ptr<LoadedPlugin>>& plugins() const { return plugins_; }
  const std::vector<PluginProblem>& problems() const { return problems_; }
  const std::vector<std::filesystem::path>& searched() const { return searched_; }

  // The plugin with this id. Throws PluginError when it is missing (listing the ids found and
  // any load problems) or ambiguous (naming both files).
  const LoadedPlugin& get(std::string_view id) const;

 private:
  std::vector<std::unique_ptr<LoadedPlugin>> plugins_;
  std::vector<PluginProblem> problems_;
  std::vector<std::pair<std::string, std::string>> duplicates_;  // id -> message
  std::vector<std::filesystem::path> searched_;
  std::vector<std::filesystem::path> loaded_files_;  // canonical, to load each file once
};

// Validates a descriptor returned by a plugin's entry point and normalises it into `out`.
// Throws PluginError with the reason. Exposed for the tests.
void validate_plugin(const cfx_plugin* raw, const std::filesystem::path& file, LoadedPlugin& out);

// The host's function table handed to every plugin.
const cfx_host* host_table();

}  // namespace conflux
