// Random-drop merges: DARE (Yu et al. 2023, arXiv 2311.03099) and DELLA (Deep et al. 2024,
// arXiv 2406.11617), each followed by task arithmetic (dare_linear, della_linear) or by the TIES
// sign election (dare_ties, della). One implementation, four plugins (plugins/dare_linear.cc,
// dare_ties.cc, della.cc, della_linear.cc), mergekit's parameter names and defaults.
//
// DEFINITION (per tensor; i runs over the models, d_i = theta_i - theta_base as float32, all
// arithmetic per entry in double, rounded once to the output):
//   u_i[e] = host->random_uniform(random_key(seed, tensor name, i), e) for flat index e
//   keep   = u_i[e] >= 1 - q_i[e]                 (imm's rule u >= p, p = 1 - q the drop rate)
//   W_i[e] = keep ? (w_i / q_i[e]) * d_i[e] : 0   (rescale = true)
//          = keep ? w_i * d_i[e] : 0               (rescale = false)
//   DARE:  q_i[e] = density for every entry.
//   DELLA: within each row (the last dimension; a 1-D tensor is one row, a scalar a row of one)
//          rank the entries by |d_i| ascending, equal magnitudes by lower index first (the
//          lower index gets the lower rank), r = 0 .. L-1, and
//            q_i[e] = min(1, (density - epsilon) + r * (2 * epsilon / (L - 1)))
//          so the smallest gets density - epsilon and the largest density + epsilon; a row of
//          one entry gets q = density. The mean keep probability of a row is density.
//   linear (dare_linear, della_linear):
//          out = base + lambda * sum_i W_i / (normalize ? sum_i w_i : 1)
//   ties (dare_ties, della): the sign election of common/sign_election.h over W_i:
//          out = base + lambda * merged
// density = 1 keeps everything: DARE with density 1 is task arithmetic, dare_ties the TIES
// election without trimming; DELLA with density 1 prunes nothing whatever epsilon is (as
// mergekit's della_magprune). Otherwise DELLA's keep probabilities must lie in (0, 1]:
// density - epsilon > 0 and density + epsilon <= 1 (up to 1e-12, so 0.85 + 0.15 passes; q is
// capped at 1), else the job is refused (mergekit refuses it too; clamping would silently change
// the method).
// The keep decisions depend only on (seed, tensor name, model index, element index) and, for
// DELLA, on the row's magnitudes: the output is bit-identical at any thread count and chunking.
// With epsilon = 0 DELLA's arithmetic is DARE's exactly (same q, same rescale), so della /
// della_linear with epsilon 0 give the bits of dare_ties / dare_linear.
#pragma once

#include <conflux/plugin.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "sign_election.h"

