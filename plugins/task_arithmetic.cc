// task_arithmetic: add the models' weighted task vectors to the base (mergekit's
// "task_arithmetic", Ilharco et al. 2023).
//   out = base + lambda * sum_i w_i (theta_i - base) / (normalize ? sum_i w_i : 1)
// Computed per element from the raw values and rounded once: in float32 for a BF16 output
// (plugin.h, CFX_FLOAT32_OUTPUT_BITS), else in double.
#include <conflux/plugin.hpp>

#include <algorithm>
#include <vector>

namespace sdk = conflux::sdk;

namespace {

constexpr std::size_t kBlock = 512;

// Up to four models' terms in one sweep (operands in registers, base read once), in model
// order: acc[k] = acc_in[k] + w0 (x0[k] - base[k]) + w1 (...) + ..., in T. With `out`, the
// result base + acc is rounded to it instead (the last group); acc_in == nullptr starts from 0.
template <class T, unsigned G>
CONFLUX_MULTIVERSION void add_models(const float* const* x, const T* w, const float* base, std::size_t m,
                                     const T* acc_in, T* acc, float* out) {
  static_assert(G >= 1 && G <= 4);
  // Named locals: the vectorizer does not see through arrays of pointers.
  const float *x0 = x[0], *x1 = x[G > 1 ? 1 : 0], *x2 = x[G > 2 ? 2 : 0], *x3 = x[G > 3 ? 3 : 0];
  const T w0 = w[0], w1 = w[G > 1 ? 1 : 0], w2 = w[G > 2 ? 2 : 0], w3 = w[G > 3 ? 3 : 0];
  for (std::size_t k = 0; k < m; ++k) {
    const T b = static_cast<T>(base[k]);
    T a = acc_in ? acc_in[k] : T(0);
    a += w0 * (static_cast<T>(x0[k]) - b);
    if constexpr (G > 1) a += w1 * (static_cast<T>(x1[k]) - b);
    if constexpr (G > 2) a += w2 * (static_cast<T>(x2[k]) - b);
    if constexpr (G > 3) a += w3 * (static_cast<T>(x3[k]) - b);
    if (out)
      out[k] = static_cast<float>(b + a);
    else
      acc[k] = a;
  }
}

template <class T>
void add_group(unsigned g, const float* const* x, const T* w, const float* base, std::size_t m, const T* acc_in, T* acc,
               float* out) {
  switch (g) {
    case 1: return add_models<T, 1>(x, w, base, m, acc_in, acc, out);
    case 2: return add_models<T, 2>(x, w, base, m, acc_in, acc, out);
    case 3: return add_models<T, 3>(x, w, base, m, acc_in, acc, out);
    default: return add_models<T, 4>(x, w, base, m, acc_in, acc, out);
  }
}

}  // namespace

struct TaskArithmetic {
  static constexpr sdk::Info info{"task_arithmetic", "1.0.0",
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
    if (c.float32_suffices())
      run<float>(c, weights_f_.data(), out);
    else
      run<double>(c, weights_.data(), out);
  }

  template <class T>
  static void run(const sdk::Chunk& c, const T* weights, sdk::Span<float> out) {
    const std::uint32_t n = c.model_count();
    // Blocks small enough for the stack and the L1 cache.
    for (std::size_t k0 = 0; k0 < out.size(); k0 += kBlock) {
      const std::size_t m = std::min(kBlock, out.size() - k0);
      const float* base = c.base().data() + k0;
      const float* x[4];
      T acc[kBlock];
      for (std::uint32_t i = 0; i < n; i += 4) {
        const unsigned g = std::min(4u, n - i);
        for (unsigned j = 0; j < g; ++j) x[j] = c.models()[i + j] + k0;
        const bool last = i + g == n;
        add_group<T>(g, x, weights + i, base, m, i == 0 ? nullptr : acc, acc, last ? out.data() + k0 : nullptr);
      }
    }
  }

  std::vector<double> weights_;
  std::vector<float> weights_f_;
};

CONFLUX_PLUGIN(TaskArithmetic, sdk::map_pass<TaskArithmetic, &TaskArithmetic::map>())
