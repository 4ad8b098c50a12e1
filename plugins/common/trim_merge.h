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
// in double per entry, rounded once to float32 (and by the host to the output dtype). For a BF16
// output (plugin.h, CFX_FLOAT32_OUTPUT_BITS) of up to 4 models, in float32 instead, entries that
// float32 cannot settle within 1 BF16 ulp computed again in double (fused_block_f32,
// common/float_guard.h): the election with nonnegative weights only.
// Inputs: float32, or BF16 tensors as stored (CFX_PASS_BF16_INPUTS, common/inputs.h); the task
// vector d = x - base is the same float32 value from both.
//
// Passes: the selection (a tensor reduce that repeats: 1 to 3 executions per tensor, see
// topk.h; skipped for the whole job when nothing is trimmed) and the map. Map blocks run
// through fused_block (all models in registers, vectorized; fused_block_f32 for BF16 outputs)
// for up to 4 models; with more models, and in the one block per boundary where equal
// magnitudes straddle it, blockwise (double).
#pragma once

#include <conflux/plugin.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "active.h"
#include "float_guard.h"
#include "inputs.h"
#include "sign_election.h"
#include "topk.h"

namespace conflux::plugins {

namespace sdk = conflux::sdk;

namespace trim_detail {

// Entries per block of the map (the blockwise path keeps n float and 3 double arrays of it in L1).
constexpr std::size_t kBlock = 512;
static_assert(kBlock <= sign_election::kBlock && kBlock <= topk::kBlock && topk::kStripe % kBlock == 0);

// Up to this many models, blocks without a straddling tie run through fused_block.
constexpr std::uint32_t kFusedModels = 4;

// One block through all N models at once, in registers: d_i = x_i - base (float32), t_i = d_i
// where lo_i <= key(d_i) < hi_i (else 0), W_i = w_i * t_i, then the election (Elect) or the
// sum. The election keeps the
// vote and, per sign, the sum of W_i and of w_i; picking the elected sign's pair afterwards
// adds exactly the same terms in the same order as sign_election's agree (the others add +0),
// and the sum adds w_i * t_i in model order as the blockwise path: the same bits.
template <bool Elect, bool Normalize, std::uint32_t N, class In>
CONFLUX_MULTIVERSION static void fused_block(const In* const* d, const std::uint32_t* lo, const std::uint32_t* hi,
                                             const double* w, const In* base, double lambda, std::size_t m,
                                             float* out) {
  static_assert(N >= 1 && N <= 4);
  // Operands in named locals (array copies become memcpy's the vectorizer cannot see through).
  const In *x0 = d[0], *x1 = d[N > 1 ? 1 : 0], *x2 = d[N > 2 ? 2 : 0], *x3 = d[N > 3 ? 3 : 0];
  const std::uint32_t l0 = lo[0], l1 = lo[N > 1 ? 1 : 0], l2 = lo[N > 2 ? 2 : 0], l3 = lo[N > 3 ? 3 : 0];
  const std::uint32_t h0 = hi[0], h1 = hi[N > 1 ? 1 : 0], h2 = hi[N > 2 ? 2 : 0], h3 = hi[N > 3 ? 3 : 0];
  const double w0 = w[0], w1 = w[N > 1 ? 1 : 0], w2 = w[N > 2 ? 2 : 0], w3 = w[N > 3 ? 3 : 0];
  for (std::size_t k = 0; k < m; ++k) {
    // t_i * w_i: the trimmed entry (bitwise &: no branch), weighted.
    const float b = value(base, k);
    auto weighted = [k, b](const In* x, std::uint32_t l, std::uint32_t h, double wi) {
      const float v = value(x, k) - b;  // the float32 task vector, as the host would form it
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
      out[k] = static_cast<float>(static_cast<double>(b) + lambda * merged);
    } else {
      double acc = 0;
      acc += weighted(x0, l0, h0, w0);
      if constexpr (N > 1) acc += weighted(x1, l1, h1, w1);
      if constexpr (N > 2) acc += weighted(x2, l2, h2, w2);
      if constexpr (N > 3) acc += weighted(x3, l3, h3, w3);
      out[k] = static_cast<float>(static_cast<double>(b) + acc);
    }
  }
}

template <bool Elect, bool Normalize, class In>
void fused_n(std::uint32_t n, const In* const* d, const std::uint32_t* lo, const std::uint32_t* hi, const double* w,
             const In* base, double lambda, std::size_t m, float* out) {
  switch (n) {
    case 1: return fused_block<Elect, Normalize, 1>(d, lo, hi, w, base, lambda, m, out);
    case 2: return fused_block<Elect, Normalize, 2>(d, lo, hi, w, base, lambda, m, out);
    case 3: return fused_block<Elect, Normalize, 3>(d, lo, hi, w, base, lambda, m, out);
    default: return fused_block<Elect, Normalize, 4>(d, lo, hi, w, base, lambda, m, out);
  }
}

// The election normalizes or not; the sum's normalization is in its weights.
template <bool Elect, class In>
void fused(std::uint32_t n, const In* const* d, const std::uint32_t* lo, const std::uint32_t* hi, const double* w,
           const In* base, double lambda, bool normalize, std::size_t m, float* out) {
  if (Elect && normalize) fused_n<Elect, true>(n, d, lo, hi, w, base, lambda, m, out);
  else fused_n<Elect, false>(n, d, lo, hi, w, base, lambda, m, out);
}
static_assert(kFusedModels == 4);

// Float32 for a BF16 output (sdk::Chunk::float32_suffices), up to 4 models, blocks without a
// straddling tie: the same trim (t_i is the same float32 value), then in float32 with w_f the
// float32 weights (election: every weight 0 or in [2^-100, 2^100], see TrimMerge::elect_f32_;
// sum: the weights with lambda and normalization folded in, as task_arithmetic) and lambda_f:
//   sum:      r = base + (0 + W_0 + W_1 + ...), W_i = w_f_i * t_i  (task_arithmetic's sum, bit for
//             bit: the same terms in the same order, and the same guard)
//   election: vote = sum_i W_i; entry i agrees where t_i has the elected sign (weights >= 0: the
//             sign of W_i, and a zero weight adds 0 to both sums); merged = the agreeing sum,
//             divided by the agreeing weights when Normalize (0 where they sum to 0);
//             r = base + lambda_f * merged.
// Returns how many entries fail the guard; the caller computes those again in double
// (fused_block), entry by entry. An entry fails (each test depends on its own values only) when
//   - the result cancels: float_guard's test of r against |base| + sum_i |W_i| (sum), or against
//     4 (|base| + |lambda_f * merged|) (election: merged has a longer chain of roundings, up to
//     about 12 of 2^-24 with 4 models, so it keeps a 4x wider margin);
//   - election: the vote's sign may differ from the exact one, |vote| * 2^12 < sum_i |W_i|
//     (float32's vote is within about 2^-21 of that sum; an exact zero vote, counted as +, fails
//     too unless every W_i is 0);
//   - election, Small: a kept nonzero t_i has a key below small[i] (see small_key: w_f * t may
//     then lie below 2^-100, near or in float32's underflow, which the bounds above do not
//     cover). The caller sets Small only where such a key can occur (TrimMerge::map_inputs: the
//     kept range and the tensor's smallest nonzero key, topk::Selector::least_key), so real
//     blocks skip that test; without Small no kept key can be in that range, so Small changes
//     only the cost, never a result;
//   - magnitudes beyond 2^100 (overflow, inf, NaN: double gives the exact answer there).
// All: every model keeps every entry (lo 0, hi above every key, no Small test: the caller checks),
// so t_i = d_i without the key test, the same values.
template <bool Elect, bool Normalize, bool Small, std::uint32_t N, bool All = false, class In>
CONFLUX_MULTIVERSION static std::uint32_t fused_block_f32(const In* const* d, const std::uint32_t* lo,
                                                          const std::uint32_t* hi, const float* w,
                                                          const std::uint32_t* small, const In* base, float lambda,
                                                          std::size_t m, float* out) {
  static_assert(N >= 1 && N <= 4);
  const In *x0 = d[0], *x1 = d[N > 1 ? 1 : 0], *x2 = d[N > 2 ? 2 : 0], *x3 = d[N > 3 ? 3 : 0];
  const float w0 = w[0], w1 = w[N > 1 ? 1 : 0], w2 = w[N > 2 ? 2 : 0], w3 = w[N > 3 ? 3 : 0];
  // Key ranges as (start, length): key in [a, a + n) is (key - a) < n, unsigned (one compare).
  // Kept: [lo, hi), empty where hi <= lo. Small: the kept nonzero keys below small, [max(lo, 1),
  // min(hi, small)).
  auto length = [](std::uint32_t a, std::uint32_t z) { return z > a ? z - a : 0u; };
  std::uint32_t l[4] = {}, n[4] = {}, sa[4] = {}, sn[4] = {};
  for (std::uint32_t i = 0; i < N; ++i) {
    l[i] = lo[i];
    n[i] = length(lo[i], hi[i]);
    sa[i] = std::max(lo[i], 1u);
    sn[i] = length(sa[i], std::min(hi[i], small[i]));
  }
  const std::uint32_t l0 = l[0], l1 = l[1], l2 = l[2], l3 = l[3], n0 = n[0], n1 = n[1], n2 = n[2], n3 = n[3];
  const std::uint32_t a0 = sa[0], a1 = sa[1], a2 = sa[2], a3 = sa[3], z0 = sn[0], z1 = sn[1], z2 = sn[2], z3 = sn[3];
  std::uint32_t unsafe = 0;
  for (std::size_t k = 0; k < m; ++k) {
    const float b = value(base, k);
    // t = v or +0, by masking v's bits (a select would be folded into the sign tests below as
    // sel ? t < 0 : false, which GCC then fails to vectorize); bits: t's bits; tiny: 1 where t
    // is nonzero with a key in the Small range.
    auto trimmed = [k, b](const In* x, std::uint32_t li, std::uint32_t ni, std::uint32_t ai, std::uint32_t zi,
                          std::uint32_t& bits, std::uint32_t& tiny) {
      const float v = value(x, k) - b;
      if constexpr (All) {
        (void)li, (void)ni, (void)ai, (void)zi, (void)bits, (void)tiny;
        return v;
      }
      std::memcpy(&bits, &v, sizeof bits);
      const std::uint32_t key = bits & 0x7FFFFFFFu;
      bits &= 0u - static_cast<std::uint32_t>(key - li < ni);
      if constexpr (Small) tiny = key - ai < zi ? 1u : 0u;
      float t;
      std::memcpy(&t, &bits, sizeof t);
      return t;
    };
    std::uint32_t u0 = 0, u1 = 0, u2 = 0, u3 = 0, y0 = 0, y1 = 0, y2 = 0, y3 = 0;
    const float t0 = trimmed(x0, l0, n0, a0, z0, u0, y0), t1 = N > 1 ? trimmed(x1, l1, n1, a1, z1, u1, y1) : 0.0f,
                t2 = N > 2 ? trimmed(x2, l2, n2, a2, z2, u2, y2) : 0.0f,
                t3 = N > 3 ? trimmed(x3, l3, n3, a3, z3, u3, y3) : 0.0f;
    const float W0 = w0 * t0, W1 = N > 1 ? w1 * t1 : 0.0f, W2 = N > 2 ? w2 * t2 : 0.0f, W3 = N > 3 ? w3 * t3 : 0.0f;
    if constexpr (Elect) {
      float vote = W0;
      if constexpr (N > 1) vote += W1;
      if constexpr (N > 2) vote += W2;
      if constexpr (N > 3) vote += W3;
      float mag = std::fabs(W0);
      if constexpr (N > 1) mag += std::fabs(W1);
      if constexpr (N > 2) mag += std::fabs(W2);
      if constexpr (N > 3) mag += std::fabs(W3);
      const bool up = vote >= 0.0f;
      auto on = [up](float t) { return (up & (t > 0.0f)) | (!up & (t < 0.0f)); };  // bitwise: no branches
      float sum = on(t0) ? W0 : 0.0f, div = on(t0) ? w0 : 0.0f;
      auto agree = [&](float t, float W, float wi) {
        sum += on(t) ? W : 0.0f;
        if constexpr (Normalize) div += on(t) ? wi : 0.0f;
      };
      if constexpr (N > 1) agree(t1, W1, w1);
      if constexpr (N > 2) agree(t2, W2, w2);
      if constexpr (N > 3) agree(t3, W3, w3);
      float merged = sum;
      if constexpr (Normalize) merged = div != 0.0f ? sum / div : 0.0f;
      const float scaled = lambda * merged, r = b + scaled;
      out[k] = r;
      const float out_mag = std::fabs(b) + std::fabs(scaled);
      // (0/1 words, not bools: byte-sized flags keep the loop from vectorizing). The first test is
      // float_guard::unsafe(r, 4 * out_mag), with the 4 moved to the other side (exact).
      std::uint32_t bad = std::fabs(r) * 0x1p10f < out_mag ? 1u : 0u;
      bad |= std::fabs(vote) * 0x1p12f < mag ? 1u : 0u;
      bad |= !(mag + out_mag <= 0x1p100f) ? 1u : 0u;
      if constexpr (Small) bad |= y0 | y1 | y2 | y3;
      unsafe += bad;
    } else {
      float acc = 0.0f;
      acc += W0;
      if constexpr (N > 1) acc += W1;
      if constexpr (N > 2) acc += W2;
      if constexpr (N > 3) acc += W3;
      const float r = b + acc;
      out[k] = r;
      const float mag = std::fabs(b) + std::fabs(W0) + std::fabs(W1) + std::fabs(W2) + std::fabs(W3);
      unsafe += float_guard::unsafe(r, mag) | (!(mag <= 0x1p100f) ? 1u : 0u);
    }
  }
  return unsafe;
}

// The election's Small bound of a model of float32 weight w_f (0 or in [2^-100, 2^100]): the key
// of 2^-99 / w_f, so that w_f * |t| >= 2^-100 for every t of a larger key (1: no t fails, for a
// zero weight, or a weight so large that every nonzero t qualifies).
inline std::uint32_t small_key(float w_f) {
  if (w_f == 0.0f) return 1;
  return std::max<std::uint32_t>(topk::key_of(0x1p-99f / w_f), 1u);
}

template <bool Elect, bool Normalize, bool Small, bool All = false, class In>
std::uint32_t fused_f32_n(std::uint32_t n, const In* const* d, const std::uint32_t* lo, const std::uint32_t* hi,
                          const float* w, const std::uint32_t* small, const In* base, float lambda, std::size_t m,
                          float* out) {
  switch (n) {
    case 1: return fused_block_f32<Elect, Normalize, Small, 1, All>(d, lo, hi, w, small, base, lambda, m, out);
    case 2: return fused_block_f32<Elect, Normalize, Small, 2, All>(d, lo, hi, w, small, base, lambda, m, out);
    case 3: return fused_block_f32<Elect, Normalize, Small, 3, All>(d, lo, hi, w, small, base, lambda, m, out);
    default: return fused_block_f32<Elect, Normalize, Small, 4, All>(d, lo, hi, w, small, base, lambda, m, out);
  }
}

// tiny: run the Small test (see fused_block_f32); only for the election (the sum's results carry
// absolute errors of about 2^-149 at most from underflowing products, far below a BF16 ulp of
// anything they could change).
template <bool Elect, class In>
std::uint32_t fused_f32(std::uint32_t n, const In* const* d, const std::uint32_t* lo, const std::uint32_t* hi,
                        const float* w, const std::uint32_t* small, const In* base, float lambda, bool normalize,
                        bool tiny, std::size_t m, float* out) {
  if constexpr (Elect) {
    // Every entry kept (sparse task vectors whose nonzeros all fit, density 1): no key tests.
    bool all = !tiny;
    for (std::uint32_t i = 0; i < n; ++i) all = all && lo[i] == 0 && hi[i] >= topk::kNothing;
    if (all && normalize) return fused_f32_n<true, true, false, true>(n, d, lo, hi, w, small, base, lambda, m, out);
    if (all) return fused_f32_n<true, false, false, true>(n, d, lo, hi, w, small, base, lambda, m, out);
    if (normalize) {
      if (tiny) return fused_f32_n<true, true, true>(n, d, lo, hi, w, small, base, lambda, m, out);
      return fused_f32_n<true, true, false>(n, d, lo, hi, w, small, base, lambda, m, out);
    }
    if (tiny) return fused_f32_n<true, false, true>(n, d, lo, hi, w, small, base, lambda, m, out);
    return fused_f32_n<true, false, false>(n, d, lo, hi, w, small, base, lambda, m, out);
  } else {
    return fused_f32_n<false, false, false>(n, d, lo, hi, w, small, base, lambda, m, out);
  }
}

// acc[k] += w * double(t[k])
CONFLUX_MULTIVERSION static inline void add_scaled(const float* t, double w, std::size_t m, double* acc) {
  for (std::size_t k = 0; k < m; ++k) acc[k] += w * static_cast<double>(t[k]);
}

// out[k] = float(base[k] + lambda * merged[k])
template <class In>
CONFLUX_MULTIVERSION static inline void finish_scaled(const In* base, const double* merged, double lambda,
                                                      std::size_t m, float* out) {
  for (std::size_t k = 0; k < m; ++k)
    out[k] = static_cast<float>(static_cast<double>(value(base, k)) + lambda * merged[k]);
}

// out[k] = float(base[k] + acc[k])
template <class In>
CONFLUX_MULTIVERSION static inline void finish_sum(const In* base, const double* acc, std::size_t m, float* out) {
  for (std::size_t k = 0; k < m; ++k) out[k] = static_cast<float>(static_cast<double>(value(base, k)) + acc[k]);
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
    // Float32 (BF16 outputs): the sum with any weights; the election classifies agreement by the
    // sign of t_i, which is W_i's only with weights >= 0 (and +0, not -0: a -0 weight could give
    // a -0 sum where double has +0), and its error bounds want weights that are 0 or far from
    // float32's range limits.
    elect_f32_ = std::isfinite(lambda_);
    for (double w : weights_)
      elect_f32_ = elect_f32_ && !std::signbit(w) && (w == 0 || (w >= 0x1p-100 && w <= 0x1p100));
    for (std::uint32_t i = 0; i < n_; ++i) {
      weights_f_.push_back(static_cast<float>(V::kElect ? weights_[i] : sum_weights_[i]));
      small_.push_back(trim_detail::small_key(weights_f_.back()));
    }
  }

