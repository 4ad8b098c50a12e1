// Header-only C++ layer over the C ABI in conflux/plugin.h (the top of the hourglass).
//
// A strategy is a class with a constructor taking `const conflux::sdk::Job&` and member
// functions for its passes; CONFLUX_PLUGIN exports it. Exceptions thrown by the strategy are
// caught at the ABI boundary and reported through host->fail. Example (a complete plugin):
//
//   #include <conflux/plugin.hpp>
//   namespace sdk = conflux::sdk;
//   struct Scale {
//     static constexpr sdk::Info info{"scale", "1.0.0", "Multiplies one model by a factor",
//                                     /*min_models=*/1, /*max_models=*/1, CFX_BASE_UNUSED};
//     static inline const sdk::Param params[] = {sdk::Param::real("factor", 1.0, "multiplier")};
//     explicit Scale(const sdk::Job& job) : factor_(static_cast<float>(job.number("factor"))) {}
//     void map(const sdk::Chunk& c, Span<float> out) {
//       for (std::size_t k = 0; k < out.size(); ++k) out[k] = factor_ * c.model(0)[k];
//     }
//     float factor_;
//   };
//   CONFLUX_PLUGIN(Scale, sdk::map_pass<Scale, &Scale::map>())
//
// Reduce passes: `sdk::reduce_pass<S, T, Pass, &S::reduce, &S::combine, &S::done>(kind, flags)`, where
// Pass is the pass's position in the list (handed to S::stats_count),
// T is a trivially copyable element type and the partial is an array of S::stats_count(pass)
// elements of T (a static or member function; defaults to 1 when absent), all zero when the
// pass starts on it, except its first S::stats_unzeroed(pass) elements where S has that
// function (cfx_pass.instance_stats_unzeroed: a multiple of 16 bytes):
//   void reduce(const sdk::Chunk&, Span<T> partial);
//   void combine(const cfx_tensor* tensor, Span<T> into, Span<const T> from);
//   bool done(const cfx_tensor* tensor, Span<const T> stats);   // true: repeat the pass
// or, for a pass that may finish tensors by itself (CFX_PASS_SPECULATIVE_OUTPUT),
//   sdk::Next done(const cfx_tensor* tensor, Span<const T> stats);
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <new>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "conflux/plugin.h"

// CONFLUX_MULTIVERSION before a function compiles it for AVX-512 (x86-64-v4, whose byte and
// 16-bit lanes let loops over stored BF16 use 512-bit vectors; and AVX-512F alone), AVX2 and
// baseline x86-64 and picks the best at load time (function multiversioning), so plain loops get
// the widest vectors the CPU has. Element-wise IEEE arithmetic gives the same bits on each
// version (plugins are built with -ffp-contract=off): results do not depend on the CPU.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__ELF__) && __GNUC__ >= 11
#define CONFLUX_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "avx512f", "avx2", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__ELF__)  // no x86-64-v4 before GCC 11
#define CONFLUX_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CONFLUX_MULTIVERSION
#endif

namespace conflux::sdk {

// A view of `size()` contiguous elements (std::span is C++20; this header is C++17).
template <class T>
class Span {
 public:
  constexpr Span() = default;
  constexpr Span(T* data, std::size_t size) : data_(data), size_(size) {}
  template <class U, class = std::enable_if_t<std::is_convertible_v<U (*)[], T (*)[]>>>
  constexpr Span(Span<U> other) : data_(other.data()), size_(other.size()) {}
  constexpr T* data() const { return data_; }
  constexpr std::size_t size() const { return size_; }
  constexpr bool empty() const { return size_ == 0; }
  constexpr T& operator[](std::size_t i) const { return data_[i]; }
  constexpr T* begin() const { return data_; }
  constexpr T* end() const { return data_ + size_; }

