// Strategy parameters: a job's [job.params] bound to and checked against a plugin's schema.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include <boost/json/object.hpp>

#include "conflux/config.h"
#include "conflux/plugin_registry.h"

namespace conflux {

class ParamSet {
 public:
  // Checks every [job.params] key against the plugin's schema (unknown key, wrong type, out of
  // range, not one of the choices, per-model list of the wrong length, required and missing) and
  // fills in defaults. Also checks the job's model count and base against what the plugin
  // declares. Throws ConfigError naming the file, the job and the key.
  static ParamSet bind(const LoadedPlugin& plugin, const JobConfig& job, const std::filesystem::path& config_file);

  ParamSet(ParamSet&&) noexcept = default;
  ParamSet& operator=(ParamSet&&) noexcept = default;

  // Aligned with the plugin's params; the pointers inside stay valid while this object lives.
  const std::vector<cfx_param_value>& values() const { return values_; }
  // {"name": value, ...} with defaults filled in: what the manifest records.
  boost::json::object to_json(const LoadedPlugin& plugin) const;

 private:
  ParamSet() = default;
  std::vector<cfx_param_value> values_;
  std::vector<std::string> strings_;
  std::vector<std::vector<double>> lists_;
};

}  // namespace conflux
