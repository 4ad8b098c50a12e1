// TIES sign election and disjoint merge (Yadav et al. 2023, mergekit's consensus_method "sum"),
// shared by the ties / breadcrumbs_ties / dare_ties / della plugins. Header-only, no state.
//
// DEFINITION (per entry; i runs over the models in index order, all arithmetic in double):
//   W_i   = w_i * d_i          d_i the (trimmed / dropped / rescaled) task-vector entry, w_i the
//                              model's weight; the caller forms W_i (e.g. w_i * double(d_i))
//   vote  = sum_i W_i          s = +1 when vote >= 0 (a zero sum counts as +), else -1
//   agree_i = (sign W_i == s)  an entry with W_i == 0 has no sign and never agrees
//   merged = sum_i [agree_i] W_i                                        (normalize = false)
//          = sum_i [agree_i] W_i / sum_i [agree_i] w_i, 0 where that divisor is 0
//                                                                       (normalize = true)
// The caller then forms its output, e.g. out = base + lambda * merged.
// Difference from mergekit: mergekit replaces a zero divisor by 1. The two differ only when
// agreeing weights of mixed signs cancel exactly (negative weights); with positive weights a
// zero divisor means no model agrees and both give 0.
//
// USAGE (blockwise, the vectorization style of plugins/ram.cc: one loop per model per block,
// double lanes only; CONFLUX_MULTIVERSION picks AVX-512 / AVX2 / SSE2 at load time, with the
// same bits on every CPU since each entry's arithmetic is element-wise IEEE in a fixed order):
//
//   #include "common/sign_election.h"
//   namespace se = conflux::plugins::sign_election;
//   double W[n][m], w[n];             // or recompute W_i per phase (it must give the same bits)
//   se::Block b;  b.clear(m);         // m <= se::kBlock
//   for (i = 0; i < n; ++i) se::vote(W[i], m, b);              // phase 1: all votes first
//   for (i = 0; i < n; ++i) se::agree(W[i], w[i], m, b);       // phase 2: disjoint sums
//   se::finish(b, m, normalize, merged);                        // merged[k], double
//
// Convenience for W_i = w_i * double(d_i) straight from float32 task vectors (entries the caller
// dropped are 0 in d): se::vote_scaled(d, w, m, b), se::agree_scaled(d, w, m, b).
//
// Equivalent single pass (same bits): per entry, in model order, vote += W_i and per sign
// pos += W_i > 0 ? W_i : 0, neg += W_i < 0 ? W_i : 0 (and likewise the weights); then take
// the elected sign's pair. The terms and their order are those of agree (others add +0).
// trim_merge.h's fused_block does this with all models in registers.
#pragma once

#include <conflux/plugin.hpp>

#include <algorithm>
#include <cstddef>

namespace conflux::plugins::sign_election {

// Block length the Block arrays hold (entries per call; 3 * 8 KiB of doubles on the stack).
inline constexpr std::size_t kBlock = 1024;

struct Block {
  double vote[kBlock];   // sum_i W_i
  double sum[kBlock];    // sum_i [agree_i] W_i
  double div[kBlock];    // sum_i [agree_i] w_i
  // Zeroes the first m entries of every array.
  void clear(std::size_t m) {
    std::fill_n(vote, m, 0.0);
    std::fill_n(sum, m, 0.0);
    std::fill_n(div, m, 0.0);
  }
};

// Phase 1: vote[k] += W[k].
CONFLUX_MULTIVERSION static inline void vote(const double* W, std::size_t m, Block& b) {
  for (std::size_t k = 0; k < m; ++k) b.vote[k] += W[k];
}

// Phase 1 with W = w * double(d).
CONFLUX_MULTIVERSION static inline void vote_scaled(const float* d, double w, std::size_t m, Block& b) {
  for (std::size_t k = 0; k < m; ++k) b.vote[k] += w * static_cast<double>(d[k]);
}

// Phase 2 (after every model voted): where W[k] has the elected sign, sum[k] += W[k] and
// div[k] += w.
CONFLUX_MULTIVERSION static inline void agree(const double* W, double w, std::size_t m, Block& b) {
  for (std::size_t k = 0; k < m; ++k) {
    const double x = W[k];
    const bool up = b.vote[k] >= 0.0;
    const bool on = (up & (x > 0.0)) | (!up & (x < 0.0));  // bitwise: no branches, vectorizes
    b.sum[k] += on ? x : 0.0;
    b.div[k] += on ? w : 0.0;
  }
}

// Phase 2 with W = w * double(d).
CONFLUX_MULTIVERSION static inline void agree_scaled(const float* d, double w, std::size_t m, Block& b) {
  for (std::size_t k = 0; k < m; ++k) {
    const double x = w * static_cast<double>(d[k]);
    const bool up = b.vote[k] >= 0.0;
    const bool on = (up & (x > 0.0)) | (!up & (x < 0.0));
    b.sum[k] += on ? x : 0.0;
    b.div[k] += on ? w : 0.0;
  }
}

// merged[k] = sum[k] / div[k] (0 where div[k] == 0) when normalize, else sum[k].
CONFLUX_MULTIVERSION static inline void finish(const Block& b, std::size_t m, bool normalize, double* merged) {
  if (normalize) {
    for (std::size_t k = 0; k < m; ++k) merged[k] = b.div[k] != 0.0 ? b.sum[k] / b.div[k] : 0.0;
  } else {
    for (std::size_t k = 0; k < m; ++k) merged[k] = b.sum[k];
  }
}

}  // namespace conflux::plugins::sign_election
