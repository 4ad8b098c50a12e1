#include "conflux/config.h"

#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include <toml++/toml.h>

#include "conflux/writer.h"

namespace conflux {

namespace fs = std::filesystem;

namespace {

// Names the place of an error: "FILE:LINE: job 'x': key 'y': ".
class Where {
 public:
  Where(fs::path file, std::string job = {}) : file_(std::move(file)), job_(std::move(job)) {}
  Where for_job(std::string job) const { return Where(file_, std::move(job)); }

  [[noreturn]] void fail(const toml::node* node, const std::string& key, const std::string& message) const {
    std::string s = file_.string();
    if (node && node->source().begin.line > 0) s += ":" + std::to_string(node->source().begin.line);
    s += ": ";
    if (!job_.empty()) s += "job '" + job_ + "': ";
    if (!key.empty()) s += "key '" + key + "': ";
    throw ConfigError(s + message);
  }

 private:
  fs::path file_;
  std::string job_;
};

std::string type_name(const toml::node& n) {
  switch (n.type()) {
    case toml::node_type::string: return "a string";
    case toml::node_type::integer: return "an integer";
    case toml::node_type::floating_point: return "a float";
    case toml::node_type::boolean: return "a boolean";
    case toml::node_type::array: return "an array";
    case toml::node_type::table: return "a table";
    default: return "a date/time";
  }
}

std::string get_string(const toml::node& n, const std::string& key, const Where& w) {
  if (!n.is_string()) w.fail(&n, key, "must be a string, not " + type_name(n));
  return *n.value<std::string>();
}

std::int64_t get_integer(const toml::node& n, const std::string& key, const Where& w, std::int64_t min,
                         std::int64_t max = INT64_MAX) {
  if (!n.is_integer()) w.fail(&n, key, "must be an integer, not " + type_name(n));
  const std::int64_t v = *n.value_exact<std::int64_t>();
  if (v < min) w.fail(&n, key, "must be at least " + std::to_string(min) + ", not " + std::to_string(v));
  if (v > max) w.fail(&n, key, "must be at most " + std::to_string(max) + ", not " + std::to_string(v));
  return v;
}

// Threads and job counts: far beyond any machine, well inside `unsigned`.
constexpr std::int64_t kMaxThreads = 4096;

// A TOML number as a double; integers are converted explicitly (toml++'s value<double>() is
// empty for integers it cannot represent exactly).
double number_of(const toml::node& n) {
  if (n.is_integer()) return static_cast<double>(*n.value_exact<std::int64_t>());
  return *n.value_exact<double>();
}

fs::path get_path(const toml::node& n, const std::string& key, const Where& w, const fs::path& anchor) {
  const std::string s = get_string(n, key, w);
  if (s.empty()) w.fail(&n, key, "must not be empty");
  const fs::path p(s);
  return p.is_absolute() ? p : (anchor / p).lexically_normal();
}

std::uint64_t get_bytes(const toml::node& n, const std::string& key, const Where& w) {
  if (n.is_integer()) {
    const std::int64_t v = *n.value<std::int64_t>();
    if (v <= 0) w.fail(&n, key, "must be a positive number of bytes");
    return static_cast<std::uint64_t>(v);
  }
  if (!n.is_string()) w.fail(&n, key, "must be a size such as \"5GB\" or a number of bytes, not " + type_name(n));
  try {
    const std::uint64_t v = parse_byte_size(*n.value<std::string>());
    if (v == 0) w.fail(&n, key, "must be positive");
    return v;
  } catch (const std::invalid_argument& e) {
    w.fail(&n, key, e.what());
  }
}

std::chrono::milliseconds get_duration(const toml::node& n, const std::string& key, const Where& w) {
  if (n.is_integer() || n.is_floating_point()) {
    const double s = number_of(n);
    if (!(s >= 0) || s > 1e9) w.fail(&n, key, "must be a duration such as \"10s\"");
    return std::chrono::milliseconds(static_cast<std::int64_t>(std::llround(s * 1000)));
  }
  if (!n.is_string()) w.fail(&n, key, "must be a duration such as \"10s\", not " + type_name(n));
  try {
    return parse_duration(*n.value<std::string>());
  } catch (const std::invalid_argument& e) {
    w.fail(&n, key, e.what());
  }
}

bool valid_job_name(const std::string& s) {
  if (s.empty() || s.size() > 128) return false;
  for (char c : s)
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.' || c == '-')) return false;
  return s != "." && s != "..";
}

RawParam raw_param(const std::string& key, const toml::node& n) {
  RawParam p;
  p.key = key;
  p.line = static_cast<int>(n.source().begin.line);
  if (n.is_integer()) {
    p.kind = RawParam::Kind::integer;
    p.integer = *n.value_exact<std::int64_t>();
    p.number = static_cast<double>(p.integer);
  } else if (n.is_floating_point()) {
    p.kind = RawParam::Kind::floating;
    p.number = *n.value_exact<double>();
  } else if (n.is_boolean()) {
    p.kind = RawParam::Kind::boolean;
    p.number = *n.value<bool>() ? 1 : 0;
  } else if (n.is_string()) {
    p.kind = RawParam::Kind::string;
    p.string = *n.value<std::string>();
  } else if (const toml::array* a = n.as_array()) {
    p.kind = RawParam::Kind::array;
    for (const toml::node& e : *a) {
      if (e.is_integer() || e.is_floating_point()) p.list.push_back(number_of(e));
      else p.list_numeric = false;
    }
  }
  return p;
}

DaemonConfig parse_daemon(const toml::table& t, const Where& w, const fs::path& anchor) {
  DaemonConfig d;
  for (const auto& [k, v] : t) {
    const std::string key(k.str());
    const std::string dkey = "daemon." + key;
    if (key == "control_socket") d.control_socket = get_path(v, dkey, w, anchor);
    else if (key == "state_dir") d.state_dir = get_path(v, dkey, w, anchor);
    else if (key == "plugin_dirs") {
      const toml::array* a = v.as_array();
      if (!a) w.fail(&v, dkey, "must be an array of directory paths");
      for (const toml::node& e : *a) d.plugin_dirs.push_back(get_path(e, dkey, w, anchor));
    } else if (key == "threads") d.threads = static_cast<unsigned>(get_integer(v, dkey, w, 0, kMaxThreads));
    else if (key == "rescan") {
      d.rescan = get_duration(v, dkey, w);
      if (d.rescan.count() < 100) w.fail(&v, dkey, "must be at least 100ms");
    } else if (key == "max_parallel_jobs") {
      d.max_parallel_jobs = static_cast<unsigned>(get_integer(v, dkey, w, 1, kMaxThreads));
    } else if (key == "socket_group") d.socket_group = get_string(v, dkey, w);
    else
      w.fail(&v, dkey,
             "unknown key (known: control_socket, state_dir, plugin_dirs, threads, rescan, "
             "max_parallel_jobs, socket_group)");
  }
  return d;
}

JobConfig parse_job(const toml::table& t, std::size_t index, const Where& file_where, const fs::path& anchor) {
  JobConfig j;
  j.line = static_cast<int>(t.source().begin.line);
  const toml::node* name = t.get("name");
  if (!name) file_where.fail(&t, "name", "job #" + std::to_string(index + 1) + " has no name (a required key)");
  j.name = get_string(*name, "name", file_where);
  if (!valid_job_name(j.name))
    file_where.fail(name, "name", "job name \"" + j.name + "\" must match [A-Za-z0-9_.-]+");
  const Where w = file_where.for_job(j.name);

  bool has_models = false, has_strategy = false, has_output = false;
  for (const auto& [k, v] : t) {
    const std::string key(k.str());
    if (key == "name") continue;
    if (key == "strategy") {
      j.strategy = get_string(v, key, w);
      if (j.strategy.empty()) w.fail(&v, key, "must not be empty");
      has_strategy = true;
    } else if (key == "base") {
      j.base = get_path(v, key, w, anchor);
    } else if (key == "models") {
      const toml::array* a = v.as_array();
      if (!a) w.fail(&v, key, "must be an array of checkpoint paths, not " + type_name(v));
      if (a->empty()) w.fail(&v, key, "must list at least one checkpoint");
      for (const toml::node& e : *a) j.models.push_back(get_path(e, key, w, anchor));
      has_models = true;
    } else if (key == "output") {
      j.output = get_path(v, key, w, anchor);
      has_output = true;
    } else if (key == "out_dtype") {
      const std::string s = get_string(v, key, w);
      j.out_dtype = parse_out_dtype(s);
      if (!j.out_dtype) w.fail(&v, key, "must be \"bf16\", \"f16\" or \"f32\", not \"" + s + "\"");
    } else if (key == "shard_size") {
      j.shard_size = get_bytes(v, key, w);
    } else if (key == "threads") {
      j.threads = static_cast<unsigned>(get_integer(v, key, w, 0, kMaxThreads));
    } else if (key == "seed") {
      j.seed = static_cast<std::uint64_t>(get_integer(v, key, w, 0));
    } else if (key == "params") {
      const toml::table* p = v.as_table();
      if (!p) w.fail(&v, key, "must be a table ([job.params]), not " + type_name(v));
      for (const auto& [pk, pv] : *p) j.params.push_back(raw_param(std::string(pk.str()), pv));
    } else if (key == "trigger") {
      j.trigger = get_string(v, key, w);
      if (j.trigger != "watch" && j.trigger != "manual")
        w.fail(&v, key, "must be \"watch\" or \"manual\", not \"" + j.trigger + "\"");
    } else if (key == "settle") {
      j.settle = get_duration(v, key, w);
    } else if (key == "ready_marker") {
      j.ready_marker = get_string(v, key, w);
      if (j.ready_marker.find('/') != std::string::npos || j.ready_marker == ".." || j.ready_marker == ".")
        w.fail(&v, key, "must be a file name inside the checkpoint directory, not a path");
    } else if (key == "output_name") {
      j.output_name = get_string(v, key, w);
      if (j.output_name.empty() || j.output_name.find('/') != std::string::npos || j.output_name[0] == '.')
        w.fail(&v, key, "must be a file name template (no '/', not starting with '.')");
      for (std::size_t i = j.output_name.find('{'); i != std::string::npos; i = j.output_name.find('{', i + 1)) {
        const std::string rest = j.output_name.substr(i);
        if (!rest.starts_with("{n}") && !rest.starts_with("{checkpoint}") && !rest.starts_with("{time}"))
          w.fail(&v, key, "unknown placeholder in \"" + j.output_name + "\" (known: {n}, {checkpoint}, {time})");
      }
    } else if (key == "keep") {
      j.keep = static_cast<std::uint64_t>(get_integer(v, key, w, 1));
    } else if (key == "memory_limit") {
      j.memory_limit = get_bytes(v, key, w);
    } else {
      w.fail(&v, key,
             "unknown key (known: name, strategy, base, models, output, out_dtype, shard_size, threads, "
             "seed, params, trigger, settle, ready_marker, output_name, keep, memory_limit)");
    }
  }
  if (!has_strategy) w.fail(&t, "strategy", "missing (a required key: the strategy plugin's id)");
  if (!has_models) w.fail(&t, "models", "missing (a required key: the checkpoints to merge)");
  if (!has_output) w.fail(&t, "output", "missing (a required key: where the merged checkpoint goes)");
  return j;
}

}  // namespace

std::optional<DType> parse_out_dtype(std::string_view s) {
  if (s == "bf16" || s == "bfloat16") return DType::BF16;
  if (s == "f16" || s == "float16" || s == "fp16") return DType::F16;
  if (s == "f32" || s == "float32" || s == "fp32") return DType::F32;
  return std::nullopt;
}

std::chrono::milliseconds parse_duration(std::string_view text) {
  std::size_t i = 0;
  double value = 0;
  bool digits = false, dot = false;
  double scale = 1;
  for (; i < text.size(); ++i) {
    const char c = text[i];
    if (c >= '0' && c <= '9') {
      digits = true;
      if (dot) value += (c - '0') * (scale /= 10);
      else value = value * 10 + (c - '0');
    } else if (c == '.' && !dot) {
      dot = true;
    } else {
      break;
    }
  }
  const std::string_view unit = text.substr(i);
  double ms;
  if (unit == "ms") ms = value;
  else if (unit == "s" || unit.empty()) ms = value * 1e3;
  else if (unit == "m" || unit == "min") ms = value * 60e3;
  else if (unit == "h") ms = value * 3600e3;
  else digits = false;
  if (!digits || !(ms < 1e15))
    throw std::invalid_argument("invalid duration \"" + std::string(text) + "\" (use e.g. \"500ms\", \"10s\", \"2m\", \"1h\")");
  return std::chrono::milliseconds(static_cast<std::int64_t>(std::llround(ms)));
}

const JobConfig& Config::job(const std::string& name) const {
  for (const auto& j : jobs)
    if (j.name == name) return j;
  std::string known;
  for (const auto& j : jobs) known += (known.empty() ? "" : ", ") + j.name;
  throw ConfigError(file.string() + ": no job named '" + name + "' (jobs: " + known + ")");
}

Config parse_config(std::string_view text, const fs::path& file) {
  toml::table root;
  try {
    root = toml::parse(text, file.string());
  } catch (const toml::parse_error& e) {
    throw ConfigError(file.string() + ":" + std::to_string(e.source().begin.line) + ": not valid TOML: " +
                      std::string(e.description()));
  }
  const Where w(file);
  const fs::path anchor = file.has_parent_path() ? fs::absolute(file).parent_path() : fs::current_path();
  Config c;
  c.file = file;
  for (const auto& [k, v] : root) {
    const std::string key(k.str());
    if (key == "daemon") {
      const toml::table* t = v.as_table();
      if (!t) w.fail(&v, key, "must be a table ([daemon])");
      c.daemon = parse_daemon(*t, w, anchor);
      c.has_daemon_table = true;
    } else if (key == "job") {
      const toml::array* a = v.as_array();
      if (!a || !a->is_array_of_tables()) w.fail(&v, key, "must be an array of tables ([[job]])");
      std::size_t i = 0;
      for (const toml::node& e : *a) c.jobs.push_back(parse_job(*e.as_table(), i++, w, anchor));
    } else {
      w.fail(&v, key, "unknown top-level key (known: [daemon], [[job]])");
    }
  }
  std::set<std::string> names;
  for (const auto& j : c.jobs)
    if (!names.insert(j.name).second) throw ConfigError(file.string() + ":" + std::to_string(j.line) + ": job '" + j.name + "': key 'name': the name is used by two jobs");
  return c;
}

Config load_config(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw ConfigError(file.string() + ": cannot open the configuration file: " + std::strerror(errno));
  std::ostringstream ss;
  ss << in.rdbuf();
  return parse_config(ss.str(), file);
}

fs::path control_socket_of(const fs::path& file) {
  try {
    return load_config(file).daemon.control_socket;
  } catch (const ConfigError& full) {
    // Only [daemon].control_socket needs to be right: a daemon runs the configuration it loaded,
    // which may since have been edited into one that does not check.
    std::ifstream in(file, std::ios::binary);
    std::ostringstream ss;
    ss << in.rdbuf();
    toml::table root;
    try {
      root = toml::parse(ss.str(), file.string());
    } catch (const toml::parse_error&) {
      throw full;
    }
    const toml::node* socket = root.at_path("daemon.control_socket").node();
    if (!socket) return DaemonConfig{}.control_socket;
    const fs::path anchor = file.has_parent_path() ? fs::absolute(file).parent_path() : fs::current_path();
    return get_path(*socket, "daemon.control_socket", Where(file), anchor);
  }
}

}  // namespace conflux