  // The selection pass runs only when some tensor has something to trim.
  bool selecting() const { return selector_.active(); }
  std::size_t stats_count(std::uint32_t) const { return selector_.stats_words(); }
  std::size_t stats_unzeroed(std::uint32_t) const { return selector_.stats_unzeroed_words(); }
  // A chunk the selection speculates on (topk.h, SPECULATION) is merged here, every nonzero
  // entry kept: what the map computes when the selection turns out to keep them all.
  void reduce(const sdk::Chunk& c, sdk::Span<std::uint32_t> partial) {
    const auto merge = [&](std::size_t first, std::size_t count, std::uint32_t* nonzero, std::uint32_t* least) {
      with_inputs(c, [&](auto models, auto base) {
        map_inputs(c, models, base, c.speculative_output(), Counts{nonzero, least}, first, first + count);
      });
    };
    if (selector_.reduce(c, partial, merge)) c.output_written();
  }
  void combine(const cfx_tensor* t, sdk::Span<std::uint32_t> into, sdk::Span<const std::uint32_t> from) {
    selector_.combine(t, into, from);
  }
  sdk::Next done(const cfx_tensor* t, sdk::Span<const std::uint32_t> stats) { return selector_.done(t, stats); }

  // Float32 or stored BF16 inputs (the pass has CFX_PASS_BF16_INPUTS).
  void map(const sdk::Chunk& c, sdk::Span<float> out) {
    with_inputs(c, [&](auto models, auto base) { map_inputs(c, models, base, out); });
    selector_.mapped(c);
  }

