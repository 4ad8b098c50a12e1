// The strategy shared by ties, breadcrumbs and breadcrumbs_ties: trim every task vector by
// magnitude per tensor (exact streaming selection, common/topk.h), then merge the trimmed
// vectors by task arithmetic or by the TIES sign election (common/sign_election.h).
//
// A variant V (see ties.cc, breadcrumbs.cc, breadcrumbs_ties.cc) provides `info`, `params` and
//   static constexpr bool kGamma;  // breadcrumbs: also drop the top outliers (parameter gamma)
//   static constexpr bool kElect;  // TIES sign election (else a weighted sum)
//
// Per tensor of n entries and model i (d_i = theta_i - theta_base in float32, the task vector
// as the host would compute it; formed inside the kernels, the passes read raw values):
//   k_i = floor(density_i * n),  a_i = floor(gamma_i * n) (0 without gamma),
//   a_i = n - k_i when a_i + k_i > n (as mergekit: fewer top entries removed),
//   rank the entries by (|d_i| desc, flat index asc) and keep ranks [a_i, a_i + k_i).
//   t_i = d_i on kept entries, 0 elsewhere;  W_i = w_i * t_i (double).
//   kElect:  merged = TIES disjoint merge of the W_i (sign_election.h; normalize: divided by the
//            agreeing weights, 0 where they sum to 0);  out = base + lambda * merged
//   else:    out = base + lambda * sum_i W_i / (normalize ? sum_i w_i : 1)
// in double per entry, rounded once to float32 (and by the host to the output dtype).
//
// Passes: the selection (a tensor reduce that repeats: 1 to 3 executions per tensor, see
// topk.h; skipped for the whole job when nothing is trimmed) and the map. Map blocks run
// through fused_block (all models in registers, vectorized) for up to 4 models; with more
// models, and in the one block per boundary where equal magnitudes straddle it, blockwise.
#pragma once

#include <conflux/plugin.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "sign_election.h"
#include "topk.h"

