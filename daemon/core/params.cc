#include "conflux/params.h"

#include <cmath>
#include <cstdio>
#include <cstring>

namespace conflux {

namespace {

std::string num(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  // Trim the noise of %.17g for values people write ("0.10000000000000001" -> "0.1").
  char short_buf[64];
  std::snprintf(short_buf, sizeof short_buf, "%g", v);
  return std::strtod(short_buf, nullptr) == v ? short_buf : buf;
}

std::string range_text(const cfx_param_spec& s) {
  const bool lo = s.flags & CFX_PARAM_HAS_MIN, hi = s.flags & CFX_PARAM_HAS_MAX;
  if (lo && hi)
    return std::string((s.flags & CFX_PARAM_MIN_EXCLUSIVE) ? "(" : "[") + num(s.min) + ", " + num(s.max) +
           ((s.flags & CFX_PARAM_MAX_EXCLUSIVE) ? ")" : "]");
  if (lo) return std::string((s.flags & CFX_PARAM_MIN_EXCLUSIVE) ? "> " : ">= ") + num(s.min);
  return std::string((s.flags & CFX_PARAM_MAX_EXCLUSIVE) ? "< " : "<= ") + num(s.max);
}

bool in_range(const cfx_param_spec& s, double v) {
  if (!std::isfinite(v)) return false;
  if (s.flags & CFX_PARAM_HAS_MIN) {
    if ((s.flags & CFX_PARAM_MIN_EXCLUSIVE) ? !(v > s.min) : !(v >= s.min)) return false;
  }
  if (s.flags & CFX_PARAM_HAS_MAX) {
    if ((s.flags & CFX_PARAM_MAX_EXCLUSIVE) ? !(v < s.max) : !(v <= s.max)) return false;
  }
  return true;
}

}  // namespace

ParamSet ParamSet::bind(const LoadedPlugin& plugin, const JobConfig& job, const std::filesystem::path& file) {
  auto fail = [&](int line, const std::string& key, const std::string& message) -> void {
    std::string s = file.string();
    if (line > 0) s += ":" + std::to_string(line);
    s += ": job '" + job.name + "': key '" + key + "': " + message;
    throw ConfigError(s);
  };
  const cfx_plugin& d = plugin.desc;
  const std::string sid = "strategy '" + plugin.id() + "'";
  const auto n_models = job.models.size();
  if (n_models < d.min_models || (d.max_models != 0 && n_models > d.max_models)) {
    std::string need = d.max_models == d.min_models ? "exactly " + std::to_string(d.min_models)
                       : d.max_models == 0          ? "at least " + std::to_string(d.min_models)
                                                    : std::to_string(d.min_models) + " to " + std::to_string(d.max_models);
    fail(job.line, "models", sid + " needs " + need + " model" + (d.min_models == 1 && d.max_models == 1 ? "" : "s") +
                                 ", the job lists " + std::to_string(n_models));
  }
  if (d.base == CFX_BASE_REQUIRED && !job.base)
    fail(job.line, "base", sid + " needs a base model (the checkpoint the models were fine-tuned from)");

  ParamSet set;
  const std::size_t n = plugin.params.size();
  set.values_.resize(n);
  set.strings_.resize(n);
  set.lists_.resize(n);
  std::vector<const RawParam*> given(n, nullptr);
  for (const RawParam& raw : job.params) {
    std::size_t i = 0;
    while (i < n && raw.key != plugin.params[i].name) ++i;
    if (i == n) {
      std::string known;
      for (const auto& p : plugin.params) known += (known.empty() ? "" : ", ") + std::string(p.name);
      fail(raw.line, "params." + raw.key,
           "unknown parameter of " + sid + (known.empty() ? " (it takes none)" : " (known: " + known + ")"));
    }
    given[i] = &raw;
  }

  for (std::size_t i = 0; i < n; ++i) {
    const cfx_param_spec& s = plugin.params[i];
    const std::string key = std::string("params.") + s.name;
    cfx_param_value& v = set.values_[i];
    v.struct_size = sizeof v;
    v.type = s.type;
    const RawParam* raw = given[i];
    if (!raw) {
      if (s.flags & CFX_PARAM_REQUIRED) fail(job.line, key, "missing (required by " + sid + ")");
      v.number = s.default_number;
      if (s.type == CFX_PARAM_STRING) set.strings_[i] = s.default_string;
      if (s.flags & CFX_PARAM_PER_MODEL) set.lists_[i].assign(n_models, s.default_number);
      continue;
    }
    const int line = raw->line;
    switch (s.type) {
      case CFX_PARAM_FLOAT:
        if (raw->kind != RawParam::Kind::floating && raw->kind != RawParam::Kind::integer)
          fail(line, key, "must be a number");
        if (!std::isfinite(raw->number)) fail(line, key, "must be a finite number, not " + num(raw->number));
        if (!in_range(s, raw->number)) fail(line, key, "must be in " + range_text(s) + ", not " + num(raw->number));
        v.number = raw->number;
        break;
      case CFX_PARAM_INT:
        if (raw->kind != RawParam::Kind::integer) fail(line, key, "must be an integer");
        if (!in_range(s, raw->number)) fail(line, key, "must be in " + range_text(s) + ", not " + std::to_string(raw->integer));
        v.number = raw->number;
        break;
      case CFX_PARAM_BOOL:
        if (raw->kind != RawParam::Kind::boolean) fail(line, key, "must be true or false");
        v.number = raw->number;
        break;
      case CFX_PARAM_STRING: {
        if (raw->kind != RawParam::Kind::string) fail(line, key, "must be a string");
        bool ok = s.choice_count == 0;
        std::string choices;
        for (std::uint32_t c = 0; c < s.choice_count; ++c) {
          ok = ok || raw->string == s.choices[c];
          choices += std::string(c ? ", " : "") + "\"" + s.choices[c] + "\"";
        }
        if (!ok) fail(line, key, "must be one of " + choices + ", not \"" + raw->string + "\"");
        set.strings_[i] = raw->string;
        break;
      }
      case CFX_PARAM_FLOAT_LIST: {
        std::vector<double> list;
        if ((s.flags & CFX_PARAM_PER_MODEL) &&
            (raw->kind == RawParam::Kind::floating || raw->kind == RawParam::Kind::integer)) {
          list.assign(n_models, raw->number);  // one number for every model
        } else if (raw->kind == RawParam::Kind::array && raw->list_numeric) {
          list = raw->list;
        } else {
          fail(line, key, (s.flags & CFX_PARAM_PER_MODEL) ? "must be a number or a list of numbers, one per model"
                                                          : "must be a list of numbers");
        }
        if ((s.flags & CFX_PARAM_PER_MODEL) && list.size() != n_models)
          fail(line, key, "has " + std::to_string(list.size()) + " values but the job lists " +
                              std::to_string(n_models) + " models (give one per model, in the order of 'models')");
        for (double x : list) {
          if (!std::isfinite(x)) fail(line, key, "values must be finite numbers, not " + num(x));
          if (!in_range(s, x)) fail(line, key, "values must be in " + range_text(s) + ", not " + num(x));
        }
        set.lists_[i] = std::move(list);
        break;
      }
      default:
        break;
    }
  }
  for (std::size_t i = 0; i < n; ++i) {
    if (set.values_[i].type == CFX_PARAM_STRING) set.values_[i].string = set.strings_[i].c_str();
    if (set.values_[i].type == CFX_PARAM_FLOAT_LIST) {
      set.values_[i].list = set.lists_[i].data();
      set.values_[i].list_length = set.lists_[i].size();
    }
  }
  return set;
}

boost::json::object ParamSet::to_json(const LoadedPlugin& plugin) const {
  boost::json::object o;
  for (std::size_t i = 0; i < values_.size(); ++i) {
    const cfx_param_value& v = values_[i];
    const char* name = plugin.params[i].name;
    switch (v.type) {
      case CFX_PARAM_FLOAT: o[name] = v.number; break;
      case CFX_PARAM_INT: o[name] = static_cast<std::int64_t>(v.number); break;
      case CFX_PARAM_BOOL: o[name] = v.number != 0; break;
      case CFX_PARAM_STRING: o[name] = v.string; break;
      case CFX_PARAM_FLOAT_LIST: {
        boost::json::array a;
        for (std::uint64_t k = 0; k < v.list_length; ++k) a.push_back(v.list[k]);
        o[name] = std::move(a);
        break;
      }
      default: break;
    }
  }
  return o;
}

}  // namespace conflux