namespace conflux::plugins::drop_merge {

namespace sdk = conflux::sdk;
namespace se = conflux::plugins::sign_election;

enum class Drop { dare, della };

// Entries per block: the kernels run one loop per model per block, each in one lane width
// (double lanes for values, see plugins/ram.cc), so they vectorize under CONFLUX_MULTIVERSION.
inline constexpr std::size_t kBlock = 256;
static_assert(kBlock <= se::kBlock);

// ----------------------------------------------------------------------------------------------
// Kernels
// ----------------------------------------------------------------------------------------------

// W[k] = w * d[k] (nothing dropped).
CONFLUX_MULTIVERSION static inline void scaled(const float* d, std::size_t m, double w, double* W) {
  for (std::size_t k = 0; k < m; ++k) W[k] = w * static_cast<double>(d[k]);
}

// acc[k] += w * d[k]
CONFLUX_MULTIVERSION static inline void add_scaled(const float* d, std::size_t m, double w, double* acc) {
  for (std::size_t k = 0; k < m; ++k) acc[k] += w * static_cast<double>(d[k]);
}

// DARE: W[k] = u[k] >= p ? c * d[k] : 0, with c = w / density (or w).
CONFLUX_MULTIVERSION static inline void dare_block(const float* d, const float* u, std::size_t m, double p, double c,
                                                   double* W) {
  for (std::size_t k = 0; k < m; ++k) W[k] = static_cast<double>(u[k]) >= p ? c * static_cast<double>(d[k]) : 0.0;
}

// DARE into a running sum: acc[k] += u[k] >= p ? c * d[k] : 0.
CONFLUX_MULTIVERSION static inline void dare_add(const float* d, const float* u, std::size_t m, double p, double c,
                                                 double* acc) {
  for (std::size_t k = 0; k < m; ++k) acc[k] += static_cast<double>(u[k]) >= p ? c * static_cast<double>(d[k]) : 0.0;
}

// The smallest float f with double(f) >= p: for a float u, double(u) >= p exactly when u >= f,
// so the keep decision can be counted in float lanes (32-bit, like the counter).
inline float float_threshold(double p) {
  float f = static_cast<float>(p);
  if (static_cast<double>(f) < p) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

// Entries with u[k] >= pf, pf = float_threshold(p) (an integer reduction, which vectorizes).
CONFLUX_MULTIVERSION static inline std::uint32_t count_kept(const float* u, std::size_t m, float pf) {
  std::uint32_t kept = 0;
  for (std::size_t k = 0; k < m; ++k) kept += u[k] >= pf ? 1u : 0u;
  return kept;
}

// DELLA's keep probabilities and drop thresholds of a block from the ranks:
// q[k] = min(1, lo + rank[k] * step), p[k] = 1 - q[k].
CONFLUX_MULTIVERSION static inline void della_probs(const std::int32_t* rank, std::size_t m, double lo, double step,
                                                    double* q, double* p) {
  for (std::size_t k = 0; k < m; ++k) {
    const double x = std::min(lo + static_cast<double>(rank[k]) * step, 1.0);
    q[k] = x;
    p[k] = 1.0 - x;
  }
}

// DELLA: W[k] = u[k] >= p[k] ? (w / q[k]) * d[k] : 0 (rescale), or w * d[k].
CONFLUX_MULTIVERSION static inline void della_block(const float* d, const float* u, const double* q, const double* p,
                                                    std::size_t m, double w, bool rescale, double* W) {
  if (rescale) {
    for (std::size_t k = 0; k < m; ++k)
      W[k] = static_cast<double>(u[k]) >= p[k] ? (w / q[k]) * static_cast<double>(d[k]) : 0.0;
  } else {
    for (std::size_t k = 0; k < m; ++k) W[k] = static_cast<double>(u[k]) >= p[k] ? w * static_cast<double>(d[k]) : 0.0;
  }
}

// Entries with u[k] >= p[k] (64-bit counters: the same lane width as the doubles).
CONFLUX_MULTIVERSION static inline std::uint64_t count_kept_each(const float* u, const double* p, std::size_t m) {
  std::uint64_t kept = 0;
  for (std::size_t k = 0; k < m; ++k) kept += static_cast<double>(u[k]) >= p[k] ? 1u : 0u;
  return kept;
}

// acc[k] += W[k]
CONFLUX_MULTIVERSION static inline void add(const double* W, std::size_t m, double* acc) {
  for (std::size_t k = 0; k < m; ++k) acc[k] += W[k];
}

// out[k] = base[k] + f * x[k], rounded once.
CONFLUX_MULTIVERSION static inline void finish_block(const float* base, const double* x, std::size_t m, double f,
                                                     float* out) {
  for (std::size_t k = 0; k < m; ++k) out[k] = static_cast<float>(static_cast<double>(base[k]) + f * x[k]);
}

// Sorts the packed entries a[0..n) (key << 32 | index) by key, stably, with an LSD radix sort on
// the key's digits of widths W... (low digit first; they cover the 31 bits of a magnitude). A
// digit on which every key agrees is skipped. Returns the sorted array (a or b).
template <unsigned... W>
std::uint64_t* radix_sort(std::uint64_t* a, std::uint64_t* b, std::size_t n) {
  constexpr unsigned kWidths[] = {W...};
  constexpr std::size_t kDigits = sizeof...(W);
  constexpr std::size_t kBuckets = ((std::size_t{1} << W) + ...);
  static_assert((W + ...) == 31);
  std::uint32_t hist[kBuckets];
  std::memset(hist, 0, sizeof hist);
  for (std::size_t k = 0; k < n; ++k) {
    const auto key = static_cast<std::uint32_t>(a[k] >> 32);
    std::uint32_t* h = hist;
    unsigned shift = 0;
    for (std::size_t j = 0; j < kDigits; ++j) {
      ++h[(key >> shift) & ((1u << kWidths[j]) - 1)];
      h += std::size_t{1} << kWidths[j];
      shift += kWidths[j];
    }
  }
  std::uint32_t* h = hist;
  unsigned shift = 32;
  for (std::size_t j = 0; j < kDigits; ++j) {
    const std::size_t buckets = std::size_t{1} << kWidths[j];
    const std::uint64_t mask = buckets - 1;
    if (h[(a[0] >> shift) & mask] != n) {  // else one value: already in order
      std::uint32_t sum = 0;
      for (std::size_t v = 0; v < buckets; ++v) {  // bucket starts, in place
        const std::uint32_t c = h[v];
        h[v] = sum;
        sum += c;
      }
      for (std::size_t k = 0; k < n; ++k) {
        const std::uint64_t x = a[k];
        b[h[(x >> shift) & mask]++] = x;
      }
      std::swap(a, b);
    }
    h += buckets;
    shift += kWidths[j];
  }
  return a;
}

// rank[k] = position of entry k of the row d[0..n) sorted by |d| ascending, equal magnitudes by
// lower index first. Zeros (common: sparse task vectors) take the first ranks in index order
// without sorting; the others are packed as (|d| bits << 32 | index) and radix-sorted (8-bit
// digits for few entries, where clearing larger histograms would dominate, else 11/10/10 bits).
// a and b hold n entries each.
inline void rank_row(const float* d, std::size_t n, std::uint64_t* a, std::uint64_t* b, std::int32_t* rank) {
  // Branch-free: faster than skipping runs of zeros, whose lengths are unpredictable.
  std::size_t nonzero = 0;
  std::int32_t zeros = 0;
  for (std::size_t k = 0; k < n; ++k) {
    std::uint32_t bits;
    std::memcpy(&bits, &d[k], sizeof bits);
    bits &= 0x7FFFFFFFu;  // |d|: orders like the magnitude (NaNs last)
    a[nonzero] = (static_cast<std::uint64_t>(bits) << 32) | static_cast<std::uint64_t>(k);
    rank[k] = zeros;  // final for a zero; overwritten below otherwise
    nonzero += bits != 0 ? 1 : 0;
    zeros += bits == 0 ? 1 : 0;
  }
  if (nonzero == 0) return;
  const std::uint64_t* sorted =
      nonzero < 512 ? radix_sort<8, 8, 8, 7>(a, b, nonzero) : radix_sort<11, 10, 10>(a, b, nonzero);
  for (std::size_t r = 0; r < nonzero; ++r)
    rank[static_cast<std::uint32_t>(sorted[r])] = zeros + static_cast<std::int32_t>(r);
}

// ----------------------------------------------------------------------------------------------
// The strategy
// ----------------------------------------------------------------------------------------------

// Traits T: `info`, `params` (the plugin's schema, with density, weights, lambda, normalize,
// rescale and for DELLA epsilon), `static constexpr Drop drop`, `static constexpr bool ties`.
template <class T>
class DropMerge {
 public:
  static constexpr const sdk::Info& info = T::info;
  static constexpr const auto& params = T::params;
  static constexpr bool kDella = T::drop == Drop::della;

  explicit DropMerge(const sdk::Job& job)
      : job_(job),
        n_(job.model_count()),
        density_(job.number("density")),
        epsilon_(kDella ? job.number("epsilon") : 0.0),
        lambda_(job.number("lambda")),
        normalize_(job.flag("normalize")),
        rescale_(job.flag("rescale")),
        kept_(new std::atomic<std::uint64_t>[n_]) {
    for (std::uint32_t i = 0; i < n_; ++i) kept_[i] = 0;
    const auto w = job.list("weights");
    weights_.assign(w.begin(), w.end());
    // The parameter schema already holds density in (0, 1]; check again for a stray host.
    if (!(density_ > 0.0 && density_ <= 1.0)) throw sdk::Error("density must be in (0, 1], got " + num(density_));
    drop_ = density_ < 1.0;
    if (kDella && drop_) {
      if (!(density_ - epsilon_ > 0.0))
        throw sdk::Error("keep probabilities must stay in (0, 1]: density - epsilon = " + num(density_) + " - " +
                         num(epsilon_) + " = " + num(density_ - epsilon_) + " is not > 0 (lower epsilon or raise density)");
      if (density_ + epsilon_ > 1.0 + 1e-12)
        throw sdk::Error("keep probabilities must stay in (0, 1]: density + epsilon = " + num(density_) + " + " +
                         num(epsilon_) + " = " + num(density_ + epsilon_) + " exceeds 1 (lower epsilon or density)");
    }
    double sum = 0;
    for (double x : weights_) sum += x;
    if (!T::ties && normalize_ && sum == 0) throw sdk::Error("weights sum to 0, so they cannot be normalized");
    out_factor_ = T::ties ? lambda_ : lambda_ * (normalize_ ? 1.0 / sum : 1.0);
    drop_threshold_f_ = float_threshold(1.0 - density_);
    // DARE's per-model factor for survivors: w_i / density (rescale) or w_i.
    for (double x : weights_) survivor_scale_.push_back(rescale_ ? x / density_ : x);
  }

  void map(const sdk::Chunk& c, sdk::Span<float> out) {
    const std::size_t count = out.size();
    std::vector<std::uint64_t> keys(drop_ ? n_ : 0);
    for (std::uint32_t i = 0; i < keys.size(); ++i) keys[i] = job_.random_key(c.tensor(), i);
    std::vector<std::uint64_t> kept(n_, 0);
    Scratch s(n_, T::ties);
    if constexpr (kDella) {
      // Whole rows (CFX_PASS_WHOLE_ROWS): rank each model's row, then merge it blockwise.
      const auto len = static_cast<std::size_t>(c.tensor().row_length);  // numel (1) for a scalar
      if (len >= (std::size_t{1} << 31)) throw sdk::Error("della ranks rows of fewer than 2^31 entries");
      if (len == 0 || count % len != 0)
        throw sdk::Error("internal: della needs chunks of whole rows (chunk of " + std::to_string(count) +
                         " entries, rows of " + std::to_string(len) + ")");
      if (drop_) {
        s.rank.resize(n_ * len);
        s.radix_a.resize(len);
        s.radix_b.resize(len);
      }
      const double step = len > 1 ? 2.0 * epsilon_ / static_cast<double>(len - 1) : 0.0;
      const double lo = len > 1 ? density_ - epsilon_ : density_;
      for (std::size_t r0 = 0; r0 < count; r0 += len) {
        if (drop_)
          for (std::uint32_t i = 0; i < n_; ++i)
            rank_row(c.models()[i] + r0, len, s.radix_a.data(), s.radix_b.data(), s.rank.data() + i * len);
        for (std::size_t k0 = 0; k0 < len; k0 += kBlock) {
          const std::size_t m = std::min(kBlock, len - k0);
          merge_block(c, r0 + k0, m, keys, kept, s, [&](std::uint32_t i, const float* u, double* q, double* p) {
            della_probs(s.rank.data() + i * len + k0, m, lo, step, q, p);
            return count_kept_each(u, p, m);
          }, out.data());
        }
      }
    } else {
      for (std::size_t k0 = 0; k0 < count; k0 += kBlock)
        merge_block(c, k0, std::min(kBlock, count - k0), keys, kept, s, nullptr, out.data());
    }
    for (std::uint32_t i = 0; i < n_; ++i) kept_[i].fetch_add(drop_ ? kept[i] : count, std::memory_order_relaxed);
    elements_.fetch_add(count, std::memory_order_relaxed);
  }

  void finish() {
    const std::uint64_t elements = elements_.load();
    char buf[512];
    std::string json = "{\"method\":\"" + std::string(info.id) + "\"";
    std::snprintf(buf, sizeof buf,
                  ",\"density\":%.17g,%s\"lambda\":%.17g,\"normalize\":%s,\"rescale\":%s,\"elements\":%llu,"
                  "\"expected_kept_fraction\":%.17g,\"models\":[",
                  density_, kDella ? ("\"epsilon\":" + num17(epsilon_) + ",").c_str() : "", lambda_,
                  normalize_ ? "true" : "false", rescale_ ? "true" : "false", static_cast<unsigned long long>(elements),
                  drop_ ? density_ : 1.0);
    json += buf;
    for (std::uint32_t i = 0; i < n_; ++i) {
      const std::uint64_t kept = kept_[i].load();
      const double fraction = elements ? static_cast<double>(kept) / static_cast<double>(elements) : 1.0;
      std::snprintf(buf, sizeof buf, "%s{\"model\":%u,\"weight\":%.17g,\"kept\":%llu,\"kept_fraction\":%.9g}",
                    i ? "," : "", i, weights_[i], static_cast<unsigned long long>(kept), fraction);
      json += buf;
      std::snprintf(buf, sizeof buf, "model %u (%s): kept %.4f%% of the task vector's entries (expected %.4f%%)", i,
                    job_.model_name(i), 100 * fraction, 100 * (drop_ ? density_ : 1.0));
      job_.log(CFX_LOG_INFO, buf);
    }
    json += "]}";
    job_.report(json);
  }

 private:
  struct Scratch {
    Scratch(std::uint32_t n, bool ties) : W(static_cast<std::size_t>(ties ? n : 1) * kBlock) {}
    std::vector<double> W;  // ties: every model's W of the block; linear: one model's
    std::vector<std::int32_t> rank;
    std::vector<std::uint64_t> radix_a, radix_b;
    double acc[kBlock];
    double q[kBlock], p[kBlock];
    float u[kBlock];
    se::Block election;
  };

  // Merges entries [k0, k0 + m) of the chunk into out. `probs(i, u, q, p)` (DELLA) fills the
  // block's keep probabilities and drop thresholds of model i and returns how many u >= p.
  template <class Probs>
  void merge_block(const sdk::Chunk& c, std::size_t k0, std::size_t m, const std::vector<std::uint64_t>& keys,
                   std::vector<std::uint64_t>& kept, Scratch& s, Probs probs, float* out) {
    auto model_W = [&](std::uint32_t i, double* W) {
      const float* d = c.models()[i] + k0;
      if (!drop_) {
        scaled(d, m, weights_[i], W);
        return;
      }
      job_.host()->random_uniform(keys[i], c.begin() + k0, m, s.u);
      if constexpr (kDella) {
        kept[i] += probs(i, s.u, s.q, s.p);
        della_block(d, s.u, s.q, s.p, m, weights_[i], rescale_, W);
      } else {
        const double p = 1.0 - density_;
        kept[i] += count_kept(s.u, m, drop_threshold_f_);
        dare_block(d, s.u, m, p, survivor_scale_[i], W);
      }
    };
    const float* base = c.base().data() + k0;
    if constexpr (T::ties) {
      s.election.clear(m);
      for (std::uint32_t i = 0; i < n_; ++i) {
        double* W = s.W.data() + i * kBlock;
        model_W(i, W);
        se::vote(W, m, s.election);
      }
      for (std::uint32_t i = 0; i < n_; ++i) se::agree(s.W.data() + i * kBlock, weights_[i], m, s.election);
      se::finish(s.election, m, normalize_, s.acc);
    } else {
      std::fill_n(s.acc, m, 0.0);
      for (std::uint32_t i = 0; i < n_; ++i) {
        if (!drop_) {
          add_scaled(c.models()[i] + k0, m, weights_[i], s.acc);
        } else if constexpr (!kDella) {
          const double p = 1.0 - density_;
          job_.host()->random_uniform(keys[i], c.begin() + k0, m, s.u);
          kept[i] += count_kept(s.u, m, drop_threshold_f_);
          dare_add(c.models()[i] + k0, s.u, m, p, survivor_scale_[i], s.acc);
        } else {
          model_W(i, s.W.data());
          add(s.W.data(), m, s.acc);
        }
      }
    }
    finish_block(base, s.acc, m, out_factor_, out + k0);
  }

  static std::string num(double v) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%g", v);
    return buf;
  }
  static std::string num17(double v) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%.17g", v);
    return buf;
  }

  const sdk::Job& job_;
  std::uint32_t n_;
  double density_, epsilon_, lambda_;
  bool normalize_, rescale_;
  bool drop_ = true;        // density < 1
  double out_factor_ = 1;   // out = base + out_factor_ * (merged sum, or the election's result)
  float drop_threshold_f_ = 0;  // DARE: float_threshold(1 - density)
  std::vector<double> weights_, survivor_scale_;
  std::unique_ptr<std::atomic<std::uint64_t>[]> kept_;
  std::atomic<std::uint64_t> elements_{0};
};

}  // namespace conflux::plugins::drop_merge
