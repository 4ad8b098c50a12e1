#include "conflux/plugin_registry.h"

#include <dlfcn.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstddef>
#include <cstdlib>
#include <cerrno>
#include <cstring>
#include <set>

namespace conflux {

namespace fs = std::filesystem;

namespace {

// The sizes of the structs as ABI 1.0 defined them: anything smaller is malformed.
constexpr std::size_t kMinPluginSize = offsetof(cfx_plugin, destroy) + sizeof(void*);
constexpr std::size_t kMinParamSize = offsetof(cfx_param_spec, choices) + sizeof(void*);
constexpr std::size_t kMinPassSize = offsetof(cfx_pass, instance_stats_size) + sizeof(void*);

bool valid_id(const char* s) {
  if (!s || !*s || std::strlen(s) > 64) return false;
  for (const char* p = s; *p; ++p)
    if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_')) return false;
  return true;
}

bool valid_param_name(const char* s) {
  if (!s || !*s || std::strlen(s) > 64) return false;
  if (!(std::isalpha(static_cast<unsigned char>(*s)) || *s == '_')) return false;
  for (const char* p = s; *p; ++p)
    if (!(std::isalnum(static_cast<unsigned char>(*p)) || *p == '_')) return false;
  return true;
}

// Copies an array of size-prefixed structs whose element size is the plugin's into host-sized
// structs, zero-filling fields the plugin does not know.
template <class T>
std::vector<T> copy_array(const T* first, std::uint32_t count, std::size_t min_size, const char* what,
                          const std::string& where) {
  std::vector<T> out(count);
  if (count == 0) return out;
  if (!first) throw PluginError(where + ": " + what + " count is " + std::to_string(count) + " but the array is NULL");
  const std::size_t stride = first->struct_size;
  if (stride < min_size)
    throw PluginError(where + ": " + what + " struct_size " + std::to_string(stride) + " is smaller than ABI 1.0's " +
                      std::to_string(min_size));
  const auto* bytes = reinterpret_cast<const unsigned char*>(first);
  for (std::uint32_t i = 0; i < count; ++i) {
    T item{};
    std::memcpy(&item, bytes + i * stride, std::min(stride, sizeof(T)));
    if (item.struct_size != stride)
      throw PluginError(where + ": " + what + " " + std::to_string(i) + " has struct_size " +
                        std::to_string(item.struct_size) + ", the first has " + std::to_string(stride));
    item.struct_size = sizeof(T);
    out[i] = item;
  }
  return out;
}

std::string number_text(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

void validate_param(const cfx_param_spec& p, const std::string& where) {
  const std::string at = where + ": parameter '" + (p.name ? p.name : "(null)") + "'";
  if (!valid_param_name(p.name)) throw PluginError(at + ": name must match [A-Za-z_][A-Za-z0-9_]*");
  if (p.type < CFX_PARAM_FLOAT || p.type > CFX_PARAM_FLOAT_LIST)
    throw PluginError(at + ": unknown type " + std::to_string(p.type));
  const bool numeric = p.type == CFX_PARAM_FLOAT || p.type == CFX_PARAM_INT || p.type == CFX_PARAM_FLOAT_LIST;
  if ((p.flags & (CFX_PARAM_HAS_MIN | CFX_PARAM_HAS_MAX)) && !numeric)
    throw PluginError(at + ": a range needs a numeric type");
  if ((p.flags & CFX_PARAM_PER_MODEL) && p.type != CFX_PARAM_FLOAT_LIST)
    throw PluginError(at + ": per-model values need the float-list type");
  if (p.choice_count > 0 && p.type != CFX_PARAM_STRING) throw PluginError(at + ": choices need the string type");
  if (p.choice_count > 0 && !p.choices) throw PluginError(at + ": choice_count > 0 but choices is NULL");
  for (std::uint32_t i = 0; i < p.choice_count; ++i)
    if (!p.choices[i]) throw PluginError(at + ": choice " + std::to_string(i) + " is NULL");
  if ((p.flags & CFX_PARAM_HAS_MIN) && (p.flags & CFX_PARAM_HAS_MAX) && !(p.min <= p.max))
    throw PluginError(at + ": min " + number_text(p.min) + " exceeds max " + number_text(p.max));
  if (p.flags & CFX_PARAM_REQUIRED) return;
  // The default must itself be a valid value.
  switch (p.type) {
    case CFX_PARAM_STRING: {
      if (!p.default_string) throw PluginError(at + ": a string parameter needs a default (or the required flag)");
      bool ok = p.choice_count == 0;
      for (std::uint32_t i = 0; i < p.choice_count; ++i) ok = ok || std::strcmp(p.choices[i], p.default_string) == 0;
      if (!ok) throw PluginError(at + ": default \"" + p.default_string + "\" is not one of its choices");
      return;
    }
    case CFX_PARAM_BOOL:
      if (p.default_number != 0 && p.default_number != 1) throw PluginError(at + ": a boolean default must be 0 or 1");
      return;
    case CFX_PARAM_FLOAT_LIST:
      if (!(p.flags & CFX_PARAM_PER_MODEL)) return;  // a plain list defaults to empty
      [[fallthrough]];
    case CFX_PARAM_INT:
    case CFX_PARAM_FLOAT: {
      const double v = p.default_number;
      if (!std::isfinite(v)) throw PluginError(at + ": default is not finite");
      if (p.type == CFX_PARAM_INT && v != std::trunc(v)) throw PluginError(at + ": an integer default must be whole");
      const bool lo = !(p.flags & CFX_PARAM_HAS_MIN) ||
                      ((p.flags & CFX_PARAM_MIN_EXCLUSIVE) ? v > p.min : v >= p.min);
      const bool hi = !(p.flags & CFX_PARAM_HAS_MAX) ||
                      ((p.flags & CFX_PARAM_MAX_EXCLUSIVE) ? v < p.max : v <= p.max);
      if (!lo || !hi) throw PluginError(at + ": default " + number_text(v) + " is outside its range");
      return;
    }
    default:
      return;
  }
}

void validate_pass(const cfx_pass& p, std::size_t index, const cfx_plugin& d, const std::string& where) {
  const std::string at = where + ": pass " + std::to_string(index);
  if (p.kind == CFX_PASS_MAP) {
    if (!p.map) throw PluginError(at + ": a map pass needs a map function");
    if (p.enabled) throw PluginError(at + ": the map pass cannot be optional (enabled must be NULL)");
  } else if (p.kind == CFX_PASS_TENSOR_REDUCE || p.kind == CFX_PASS_MODEL_REDUCE) {
    if (!p.reduce || !p.combine || !p.reduce_done)
      throw PluginError(at + ": a reduce pass needs reduce, combine and reduce_done functions");
    if (p.stats_size == 0 && !p.instance_stats_size)
      throw PluginError(at + ": a reduce pass needs stats_size > 0 or instance_stats_size");
    if (p.flags & CFX_PASS_OUTPUT_DELTA) throw PluginError(at + ": only a map pass can output a delta");
  } else {
    throw PluginError(at + ": unknown pass kind " + std::to_string(p.kind));
  }
  if ((p.flags & (CFX_PASS_TASK_VECTORS | CFX_PASS_OUTPUT_DELTA)) && d.base == CFX_BASE_UNUSED)
    throw PluginError(at + ": task vectors and delta output need a base, but the plugin declares it unused");
  if ((p.flags & CFX_PASS_BF16_INPUTS) && (p.flags & (CFX_PASS_TASK_VECTORS | CFX_PASS_OUTPUT_DELTA)))
    throw PluginError(at + ": stored BF16 inputs cannot be combined with task vectors or delta output");
  if ((p.flags & CFX_PASS_SPECULATIVE_OUTPUT) && p.kind != CFX_PASS_TENSOR_REDUCE)
    throw PluginError(at + ": only a tensor-scope reduce pass can write speculative output");
  if ((p.flags & CFX_PASS_SPECULATIVE_OUTPUT) && (p.flags & CFX_PASS_TASK_VECTORS))
    throw PluginError(at + ": speculative output cannot be combined with task vectors");
  if (p.flags & ~std::uint32_t{CFX_PASS_TASK_VECTORS | CFX_PASS_OUTPUT_DELTA | CFX_PASS_WHOLE_ROWS |
                               CFX_PASS_BF16_INPUTS | CFX_PASS_SPECULATIVE_OUTPUT})
    throw PluginError(at + ": unknown flags " + std::to_string(p.flags));
}

}  // namespace

const cfx_param_spec* LoadedPlugin::param(std::string_view name) const {
  for (const auto& p : params)
    if (name == p.name) return &p;
  return nullptr;
}

void validate_plugin(const cfx_plugin* raw, const fs::path& file, LoadedPlugin& out) {
  const std::string where = "plugin " + file.string();
  if (!raw) throw PluginError(where + ": the entry point returned NULL (the plugin refused this host)");
  // The version comes first: struct_size, abi_major and abi_minor open the descriptor in every ABI,
  // so a plugin of another major is refused as such, whatever its descriptor's size.
  if (raw->struct_size >= offsetof(cfx_plugin, id) && raw->abi_major != CFX_ABI_MAJOR)
    throw PluginError(where + ": built for plugin ABI " + std::to_string(raw->abi_major) + "." +
                      std::to_string(raw->abi_minor) + ", but this Conflux speaks ABI " +
                      std::to_string(CFX_ABI_MAJOR) + "." + std::to_string(CFX_ABI_MINOR) +
                      ": rebuild the plugin against this SDK");
  if (raw->struct_size < kMinPluginSize)
    throw PluginError(where + ": descriptor struct_size " + std::to_string(raw->struct_size) +
                      " is smaller than ABI 1.0's " + std::to_string(kMinPluginSize));
  cfx_plugin d{};
  std::memcpy(&d, raw, std::min<std::size_t>(raw->struct_size, sizeof d));
  d.struct_size = sizeof d;
  if (!valid_id(d.id)) throw PluginError(where + ": id must match [a-z0-9_]+ (at most 64 characters)");
  const std::string at = where + " ('" + d.id + "')";
  if (!d.version || !*d.version) throw PluginError(at + ": missing version");
  if (!d.description) throw PluginError(at + ": missing description");
  if (!d.create || !d.destroy) throw PluginError(at + ": create and destroy are required");
  if (d.min_models < 1) throw PluginError(at + ": min_models must be at least 1");
  if (d.max_models != 0 && d.max_models < d.min_models) throw PluginError(at + ": max_models is below min_models");
  if (d.base > CFX_BASE_REQUIRED) throw PluginError(at + ": unknown base use " + std::to_string(d.base));
  if (d.param_count > 256) throw PluginError(at + ": more than 256 parameters");
  if (d.pass_count < 1 || d.pass_count > 64) throw PluginError(at + ": pass_count must be 1 to 64");

  out.params = copy_array(d.params, d.param_count, kMinParamSize, "parameter", at);
  std::set<std::string_view> names;
  for (const auto& p : out.params) {
    validate_param(p, at);
    if (!names.insert(p.name).second) throw PluginError(at + ": parameter '" + p.name + "' is declared twice");
  }
  out.passes = copy_array(d.passes, d.pass_count, kMinPassSize, "pass", at);
  for (std::size_t i = 0; i < out.passes.size(); ++i) {
    validate_pass(out.passes[i], i, d, at);
    const bool last = i + 1 == out.passes.size();
    if ((out.passes[i].kind == CFX_PASS_MAP) != last)
      throw PluginError(at + ": exactly one map pass, the last one, is required");
  }
  d.params = out.params.data();
  d.passes = out.passes.data();
  out.desc = d;
  out.file = file;
}

PluginRegistry::~PluginRegistry() = default;

std::vector<fs::path> PluginRegistry::search_path(const std::vector<fs::path>& config_dirs) {
  std::vector<fs::path> dirs;
  if (const char* env = std::getenv("CONFLUX_PLUGIN_PATH"); env && *env) {
    std::string_view rest = env;
    while (!rest.empty()) {
      const auto colon = rest.find(':');
      const std::string_view part = rest.substr(0, colon);
      if (!part.empty()) dirs.emplace_back(part);
      if (colon == std::string_view::npos) break;
      rest.remove_prefix(colon + 1);
    }
  }
  dirs.insert(dirs.end(), config_dirs.begin(), config_dirs.end());
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (!ec) dirs.push_back((exe.parent_path().parent_path() / "lib" / "conflux" / "plugins").lexically_normal());
  dirs.emplace_back(CONFLUX_PLUGIN_INSTALL_DIR);
  // The same directory twice (e.g. the executable lives in the install prefix) is searched once.
  std::vector<fs::path> unique;
  for (const auto& d : dirs) {
    const fs::path canon = fs::weakly_canonical(d, ec);
    const fs::path key = ec ? d : canon;
    if (std::find(unique.begin(), unique.end(), key) == unique.end()) unique.push_back(key);
  }
  return unique;
}

void PluginRegistry::load_dirs(const std::vector<fs::path>& dirs) {
  for (const fs::path& dir : dirs) {
    searched_.push_back(dir);
    std::error_code ec;
    if (!fs::is_directory(dir, ec)) continue;
    std::vector<fs::path> files;
    for (const auto& e : fs::directory_iterator(dir, ec))
      if (e.path().extension() == ".so" && e.is_regular_file(ec)) files.push_back(e.path());
    std::sort(files.begin(), files.end());
    for (const auto& f : files)
      if (auto problem = load_file(f)) problems_.push_back(*problem);
  }
}

namespace {

// Like sshd's StrictModes: code loaded into the process must not be replaceable by anyone but
// root or the user running it. Returns the reason a path is refused, or empty.
std::string untrusted(const fs::path& p, const char* what) {
  struct stat st {};
  if (::stat(p.c_str(), &st) != 0) return std::string("cannot stat ") + what + " " + p.string() + ": " + std::strerror(errno);
  if (st.st_uid != 0 && st.st_uid != ::geteuid())
    return std::string(what) + " " + p.string() + " is owned by uid " + std::to_string(st.st_uid) +
           ", neither root nor this process's user";
  if (st.st_mode & (S_IWGRP | S_IWOTH))
    return std::string(what) + " " + p.string() + " is writable by " +
           ((st.st_mode & S_IWOTH) ? "others" : "its group") + " (chmod go-w it)";
  return {};
}

// The directories above a plugin's: whoever can rename entries in one of them can swap the
// plugin's directory. World- or group-writable ancestors are fine only with the sticky bit
// (like /tmp), where nobody can rename what they do not own.
std::string untrusted_ancestor(const fs::path& dir) {
  for (fs::path p = dir.parent_path(); !p.empty(); p = p.parent_path()) {
    struct stat st {};
    if (::stat(p.c_str(), &st) != 0) break;
    if (st.st_uid != 0 && st.st_uid != ::geteuid())
      return "directory " + p.string() + " above it is owned by uid " + std::to_string(st.st_uid) +
             ", neither root nor this process's user";
    if ((st.st_mode & (S_IWGRP | S_IWOTH)) && !(st.st_mode & S_ISVTX))
      return "directory " + p.string() + " above it is writable by " + ((st.st_mode & S_IWOTH) ? "others" : "its group");
    if (p == p.root_path()) break;
  }
  return {};
}

}  // namespace

std::optional<PluginProblem> PluginRegistry::load_file(const fs::path& file) {
  std::error_code ec;
  const fs::path canon = fs::weakly_canonical(file, ec);
  for (const auto& [p, what] : {std::pair{canon.parent_path(), "directory"}, std::pair{canon, "file"}})
    if (std::string why = untrusted(p, what); !why.empty())
      return PluginProblem{file, "plugin " + file.string() + ": refused: " + why};
  if (std::string why = untrusted_ancestor(canon.parent_path()); !why.empty())
    return PluginProblem{file, "plugin " + file.string() + ": refused: " + why};
  if (std::find(loaded_files_.begin(), loaded_files_.end(), canon) != loaded_files_.end()) return std::nullopt;
  loaded_files_.push_back(canon);

  // RTLD_LOCAL: plugins do not see each other's symbols. The handle is never closed (see the
  // destructor's comment).
  void* handle = ::dlopen(file.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle) {
    const char* err = ::dlerror();
    return PluginProblem{file, "plugin " + file.string() + ": cannot load: " + (err ? err : "unknown error")};
  }
  void* sym = ::dlsym(handle, CFX_PLUGIN_ENTRY_SYMBOL);
  if (!sym)
    return PluginProblem{file, "plugin " + file.string() + ": no entry symbol '" CFX_PLUGIN_ENTRY_SYMBOL
                               "' (is it a Conflux strategy plugin built with the SDK?)"};
  auto entry = reinterpret_cast<cfx_plugin_entry_fn>(sym);
  auto loaded = std::make_unique<LoadedPlugin>();
  try {
    validate_plugin(entry(host_table()), file, *loaded);
  } catch (const PluginError& e) {
    return PluginProblem{file, e.what()};
  }
  const std::string id = loaded->id();
  for (const auto& p : plugins_) {
    if (p->id() != id) continue;
    const std::string message = "strategy id '" + id + "' is provided by two plugins: " + p->file.string() +
                                " and " + file.string() + "; remove or rename one";
    duplicates_.emplace_back(id, message);
    return PluginProblem{file, message};
  }
  plugins_.push_back(std::move(loaded));
  return std::nullopt;
}

const LoadedPlugin& PluginRegistry::get(std::string_view id) const {
  for (const auto& [dup, message] : duplicates_)
    if (dup == id) throw PluginError(message);
  for (const auto& p : plugins_)
    if (p->id() == id) return *p;
  std::string message = "unknown strategy '" + std::string(id) + "'";
  if (plugins_.empty()) {
    message += "; no plugins found in";
    for (const auto& d : searched_) message += " " + d.string();
  } else {
    message += "; available:";
    for (const auto& p : plugins_) message += " " + p->id();
  }
  for (const auto& p : problems_) message += "; " + p.message;
  throw PluginError(message);
}

}  // namespace conflux