 private:
  T* data_ = nullptr;
  std::size_t size_ = 0;
};

// `s` as a JSON string literal (quotes, backslashes and control characters escaped): for the
// JSON object a strategy reports through Job::report.
inline std::string json_quote(std::string_view s) {
  std::string out = "\"";
  for (const char c : s) {
    const auto ch = static_cast<unsigned char>(c);
    if (ch == '"' || ch == '\\') {
      out += '\\';
      out += c;
    } else if (ch < 0x20) {
      static constexpr char kHex[] = "0123456789abcdef";
      out += "\\u00";
      out += kHex[ch >> 4];
      out += kHex[ch & 15];
    } else {
      out += c;
    }
  }
  return out + "\"";
}

// Thrown by strategy code for a user-facing failure; the message reaches the user as is.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Info {
  const char* id;
  const char* version;
  const char* description;
  std::uint32_t min_models;
  std::uint32_t max_models;  // 0: no limit
  cfx_base_use base;
};

// Parameter declarations. Ranges: closed unless made exclusive with .above()/.below().
struct Param {
  cfx_param_spec spec{};

  static constexpr Param make(cfx_param_type type, const char* name, const char* doc) {
    Param p;
    p.spec.struct_size = sizeof(cfx_param_spec);
    p.spec.type = type;
    p.spec.name = name;
    p.spec.doc = doc;
    return p;
  }
  static constexpr Param real(const char* name, double def, const char* doc) {
    Param p = make(CFX_PARAM_FLOAT, name, doc);
    p.spec.default_number = def;
    return p;
  }
  static constexpr Param integer(const char* name, std::int64_t def, const char* doc) {
    Param p = make(CFX_PARAM_INT, name, doc);
    p.spec.default_number = static_cast<double>(def);
    return p;
  }
  static constexpr Param boolean(const char* name, bool def, const char* doc) {
    Param p = make(CFX_PARAM_BOOL, name, doc);
    p.spec.default_number = def ? 1.0 : 0.0;
    return p;
  }
  static constexpr Param string(const char* name, const char* def, const char* doc) {
    Param p = make(CFX_PARAM_STRING, name, doc);
    p.spec.default_string = def;
    return p;
  }
  // One value per model; a job may give one number for all. Default: `def` for every model.
  static constexpr Param per_model(const char* name, double def, const char* doc) {
    Param p = make(CFX_PARAM_FLOAT_LIST, name, doc);
    p.spec.flags |= CFX_PARAM_PER_MODEL;
    p.spec.default_number = def;
    return p;
  }
  constexpr Param min(double v) const { Param p = *this; p.spec.flags |= CFX_PARAM_HAS_MIN; p.spec.min = v; return p; }
  constexpr Param max(double v) const { Param p = *this; p.spec.flags |= CFX_PARAM_HAS_MAX; p.spec.max = v; return p; }
  constexpr Param above(double v) const { Param p = min(v); p.spec.flags |= CFX_PARAM_MIN_EXCLUSIVE; return p; }
  constexpr Param below(double v) const { Param p = max(v); p.spec.flags |= CFX_PARAM_MAX_EXCLUSIVE; return p; }
  constexpr Param required() const { Param p = *this; p.spec.flags |= CFX_PARAM_REQUIRED; return p; }
  template <std::size_t N>
  constexpr Param one_of(const char* const (&values)[N]) const {
    Param p = *this;
    p.spec.choices = values;
    p.spec.choice_count = static_cast<std::uint32_t>(N);
    return p;
  }
};

// The job as a strategy sees it: validated parameters, counts, the host's services.
class Job {
 public:
  explicit Job(const cfx_job* job, const cfx_plugin* plugin) : job_(job), plugin_(plugin) {}

  std::uint32_t model_count() const { return job_->model_count; }
  bool has_base() const { return job_->has_base != 0; }
  std::uint64_t seed() const { return job_->seed; }
  Span<const cfx_tensor> tensors() const { return {job_->tensors, static_cast<std::size_t>(job_->tensor_count)}; }
  const char* model_name(std::uint32_t i) const { return job_->model_names[i]; }
  const cfx_host* host() const { return job_->host; }
  cfx_context* context() const { return job_->ctx; }

  double number(std::string_view name) const { return value(name).number; }
  bool flag(std::string_view name) const { return value(name).number != 0; }
  std::string_view string(std::string_view name) const { return value(name).string; }
  Span<const double> list(std::string_view name) const {
    const cfx_param_value& v = value(name);
    return {v.list, static_cast<std::size_t>(v.list_length)};
  }

