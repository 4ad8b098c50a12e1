// imm: Iterative Model Merging (EMNLP 2025).
//
// Self-improvement rounds overfit; after each round the new checkpoint is merged back with the
// original model, and the merge seeds the next round:
//   out = theta_orig + weight * DARE_p(theta_new - theta_orig)
// DARE keeps each entry of the task vector with probability 1 - p and, with `rescale`, divides
// the survivors by 1 - p (so the expected update is unchanged). The keep decision for element e
// of a tensor is host->random_uniform(key(seed, tensor, model 0), e) >= p: it depends on the seed
// and the element only, never on threads or chunking. With drop_rate = 0 the merge is
// deterministic and needs no randomness.
#include <conflux/plugin.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>

namespace sdk = conflux::sdk;

namespace {

// The kernels compute in T: float32 for a BF16 output (plugin.h, CFX_FLOAT32_OUTPUT_BITS), else
// double. `p` is the drop threshold in T's lanes: the keep test u >= p gives the same decisions
// in both (see keep_threshold).

// out = base + (u >= p ? scale * d : 0)
template <class T>
CONFLUX_MULTIVERSION void dare_block(const float* d, const float* base, const float* u, std::size_t m, T p, T scale,
                                     float* out) {
  for (std::size_t k = 0; k < m; ++k) {
    const T kept = scale * static_cast<T>(d[k]);
    out[k] = static_cast<float>(static_cast<T>(base[k]) + (static_cast<T>(u[k]) >= p ? kept : T(0)));
  }
}

// Kept entries of a block (an integer reduction, which vectorizes).
CONFLUX_MULTIVERSION std::uint32_t count_kept(const float* u, std::size_t m, float p) {
  std::uint32_t kept = 0;
  for (std::size_t k = 0; k < m; ++k) kept += u[k] >= p ? 1u : 0u;
  return kept;
}

template <class T>
CONFLUX_MULTIVERSION void weighted_add(const float* d, const float* base, std::size_t m, T w, float* out) {
  for (std::size_t k = 0; k < m; ++k) out[k] = static_cast<float>(static_cast<T>(base[k]) + w * static_cast<T>(d[k]));
}

// The smallest float >= p: for a float u, u >= p exactly when u >= keep_threshold(p).
float keep_threshold(double p) {
  float f = static_cast<float>(p);
  if (static_cast<double>(f) < p) f = std::nextafter(f, 2.0f);
  return f;
}

}  // namespace

struct Imm {
  static constexpr sdk::Info info{"imm", "1.0.0",
                                  "Iterative Model Merging: the original plus a weighted DARE of the new round's "
                                  "update",
                                  1, 1, CFX_BASE_REQUIRED};
  static inline const sdk::Param params[] = {
      sdk::Param::real("weight", 0.5, "weight of the new round's (dropped, rescaled) task vector").min(0),
      sdk::Param::real("drop_rate", 0.2, "DARE drop probability p").min(0).below(1),
      sdk::Param::boolean("rescale", true, "divide the kept entries by 1 - p"),
  };

  explicit Imm(const sdk::Job& job)
      : job_(job),
        weight_(job.number("weight")),
        p_(job.number("drop_rate")),
        scale_(job.number("weight") * (job.flag("rescale") ? 1.0 / (1.0 - job.number("drop_rate")) : 1.0)),
        p_f_(keep_threshold(p_)) {}

  void map(const sdk::Chunk& c, sdk::Span<float> out) {
    if (c.float32_suffices())
      run<float>(c, static_cast<float>(weight_), p_f_, static_cast<float>(scale_), out);
    else
      run<double>(c, weight_, p_, scale_, out);
  }

  template <class T>
  void run(const sdk::Chunk& c, T weight, T p, T scale, sdk::Span<float> out) {
    const float* d = c.models()[0];
    const float* base = c.base().data();
    if (p_ == 0) {
      weighted_add<T>(d, base, out.size(), weight, out.data());
      kept_ += out.size();
      total_ += out.size();
      return;
    }
    const std::uint64_t key = job_.random_key(c.tensor(), 0);
    constexpr std::size_t kBlock = 1024;
    float u[kBlock];
    std::uint64_t kept = 0;
    for (std::size_t k0 = 0; k0 < out.size(); k0 += kBlock) {
      const std::size_t m = std::min(kBlock, out.size() - k0);
      job_.host()->random_uniform(key, c.begin() + k0, m, u);
      dare_block<T>(d + k0, base + k0, u, m, p, scale, out.data() + k0);
      kept += count_kept(u, m, p_f_);
    }
    kept_ += kept;
    total_ += out.size();
  }

  void finish() {
    const double kept = total_ ? static_cast<double>(kept_.load()) / static_cast<double>(total_.load()) : 1.0;
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "{\"weight\":%.17g,\"drop_rate\":%.17g,\"scale_of_kept\":%.17g,\"elements\":%llu,\"kept\":%llu,"
                  "\"kept_fraction\":%.9g}",
                  weight_, p_, scale_, static_cast<unsigned long long>(total_.load()),
                  static_cast<unsigned long long>(kept_.load()), kept);
    job_.report(buf);
    std::snprintf(buf, sizeof buf, "kept %.4f%% of the update's entries (expected %.4f%%), each scaled by %.6g", 100 * kept,
                  100 * (1 - p_), scale_);
    job_.log(CFX_LOG_INFO, buf);
  }

  const sdk::Job& job_;
  double weight_, p_, scale_;
  float p_f_;  // keep_threshold(p_)
  std::atomic<std::uint64_t> kept_{0}, total_{0};
};

CONFLUX_PLUGIN(Imm, sdk::map_pass<Imm, &Imm::map>(CFX_PASS_TASK_VECTORS))