namespace conflux::plugins {

namespace sdk = conflux::sdk;

namespace trim_detail {

// Entries per block of the map (the blockwise path keeps n float and 3 double arrays of it in L1).
constexpr std::size_t kBlock = 512;
static_assert(kBlock <= sign_election::kBlock && kBlock <= topk::kBlock);

// Up to this many models, blocks without a straddling tie run through fused_block.
constexpr std::uint32_t kFusedModels = 4;

// One block through all N models at once, in registers: d_i = x_i - base (float32), t_i = d_i
// where lo_i <= key(d_i) < hi_i (else 0), W_i = w_i * t_i, then the election (Elect) or the
// sum. The election keeps the
// vote and, per sign, the sum of W_i and of w_i; picking the elected sign's pair afterwards
// adds exactly the same terms in the same order as sign_election's agree (the others add +0),
// and the sum adds w_i * t_i in model order as the blockwise path: the same bits.
template <bool Elect, bool Normalize, std::uint32_t N>
CONFLUX_MULTIVERSION static void fused_block(const float* const* d, const std::uint32_t* lo, const std::uint32_t* hi,
                                             const double* w, const float* base, double lambda, std::size_t m,
                                             float* out) {
  static_assert(N >= 1 && N <= 4);
  // Operands in named locals (array copies become memcpy's the vectorizer cannot see through).
  const float *x0 = d[0], *x1 = d[N > 1 ? 1 : 0], *x2 = d[N > 2 ? 2 : 0], *x3 = d[N > 3 ? 3 : 0];
  const std::uint32_t l0 = lo[0], l1 = lo[N > 1 ? 1 : 0], l2 = lo[N > 2 ? 2 : 0], l3 = lo[N > 3 ? 3 : 0];
  const std::uint32_t h0 = hi[0], h1 = hi[N > 1 ? 1 : 0], h2 = hi[N > 2 ? 2 : 0], h3 = hi[N > 3 ? 3 : 0];
  const double w0 = w[0], w1 = w[N > 1 ? 1 : 0], w2 = w[N > 2 ? 2 : 0], w3 = w[N > 3 ? 3 : 0];
  for (std::size_t k = 0; k < m; ++k) {
    // t_i * w_i: the trimmed entry (bitwise &: no branch), weighted.
    auto weighted = [k, base](const float* x, std::uint32_t l, std::uint32_t h, double wi) {
      const float v = x[k] - base[k];  // the float32 task vector, as the host would form it
      const std::uint32_t key = topk::key_of(v);
      return wi * static_cast<double>(((key >= l) & (key < h)) ? v : 0.0f);
    };
    if constexpr (Elect) {
      double vote = 0, pos = 0, neg = 0, pos_w = 0, neg_w = 0;
      auto add = [&](double W, double wi) {
        vote += W;
        pos += W > 0.0 ? W : 0.0;
        neg += W < 0.0 ? W : 0.0;
        pos_w += W > 0.0 ? wi : 0.0;
        neg_w += W < 0.0 ? wi : 0.0;
      };
      add(weighted(x0, l0, h0, w0), w0);
      if constexpr (N > 1) add(weighted(x1, l1, h1, w1), w1);
      if constexpr (N > 2) add(weighted(x2, l2, h2, w2), w2);
      if constexpr (N > 3) add(weighted(x3, l3, h3, w3), w3);
      const bool up = vote >= 0.0;
      const double sum = up ? pos : neg, div = up ? pos_w : neg_w;
      double merged = sum;
      if constexpr (Normalize) merged = div != 0.0 ? sum / div : 0.0;
      out[k] = static_cast<float>(static_cast<double>(base[k]) + lambda * merged);
    } else {
      double acc = 0;
      acc += weighted(x0, l0, h0, w0);
      if constexpr (N > 1) acc += weighted(x1, l1, h1, w1);
      if constexpr (N > 2) acc += weighted(x2, l2, h2, w2);
      if constexpr (N > 3) acc += weighted(x3, l3, h3, w3);
      out[k] = static_cast<float>(static_cast<double>(base[k]) + acc);
    }
  }
}

template <bool Elect, bool Normalize>
void fused_n(std::uint32_t n, const float* const* d, const std::uint32_t* lo, const std::uint32_t* hi, const double* w,
             const float* base, double lambda, std::size_t m, float* out) {
  switch (n) {
    case 1: return fused_block<Elect, Normalize, 1>(d, lo, hi, w, base, lambda, m, out);
    case 2: return fused_block<Elect, Normalize, 2>(d, lo, hi, w, base, lambda, m, out);
    case 3: return fused_block<Elect, Normalize, 3>(d, lo, hi, w, base, lambda, m, out);
    default: return fused_block<Elect, Normalize, 4>(d, lo, hi, w, base, lambda, m, out);
  }
}

// The election normalizes or not; the sum's normalization is in its weights.
template <bool Elect>
void fused(std::uint32_t n, const float* const* d, const std::uint32_t* lo, const std::uint32_t* hi, const double* w,
           const float* base, double lambda, bool normalize, std::size_t m, float* out) {
  if (Elect && normalize) fused_n<Elect, true>(n, d, lo, hi, w, base, lambda, m, out);
  else fused_n<Elect, false>(n, d, lo, hi, w, base, lambda, m, out);
}
static_assert(kFusedModels == 4);

// acc[k] += w * double(t[k])
CONFLUX_MULTIVERSION static inline void add_scaled(const float* t, double w, std::size_t m, double* acc) {
  for (std::size_t k = 0; k < m; ++k) acc[k] += w * static_cast<double>(t[k]);
}

// out[k] = float(base[k] + lambda * merged[k])
CONFLUX_MULTIVERSION static inline void finish_scaled(const float* base, const double* merged, double lambda,
                                                      std::size_t m, float* out) {
  for (std::size_t k = 0; k < m; ++k) out[k] = static_cast<float>(static_cast<double>(base[k]) + lambda * merged[k]);
}

// out[k] = float(base[k] + acc[k])
CONFLUX_MULTIVERSION static inline void finish_sum(const float* base, const double* acc, std::size_t m, float* out) {
  for (std::size_t k = 0; k < m; ++k) out[k] = static_cast<float>(static_cast<double>(base[k]) + acc[k]);
}

// floor(x * n) as mergekit's int(x * numel): the double product, truncated.
inline std::uint64_t fraction_of(double x, std::uint64_t n) {
  return static_cast<std::uint64_t>(x * static_cast<double>(n));
}

}  // namespace trim_detail

template <class V>
struct TrimMerge : V {
  explicit TrimMerge(const sdk::Job& job)
      : job_(job),
        n_(job.model_count()),
        density_(list(job, "density")),
        gamma_(V::kGamma ? list(job, "gamma") : std::vector<double>(n_, 0.0)),
        weights_(list(job, "weights")),
        lambda_(job.number("lambda")),
        normalize_(job.flag("normalize")),
        selector_(job.tensors(), n_, V::kGamma ? 2 * n_ : n_,
                  [this](const cfx_tensor& t, std::uint32_t j) { return target(t, j); }) {
    if (!V::kElect) {
      double sum = 0;
      for (double w : weights_) sum += w;
      if (normalize_ && sum == 0) throw sdk::Error("weights sum to 0, so they cannot be normalized");
      for (double w : weights_) sum_weights_.push_back(w * lambda_ / (normalize_ ? sum : 1.0));
    }
  }

