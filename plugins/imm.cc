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

#include "common/float_guard.h"
#include "common/inputs.h"

namespace sdk = conflux::sdk;
namespace fg = conflux::plugins::float_guard;
using conflux::plugins::value;
using conflux::plugins::with_inputs;

namespace {

// The kernels compute in T: float32 for a BF16 output (plugin.h, CFX_FLOAT32_OUTPUT_BITS; entries
// where the update nearly cancels the base are computed again in double, common/float_guard.h),
// else double. `p` is the drop threshold in T's lanes: the keep test u >= p gives the same decisions
// in both (see keep_threshold). The task vector d = x - base is formed in float32 from the raw
// values (the host's task vector, without its separate sweep); In: float32 or stored BF16 inputs
// (common/inputs.h).

// out = base + (u >= p ? scale * d : 0). Guard (float32): returns how many results fail
// float_guard's test (the kept update nearly cancelling the base).
template <class T, bool Guard = false, class In>
CONFLUX_MULTIVERSION std::uint32_t dare_block(const In* x, const In* base, const float* u, std::size_t m, T p,
                                              T scale, float* out) {
  std::uint32_t unsafe = 0;
  for (std::size_t k = 0; k < m; ++k) {
    const float bf = value(base, k), d = value(x, k) - bf;
    const T kept = static_cast<T>(u[k]) >= p ? scale * static_cast<T>(d) : T(0);
    const T b = static_cast<T>(bf), r = b + kept;
    out[k] = static_cast<float>(r);
    if constexpr (Guard) unsafe += fg::unsafe(r, std::fabs(b) + std::fabs(kept));
  }
  return unsafe;
}

// Kept entries of a block (an integer reduction, which vectorizes).
CONFLUX_MULTIVERSION std::uint32_t count_kept(const float* u, std::size_t m, float p) {
  std::uint32_t kept = 0;
  for (std::size_t k = 0; k < m; ++k) kept += u[k] >= p ? 1u : 0u;
  return kept;
}

template <class T, bool Guard = false, class In>
CONFLUX_MULTIVERSION std::uint32_t weighted_add(const In* x, const In* base, std::size_t m, T w, float* out) {
  std::uint32_t unsafe = 0;
  for (std::size_t k = 0; k < m; ++k) {
    const float bf = value(base, k), d = value(x, k) - bf;
    const T b = static_cast<T>(bf), t = w * static_cast<T>(d), r = b + t;
    out[k] = static_cast<float>(r);
    if constexpr (Guard) unsafe += fg::unsafe(r, std::fabs(b) + std::fabs(t));
  }
  return unsafe;
}

// The smallest float >= p: for a float u, u >= p exactly when u >= keep_threshold(p).
float keep_threshold(double p) {
  float f = static_cast<float>(p);
  if (static_cast<double>(f) < p) f = std::nextafter(f, 2.0f);
  return f;
}

}  // namespace

struct Imm {
  static constexpr sdk::Info info{"imm", "1.1.0",
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
    with_inputs(c, [&](auto models, auto base) { map_inputs(c, models[0], base, out); });
  }

  template <class In>
  void map_inputs(const sdk::Chunk& c, const In* d, const In* base, sdk::Span<float> out) {
    const bool f32 = c.float32_suffices();
    const float w_f = static_cast<float>(weight_), scale_f = static_cast<float>(scale_);
    // Float32 for a BF16 output, with float_guard's per-entry fallback to double.
    auto guarded = [&](auto&& f32_run, auto&& f64_run, std::size_t m) {
      if (f32)
        fg::run(m, f32_run, f64_run);
      else
        f64_run(std::size_t{0}, m);
    };
    if (p_ == 0) {
      guarded([&](std::size_t at, std::size_t n) { return weighted_add<float, true>(d + at, base + at, n, w_f, out.data() + at); },
              [&](std::size_t at, std::size_t n) { weighted_add<double>(d + at, base + at, n, weight_, out.data() + at); },
              out.size());
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
      const In* dk = d + k0;
      const In* bk = base + k0;
      float* ok = out.data() + k0;
      guarded([&](std::size_t at, std::size_t n) { return dare_block<float, true>(dk + at, bk + at, u + at, n, p_f_, scale_f, ok + at); },
              [&](std::size_t at, std::size_t n) { dare_block<double>(dk + at, bk + at, u + at, n, p_, scale_, ok + at); },
              m);
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

CONFLUX_PLUGIN(Imm, sdk::map_pass<Imm, &Imm::map>(CFX_PASS_BF16_INPUTS))