  // A speculating stripe's counts (topk::Selector::reduce): per model its nonzero entries, added
  // to, and the smallest nonzero key, folded into (the counts come from the merge's own sweep).
  struct Counts {
    std::uint32_t* nonzero = nullptr;
    std::uint32_t* least = nullptr;
  };

  // With counts (a speculating stripe): each block is counted before it is merged, and its
  // least keys (the chunk's so far) bound the block's for the Small test. [first, last): the
  // entries of the chunk to merge, in blocks from `first` (kStripe is a multiple of kBlock, so
  // they are the whole chunk's blocks). The cursors are the selection's either way: while it
  // speculates, an open target's keeps every entry (topk.h, SPECULATION), and a settled one
  // (k = 0 or k = n) keeps what it will, so no stripe starts inside a run of ties.
  template <class In>
  void map_inputs(const sdk::Chunk& c, const In* const* models, const In* base, sdk::Span<float> out,
                  Counts counts = {}, std::size_t first = 0, std::size_t last = static_cast<std::size_t>(-1)) {
    namespace se = sign_election;
    using trim_detail::kBlock;
    std::vector<topk::Cursor> keep(n_), drop(n_, topk::Cursor{topk::kNothing, 0, 0});
    std::vector<std::uint32_t> least(n_);
    for (std::uint32_t i = 0; i < n_; ++i) {
      if (!counts.least) least[i] = selector_.least_key(c, i);
      keep[i] = selector_.cursor(c, V::kGamma ? 2 * i : i);
      if (V::kGamma) drop[i] = selector_.cursor(c, 2 * i + 1);
    }
    std::vector<float> trimmed;
    const double* w = V::kElect ? weights_.data() : sum_weights_.data();
    // Float32 with float_guard's per-entry fallback to double (fused_block_f32), for BF16 outputs.
    const bool f32 = c.float32_suffices() && n_ <= trim_detail::kFusedModels && (!V::kElect || elect_f32_);
    const float lambda_f = static_cast<float>(lambda_);
    std::vector<const In*> x(n_);
    std::vector<std::uint32_t> lo(n_), hi(n_);
    last = std::min(last, out.size());
    // A block without a straddling tie may run on its active entries gathered (common/active.h;
    // a speculating stripe's gather also counts them): with the inactive entries' result from the
    // kernel itself, float32 or double (base -0 and a zero task vector give r = -0 + z = z; a zero
    // task-vector entry merges to nothing whether the trim keeps it or not).
    active::Sparse sparse;
    if (n_ <= trim_detail::kFusedModels && n_ <= active::kMaxModels) {
      const float minus_zero = -0.0f;
      const float* zeros[trim_detail::kFusedModels] = {&minus_zero, &minus_zero, &minus_zero, &minus_zero};
      const std::uint32_t every_lo[trim_detail::kFusedModels] = {};
      const std::uint32_t every_hi[trim_detail::kFusedModels] = {topk::kNothing, topk::kNothing, topk::kNothing,
                                                                 topk::kNothing};
      float z = 1.0f;
      bool settled = true;  // float32: the guard passed
      if (f32)
        settled = trim_detail::fused_f32<V::kElect>(n_, zeros, every_lo, every_hi, weights_f_.data(), small_.data(),
                                                    &minus_zero, lambda_f, normalize_, false, 1, &z) == 0;
      else
        trim_detail::fused<V::kElect>(n_, zeros, every_lo, every_hi, w, &minus_zero, lambda_, normalize_, 1, &z);
      if (settled) sparse.start(z);
    }
    for (std::size_t k0 = first; k0 < last; k0 += kBlock) {
      const std::size_t m = std::min(kBlock, last - k0);
      bool straddle = false;
      for (std::uint32_t i = 0; i < n_; ++i) {
        x[i] = models[i] + k0;
        lo[i] = keep[i].U;
        hi[i] = drop[i].U;
        straddle = straddle || keep[i].quota > 0 || drop[i].quota > 0;
      }
      // Gathered where the block is sparse; a speculating stripe's block is counted first (by
      // the gather, else by the selection's kernel).
      active::Lanes* gathered = nullptr;
      bool counted = false;
      if (!straddle && sparse.next()) {
        active::Lanes& a = active::thread_lanes();
        counted = active::gather_active(n_, x.data(), base + k0, m, a, counts.nonzero, counts.least);
        if (!counted) sparse.off();  // this CPU cannot gather
        else if (sparse.worth(a.count, m)) gathered = &a;
      }
      if (counts.nonzero) {
        if (!counted)
          for (std::uint32_t i = 0; i < n_; ++i)
            counts.nonzero[i] += topk::kernels::count_nonzero(x[i], base + k0, m, counts.least[i]);
        for (std::uint32_t i = 0; i < n_; ++i) least[i] = counts.least[i];
      }
      if (!straddle && n_ <= trim_detail::kFusedModels) {
        // Small where some model may keep a nonzero key below its bound: the kept range [lo, hi),
        // the tensor's smallest nonzero key and small_ leave room for one.
        bool tiny = false;
        for (std::uint32_t i = 0; i < n_; ++i)
          tiny = tiny || std::max({lo[i], least[i], 1u}) < std::min(hi[i], small_[i]);
        // count entries of operands xs0 (per model), b, into r: in float32 with float_guard's
        // per-entry fallback to double, or in double. The operands are the block's, or (sparse)
        // its active entries gathered (common/active.h: the same bits).
        auto run = [&](const auto* const* xs0, const auto* b, float* r, std::size_t count) {
          using E = std::remove_cv_t<std::remove_reference_t<decltype(*b)>>;  // In, or float gathered
          auto part = [&](auto zero, std::size_t at, std::size_t n) -> std::uint32_t {
            const E* xs[trim_detail::kFusedModels];
            for (std::uint32_t i = 0; i < n_; ++i) xs[i] = xs0[i] + at;
            if constexpr (std::is_same_v<decltype(zero), float>) {
              return trim_detail::fused_f32<V::kElect>(n_, xs, lo.data(), hi.data(), weights_f_.data(), small_.data(),
                                                       b + at, lambda_f, normalize_, tiny, n, r + at);
            } else {
              trim_detail::fused<V::kElect>(n_, xs, lo.data(), hi.data(), w, b + at, lambda_, normalize_, n, r + at);
              return 0;
            }
          };
          if (!f32) return static_cast<void>(part(0.0, 0, count));
          auto f32_part = [&](std::size_t at, std::size_t n) { return part(0.0f, at, n); };
          float_guard::redo(count, f32_part(0, count), f32_part,
                            [&](std::size_t at, std::size_t n) { part(0.0, at, n); });
        };
        if (gathered) {
          active::Lanes& a = *gathered;
          run(a.xs, a.b, a.r, a.padded());
          active::fill_base_plus_f32(base + k0, m, sparse.z, out.data() + k0);
          active::scatter(a, out.data() + k0);
        } else {
          run(x.data(), base + k0, out.data() + k0, m);
        }
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
                  "\"tie_breaks_from_lists\":%llu,\"boundaries_from_windows\":%llu,"
                  "\"tensors_merged_in_selection_pass\":%llu}}",
                  static_cast<unsigned long long>(selector_.tensors_by_executions(0)),
                  static_cast<unsigned long long>(selector_.tensors_by_executions(1)),
                  static_cast<unsigned long long>(selector_.tensors_by_executions(2)),
                  static_cast<unsigned long long>(selector_.tensors_by_executions(3)),
                  static_cast<unsigned long long>(selector_.tie_breaks()),
                  static_cast<unsigned long long>(selector_.listed_tie_breaks()),
                  static_cast<unsigned long long>(selector_.window_resolved()),
                  static_cast<unsigned long long>(selector_.speculated()));
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
                    "%llu boundaries resolved by tie counts, %llu settled from the chunks' windows in the "
                    "histogram's pass, %llu tensors merged in the selection pass (every nonzero entry kept)",
                    static_cast<unsigned long long>(selector_.tensors_by_executions(1)),
                    static_cast<unsigned long long>(selector_.tensors_by_executions(2)),
                    static_cast<unsigned long long>(selector_.tensors_by_executions(3)),
                    static_cast<unsigned long long>(selector_.tie_breaks()),
                    static_cast<unsigned long long>(selector_.window_resolved()),
                    static_cast<unsigned long long>(selector_.speculated()));
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
    if (!V::kGamma) return {i, k, true};
    return {i, j % 2 == 0 ? a + k : a, j % 2 == 0};
  }

