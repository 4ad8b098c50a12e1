// task_arithmetic: add the models' weighted task vectors to the base (mergekit's
// "task_arithmetic", Ilharco et al. 2023).
//   out = base + lambda * sum_i w_i (theta_i - base) / (normalize ? sum_i w_i : 1)
// Computed per element in double from the raw values, rounded once.
#include <conflux/plugin.hpp>

#include <algorithm>
#include <vector>

namespace sdk = conflux::sdk;

namespace {

constexpr std::size_t kBlock = 512;

// acc[k] += w * (x[k] - base[k])
CONFLUX_MULTIVERSION void add_task_vector(const float* x, const float* base, std::size_t m, double w, double* acc) {
  for (std::size_t k = 0; k < m; ++k) acc[k] += w * (static_cast<double>(x[k]) - base[k]);
}

// out[k] = base[k] + acc[k], rounded once
CONFLUX_MULTIVERSION void finish_block(const float* base, const double* acc, std::size_t m, float* out) {
  for (std::size_t k = 0; k < m; ++k) out[k] = static_cast<float>(base[k] + acc[k]);
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
    for (double x : w) weights_.push_back(x * scale);
  }

  void map(const sdk::Chunk& c, sdk::Span<float> out) {
    // Blocks small enough for the stack and the L1 cache.
    for (std::size_t k0 = 0; k0 < out.size(); k0 += kBlock) {
      const std::size_t m = std::min(kBlock, out.size() - k0);
      const float* base = c.base().data() + k0;
      double acc[kBlock] = {};
      for (std::uint32_t i = 0; i < c.model_count(); ++i) add_task_vector(c.models()[i] + k0, base, m, weights_[i], acc);
      finish_block(base, acc, m, out.data() + k0);
    }
  }

  std::vector<double> weights_;
};

CONFLUX_PLUGIN(TaskArithmetic, sdk::map_pass<TaskArithmetic, &TaskArithmetic::map>())