  void log(cfx_log_level level, const std::string& message) const {
    job_->host->log(job_->ctx, level, message.c_str());
  }
  // Attaches the strategy's statistics (a JSON object) to the manifest.
  void report(const std::string& json_object) const { job_->host->set_report(job_->ctx, json_object.c_str()); }

  // The counter-based random stream of (tensor, model) for this job's seed.
  std::uint64_t random_key(const cfx_tensor& tensor, std::uint32_t model) const {
    return job_->host->random_key(job_->seed, tensor.name, model);
  }

 private:
  const cfx_param_value& value(std::string_view name) const {
    for (std::uint32_t i = 0; i < plugin_->param_count; ++i)
      if (name == plugin_->params[i].name) return job_->params[i];
    throw Error("internal: the plugin reads parameter '" + std::string(name) + "', which it does not declare");
  }

  const cfx_job* job_;
  const cfx_plugin* plugin_;
};

// A chunk of one tensor: `count()` consecutive elements starting at flat index `begin()`.
// True when float32 arithmetic is precise enough for tensor t's output (plugin.h,
// CFX_FLOAT32_OUTPUT_BITS: a BF16 output). False on a 1.0 host, which does not say.
inline bool float32_suffices(const cfx_tensor& t) {
  return t.struct_size >= offsetof(cfx_tensor, out_precision) + sizeof t.out_precision && t.out_precision != 0 &&
         t.out_precision <= CFX_FLOAT32_OUTPUT_BITS;
}

// The float32 value of a BF16 bit pattern (exact). Loops over stored BF16 values written with it
// vectorize (a widening load and a shift).
inline float bf16_to_float(std::uint16_t bits) {
  const std::uint32_t w = static_cast<std::uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}

class Chunk {
 public:
  explicit Chunk(const cfx_chunk* c) : c_(c) {}
  const cfx_tensor& tensor() const { return *c_->tensor; }
  std::uint64_t begin() const { return c_->begin; }
  std::size_t count() const { return static_cast<std::size_t>(c_->count); }
  std::uint32_t model_count() const { return c_->model_count; }
  // Stored BF16 values (passes with CFX_PASS_BF16_INPUTS, BF16 tensors): then models() and
  // base() are empty and bf16_models()/bf16_base() hold the values; otherwise the reverse.
  bool is_bf16() const { return bf16_models() != nullptr; }
  const std::uint16_t* const* bf16_models() const {
    return c_->struct_size >= offsetof(cfx_chunk, bf16_base) + sizeof c_->bf16_base ? c_->bf16_models : nullptr;
  }
  const std::uint16_t* bf16_base() const { return is_bf16() ? c_->bf16_base : nullptr; }
  Span<const float> model(std::uint32_t i) const { return {c_->models[i], count()}; }
  const float* const* models() const { return c_->models; }
  bool has_base() const { return c_->base != nullptr || bf16_base() != nullptr; }
  Span<const float> base() const { return {c_->base, c_->base ? count() : 0}; }
  const cfx_chunk* raw() const { return c_; }
  // See sdk::float32_suffices.
  bool float32_suffices() const { return sdk::float32_suffices(*c_->tensor); }
  // CFX_PASS_SPECULATIVE_OUTPUT, the pass's first execution on the tensor: room for the chunk's
  // output (empty otherwise). After filling all of it, call output_written().
  Span<float> speculative_output() const {
    const bool has = c_->struct_size >= offsetof(cfx_chunk, out_written) + sizeof c_->out_written && c_->out &&
                     c_->out_written;
    return {has ? c_->out : nullptr, has ? count() : 0};
  }
  void output_written() const {
    if (!speculative_output().empty()) *c_->out_written = 1;
  }

 private:
  const cfx_chunk* c_;
};