  // The selection pass runs only when some tensor has something to trim.
  bool selecting() const { return selector_.active(); }
  std::size_t stats_count(std::uint32_t) const { return selector_.stats_words(); }
  void reduce(const sdk::Chunk& c, sdk::Span<std::uint32_t> partial) { selector_.reduce(c, partial); }
  void combine(const cfx_tensor* t, sdk::Span<std::uint32_t> into, sdk::Span<const std::uint32_t> from) {
    selector_.combine(t, into, from);
  }
  bool done(const cfx_tensor* t, sdk::Span<const std::uint32_t> stats) { return selector_.done(t, stats); }

  void map(const sdk::Chunk& c, sdk::Span<float> out) {
    namespace se = sign_election;
    using trim_detail::kBlock;
    std::vector<topk::Cursor> keep(n_), drop(n_, topk::Cursor{topk::kNothing, 0, 0});
    for (std::uint32_t i = 0; i < n_; ++i) {
      keep[i] = selector_.cursor(c, V::kGamma ? 2 * i : i);
      if (V::kGamma) drop[i] = selector_.cursor(c, 2 * i + 1);
    }
    std::vector<float> trimmed;
    const float* base = c.base().data();
    const double* w = V::kElect ? weights_.data() : sum_weights_.data();
    std::vector<const float*> x(n_);
    std::vector<std::uint32_t> lo(n_), hi(n_);
    for (std::size_t k0 = 0; k0 < out.size(); k0 += kBlock) {
      const std::size_t m = std::min(kBlock, out.size() - k0);
      bool straddle = false;
      for (std::uint32_t i = 0; i < n_; ++i) {
        x[i] = c.model(i).data() + k0;
        lo[i] = keep[i].U;
        hi[i] = drop[i].U;
        straddle = straddle || keep[i].quota > 0 || drop[i].quota > 0;
      }
      if (!straddle && n_ <= trim_detail::kFusedModels) {
        trim_detail::fused<V::kElect>(n_, x.data(), lo.data(), hi.data(), w, base + k0, lambda_, normalize_, m,
                                      out.data() + k0);
        continue;
      }
      // Blockwise: many models, or the block where ties straddle a boundary.
      trimmed.resize(std::size_t{n_} * kBlock);
      for (std::uint32_t i = 0; i < n_; ++i)
        topk::select_block(x[i], base + k0, m, keep[i], drop[i], trimmed.data() + i * kBlock);
      if constexpr (V::kElect) {
        se::Block b;
        b.clear(m);
        for (std::uint32_t i = 0; i < n_; ++i) se::vote_scaled(trimmed.data() + i * kBlock, weights_[i], m, b);
        for (std::uint32_t i = 0; i < n_; ++i) se::agree_scaled(trimmed.data() + i * kBlock, weights_[i], m, b);
        double merged[kBlock];
        se::finish(b, m, normalize_, merged);
        trim_detail::finish_scaled(base + k0, merged, lambda_, m, out.data() + k0);
      } else {
        double acc[kBlock] = {};
        for (std::uint32_t i = 0; i < n_; ++i)
          trim_detail::add_scaled(trimmed.data() + i * kBlock, sum_weights_[i], m, acc);
        trim_detail::finish_sum(base + k0, acc, m, out.data() + k0);
      }
    }
    selector_.mapped(c);
  }

