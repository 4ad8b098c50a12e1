// task_arithmetic: add the models' weighted task vectors to the base (mergekit's
// "task_arithmetic", Ilharco et al. 2023).
//   out = base + lambda * sum_i w_i (theta_i - base) / (normalize ? sum_i w_i : 1)
// Computed per element from the raw values and rounded once: in float32 for a BF16 output of up
// to 4 models (plugin.h, CFX_FLOAT32_OUTPUT_BITS; entries whose terms cancel are computed again
// in double, common/float_guard.h), else in double.
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

// Up to four models' terms in one sweep (operands in registers, base read once), in model
// order: acc[k] = acc_in[k] + w0 (x0[k] - base[k]) + w1 (...) + ..., in T. With `out`, the
// result base + acc is rounded to it instead (the last group); acc_in == nullptr starts from 0.
// Guard (float32, one group): returns how many results fail float_guard's test. In: float32 or
// stored BF16 inputs (common/inputs.h).
template <class T, unsigned G, bool Guard = false, class In>
CONFLUX_MULTIVERSION std::uint32_t add_models(const In* const* x, const T* w, const In* base, std::size_t m,
                                              const T* acc_in, T* acc, float* out) {
  static_assert(G >= 1 && G <= 4);
  // Named locals: the vectorizer does not see through arrays of pointers.
  const In *x0 = x[0], *x1 = x[G > 1 ? 1 : 0], *x2 = x[G > 2 ? 2 : 0], *x3 = x[G > 3 ? 3 : 0];
  const T w0 = w[0], w1 = w[G > 1 ? 1 : 0], w2 = w[G > 2 ? 2 : 0], w3 = w[G > 3 ? 3 : 0];
  std::uint32_t unsafe = 0;
  for (std::size_t k = 0; k < m; ++k) {
    const T b = static_cast<T>(value(base, k));
    T a = acc_in ? acc_in[k] : T(0);
    const T t0 = w0 * (static_cast<T>(value(x0, k)) - b);
    const T t1 = G > 1 ? w1 * (static_cast<T>(value(x1, k)) - b) : T(0);
    const T t2 = G > 2 ? w2 * (static_cast<T>(value(x2, k)) - b) : T(0);
    const T t3 = G > 3 ? w3 * (static_cast<T>(value(x3, k)) - b) : T(0);
    a += t0;
    if constexpr (G > 1) a += t1;
    if constexpr (G > 2) a += t2;
    if constexpr (G > 3) a += t3;
    if (out) {
      const T r = b + a;
      out[k] = static_cast<float>(r);
      if constexpr (Guard)
        unsafe += fg::unsafe(r, std::fabs(b) + std::fabs(t0) + std::fabs(t1) + std::fabs(t2) + std::fabs(t3));
    } else {
      acc[k] = a;
    }
  }
  return unsafe;
}

template <class T, bool Guard = false, class In>
std::uint32_t add_group(unsigned g, const In* const* x, const T* w, const In* base, std::size_t m,
                        const T* acc_in, T* acc, float* out) {
  switch (g) {
    case 1: return add_models<T, 1, Guard>(x, w, base, m, acc_in, acc, out);
    case 2: return add_models<T, 2, Guard>(x, w, base, m, acc_in, acc, out);
    case 3: return add_models<T, 3, Guard>(x, w, base, m, acc_in, acc, out);
    default: return add_models<T, 4, Guard>(x, w, base, m, acc_in, acc, out);
  }
}

}  // namespace

struct TaskArithmetic {
  static constexpr sdk::Info info{"task_arithmetic", "1.1.0",
                                  "Base plus the weighted sum of the models' task vectors", 1, 0,
                                  CFX_BASE_REQUIRED};
  static inline const sdk::Param params[] = {
      sdk::Param::per_model("weights", 1.0, "weight of each model's task vector"),
      sdk::Param::real("lambda", 1.0, "scale of the merged task vector"),
      sdk::Param::boolean("normalize", false, "divide by the sum of the weights"),
  };

  explicit TaskArithmetic(const sdk::Job& job) {
    const auto w = job.list("weights");
    double sum = 0;
    for (double x : w) sum += x;
    if (job.flag("normalize") && sum == 0) throw sdk::Error("weights sum to 0, so they cannot be normalized");
    const double scale = job.number("lambda") * (job.flag("normalize") ? 1.0 / sum : 1.0);
    for (double x : w) {
      weights_.push_back(x * scale);
      weights_f_.push_back(static_cast<float>(x * scale));
    }
  }

  void map(const sdk::Chunk& c, sdk::Span<float> out) {
    with_inputs(c, [&](auto models, auto base) {
      if (c.float32_suffices() && c.model_count() <= 4)
        run_guarded(c.model_count(), models, base, out);
      else
        run_double(c.model_count(), models, base, out);
    });
  }

  // Float32 with float_guard's per-entry fallback to double (one sweep: at most 4 models).
  template <class In>
  void run_guarded(unsigned n, const In* const* models, const In* base, sdk::Span<float> out) const {
    auto sweep = [&](auto zero, std::size_t at, std::size_t count) {
      using T = decltype(zero);
      const In* x[4];
      for (unsigned i = 0; i < n; ++i) x[i] = models[i] + at;
      const T* w = nullptr;
      if constexpr (std::is_same_v<T, float>) w = weights_f_.data(); else w = weights_.data();
      return add_group<T, std::is_same_v<T, float>>(n, x, w, base + at, count, nullptr, nullptr, out.data() + at);
    };
    fg::run(out.size(), [&](std::size_t at, std::size_t count) { return sweep(0.0f, at, count); },
            [&](std::size_t at, std::size_t count) { sweep(0.0, at, count); });
  }

  // Double, any number of models: groups of 4 chained through the accumulator.
  template <class In>
  void run_double(std::uint32_t n, const In* const* models, const In* base_in, sdk::Span<float> out) const {
    // Blocks small enough for the stack and the L1 cache.
    for (std::size_t k0 = 0; k0 < out.size(); k0 += kBlock) {
      const std::size_t m = std::min(kBlock, out.size() - k0);
      const In* base = base_in + k0;
      const In* x[4];
      double acc[kBlock];
      for (std::uint32_t i = 0; i < n; i += 4) {
        const unsigned g = std::min(4u, n - i);
        for (unsigned j = 0; j < g; ++j) x[j] = models[i + j] + k0;
        const bool last = i + g == n;
        add_group<double>(g, x, weights_.data() + i, base, m, i == 0 ? nullptr : acc, acc,
                          last ? out.data() + k0 : nullptr);
      }
    }
  }

  std::vector<double> weights_;
  std::vector<float> weights_f_;
};

CONFLUX_PLUGIN(TaskArithmetic, sdk::map_pass<TaskArithmetic, &TaskArithmetic::map>(CFX_PASS_BF16_INPUTS))