namespace detail {

// Per-plugin globals: the host table and the descriptor, set up by the entry point.
template <class S>
struct Globals {
  static inline const cfx_host* host = nullptr;
  static inline cfx_plugin descriptor{};
};

template <class S>
struct Instance {
  Job job;
  S strategy;
  Instance(const cfx_job* j, const cfx_plugin* p) : job(j, p), strategy(job) {}
};

template <class S, class F>
int guarded(const cfx_host* host, cfx_context* ctx, F&& f) noexcept {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    if (host) host->fail(ctx, e.what());
  } catch (...) {
    if (host) host->fail(ctx, "unknown exception in strategy plugin");
  }
  return 1;
}

template <class S>
Instance<S>* self(void* p) {
  return static_cast<Instance<S>*>(p);
}

template <class S>
int create(const cfx_job* job, void** out) {
  *out = nullptr;
  return guarded<S>(job->host, job->ctx, [&] { *out = new Instance<S>(job, &Globals<S>::descriptor); });
}

template <class S, class = void>
struct has_finish : std::false_type {};
template <class S>
struct has_finish<S, std::void_t<decltype(std::declval<S&>().finish())>> : std::true_type {};

template <class S, class = void>
struct has_stats_count : std::false_type {};
template <class S>
struct has_stats_count<S, std::void_t<decltype(std::declval<S&>().stats_count(std::uint32_t{0}))>> : std::true_type {};

template <class S, class = void>
struct has_stats_unzeroed : std::false_type {};
template <class S>
struct has_stats_unzeroed<S, std::void_t<decltype(std::declval<S&>().stats_unzeroed(std::uint32_t{0}))>>
    : std::true_type {};

template <class S, class = void>
struct has_params : std::false_type {};
template <class S>
struct has_params<S, std::void_t<decltype(S::params)>> : std::true_type {};

template <class S>
int finish(void* p) {
  auto* inst = self<S>(p);
  return guarded<S>(inst->job.host(), inst->job.context(), [&] {
    if constexpr (has_finish<S>::value) inst->strategy.finish();
  });
}

template <class S>
void destroy(void* p) {
  delete self<S>(p);
}

template <class S, class T>
std::size_t stats_count(S& s, std::uint32_t pass) {
  if constexpr (has_stats_count<S>::value) return s.stats_count(pass);
  else return 1;
}

}  // namespace detail

template <class S, void (S::*Map)(const Chunk&, Span<float>)>
constexpr cfx_pass map_pass(std::uint32_t flags = 0) {
  cfx_pass p{};
  p.struct_size = sizeof(cfx_pass);
  p.kind = CFX_PASS_MAP;
  p.flags = flags;
  p.map = [](void* inst, const cfx_chunk* c, float* out) -> int {
    auto* i = detail::self<S>(inst);
    return detail::guarded<S>(i->job.host(), i->job.context(),
                              [&] { (i->strategy.*Map)(Chunk(c), {out, static_cast<std::size_t>(c->count)}); });
  };
  return p;
}

// What a tensor-scope reduce asks for after a tensor's statistics (see cfx_pass.reduce_done).
enum class Next : std::int32_t {
  proceed = 0,                              // the next pass
  again = 1,                                // this pass once more
  output_final = CFX_REDUCE_OUTPUT_FINAL    // the speculative output is the tensor's output
};

// `Pass` is this pass's position in the plugin's pass list (passed to S::stats_count). Done is
// `bool (S::*)(const cfx_tensor*, Span<const T>)` (true: again) or returns sdk::Next.
template <class S, class T, std::uint32_t Pass, void (S::*Reduce)(const Chunk&, Span<T>),
          void (S::*Combine)(const cfx_tensor*, Span<T>, Span<const T>), auto Done>
