// linear: a weighted average of the models (mergekit's "linear"). No base.
//   out = sum_i w_i theta_i / (normalize ? sum_i w_i : 1)
// Computed per element and rounded once: in float32 for a BF16 output of up to 4 models (plugin.h,
// CFX_FLOAT32_OUTPUT_BITS; entries whose terms cancel are computed again in double,
// common/float_guard.h), else in double.
#include <conflux/plugin.hpp>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "common/float_guard.h"
#include "common/inputs.h"

namespace sdk = conflux::sdk;
namespace fg = conflux::plugins::float_guard;
using conflux::plugins::value;
using conflux::plugins::with_inputs;

namespace {

constexpr std::size_t kBlock = 512;

// acc[k] += w * x[k], in T (the path for more than 4 models). In: float32 or stored BF16 inputs
// (common/inputs.h).
template <class T, class In>
CONFLUX_MULTIVERSION void add_weighted(const In* x, std::size_t m, T w, T* acc) {
  for (std::size_t k = 0; k < m; ++k) acc[k] += w * static_cast<T>(value(x, k));
}

template <class T>
CONFLUX_MULTIVERSION void round_block(const T* acc, std::size_t m, float* out) {
  for (std::size_t k = 0; k < m; ++k) out[k] = static_cast<float>(acc[k]);
}

// Up to 4 models in one sweep, the same sums in the same order as add_weighted. Guard (float32):
// returns how many results fail float_guard's test.
template <class T, unsigned G, bool Guard, class In>
CONFLUX_MULTIVERSION std::uint32_t fused(const In* const* x, const T* w, std::size_t m, float* out) {
  static_assert(G >= 1 && G <= 4);
  const In *x0 = x[0], *x1 = x[G > 1 ? 1 : 0], *x2 = x[G > 2 ? 2 : 0], *x3 = x[G > 3 ? 3 : 0];
  const T w0 = w[0], w1 = w[G > 1 ? 1 : 0], w2 = w[G > 2 ? 2 : 0], w3 = w[G > 3 ? 3 : 0];
  std::uint32_t unsafe = 0;
  for (std::size_t k = 0; k < m; ++k) {
    const T t0 = w0 * static_cast<T>(value(x0, k));
    const T t1 = G > 1 ? w1 * static_cast<T>(value(x1, k)) : T(0);
    const T t2 = G > 2 ? w2 * static_cast<T>(value(x2, k)) : T(0);
    const T t3 = G > 3 ? w3 * static_cast<T>(value(x3, k)) : T(0);
    T a = T(0) + t0;
    if constexpr (G > 1) a += t1;
    if constexpr (G > 2) a += t2;
    if constexpr (G > 3) a += t3;
    out[k] = static_cast<float>(a);
    if constexpr (Guard) unsafe += fg::unsafe(a, std::fabs(t0) + std::fabs(t1) + std::fabs(t2) + std::fabs(t3));
  }
  return unsafe;
}

template <class T, bool Guard, class In>
std::uint32_t fused_n(unsigned n, const In* const* x, const T* w, std::size_t m, float* out) {
  switch (n) {
    case 1: return fused<T, 1, Guard>(x, w, m, out);
    case 2: return fused<T, 2, Guard>(x, w, m, out);
    case 3: return fused<T, 3, Guard>(x, w, m, out);
    default: return fused<T, 4, Guard>(x, w, m, out);
  }
}

}  // namespace

struct Linear {
  static constexpr sdk::Info info{"linear", "1.1.0", "Weighted average of the models' weights",
                                  1, 0, CFX_BASE_UNUSED};
  static inline const sdk::Param params[] = {
      sdk::Param::per_model("weights", 1.0, "weight of each model (one number applies to all)"),
      sdk::Param::boolean("normalize", true, "divide by the sum of the weights"),
  };

  explicit Linear(const sdk::Job& job) {
    const auto w = job.list("weights");
    double sum = 0;
    for (double x : w) sum += x;
    if (job.flag("normalize") && sum == 0) throw sdk::Error("weights sum to 0, so they cannot be normalized");
    const double scale = job.flag("normalize") ? 1.0 / sum : 1.0;
    for (double x : w) {
      weights_.push_back(x * scale);
      weights_f_.push_back(static_cast<float>(x * scale));
    }
  }

  void map(const sdk::Chunk& c, sdk::Span<float> out) {
    with_inputs(c, [&](auto models, auto) { map_inputs(c, models, out); });
  }

  template <class In>
  void map_inputs(const sdk::Chunk& c, const In* const* models, sdk::Span<float> out) const {
    if (c.model_count() > 4) return run(c.model_count(), models, out);
    auto sweep = [&](auto zero, std::size_t at, std::size_t count) {
      using T = decltype(zero);
      const In* x[4];
      for (unsigned i = 0; i < c.model_count(); ++i) x[i] = models[i] + at;
      const T* w = nullptr;
      if constexpr (std::is_same_v<T, float>) w = weights_f_.data(); else w = weights_.data();
      return fused_n<T, std::is_same_v<T, float>>(c.model_count(), x, w, count, out.data() + at);
    };
    if (c.float32_suffices())
      fg::run(out.size(), [&](std::size_t at, std::size_t n) { return sweep(0.0f, at, n); },
              [&](std::size_t at, std::size_t n) { sweep(0.0, at, n); });
    else
      sweep(0.0, 0, out.size());
  }

  // More than 4 models: blockwise, in double.
  template <class In>
  void run(std::uint32_t n, const In* const* models, sdk::Span<float> out) const {
    for (std::size_t k0 = 0; k0 < out.size(); k0 += kBlock) {
      const std::size_t m = std::min(kBlock, out.size() - k0);
      double acc[kBlock] = {};
      for (std::uint32_t i = 0; i < n; ++i) add_weighted<double>(models[i] + k0, m, weights_[i], acc);
      round_block<double>(acc, m, out.data() + k0);
    }
  }

  std::vector<double> weights_;
  std::vector<float> weights_f_;
};

CONFLUX_PLUGIN(Linear, sdk::map_pass<Linear, &Linear::map>(CFX_PASS_BF16_INPUTS))
