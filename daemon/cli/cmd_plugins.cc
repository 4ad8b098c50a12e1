// conflux plugins [--json] [--config FILE]: the strategies found, with their parameter schemas.
#include <cstdio>
#include <iostream>

#include <boost/json.hpp>
#include <boost/program_options.hpp>

#include "commands.h"
#include "conflux/config.h"
#include "conflux/plugin_registry.h"

namespace conflux::cli {

namespace po = boost::program_options;
namespace json = boost::json;

namespace {

const char* type_name(std::uint32_t t, std::uint32_t flags) {
  switch (t) {
    case CFX_PARAM_FLOAT: return "float";
    case CFX_PARAM_INT: return "int";
    case CFX_PARAM_BOOL: return "bool";
    case CFX_PARAM_STRING: return "string";
    case CFX_PARAM_FLOAT_LIST: return (flags & CFX_PARAM_PER_MODEL) ? "float per model" : "float list";
    default: return "?";
  }
}

std::string number(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%g", v);
  return buf;
}

std::string default_text(const cfx_param_spec& p) {
  if (p.flags & CFX_PARAM_REQUIRED) return "required";
  switch (p.type) {
    case CFX_PARAM_BOOL: return p.default_number != 0 ? "true" : "false";
    case CFX_PARAM_STRING: return std::string("\"") + p.default_string + "\"";
    case CFX_PARAM_FLOAT_LIST: return (p.flags & CFX_PARAM_PER_MODEL) ? number(p.default_number) + " each" : "[]";
    default: return number(p.default_number);
  }
}

std::string range_text(const cfx_param_spec& p) {
  std::string s;
  if (p.flags & CFX_PARAM_HAS_MIN) s += std::string((p.flags & CFX_PARAM_MIN_EXCLUSIVE) ? "> " : ">= ") + number(p.min);
  if (p.flags & CFX_PARAM_HAS_MAX)
    s += std::string(s.empty() ? "" : ", ") + ((p.flags & CFX_PARAM_MAX_EXCLUSIVE) ? "< " : "<= ") + number(p.max);
  for (std::uint32_t i = 0; i < p.choice_count; ++i) s += std::string(i ? " | " : "one of ") + p.choices[i];
  return s;
}

json::object to_json(const LoadedPlugin& p) {
  const cfx_plugin& d = p.desc;
  json::object o{{"id", d.id},
                 {"version", d.version},
                 {"description", d.description},
                 {"file", p.file.string()},
                 {"min_models", d.min_models},
                 {"max_models", d.max_models == 0 ? json::value(nullptr) : json::value(d.max_models)},
                 {"base", d.base == CFX_BASE_REQUIRED ? "required" : d.base == CFX_BASE_OPTIONAL ? "optional" : "unused"}};
  json::array params;
  for (const cfx_param_spec& s : p.params) {
    json::object q{{"name", s.name}, {"type", type_name(s.type, s.flags)}, {"doc", s.doc ? s.doc : ""}};
    q["required"] = (s.flags & CFX_PARAM_REQUIRED) != 0;
    if (!(s.flags & CFX_PARAM_REQUIRED)) {
      if (s.type == CFX_PARAM_BOOL) q["default"] = s.default_number != 0;
      else if (s.type == CFX_PARAM_STRING) q["default"] = s.default_string;
      else if (s.type == CFX_PARAM_INT) q["default"] = static_cast<std::int64_t>(s.default_number);
      else if (s.type == CFX_PARAM_FLOAT_LIST && !(s.flags & CFX_PARAM_PER_MODEL)) q["default"] = json::array{};
      else q["default"] = s.default_number;
    }
    if (s.flags & CFX_PARAM_HAS_MIN) q[(s.flags & CFX_PARAM_MIN_EXCLUSIVE) ? "above" : "min"] = s.min;
    if (s.flags & CFX_PARAM_HAS_MAX) q[(s.flags & CFX_PARAM_MAX_EXCLUSIVE) ? "below" : "max"] = s.max;
    if (s.choice_count) {
      json::array c;
      for (std::uint32_t i = 0; i < s.choice_count; ++i) c.push_back(json::string(s.choices[i]));
      q["choices"] = std::move(c);
    }
    params.push_back(std::move(q));
  }
  o["parameters"] = std::move(params);
  json::array passes;
  for (const cfx_pass& s : p.passes)
    passes.push_back(json::string(s.kind == CFX_PASS_MAP ? "map" : s.kind == CFX_PASS_TENSOR_REDUCE ? "tensor_reduce" : "model_reduce"));
  o["passes"] = std::move(passes);
  return o;
}

}  // namespace

int cmd_plugins(int argc, char** argv) {
  po::options_description opts(
      "usage: conflux plugins [--json] [--config FILE]\n\n"
      "Lists the strategy plugins found (CONFLUX_PLUGIN_PATH, the config's [daemon].plugin_dirs,\n"
      "then the built-in directory) with their parameters.\n\noptions");
  std::string config_file;
  opts.add_options()("json", "print JSON")("config", po::value(&config_file), "also search this config's plugin_dirs")(
      "help,h", "show this help");
  po::variables_map vm;
  try {
    po::store(po::parse_command_line(argc, argv, opts), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    std::fprintf(stderr, "conflux plugins: %s (try 'conflux plugins --help')\n", e.what());
    return kExitUsage;
  }
  if (vm.count("help")) {
    std::cout << opts << "\n";
    return kExitOk;
  }
  std::vector<std::filesystem::path> dirs;
  if (!config_file.empty()) {
    try {
      dirs = load_config(config_file).daemon.plugin_dirs;
    } catch (const ConfigError& e) {
      std::fprintf(stderr, "conflux plugins: %s\n", e.what());
      return kExitUsage;
    }
  }
  PluginRegistry reg;
  reg.load_dirs(PluginRegistry::search_path(dirs));
  for (const auto& p : reg.problems()) std::fprintf(stderr, "conflux plugins: warning: %s\n", p.message.c_str());

  if (vm.count("json")) {
    json::array arr;
    for (const auto& p : reg.plugins()) arr.push_back(to_json(*p));
    json::array searched;
    for (const auto& d : reg.searched()) searched.push_back(json::string(d.string()));
    json::array problems;
    for (const auto& p : reg.problems()) problems.push_back(json::object{{"file", p.file.string()}, {"message", p.message}});
    std::cout << json::serialize(json::object{{"plugins", std::move(arr)}, {"searched", std::move(searched)},
                                              {"problems", std::move(problems)}})
              << "\n";
    return kExitOk;
  }
  if (reg.plugins().empty()) {
    std::printf("no strategy plugins found; searched:\n");
    for (const auto& d : reg.searched()) std::printf("  %s\n", d.c_str());
    return kExitOk;
  }
  for (const auto& lp : reg.plugins()) {
    const cfx_plugin& d = lp->desc;
    std::string models = d.max_models == d.min_models ? std::to_string(d.min_models)
                         : d.max_models == 0          ? std::to_string(d.min_models) + "+"
                                                      : std::to_string(d.min_models) + "-" + std::to_string(d.max_models);
    std::printf("%s %s  %s\n  models: %s; base: %s; file: %s\n", d.id, d.version, d.description, models.c_str(),
                d.base == CFX_BASE_REQUIRED ? "required" : d.base == CFX_BASE_OPTIONAL ? "optional" : "unused",
                lp->file.c_str());
    for (const cfx_param_spec& s : lp->params) {
      const std::string range = range_text(s);
      std::printf("    %-12s %-16s default %-10s %s%s%s%s\n", s.name, type_name(s.type, s.flags), default_text(s).c_str(),
                  s.doc ? s.doc : "", range.empty() ? "" : " (", range.c_str(), range.empty() ? "" : ")");
    }
  }
  return kExitOk;
}

}  // namespace conflux::cli