  void finish() {
    std::uint64_t elements = 0;
    std::vector<std::uint64_t> kept(n_, 0);
    for (const cfx_tensor& t : job_.tensors()) {
      elements += t.numel;
      for (std::uint32_t i = 0; i < n_; ++i) {
        const auto [a, k] = range(t.numel, i);
        kept[i] += k;
        (void)a;
      }
    }
    char buf[256];
    std::string json = std::string("{\"method\":\"") + V::info.id + "\"";
    auto numbers = [&](const char* key, const std::vector<double>& v) {
      json += std::string(",\"") + key + "\":[";
      for (std::size_t i = 0; i < v.size(); ++i) {
        std::snprintf(buf, sizeof buf, "%s%.17g", i ? "," : "", v[i]);
        json += buf;
      }
      json += "]";
    };
    numbers("density", density_);
    if (V::kGamma) numbers("gamma", gamma_);
    numbers("weights", weights_);
    std::snprintf(buf, sizeof buf, ",\"lambda\":%.17g,\"normalize\":%s,\"elements\":%llu,\"kept\":[", lambda_,
                  normalize_ ? "true" : "false", static_cast<unsigned long long>(elements));
    json += buf;
    for (std::uint32_t i = 0; i < n_; ++i) {
      std::snprintf(buf, sizeof buf, "%s%llu", i ? "," : "", static_cast<unsigned long long>(kept[i]));
      json += buf;
    }
    std::snprintf(buf, sizeof buf,
                  "],\"selection\":{\"tensors_by_passes\":[%llu,%llu,%llu,%llu],\"tie_breaks\":%llu,"
                  "\"tie_breaks_from_lists\":%llu}}",
                  static_cast<unsigned long long>(selector_.tensors_by_executions(0)),
                  static_cast<unsigned long long>(selector_.tensors_by_executions(1)),
                  static_cast<unsigned long long>(selector_.tensors_by_executions(2)),
                  static_cast<unsigned long long>(selector_.tensors_by_executions(3)),
                  static_cast<unsigned long long>(selector_.tie_breaks()),
                  static_cast<unsigned long long>(selector_.listed_tie_breaks()));
    json += buf;
    job_.report(json);
    for (std::uint32_t i = 0; i < n_; ++i) {
      std::snprintf(buf, sizeof buf, "model %u (%s): kept %.4f%% of entries", i, job_.model_name(i),
                    elements ? 100.0 * static_cast<double>(kept[i]) / static_cast<double>(elements) : 0.0);
      job_.log(CFX_LOG_INFO, buf);
    }
    if (selector_.active()) {
      std::snprintf(buf, sizeof buf,
                    "selection: tensors whose threshold took 1/2/3 statistics passes: %llu/%llu/%llu, "
                    "%llu boundaries resolved by tie counts",
                    static_cast<unsigned long long>(selector_.tensors_by_executions(1)),
                    static_cast<unsigned long long>(selector_.tensors_by_executions(2)),
                    static_cast<unsigned long long>(selector_.tensors_by_executions(3)),
                    static_cast<unsigned long long>(selector_.tie_breaks()));
      job_.log(CFX_LOG_INFO, buf);
    }
  }

 private:
  static std::vector<double> list(const sdk::Job& job, const char* name) {
    const auto v = job.list(name);
    return {v.begin(), v.end()};
  }

  // Model i keeps ranks [a, a + k) of a tensor of n entries.
  std::pair<std::uint64_t, std::uint64_t> range(std::uint64_t n, std::uint32_t i) const {
    const std::uint64_t k = trim_detail::fraction_of(density_[i], n);
    std::uint64_t a = trim_detail::fraction_of(gamma_[i], n);
    if (a + k > n) a = n - k;
    return {a, k};
  }

  // Without gamma: target i = model i's top k. With gamma: target 2i = top a + k (kept),
  // target 2i + 1 = top a (removed).
  topk::Target target(const cfx_tensor& t, std::uint32_t j) const {
    const std::uint32_t i = V::kGamma ? j / 2 : j;
    const auto [a, k] = range(t.numel, i);
    if (!V::kGamma) return {i, k};
    return {i, j % 2 == 0 ? a + k : a};
  }

  const sdk::Job& job_;
  std::uint32_t n_;
  std::vector<double> density_, gamma_, weights_;
  double lambda_;
  bool normalize_;
  std::vector<double> sum_weights_;  // no election: w_i * lambda / (normalize ? sum w : 1)
  topk::Selector selector_;
};

}  // namespace conflux::plugins

// The passes of a TrimMerge strategy S: the selection (a repeating tensor reduce on the task
// vectors, skipped when nothing is trimmed) and the merge.
#define CONFLUX_TRIM_MERGE_PLUGIN(S)                                                                    \
  CONFLUX_PLUGIN(S,                                                                                     \
                 ::conflux::sdk::only_if<S, &S::selecting>(                                             \
                     ::conflux::sdk::reduce_pass<S, std::uint32_t, 0, &S::reduce, &S::combine, &S::done>( \
                         CFX_PASS_TENSOR_REDUCE)),                                                      \
                 ::conflux::sdk::map_pass<S, &S::map>())