constexpr cfx_pass reduce_pass(cfx_pass_kind kind, std::uint32_t flags = 0) {
  static_assert(std::is_trivially_copyable_v<T> && alignof(T) <= 16);
  cfx_pass p{};
  p.struct_size = sizeof(cfx_pass);
  p.kind = kind;
  p.flags = flags;
  p.stats_size = sizeof(T);
  p.instance_stats_size = [](void* inst) -> std::uint64_t {
    return sizeof(T) * detail::stats_count<S, T>(detail::self<S>(inst)->strategy, Pass);
  };
  if constexpr (detail::has_stats_unzeroed<S>::value)
    p.instance_stats_unzeroed = [](void* inst) -> std::uint64_t {
      return sizeof(T) * detail::self<S>(inst)->strategy.stats_unzeroed(Pass);
    };
  p.reduce = [](void* inst, const cfx_chunk* c, void* partial) -> int {
    auto* i = detail::self<S>(inst);
    const std::size_t n = detail::stats_count<S, T>(i->strategy, Pass);
    return detail::guarded<S>(i->job.host(), i->job.context(), [&] {
      (i->strategy.*Reduce)(Chunk(c), {std::launder(static_cast<T*>(partial)), n});
    });
  };
  p.combine = [](void* inst, const cfx_tensor* t, void* into, const void* from) -> int {
    auto* i = detail::self<S>(inst);
    const std::size_t n = detail::stats_count<S, T>(i->strategy, Pass);
    return detail::guarded<S>(i->job.host(), i->job.context(), [&] {
      (i->strategy.*Combine)(t, {std::launder(static_cast<T*>(into)), n},
                             {std::launder(static_cast<const T*>(from)), n});
    });
  };
  p.reduce_done = [](void* inst, const cfx_tensor* t, const void* stats, std::int32_t* repeat) -> int {
    auto* i = detail::self<S>(inst);
    const std::size_t n = detail::stats_count<S, T>(i->strategy, Pass);
    return detail::guarded<S>(i->job.host(), i->job.context(), [&] {
      const auto next = (i->strategy.*Done)(t, {std::launder(static_cast<const T*>(stats)), n});
      if constexpr (std::is_same_v<decltype(next), const Next>) *repeat = static_cast<std::int32_t>(next);
      else *repeat = next ? 1 : 0;
    });
  };
  return p;
}

// Makes a reduce pass optional: it runs only for jobs where (strategy.*Enabled)() is true.
template <class S, bool (S::*Enabled)() const>
constexpr cfx_pass only_if(cfx_pass p) {
  p.enabled = [](void* inst) -> std::int32_t {
    return (detail::self<S>(inst)->strategy.*Enabled)() ? 1 : 0;
  };
  return p;
}

}  // namespace conflux::sdk

namespace conflux::sdk::detail {

template <class S>
constexpr std::size_t param_count() {
  if constexpr (has_params<S>::value) return sizeof(S::params) / sizeof(S::params[0]);
  else return 0;
}

// Fills the descriptor once; the host calls the entry point once per process.
template <class S, std::size_t NPasses>
const cfx_plugin* entry(const cfx_host* host, const cfx_pass (&passes)[NPasses]) {
  if (host == nullptr || host->abi_major != CFX_ABI_MAJOR) return nullptr;
  static cfx_param_spec specs[param_count<S>() + 1];  // +1: never a zero-length array
  if constexpr (param_count<S>() > 0)
    for (std::size_t i = 0; i < param_count<S>(); ++i) specs[i] = S::params[i].spec;
  Globals<S>::host = host;
  cfx_plugin& d = Globals<S>::descriptor;
  d.struct_size = sizeof(cfx_plugin);
  d.abi_major = CFX_ABI_MAJOR;
  d.abi_minor = CFX_ABI_MINOR;
  d.id = S::info.id;
  d.version = S::info.version;
  d.description = S::info.description;
  d.param_count = static_cast<std::uint32_t>(param_count<S>());
  d.params = specs;
  d.pass_count = static_cast<std::uint32_t>(NPasses);
  d.passes = passes;
  d.min_models = S::info.min_models;
  d.max_models = S::info.max_models;
  d.base = static_cast<std::uint32_t>(S::info.base);
  d.create = create<S>;
  d.finish = finish<S>;
  d.destroy = destroy<S>;
  return &d;
}

}  // namespace conflux::sdk::detail

// Exports strategy class S with the given passes (in order; the last one a map pass). Use once
// per shared object.
#define CONFLUX_PLUGIN(S, ...)                                                          \
  extern "C" CFX_EXPORT const cfx_plugin* conflux_plugin_entry(const cfx_host* host) { \
    static const cfx_pass passes[] = {__VA_ARGS__};                                    \
    return ::conflux::sdk::detail::entry<S>(host, passes);                             \
  }