  const sdk::Job& job_;
  std::uint32_t n_;
  std::vector<double> density_, gamma_, weights_;
  double lambda_;
  bool normalize_;
  std::vector<double> sum_weights_;  // no election: w_i * lambda / (normalize ? sum w : 1)
  bool elect_f32_ = false;           // the election may run in float32 (see the constructor)
  std::vector<float> weights_f_;     // float32 weights: the election's w_i, or sum_weights_
  std::vector<std::uint32_t> small_;  // election: trim_detail::small_key of each weight
  topk::Selector selector_;
};

}  // namespace conflux::plugins

// The passes of a TrimMerge strategy S: the selection (a repeating tensor reduce on the task
// vectors, skipped when nothing is trimmed) and the merge. Both read BF16 tensors as stored
// (CFX_PASS_BF16_INPUTS: straight from the mapped files, without the host's conversion).
#define CONFLUX_TRIM_MERGE_PLUGIN(S)                                                                    \
  CONFLUX_PLUGIN(S,                                                                                     \
                 ::conflux::sdk::only_if<S, &S::selecting>(                                             \
                     ::conflux::sdk::reduce_pass<S, std::uint32_t, 0, &S::reduce, &S::combine, &S::done>( \
                         CFX_PASS_TENSOR_REDUCE, CFX_PASS_BF16_INPUTS | CFX_PASS_SPECULATIVE_OUTPUT)),  \
                 ::conflux::sdk::map_pass<S, &S::map>(CFX_PASS_BF16_INPUTS))
