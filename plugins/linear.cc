// linear: a weighted average of the models (mergekit's "linear"). No base.
//   out = sum_i w_i theta_i / (normalize ? sum_i w_i : 1)
// Computed per element in double and rounded once.
#include <conflux/plugin.hpp>

#include <algorithm>
#include <vector>

namespace sdk = conflux::sdk;

namespace {

constexpr std::size_t kBlock = 512;

// acc[k] += w * x[k]
CONFLUX_MULTIVERSION void add_weighted(const float* x, std::size_t m, double w, double* acc) {
  for (std::size_t k = 0; k < m; ++k) acc[k] += w * static_cast<double>(x[k]);
}

CONFLUX_MULTIVERSION void round_block(const double* acc, std::size_t m, float* out) {
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
    for (double x : w) weights_.push_back(x * scale);
  }

  void map(const sdk::Chunk& c, sdk::Span<float> out) {
    // Blocks small enough for the stack and the L1 cache.
    for (std::size_t k0 = 0; k0 < out.size(); k0 += kBlock) {
      const std::size_t m = std::min(kBlock, out.size() - k0);
      double acc[kBlock] = {};
      for (std::uint32_t i = 0; i < c.model_count(); ++i) add_weighted(c.models()[i] + k0, m, weights_[i], acc);
      round_block(acc, m, out.data() + k0);
    }
  }

  std::vector<double> weights_;
};

CONFLUX_PLUGIN(Linear, sdk::map_pass<Linear, &Linear::map>())
