// linear: a weighted average of the models (mergekit's "linear"). No base.
//   out = sum_i w_i theta_i / (normalize ? sum_i w_i : 1)
// Computed per element and rounded once: in float32 for a BF16 output (plugin.h,
// CFX_FLOAT32_OUTPUT_BITS), else in double.
#include <conflux/plugin.hpp>

#include <algorithm>
#include <vector>

namespace sdk = conflux::sdk;

namespace {

constexpr std::size_t kBlock = 512;

// acc[k] += w * x[k], in T
template <class T>
CONFLUX_MULTIVERSION void add_weighted(const float* x, std::size_t m, T w, T* acc) {
  for (std::size_t k = 0; k < m; ++k) acc[k] += w * static_cast<T>(x[k]);
}

template <class T>
CONFLUX_MULTIVERSION void round_block(const T* acc, std::size_t m, float* out) {
  for (std::size_t k = 0; k < m; ++k) out[k] = static_cast<float>(acc[k]);
}

}  // namespace

struct Linear {
  static constexpr sdk::Info info{"linear", "1.0.0", "Weighted average of the models' weights",
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
    if (c.float32_suffices())
      run<float>(c, weights_f_.data(), out);
    else
      run<double>(c, weights_.data(), out);
  }

  template <class T>
  static void run(const sdk::Chunk& c, const T* weights, sdk::Span<float> out) {
    // Blocks small enough for the stack and the L1 cache.
    for (std::size_t k0 = 0; k0 < out.size(); k0 += kBlock) {
      const std::size_t m = std::min(kBlock, out.size() - k0);
      T acc[kBlock] = {};
      for (std::uint32_t i = 0; i < c.model_count(); ++i) add_weighted<T>(c.models()[i] + k0, m, weights[i], acc);
      round_block<T>(acc, m, out.data() + k0);
    }
  }

  std::vector<double> weights_;
  std::vector<float> weights_f_;
};

CONFLUX_PLUGIN(Linear, sdk::map_pass<Linear, &Linear::map>())
