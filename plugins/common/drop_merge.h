// Random-drop merges: DARE (Yu et al. 2023, arXiv 2311.03099) and DELLA (Deep et al. 2024,
// arXiv 2406.11617), each followed by task arithmetic (dare_linear, della_linear) or by the TIES
// sign election (dare_ties, della). One implementation, four plugins (plugins/dare_linear.cc,
// dare_ties.cc, della.cc, della_linear.cc), mergekit's parameter names and defaults.
//
// DEFINITION (per tensor; i runs over the models, d_i = theta_i - theta_base in float32, as the
// host would form it: the plugins read raw values and subtract in their kernels):
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
//
// ARITHMETIC. Each entry is computed in T and rounded once to float32 (then by the host to the
// output dtype): T = float32 for DARE when the tensor's output is BF16 (sdk::Chunk::
// float32_suffices, plugin.h CFX_FLOAT32_OUTPUT_BITS), the models fit one group (kGroup) and,
// for the election, no weight is negative; else T = double (DELLA always: its ranking, not the
// arithmetic, is its cost). Float32 entries whose terms may cancel are computed again in double
// (common/float_guard.h; redo), so every entry is within 1 BF16 ulp of the double one.
//   - q, 1 - q and the survivor factor c_i = w_i / q (w_i without rescale) are computed in
//     double, as written above. T = double: W_i = c_i * double(d_i). T = float: c_i is rounded
//     to float and W_i = float(c_i) * d_i in float.
//   - The keep decision is the same in both: u is a float multiple of 2^-24, and double(u) >=
//     1 - q exactly when u >= keep_threshold(1 - q), the smallest float >= 1 - q.
//   - linear: acc = ((0 + W_0) + W_1) + ... in model order, out = base + f * acc with
//     f = lambda * (normalize ? 1 / sum_i w_i : 1) computed in double (then rounded to T).
//   - ties: sign_election.h in its single-pass form: per entry, in model order, vote += W_i and
//     per sign the sums of the W_i and of the w_i; merged = the elected sign's sum (divided by
//     its weights with normalize, 0 where they sum to 0); out = base + lambda * merged. In
//     T = float the vote, the sums of the agreeing W_i and w_i and the division are in float,
//     and whether W_i agrees is the sign of w_i * d_i (also where the float product underflows).
//     The elected sign is discontinuous: an entry whose float vote is too small against its
//     terms to be sure of the sign (|vote| * 2^12 < sum |W_i|) goes to double, as do entries
//     whose terms fall below 2^-100 (float products may underflow there).
//   With T = double every entry has the bits of the definition evaluated in double in this
//   order (the float64 reference's). With T = float the result is within 1 BF16 ulp of it: the
//   entries where the terms may cancel far below the magnitudes they combine are redone in
//   double (the decision depends on the entry alone, so chunking changes nothing).
// The keep decisions depend only on (seed, tensor name, model index, element index) and, for
// DELLA, on the row's magnitudes: the output is bit-identical at any thread count and chunking.
// With epsilon = 0 (or rows of one entry) every q is density and DELLA runs DARE's code, so
// della / della_linear with epsilon 0 give the bits of dare_ties / dare_linear.
//
// IMPLEMENTATION. DARE: blocks of kBlock entries, one sweep over up to kGroup models at once
// (operands in registers, vectorized; more models carry the per-entry sums between groups, in
// the same order) that draws each entry's uniforms itself, by the host's definition (draw), and
// counts the kept entries as it goes. A zero entry's W is 0 kept or not, so the count takes the
// kept nonzero entries exactly and the zeros at their expectation (as DELLA's below; the
// report's total differs from the count of every draw only in the zeros). With one group (at
// most kGroup models), in either arithmetic, a sparse block (at most half its entries with some
// nonzero d_i: RL task vectors) runs the same sweep on its active entries only, gathered with
// their element indices, which they draw for (common/active.h); the rest get base + z, z the
// empty merge's term: the same bits, about a sixth of the draws on the benchmark (dare_ties went
// from 1.55x to 1.37x the floor with BF16 output; with F32 output its CPU time fell by 43%).
// DELLA: groups of whole rows; per row and model the entries are split (AVX-512 compress where
// available; the draws by the same definition: RowDraws) into zeros, which take ranks 0 .. Z-1
// in index order, and nonzero entries, ranks Z .. L-1. A zero's W is 0 whether it is kept or
// not, so no keep decision is made for zeros (the AVX-512 split does not even draw them; the
// portable one fills every draw, vectorized, and ignores the zeros'): the kept count takes them
// at their expectation, sum_{r<Z} P(keep at rank r), an exact integer in units of 2^-24 from the
// tables (sparse task vectors are mostly zeros: della on the benchmark went from 1.98x to 1.71x
// the floor). Only a nonzero entry whose draw reaches the row's lowest threshold can be kept;
// when few do (low keep probabilities, sparse task vectors) their ranks are counted directly
// with vector compares, else the nonzero entries are radix-sorted on the key bits that vary
// within the row. Kept entries' W are added, model by model, into the sums of a cell per entry
// with a kept term (DellaPool: packed, zero at rest; skipping a zero W leaves a sum's bits
// unchanged: the sums start at +0 and never become -0). Thresholds and factors by rank come
// from tables per row length, built once per job.
#pragma once

#include <conflux/plugin.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "active.h"
#include "float_guard.h"
#include "inputs.h"

// AVX-512 kernels for DELLA's rows (chosen at run time when the CPU has AVX-512; a build may
// define CONFLUX_DROP_MERGE_AVX512=0 to leave only the portable ones).
#ifndef CONFLUX_DROP_MERGE_AVX512
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CONFLUX_DROP_MERGE_AVX512 1
#else
#define CONFLUX_DROP_MERGE_AVX512 0
#endif
#endif
#if CONFLUX_DROP_MERGE_AVX512
#include <immintrin.h>
#elif defined(__x86_64__) && defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace conflux::plugins::drop_merge {

namespace sdk = conflux::sdk;
namespace fg = conflux::plugins::float_guard;

enum class Drop { dare, della };

// DARE: entries per block (one pass of a group of models' sweep; its sums stay in L1).
inline constexpr std::size_t kBlock = 1024;
// Models per sweep: their operands fit in registers.
inline constexpr std::uint32_t kGroup = 4;
// DELLA: entries per group of whole rows (at least one row) whose sums one finish computes:
// about one row of the benchmark's, so the finish reads sums (40 bytes an entry) still in L1
// (measured: 24% fewer CPU samples for della than with 4096; 256 gave the same as 1024).
inline constexpr std::size_t kRowGroup = 1024;
// DELLA: bytes of rank tables kept for the job (row lengths beyond it get theirs per chunk).
inline constexpr std::size_t kTableBudget = std::size_t{16} << 20;

// The smallest float f with double(f) >= p: for a float u, double(u) >= p exactly when u >= f,
// so the keep decision runs in float lanes in both arithmetics.
inline float keep_threshold(double p) {
  float f = static_cast<float>(p);
  if (static_cast<double>(f) < p) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

// ----------------------------------------------------------------------------------------------
// Shared kernels
// ----------------------------------------------------------------------------------------------

// DARE draws its uniforms inside its sweeps, by the host's definition (plugin.h,
// cfx_host::random_uniform, stable forever): u = m * 2^-24 with m = draw(k0, salt, lo32(e)) for
// element e of the stream of key (k0, k1), salt = k1 ^ hi32(e) * 0x9E3779B9. Drawn in registers,
// the uniforms need no buffer, no second sweep to count the kept entries, and no host call.
inline std::uint32_t fmix32(std::uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  return h ^ (h >> 16);
}
inline std::uint32_t draw(std::uint32_t k0, std::uint32_t salt, std::uint32_t lo) {
  return fmix32(fmix32(lo ^ k0) ^ salt) >> 8;
}
// The draws m lie in [0, kDrawOne): 24 bits.
inline constexpr unsigned kDrawBits = 24;
inline constexpr std::uint32_t kDrawOne = std::uint32_t{1} << kDrawBits;
// u >= pf exactly when m >= keep_from(pf) (m is an integer, u = m * 2^-24 exactly).
inline std::uint32_t keep_from(float pf) {
  return pf <= 0.0f ? 0u : static_cast<std::uint32_t>(std::ceil(static_cast<double>(pf) * 0x1p24));
}

// The draws of one model's stream over a DELLA row that starts at element e: entry k of the row
// draws at(k). A row of fewer than 2^31 entries crosses at most one multiple of 2^32 in element
// index, at entry `cut` (2^31 when it crosses none): the salt changes there.
struct RowDraws {
  std::uint32_t k0 = 0, lo = 0, salt_lo = 0, salt_hi = 0, cut = 0;
  RowDraws(std::uint64_t key, std::uint64_t e)
      : k0(static_cast<std::uint32_t>(key)),
        lo(static_cast<std::uint32_t>(e)),
        salt_lo(static_cast<std::uint32_t>(key >> 32) ^ (static_cast<std::uint32_t>(e >> 32) * 0x9E3779B9u)),
        salt_hi(static_cast<std::uint32_t>(key >> 32) ^ (static_cast<std::uint32_t>((e >> 32) + 1) * 0x9E3779B9u)),
        cut(static_cast<std::uint32_t>(std::min<std::uint64_t>((std::uint64_t{1} << 32) - lo, std::uint64_t{1} << 31))) {}
  std::uint32_t at(std::size_t k) const {
    const auto kk = static_cast<std::uint32_t>(k);
    return draw(k0, kk < cut ? salt_lo : salt_hi, lo + kk);
  }
};

// The keep decisions of up to 4 models for entry k of a block whose draws are
// draw(k0[j], salt[j], lo + k), or with Gathered draw(k0[j], salt[j], lo + idx[k]): whether the
// draw reaches `from` (named members: a sweep's copy of them becomes registers the vectorizer
// sees).
template <unsigned G, bool Gathered = false>
struct Draws {
  std::uint32_t a0, a1, a2, a3, z0, z1, z2, z3, lo, from;
  const std::uint32_t* idx;
  Draws(const std::uint32_t* k0, const std::uint32_t* salt, std::uint32_t first, std::uint32_t keep,
        const std::uint32_t* index = nullptr)
      : a0(k0[0]), a1(k0[G > 1 ? 1 : 0]), a2(k0[G > 2 ? 2 : 0]), a3(k0[G > 3 ? 3 : 0]),
        z0(salt[0]), z1(salt[G > 1 ? 1 : 0]), z2(salt[G > 2 ? 2 : 0]), z3(salt[G > 3 ? 3 : 0]),
        lo(first), from(keep), idx(index) {}
  void at(std::size_t k, bool& on0, bool& on1, bool& on2, bool& on3) const {
    const std::uint32_t e = lo + (Gathered ? idx[k] : static_cast<std::uint32_t>(k));
    on0 = draw(a0, z0, e) >= from;
    on1 = G > 1 && draw(a1, z1, e) >= from;
    on2 = G > 2 && draw(a2, z2, e) >= from;
    on3 = G > 3 && draw(a3, z3, e) >= from;
  }
};

// Per-entry state of the election while models are added (sign_election.h's single-pass form):
// vote = sum W_i (double in both arithmetics), and per sign the sums of W_i and w_i.
template <class T>
struct Election {
  double* vote;
  T *pos, *neg, *pos_w, *neg_w;
};

// Storage for an Election (grown by reserve, never shrunk: it is reused).
template <class T>
struct ElectionStore {
  std::vector<double> vote;
  std::vector<T> pos, neg, pos_w, neg_w;
  void reserve(std::size_t m) {
    if (vote.size() >= m) return;
    vote.resize(m);
    pos.resize(m);
    neg.resize(m);
    pos_w.resize(m);
    neg_w.resize(m);
  }
  Election<T> at(std::size_t k) { return {vote.data() + k, pos.data() + k, neg.data() + k, pos_w.data() + k, neg_w.data() + k}; }
};

// A vector of at least m elements (grown, never shrunk).
template <class V>
V* at_least(std::vector<V>& v, std::size_t m) {
  if (v.size() < m) v.resize(m);
  return v.data();
}

// Per-entry sums in one arithmetic: a linear merge's and an election's.
template <class V>
struct Sums {
  std::vector<V> acc;
  ElectionStore<V> election;
};

// v where on, else +0: a select on the bits (signs are coin flips, and a branch on them costs
// more than the arithmetic; a multiply by 0 or 1 would turn an infinite W into NaN).
inline double masked(double v, bool on) {
#if defined(__x86_64__) && defined(__SSE2__)
  // The mask moves to the vector register, not the value to an integer one and back.
  const __m128d mask = _mm_castsi128_pd(_mm_cvtsi64_si128(-static_cast<long long>(on)));
  return _mm_cvtsd_f64(_mm_and_pd(mask, _mm_set_sd(v)));
#else
  std::uint64_t b;
  std::memcpy(&b, &v, sizeof b);
  b &= 0 - static_cast<std::uint64_t>(on);
  std::memcpy(&v, &b, sizeof b);
  return v;
#endif
}

// elect<double, Normalize> (below) for one entry at a time: a divisor of 1 (one agreeing model
// of weight 1, the common case in sparse task vectors) skips the division's latency. The same
// bits: x / 1 is x for every x that is not a signaling NaN, and the sums are results of
// arithmetic.
template <bool Normalize>
inline double elect_one(double vote, double pos, double neg, double pos_w, double neg_w) {
  const bool up = vote >= 0.0;  // a zero vote counts as +
  const double sum = up ? pos : neg;
  if constexpr (Normalize) {
    const double div = up ? pos_w : neg_w;
    if (div == 1.0) return sum;
    return div != 0.0 ? sum / div : 0.0;
  } else {
    return sum;
  }
}

// DELLA's state for one entry of a group of rows (double) that got a kept term: the sums of the
// election (DellaVotes) or of the linear merge (DellaAcc), and the entry k it belongs to.
// merged() is the entry's merged task vector (the output is base + factor * merged); a cell of
// zeros gives the empty merge's.
// ElectionTerm<double>::add without branches on the signs (coin flips): the selects as masks.
template <bool Normalize>
struct DellaVotes {
  double vote = 0, pos = 0, neg = 0, pos_w = 0, neg_w = 0;
  std::uint32_t k = 0;
  void add(double W, double w) {
#if defined(__x86_64__) && defined(__SSE2__)
    // The selects as SSE2 masks (compare, and): no round trip of the values through integer
    // registers, as masked() takes.
    const __m128d Wv = _mm_set_sd(W), wv = _mm_set_sd(w), zero = _mm_setzero_pd();
    const __m128d up = _mm_cmpgt_sd(Wv, zero), down = _mm_cmplt_sd(Wv, zero);
    vote += W;
    pos += _mm_cvtsd_f64(_mm_and_pd(up, Wv));
    neg += _mm_cvtsd_f64(_mm_and_pd(down, Wv));
    pos_w += _mm_cvtsd_f64(_mm_and_pd(up, wv));
    neg_w += _mm_cvtsd_f64(_mm_and_pd(down, wv));
#else
    const bool up = W > 0.0, down = W < 0.0;
    vote += W;
    pos += masked(W, up);
    neg += masked(W, down);
    pos_w += masked(w, up);
    neg_w += masked(w, down);
#endif
  }
  double merged() const { return elect_one<Normalize>(vote, pos, neg, pos_w, neg_w); }
};
struct DellaAcc {
  double acc = 0;
  std::uint32_t k = 0;
  void add(double W, double) { acc += W; }
  double merged() const { return acc; }
};

// The cells of a group of rows. Sparse task vectors leave most entries without a kept term, so
// an entry gets a cell at its first kept term, the next of a pool used in order (slot[k]: its
// cell, 0 for none), and the finish visits the used cells only. The used cells are packed and
// stay in the nearest cache; a dense array of the row's sums (40 bytes an entry) did not, and
// its loads were the largest stall in della's profile. Both arrays are zero at rest: the
// finish clears what the group used.
template <class Cell>
struct DellaPool {
  std::vector<Cell> cell;           // 1 .. used; cell 0 is never used
  std::vector<std::uint32_t> slot;  // by entry of the group
  std::uint32_t used = 0;
  void reserve(std::size_t m) {
    if (slot.size() < m) {
      slot.resize(m, 0);
      cell.resize(m + 1);
    }
  }
  // Adds W (weight w) to entry k's cell.
  void add(std::uint32_t k, double W, double w) {
    std::uint32_t s = slot[k];
    const bool fresh = s == 0;  // rarely false in sparse task vectors: no branch on it
    s = fresh ? used + 1 : s;
    used += fresh ? 1 : 0;
    slot[k] = s;
    Cell& c = cell[s];
    c.k = k;
    c.add(W, w);
  }
};

// Working memory of one map call, reused by later calls (allocating it per chunk made the
// allocator hand memory back to the system and fault it in again: page faults and TLB
// shootdowns cost more than some kernels).
struct Scratch {
  std::vector<std::uint32_t> key, idx, mnz, cand, rank, draw;
  std::vector<std::uint64_t> a, b;
  // DARE: state carried between groups of models (overwritten by the first group).
  Sums<float> carry_f;
  Sums<double> carry_d;
  // DELLA (double): the cells the rows' kept entries are added into (zero at rest).
  DellaPool<DellaVotes<true>> votes;
  DellaPool<DellaVotes<false>> votes_unnormalized;
  DellaPool<DellaAcc> accs;

  template <class Cell>
  DellaPool<Cell>& cells() {
    if constexpr (std::is_same_v<Cell, DellaAcc>)
      return accs;
    else if constexpr (std::is_same_v<Cell, DellaVotes<true>>)
      return votes;
    else
      return votes_unnormalized;
  }

  template <class V>
  Sums<V>& carry() {
    if constexpr (std::is_same_v<V, double>)
      return carry_d;
    else
      return carry_f;
  }
};

// Scratch objects for concurrent map calls: one per thread in use, handed out under a lock
// (once per chunk).
class ScratchPool {
 public:
  class Lease {
   public:
    Lease(ScratchPool& pool, std::unique_ptr<Scratch> s) : pool_(pool), s_(std::move(s)) {}
    Lease(const Lease&) = delete;
    Lease& operator=(const Lease&) = delete;
    ~Lease() { pool_.put(std::move(s_)); }
    Scratch& operator*() const { return *s_; }

   private:
    ScratchPool& pool_;
    std::unique_ptr<Scratch> s_;
  };

  Lease get() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (free_.empty()) return Lease(*this, std::make_unique<Scratch>());
    std::unique_ptr<Scratch> s = std::move(free_.back());
    free_.pop_back();
    return Lease(*this, std::move(s));
  }

 private:
  void put(std::unique_ptr<Scratch> s) {
    std::lock_guard<std::mutex> lock(mutex_);
    free_.push_back(std::move(s));
  }
  std::mutex mutex_;
  std::vector<std::unique_ptr<Scratch>> free_;
};

// The elected result of one entry: the sum of the agreeing W (divided by their weights).
template <class T, bool Normalize>
inline T elect(double vote, T pos, T neg, T pos_w, T neg_w) {
  const bool up = vote >= 0.0;  // a zero vote counts as +
  const T sum = up ? pos : neg;
  if constexpr (Normalize) {
    const T div = up ? pos_w : neg_w;
    return div != T(0) ? sum / div : T(0);
  } else {
    return sum;
  }
}

// out[k] = base[k] + f * acc[k], rounded once; acc[k] = 0 again (sums kept zero at rest are
// not cleared in a separate pass).
template <class T, class In>
CONFLUX_MULTIVERSION void finish_sum(const In* base, T* acc, std::size_t m, T f, float* out) {
  for (std::size_t k = 0; k < m; ++k) {
    out[k] = static_cast<float>(static_cast<T>(value(base, k)) + f * acc[k]);
    acc[k] = T(0);
  }
}

// out[k] = base[k] + lambda * elected[k], rounded once; the state is zero again. (The arrays
// are distinct: __restrict spares the vectorizer more run-time alias checks than it makes.)
template <class T, bool Normalize, class In>
CONFLUX_MULTIVERSION void finish_election_arrays(const In* __restrict base, double* __restrict vote,
                                                 T* __restrict pos, T* __restrict neg, T* __restrict pos_w,
                                                 T* __restrict neg_w, std::size_t m, T lambda, float* __restrict out) {
  for (std::size_t k = 0; k < m; ++k) {
    out[k] = static_cast<float>(static_cast<T>(value(base, k)) +
                                lambda * elect<T, Normalize>(vote[k], pos[k], neg[k], pos_w[k], neg_w[k]));
    vote[k] = 0.0;
    pos[k] = neg[k] = pos_w[k] = neg_w[k] = T(0);
  }
}

template <class T, bool Normalize, class In>
void finish_election(const In* base, Election<T> e, std::size_t m, T lambda, float* out) {
  finish_election_arrays<T, Normalize>(base, e.vote, e.pos, e.neg, e.pos_w, e.neg_w, m, lambda, out);
}

// out[k] = float(double(base[k]) + z) for every k: the entries without a term (z = the output
// factor times the empty merge, whose bits the full expression would give them too). z is
// usually a zero of either sign: adding it is exact in float32 as in double (b, or +0 for
// b = -0 and z = +0; NaNs quieted alike), so the float32 sum gives the same bits without the
// conversions to double and back.
template <class In>
CONFLUX_MULTIVERSION void fill_base_plus(const In* __restrict base, std::size_t m, double z, float* __restrict out) {
  if (z == 0.0) return active::fill_base_plus_f32(base, m, static_cast<float>(z), out);
  for (std::size_t k = 0; k < m; ++k) out[k] = static_cast<float>(static_cast<double>(value(base, k)) + z);
}

// DELLA's finish of a group of m entries (double): out[k] = base[k] + factor * merged, rounded
// once, the bits of finish_election / finish_sum over the dense state. The entries without a
// cell from the base alone, then those with one from their cell; the pool is zero again after.
template <class Cell, class In>
void finish_della(const In* base, DellaPool<Cell>& p, std::size_t m, double factor, float* out) {
  fill_base_plus(base, m, factor * Cell{}.merged(), out);
  for (std::uint32_t s = 1; s <= p.used; ++s) {
    Cell& c = p.cell[s];
    const std::uint32_t k = c.k;
    out[k] = static_cast<float>(static_cast<double>(value(base, k)) + factor * c.merged());
    p.slot[k] = 0;
    c = Cell{};
  }
  p.used = 0;
}

// ----------------------------------------------------------------------------------------------
// DARE: fused sweeps over a group of up to kGroup models
// ----------------------------------------------------------------------------------------------

// One group's operands for a block: model j has values x[j] (float32, or stored BF16: see
// common/inputs.h; its task vector is x[j] - base, in float32 as the host would form it), the
// random stream (k0[j], salt[j]) whose draw for entry k of the block is draw(k0, salt, lo + k)
// (the block does not cross a multiple of 2^32 in element index), survivor factor c[j]
// (w / density or w, in T), weight w[j] and the sign of its weight s[j] (1, -1 or 0).
// idx (the sweeps of a sole group only: linear_sole, ties_sole): the operands are a block's
// active entries gathered (common/active.h), entry k being the block's entry idx[k], which it
// draws for.
// The sweeps add to counts[j] the entries of model j kept with a nonzero task-vector entry and
// to counts[kGroup + j] its nonzero entries (a zero adds nothing to a merge, kept or not: the
// plugin counts the zeros at their expectation).
template <class T, class In = float>
struct Group {
  const std::uint32_t* idx = nullptr;
  const In* x[kGroup];
  std::uint32_t k0[kGroup], salt[kGroup];
  std::uint32_t lo;
  T c[kGroup];
  T w[kGroup];
  float s[kGroup];
};

// A sweep's counts (Group): per model the kept entries with a nonzero task-vector entry, and the
// nonzero entries (d != 0 is true for a NaN too). Plain sums of 0/1 words, which vectorize.
struct Tally {
  std::uint32_t k0 = 0, k1 = 0, k2 = 0, k3 = 0, z0 = 0, z1 = 0, z2 = 0, z3 = 0;
  void add(bool on0, bool on1, bool on2, bool on3, float d0, float d1, float d2, float d3) {
    const std::uint32_t nz0 = d0 != 0.0f, nz1 = d1 != 0.0f, nz2 = d2 != 0.0f, nz3 = d3 != 0.0f;
    k0 += nz0 & static_cast<std::uint32_t>(on0);
    k1 += nz1 & static_cast<std::uint32_t>(on1);
    k2 += nz2 & static_cast<std::uint32_t>(on2);
    k3 += nz3 & static_cast<std::uint32_t>(on3);
    z0 += nz0;
    z1 += nz1;
    z2 += nz2;
    z3 += nz3;
  }
  template <unsigned G>
  void into(std::uint32_t* counts) const {
    const std::uint32_t kept[] = {k0, k1, k2, k3}, nonzero[] = {z0, z1, z2, z3};
    for (unsigned j = 0; j < G; ++j) {
      counts[j] += kept[j];
      counts[kGroup + j] += nonzero[j];
    }
  }
};

// Linear: acc[k] = acc_in[k] (0 without) + W_0 + W_1 + ... over the group's G models, in model
// order; with `out` (the last group), base + f * acc rounded to it instead.
// (Whether there is an acc_in and an out is a template argument: a run-time test in the loop
// keeps it from vectorizing.) Guard (float32, one group, with out): returns how many results
// fail float_guard's test, with magnitudes |base| + |f| * sum_i |W_i| over the kept terms.
template <class T, unsigned G, bool AccIn, bool Out, bool Guard, bool Gathered = false, class In>
CONFLUX_MULTIVERSION std::uint32_t linear_sweep_as(const Group<T, In>& g, std::uint32_t from, std::size_t m,
                                                   const T* acc_in, T* acc, const In* base, T f, float* out,
                                                   std::uint32_t* counts) {
  static_assert(G >= 1 && G <= kGroup);
  static_assert(!Guard || (Out && !AccIn));
  // Named locals: the vectorizer does not see through arrays of pointers.
  const In *x0 = g.x[0], *x1 = g.x[G > 1 ? 1 : 0], *x2 = g.x[G > 2 ? 2 : 0], *x3 = g.x[G > 3 ? 3 : 0];
  const Draws<G, Gathered> draws(g.k0, g.salt, g.lo, from, g.idx);
  const T c0 = g.c[0], c1 = g.c[G > 1 ? 1 : 0], c2 = g.c[G > 2 ? 2 : 0], c3 = g.c[G > 3 ? 3 : 0];
  const T fa = std::fabs(f);
  std::uint32_t unsafe = 0;
  Tally tally;
  for (std::size_t k = 0; k < m; ++k) {
    bool on0, on1, on2, on3;
    draws.at(k, on0, on1, on2, on3);
    // Every operand loaded before the selects (a load under a condition becomes a branch).
    const float b = value(base, k);
    const float d0 = value(x0, k) - b, d1 = G > 1 ? value(x1, k) - b : 0.0f, d2 = G > 2 ? value(x2, k) - b : 0.0f,
                d3 = G > 3 ? value(x3, k) - b : 0.0f;
    tally.add(on0, on1, on2, on3, d0, d1, d2, d3);
    const T t0 = on0 ? c0 * static_cast<T>(d0) : T(0);
    const T t1 = on1 ? c1 * static_cast<T>(d1) : T(0);
    const T t2 = on2 ? c2 * static_cast<T>(d2) : T(0);
    const T t3 = on3 ? c3 * static_cast<T>(d3) : T(0);
    T a = AccIn ? acc_in[k] : T(0);
    a += t0;
    if constexpr (G > 1) a += t1;
    if constexpr (G > 2) a += t2;
    if constexpr (G > 3) a += t3;
    if constexpr (Out) {
      const T r = static_cast<T>(b) + f * a;
      out[k] = static_cast<float>(r);
      if constexpr (Guard)
        unsafe += fg::unsafe(r, std::fabs(b) + fa * (std::fabs(t0) + std::fabs(t1) + std::fabs(t2) + std::fabs(t3)));
    } else {
      acc[k] = a;
    }
  }
  tally.into<G>(counts);
  return unsafe;
}

template <class T, unsigned G, class In>
void linear_sweep(const Group<T, In>& g, std::uint32_t from, std::size_t m, const T* acc_in, T* acc, const In* base,
                  T f, float* out, std::uint32_t* counts) {
  if (acc_in) {
    if (out) linear_sweep_as<T, G, true, true, false>(g, from, m, acc_in, acc, base, f, out, counts);
    else linear_sweep_as<T, G, true, false, false>(g, from, m, acc_in, acc, base, f, out, counts);
  } else {
    if (out) linear_sweep_as<T, G, false, true, false>(g, from, m, acc_in, acc, base, f, out, counts);
    else linear_sweep_as<T, G, false, false, false>(g, from, m, acc_in, acc, base, f, out, counts);
  }
}

// The sweep of a linear merge's only group (no carried sums), its entries in place or gathered
// (g.idx): in float32 with float_guard's test, returning how many results fail it; in double,
// exact (returns 0).
template <class T, bool Gathered, class In>
std::uint32_t linear_sole_n(unsigned n, const Group<T, In>& g, std::uint32_t from, std::size_t m, const In* base,
                            T f, float* out, std::uint32_t* counts) {
  constexpr bool G32 = std::is_same_v<T, float>;  // the guard
  switch (n) {
    case 1: return linear_sweep_as<T, 1, false, true, G32, Gathered>(g, from, m, nullptr, nullptr, base, f, out,
                                                                   counts);
    case 2: return linear_sweep_as<T, 2, false, true, G32, Gathered>(g, from, m, nullptr, nullptr, base, f, out,
                                                                   counts);
    case 3: return linear_sweep_as<T, 3, false, true, G32, Gathered>(g, from, m, nullptr, nullptr, base, f, out,
                                                                   counts);
    default: return linear_sweep_as<T, 4, false, true, G32, Gathered>(g, from, m, nullptr, nullptr, base, f, out,
                                                                      counts);
  }
}
template <class T, class In>
std::uint32_t linear_sole(unsigned n, const Group<T, In>& g, std::uint32_t from, std::size_t m, const In* base, T f,
                          float* out, std::uint32_t* counts) {
  if (g.idx) return linear_sole_n<T, true>(n, g, from, m, base, f, out, counts);
  return linear_sole_n<T, false>(n, g, from, m, base, f, out, counts);
}

// Adds model j's W to one entry's election state. T = double: exactly sign_election's terms.
// T = float (weights >= 0): the sums and the vote in float; agreement from the sign of s * d
// (w_i * d_i's sign, also where the float product underflows); for the guard, whether any term
// is nonzero (see ties_sweep; the magnitude of the vote's terms is pos - neg).
template <class T>
struct ElectionTerm {
  T vote = 0;
  T pos = 0, neg = 0, pos_w = 0, neg_w = 0;
  bool active = false;

  void add(float x, bool keep, T c, T w, float s) {
    const T W = keep ? c * static_cast<T>(x) : T(0);
    bool up, down;
    vote += W;
    if constexpr (std::is_same_v<T, double>) {
      (void)s;
      up = W > 0.0;
      down = W < 0.0;
    } else {
      const float sx = s * x;
      up = keep & (sx > 0.0f);
      down = keep & (sx < 0.0f);
      active = active | up | down;
    }
    pos += up ? W : T(0);
    neg += down ? W : T(0);
    pos_w += up ? w : T(0);
    neg_w += down ? w : T(0);
  }
};

// Ties: the group's G models added to each entry's election state (from `in`, else from 0);
// with `out` (the last group) the elected result base + lambda * merged is rounded to it,
// else the state is stored to `st`. Without Carry (one group) there is neither `in` nor a
// stored state, and the loop has no branches (it vectorizes).
// Guard (T = float, one group, weights >= 0): returns how many entries fail float_guard's test,
// each of: the float vote's sign may differ from the exact one (|vote| * 2^12 < sum |W_i|; an
// exact zero vote, which counts as +, is among them); the output cancels (|r| * 2^12 < |base| +
// |lambda * merged|; the agreeing terms share a sign, so the merged sum itself cannot cancel);
// or a nonzero term's magnitudes fall below 2^-100, where float products may underflow.
template <class T, unsigned G, bool Normalize, bool Carry, bool Guard, bool Gathered = false, class In>
CONFLUX_MULTIVERSION std::uint32_t ties_sweep(const Group<T, In>& g, std::uint32_t from, std::size_t m,
                                              const Election<T>* in, const Election<T>* st, const In* base, T lambda,
                                              float* out, std::uint32_t* counts) {
  static_assert(G >= 1 && G <= kGroup);
  static_assert(!Guard || (std::is_same_v<T, float> && !Carry));
  const In *x0 = g.x[0], *x1 = g.x[G > 1 ? 1 : 0], *x2 = g.x[G > 2 ? 2 : 0], *x3 = g.x[G > 3 ? 3 : 0];
  const Draws<G, Gathered> draws(g.k0, g.salt, g.lo, from, g.idx);
  const T c0 = g.c[0], c1 = g.c[G > 1 ? 1 : 0], c2 = g.c[G > 2 ? 2 : 0], c3 = g.c[G > 3 ? 3 : 0];
  const T w0 = g.w[0], w1 = g.w[G > 1 ? 1 : 0], w2 = g.w[G > 2 ? 2 : 0], w3 = g.w[G > 3 ? 3 : 0];
  const float s0 = g.s[0], s1 = g.s[G > 1 ? 1 : 0], s2 = g.s[G > 2 ? 2 : 0], s3 = g.s[G > 3 ? 3 : 0];
  std::uint32_t unsafe = 0;
  Tally tally;
  for (std::size_t k = 0; k < m; ++k) {
    bool on0, on1, on2, on3;
    draws.at(k, on0, on1, on2, on3);
    ElectionTerm<T> t;
    if (Carry && in) {
      t.vote = static_cast<T>(in->vote[k]);
      t.pos = in->pos[k];
      t.neg = in->neg[k];
      t.pos_w = in->pos_w[k];
      t.neg_w = in->neg_w[k];
    }
    const float b = value(base, k);
    const float d0 = value(x0, k) - b, d1 = G > 1 ? value(x1, k) - b : 0.0f, d2 = G > 2 ? value(x2, k) - b : 0.0f,
                d3 = G > 3 ? value(x3, k) - b : 0.0f;
    tally.add(on0, on1, on2, on3, d0, d1, d2, d3);
    t.add(d0, on0, c0, w0, s0);
    if constexpr (G > 1) t.add(d1, on1, c1, w1, s1);
    if constexpr (G > 2) t.add(d2, on2, c2, w2, s2);
    if constexpr (G > 3) t.add(d3, on3, c3, w3, s3);
    if (!Carry || out) {
      const T lm = lambda * elect<T, Normalize>(static_cast<double>(t.vote), t.pos, t.neg, t.pos_w, t.neg_w);
      const T r = static_cast<T>(b) + lm;
      out[k] = static_cast<float>(r);
      if constexpr (Guard) {
        const T mag = t.pos - t.neg;  // sum |W_i|: each sum's terms share its sign
        unsafe += fg::unsafe(t.vote, mag) | fg::unsafe(r, std::fabs(b) + std::fabs(lm)) |
                  static_cast<std::uint32_t>(t.active & (mag < 0x1p-100f));
      }
    } else {
      st->vote[k] = t.vote;
      st->pos[k] = t.pos;
      st->neg[k] = t.neg;
      st->pos_w[k] = t.pos_w;
      st->neg_w[k] = t.neg_w;
    }
  }
  tally.into<G>(counts);
  return unsafe;
}

template <class T, class In>
void linear_group(unsigned n, const Group<T, In>& g, std::uint32_t from, std::size_t m, const T* acc_in, T* acc,
                  const In* base, T f, float* out, std::uint32_t* counts) {
  switch (n) {
    case 1: return linear_sweep<T, 1>(g, from, m, acc_in, acc, base, f, out, counts);
    case 2: return linear_sweep<T, 2>(g, from, m, acc_in, acc, base, f, out, counts);
    case 3: return linear_sweep<T, 3>(g, from, m, acc_in, acc, base, f, out, counts);
    default: return linear_sweep<T, 4>(g, from, m, acc_in, acc, base, f, out, counts);
  }
}

template <class T, bool Normalize, bool Carry, bool Guard = false, bool Gathered = false, class In>
std::uint32_t ties_group_n(unsigned n, const Group<T, In>& g, std::uint32_t from, std::size_t m,
                           const Election<T>* in, const Election<T>* st, const In* base, T lambda, float* out,
                           std::uint32_t* counts) {
  switch (n) {
    case 1: return ties_sweep<T, 1, Normalize, Carry, Guard, Gathered>(g, from, m, in, st, base, lambda, out, counts);
    case 2: return ties_sweep<T, 2, Normalize, Carry, Guard, Gathered>(g, from, m, in, st, base, lambda, out, counts);
    case 3: return ties_sweep<T, 3, Normalize, Carry, Guard, Gathered>(g, from, m, in, st, base, lambda, out, counts);
    default: return ties_sweep<T, 4, Normalize, Carry, Guard, Gathered>(g, from, m, in, st, base, lambda, out, counts);
  }
}

// One group of a ties merge: the group is the only one (no carried state) or not.
template <class T, class In>
void ties_group(unsigned n, bool normalize, bool carry, const Group<T, In>& g, std::uint32_t from, std::size_t m,
                const Election<T>* in, const Election<T>* st, const In* base, T lambda, float* out,
                std::uint32_t* counts) {
  if (carry) {
    if (normalize) ties_group_n<T, true, true>(n, g, from, m, in, st, base, lambda, out, counts);
    else ties_group_n<T, false, true>(n, g, from, m, in, st, base, lambda, out, counts);
  } else {
    if (normalize) ties_group_n<T, true, false>(n, g, from, m, in, st, base, lambda, out, counts);
    else ties_group_n<T, false, false>(n, g, from, m, in, st, base, lambda, out, counts);
  }
}

// The sweep of a ties merge's only group, as linear_sole: float32 with the guard (returns its
// failures), or double (returns 0).
template <class T, class In>
std::uint32_t ties_sole(unsigned n, bool normalize, const Group<T, In>& g, std::uint32_t from, std::size_t m,
                        const In* base, T lambda, float* out, std::uint32_t* counts) {
  constexpr bool G32 = std::is_same_v<T, float>;  // the guard
  if (g.idx) {
    if (normalize)
      return ties_group_n<T, true, false, G32, true>(n, g, from, m, nullptr, nullptr, base, lambda, out, counts);
    return ties_group_n<T, false, false, G32, true>(n, g, from, m, nullptr, nullptr, base, lambda, out, counts);
  }
  if (normalize) return ties_group_n<T, true, false, G32>(n, g, from, m, nullptr, nullptr, base, lambda, out, counts);
  return ties_group_n<T, false, false, G32>(n, g, from, m, nullptr, nullptr, base, lambda, out, counts);
}
static_assert(kGroup == 4);

// ----------------------------------------------------------------------------------------------
// DELLA: splitting a row, ranking its nonzero entries
// ----------------------------------------------------------------------------------------------

// The magnitude key of x: its float32 bits without the sign (orders like |x|, NaNs last).
inline std::uint32_t key_of(float x) {
  std::uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits & 0x7FFFFFFFu;
}

// One row split into its nonzero entries (by magnitude key), in index order: the j-th has
// key[j], index idx[j] and draw mnz[j] (arrays of the row's length + 16 entries: vector stores
// run past the end). The row's zeros (rank z for the z-th) are not listed. The
// draws are the host's uniforms as integers, m = u * 2^24 (RowDraws: computed in registers by
// the AVX-512 split, into a buffer for the portable one), so the keep test u >= pf of the
// definition is the integer test m >= keep_from(pf).
struct RowSplit {
  std::uint32_t *key, *idx, *mnz;
  std::size_t nonzero = 0;
  std::uint32_t varying = 0;  // key bits that differ between the nonzero entries
};

// draw[k] = draws.at(k) for k < n (vectorized where the CPU allows: the host's generator is
// vectorized too, and the scalar split below cannot be).
CONFLUX_MULTIVERSION static inline void fill_draws(const RowDraws& draws, std::size_t n, std::uint32_t* draw) {
  const RowDraws d = draws;  // a local copy: its members become registers the vectorizer sees
  for (std::size_t k = 0; k < n; ++k) draw[k] = d.at(k);
}

// s.varying from the split's nonzero keys (few in a sparse row: cheaper than folding every
// entry of the row as it is split).
inline void set_varying(RowSplit& s) {
  std::uint32_t any = 0, all = ~0u;
  for (std::size_t j = 0; j < s.nonzero; ++j) {
    any |= s.key[j];
    all &= s.key[j];
  }
  s.varying = s.nonzero ? any & ~all : 0u;
}

// Splits the row of task vector x - base (float32, as the host would form it), given the row's
// draws. Branch-free: zeros and nonzeros interleave at random.
template <class In>
inline void split_row_scalar(const In* x, const In* base, const std::uint32_t* draw, std::size_t n, RowSplit& s) {
  std::size_t nz = 0;
  for (std::size_t k = 0; k < n; ++k) {
    const std::uint32_t bits = key_of(value(x, k) - value(base, k));
    s.key[nz] = bits;
    s.idx[nz] = static_cast<std::uint32_t>(k);
    s.mnz[nz] = draw[k];
    nz += bits != 0 ? 1 : 0;
  }
  s.nonzero = nz;
  set_varying(s);
}

#if CONFLUX_DROP_MERGE_AVX512
using conflux::plugins::have_avx512;

// Logical right shift of every lane (the zero-masked form: GCC 12's unmasked one trips
// -Wmaybe-uninitialized; an all-ones mask is the same instruction).
__attribute__((target("avx512f"))) inline __m512i shift_right(__m512i h, unsigned n) {
  return _mm512_maskz_srli_epi32(static_cast<__mmask16>(0xFFFF), h, n);
}
__attribute__((target("avx512f"))) inline __m512i fmix32_avx512(__m512i h) {
  h = _mm512_xor_si512(h, shift_right(h, 16));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(static_cast<int>(0x85EBCA6Bu)));
  h = _mm512_xor_si512(h, shift_right(h, 13));
  h = _mm512_mullo_epi32(h, _mm512_set1_epi32(static_cast<int>(0xC2B2AE35u)));
  return _mm512_xor_si512(h, shift_right(h, 16));
}

// split_row_scalar with AVX-512 compress (sparse task vectors: most entries are zeros, and the
// scalar split's dependency chain costs more than the rest of the row), then the draws of the
// nonzero entries only, from their indices (fmix32 on 16 lanes). _from: entries [k, n) of the
// row, the split so far holding nz entries (split_row_vbmi2 takes the first ones).
template <class In>
__attribute__((target("avx512f"))) inline void split_row_avx512_from(const In* x, const In* base,
                                                                     const RowDraws& draws, std::size_t n,
                                                                     RowSplit& s, std::size_t k, std::size_t nz) {
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i k0 = _mm512_set1_epi32(static_cast<int>(draws.k0));
  const __m512i lo = _mm512_set1_epi32(static_cast<int>(draws.lo));
  const __m512i salt_lo = _mm512_set1_epi32(static_cast<int>(draws.salt_lo));
  const __m512i salt_hi = _mm512_set1_epi32(static_cast<int>(draws.salt_hi));
  const __m512i cut = _mm512_set1_epi32(static_cast<int>(draws.cut));
  for (; k + 16 <= n; k += 16) {
    // The model's input one 4 KiB page (bf16) ahead: a row is read from each model in turn, a
    // few KiB of each, and the hardware prefetchers stop at page boundaries (measured: 6-9% less
    // CPU time for della on the benchmark; a hint that never faults past the end).
    _mm_prefetch(reinterpret_cast<const char*>(x + k + 2048), _MM_HINT_T0);
    const __m512 d = _mm512_sub_ps(load16(x + k), load16(base + k));
    const __m512i bits = _mm512_and_si512(_mm512_castps_si512(d), magnitude);
    const __mmask16 on = _mm512_test_epi32_mask(bits, bits);
    const __m512i index = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int>(k)));
    // Compress in registers, store whole vectors (memory-destination compress is slow on some
    // CPUs; the arrays have 16 entries of slack).
    _mm512_storeu_si512(s.key + nz, _mm512_maskz_compress_epi32(on, bits));
    _mm512_storeu_si512(s.idx + nz, _mm512_maskz_compress_epi32(on, index));
    nz += static_cast<unsigned>(__builtin_popcount(on));
  }
  // draw(k0, salt, lo + index), the salt of the indices at or past the cut being salt_hi (the
  // lanes past nz draw for stale indices, into the slack).
  for (std::size_t j = 0; j < nz; j += 16) {
    const __m512i index = _mm512_loadu_si512(s.idx + j);
    const __m512i salt = _mm512_mask_blend_epi32(_mm512_cmpge_epu32_mask(index, cut), salt_lo, salt_hi);
    const __m512i h = fmix32_avx512(_mm512_xor_si512(_mm512_add_epi32(lo, index), k0));
    _mm512_storeu_si512(s.mnz + j, shift_right(fmix32_avx512(_mm512_xor_si512(h, salt)), 8));
  }
  RowSplit tail{s.key + nz, s.idx + nz, s.mnz + nz};
  std::uint32_t tail_draws[16];
  for (std::size_t j = 0; j < n - k; ++j) tail_draws[j] = draws.at(k + j);
  split_row_scalar(x + k, base + k, tail_draws, n - k, tail);
  for (std::size_t j = nz; j < nz + tail.nonzero; ++j) s.idx[j] += static_cast<std::uint32_t>(k);
  s.nonzero = nz + tail.nonzero;
  set_varying(s);
}

template <class In>
inline void split_row_avx512(const In* x, const In* base, const RowDraws& draws, std::size_t n, RowSplit& s) {
  split_row_avx512_from(x, base, draws, n, s, 0, 0);
}

// 16 of the compressed entries of split_row_vbmi2 (stored 16-bit values x and b, their offsets
// in the block at, the block at element k; lanes past the compressed ones are zeros): their
// keys and row indices, less any whose task vector is zero after all (+0 against -0).
__attribute__((CONFLUX_GATHER_WIDE_TARGET, always_inline)) inline void split_half(__m512i x, __m512i b, __m512i at,
                                                                                  std::size_t k, unsigned count,
                                                                                  RowSplit& s, std::size_t& nz) {
  const __m512 d = _mm512_sub_ps(bf16_as_f32(x), bf16_as_f32(b));
  const __m512i key = _mm512_and_si512(_mm512_castps_si512(d), _mm512_set1_epi32(0x7FFFFFFF));
  const __m512i index = _mm512_add_epi32(at, _mm512_set1_epi32(static_cast<int>(k)));
  const __mmask16 on = _mm512_test_epi32_mask(key, key);
  if (on == static_cast<__mmask16>((1u << count) - 1)) {  // every one nonzero: as they are
    _mm512_storeu_si512(s.key + nz, key);
    _mm512_storeu_si512(s.idx + nz, index);
  } else {
    _mm512_storeu_si512(s.key + nz, _mm512_maskz_compress_epi32(on, key));
    _mm512_storeu_si512(s.idx + nz, _mm512_maskz_compress_epi32(on, index));
  }
  nz += static_cast<unsigned>(__builtin_popcount(on));
}

// split_row_avx512 for stored BF16 on AVX512-VBMI2 CPUs: 32 entries per step, picked on the
// stored bits (common/active.h, inf_or_nan16) and compressed as 16-bit values, then widened and
// subtracted (split_half drops the +0/-0 pairs): a fraction of the full-width widening on sparse
// task vectors.
__attribute__((CONFLUX_GATHER_WIDE_TARGET)) inline void split_row_vbmi2(const std::uint16_t* x,
                                                                        const std::uint16_t* base,
                                                                        const RowDraws& draws, std::size_t n,
                                                                        RowSplit& s) {
  using active::high16;
  using active::low16;
  const __m512i lanes = _mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13,
                                         12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  std::size_t nz = 0, k = 0;
  for (; k + 32 <= n; k += 32) {
    _mm_prefetch(reinterpret_cast<const char*>(x + k + 2048), _MM_HINT_T0);  // as split_row_avx512
    const __m512i rx = _mm512_loadu_si512(x + k), rb = _mm512_loadu_si512(base + k);
    const __mmask32 cand = _mm512_cmpneq_epi16_mask(rx, rb) | active::inf_or_nan16(rb);
    const auto count = static_cast<unsigned>(__builtin_popcount(cand));
    const __m512i cx = _mm512_maskz_compress_epi16(cand, rx), cb = _mm512_maskz_compress_epi16(cand, rb);
    const __m512i at = _mm512_maskz_compress_epi16(cand, lanes);
    split_half(low16(cx), low16(cb), low16(at), k, std::min(count, 16u), s, nz);
    if (count > 16) split_half(high16(cx), high16(cb), high16(at), k, count - 16, s, nz);
  }
  split_row_avx512_from(x, base, draws, n, s, k, nz);
}

// The candidates of a row: positions j (ascending) of the nonzero entries with mnz[j] >= from,
// into cand (nonzero + 16 entries); returns how many.
__attribute__((target("avx512f"))) inline std::size_t candidates_avx512(const std::uint32_t* mnz, std::size_t n,
                                                                       std::uint32_t from, std::uint32_t* cand) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i threshold = _mm512_set1_epi32(static_cast<int>(from));
  std::size_t c = 0;
  for (std::size_t j = 0; j < n; j += 16) {
    const __mmask16 valid = n - j >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - j)) - 1);
    const __mmask16 on = _mm512_mask_cmpge_epu32_mask(valid, _mm512_loadu_si512(mnz + j), threshold);
    const __m512i pos = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int>(j)));
    _mm512_storeu_si512(cand + c, _mm512_maskz_compress_epi32(on, pos));
    c += static_cast<std::size_t>(__builtin_popcount(on));
  }
  return c;
}

// The rank of nonzero entry j among key[0, n) (ascending key, equal keys by position): the
// entries before j with a key <= key[j] (< key[j] + 1) and those after it with a smaller key.
// key is padded to a multiple of 16 with 0xFFFFFFFF (above every magnitude key: never counted).
// The counts are added in a vector, per lane (a masked add per 16 keys), and summed once at the
// end: a mask's trip through a general register and popcnt per 16 keys cost twice the time.
__attribute__((target("avx512f"))) inline std::size_t rank_avx512(const std::uint32_t* key, std::size_t n,
                                                                 std::size_t j) {
  const __m512i below_or_equal = _mm512_set1_epi32(static_cast<int>(key[j] + 1));  // key[j] < 2^31
  const __m512i below = _mm512_set1_epi32(static_cast<int>(key[j]));
  const __m512i one = _mm512_set1_epi32(1);
  const std::size_t tj = j & ~std::size_t{15};
  __m512i count = _mm512_setzero_si512();
  for (std::size_t t = 0; t < tj; t += 16)
    count = _mm512_mask_add_epi32(count, _mm512_cmplt_epu32_mask(_mm512_loadu_si512(key + t), below_or_equal),
                                  count, one);
  const __m512i v = _mm512_loadu_si512(key + tj);
  const auto before = static_cast<__mmask16>((1u << (j - tj)) - 1);
  count = _mm512_mask_add_epi32(count,
                                _mm512_mask_cmplt_epu32_mask(before, v, below_or_equal) |
                                    _mm512_mask_cmplt_epu32_mask(static_cast<__mmask16>(~before), v, below),
                                count, one);
  for (std::size_t t = tj + 16; t < n; t += 16)
    count = _mm512_mask_add_epi32(count, _mm512_cmplt_epu32_mask(_mm512_loadu_si512(key + t), below), count, one);
  // The lanes' sum (zero-masked extracts: GCC 12's _mm512_reduce_add_epi32 and cast trip
  // -Wmaybe-uninitialized).
  const __m256i s8 = _mm256_add_epi32(_mm512_maskz_extracti64x4_epi64(static_cast<__mmask8>(0xFF), count, 0),
                                      _mm512_maskz_extracti64x4_epi64(static_cast<__mmask8>(0xFF), count, 1));
  __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
  s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
  return static_cast<std::size_t>(static_cast<std::uint32_t>(_mm_cvtsi128_si32(s4)));
}

// rank[e] = rank_avx512(key, n, cand[e]) for e < c (one call: the loop keeps its state in
// registers).
__attribute__((target("avx512f"))) inline void ranks_avx512(const std::uint32_t* key, std::size_t n,
                                                           const std::uint32_t* cand, std::size_t c,
                                                           std::uint32_t* rank) {
  for (std::size_t e = 0; e < c; ++e) rank[e] = static_cast<std::uint32_t>(rank_avx512(key, n, cand[e]));
}
#endif

// The row split of this CPU; `draw` holds n entries for the portable one.
template <class In>
inline void split_row(const In* x, const In* base, const RowDraws& draws, std::size_t n, std::uint32_t* draw,
                      RowSplit& s) {
#if CONFLUX_DROP_MERGE_AVX512
  if constexpr (std::is_same_v<In, std::uint16_t>)
    if (have_avx512() && active::have_vbmi2()) return split_row_vbmi2(x, base, draws, n, s);
  if (have_avx512()) return split_row_avx512(x, base, draws, n, s);
#endif
  fill_draws(draws, n, draw);
  split_row_scalar(x, base, draw, n, s);
}

// Calls visit(rank, j) for every nonzero entry j of a split row (in index order), rank being
// its position when sorted by key ascending, equal keys by position. An LSD radix sort on the
// `varying` bits only (the others are equal in every key, so they order nothing): digits of
// about log2(n) bits, so short rows clear and scan short histograms. The last pass does not
// store: the position it computes is the rank. a and b hold n entries.
template <class Visit>
void radix_ranks(const RowSplit& s, std::uint64_t* a, std::uint64_t* b, Visit&& visit) {
  const std::uint32_t* key = s.key;
  const std::size_t n = s.nonzero;
  constexpr unsigned kMaxWidth = 11, kMinWidth = 4, kMaxPasses = (31 + kMinWidth - 1) / kMinWidth;
  const unsigned lo = static_cast<unsigned>(__builtin_ctz(s.varying));
  const unsigned span = 32 - static_cast<unsigned>(__builtin_clz(s.varying)) - lo;
  const unsigned log_n = 64 - static_cast<unsigned>(__builtin_clzll(n));  // bits of n
  const unsigned max_width = std::clamp(log_n, kMinWidth, kMaxWidth);
  const unsigned passes = (span + max_width - 1) / max_width;
  unsigned shift[kMaxPasses];
  std::uint32_t mask[kMaxPasses];
  std::uint32_t* hist[kMaxPasses];
  std::uint32_t counts[3 << kMaxWidth];  // passes * 2^width <= 3 * 2^11 for every width chosen
  std::size_t used = 0;
  for (unsigned j = 0, sh = lo; j < passes; ++j) {
    const unsigned width = span / passes + (j < span % passes ? 1 : 0);
    shift[j] = sh;
    mask[j] = (1u << width) - 1;
    hist[j] = counts + used;
    used += std::size_t{1} << width;
    sh += width;
  }
  std::fill_n(counts, used, 0u);
  for (std::size_t e = 0; e < n; ++e)
    for (unsigned j = 0; j < passes; ++j) ++hist[j][(key[e] >> shift[j]) & mask[j]];
  for (unsigned j = 0; j < passes; ++j) {  // bucket starts, in place
    std::uint32_t sum = 0;
    for (std::uint32_t v = 0; v <= mask[j]; ++v) {
      const std::uint32_t c = hist[j][v];
      hist[j][v] = sum;
      sum += c;
    }
  }
  if (passes == 1) {
    for (std::size_t e = 0; e < n; ++e) visit(hist[0][(key[e] >> shift[0]) & mask[0]]++, static_cast<std::uint32_t>(e));
    return;
  }
  for (std::size_t e = 0; e < n; ++e)  // pass 0 packs (key, position) for the later passes
    a[hist[0][(key[e] >> shift[0]) & mask[0]]++] = (static_cast<std::uint64_t>(key[e]) << 32) | e;
  for (unsigned j = 1; j + 1 < passes; ++j) {
    for (std::size_t e = 0; e < n; ++e) {
      const std::uint64_t x = a[e];
      b[hist[j][(static_cast<std::uint32_t>(x >> 32) >> shift[j]) & mask[j]]++] = x;
    }
    std::swap(a, b);
  }
  const unsigned last = passes - 1;
  for (std::size_t e = 0; e < n; ++e) {
    const std::uint64_t x = a[e];
    visit(hist[last][(static_cast<std::uint32_t>(x >> 32) >> shift[last]) & mask[last]]++,
          static_cast<std::uint32_t>(x));
  }
}

// The ranks of every nonzero entry of a split row that may be kept: at least those with
// mnz[j] >= from_min, the lowest keep threshold of the row (the others are dropped whatever
// their rank). Returns how many, c: candidate e is entry cand[e] (ascending), of rank rank[e]
// among the nonzero entries (as radix_ranks). With one magnitude the rank is the position. With
// AVX-512 and few candidates (keep probabilities are low: most entries can be ruled out by their
// uniform alone), the candidates' ranks are counted directly (a vector compare per 16 entries
// and candidate) instead of sorting the row. cand and rank hold nonzero + 16 entries, a and b
// nonzero.
inline std::size_t rank_candidates(RowSplit& s, std::uint32_t from_min, std::uint32_t* cand, std::uint32_t* rank,
                                   std::uint64_t* a, std::uint64_t* b) {
  const std::size_t n = s.nonzero;
  auto every_entry = [&] {
    for (std::size_t j = 0; j < n; ++j) cand[j] = static_cast<std::uint32_t>(j);
  };
  if (n <= 1 || s.varying == 0) {
    every_entry();
    std::copy_n(cand, n, rank);
    return n;
  }
#if CONFLUX_DROP_MERGE_AVX512
  if (have_avx512()) {
    const std::size_t c = candidates_avx512(s.mnz, n, from_min, cand);
    // Counting costs c * n / 16 vector steps; the radix sort some 10 scalar steps per entry.
    if (c * ((n + 15) / 16) <= 8 * n) {
      std::fill_n(s.key + n, 16, 0xFFFFFFFFu);  // padding: above every key
      ranks_avx512(s.key, n, cand, c, rank);
      return c;
    }
  }
#endif
  (void)from_min;
  every_entry();
  radix_ranks(s, a, b, [&](std::size_t r, std::uint32_t j) { rank[j] = static_cast<std::uint32_t>(r); });
  return n;
}

// DELLA's keep thresholds and survivor factors by rank for rows of L entries:
// q_r = min(lo + r * step, 1), pf[r] = keep_threshold(1 - q_r), from[r] = keep_from(pf[r]) (the
// same test on the draw), cd[i * L + r] = w_i / q_r (or w_i without rescale), and
// zero_units[z] = sum_{r<z} (2^24 - from[r]): the expected number of kept entries among ranks
// 0 .. z-1 (a draw m is uniform on [0, 2^24)) in units of 2^-24, exact in integers.
struct RankTables {
  std::vector<float> pf;
  std::vector<std::uint32_t> from;
  std::vector<double> cd;
  std::vector<std::uint64_t> zero_units;

  RankTables(std::size_t L, double lo, double step, const std::vector<double>& weights, bool rescale)
      : pf(L), from(L), cd(weights.size() * L), zero_units(L + 1, 0) {
    for (std::size_t r = 0; r < L; ++r) {
      const double q = std::min(lo + static_cast<double>(r) * step, 1.0);
      pf[r] = keep_threshold(1.0 - q);
      from[r] = keep_from(pf[r]);
      zero_units[r + 1] = zero_units[r] + (kDrawOne - std::min(from[r], kDrawOne));
      for (std::size_t i = 0; i < weights.size(); ++i) cd[i * L + r] = rescale ? weights[i] / q : weights[i];
    }
  }
  static std::size_t bytes(std::size_t L, std::size_t n) {
    return L * (sizeof(float) + sizeof(std::uint32_t) + sizeof(std::uint64_t) + n * sizeof(double));
  }
  const double* factors(std::uint32_t i) const { return cd.data() + i * pf.size(); }
};

// Kept entries of one model: counted exactly where drawn, and DELLA's zeros (not drawn) at
// their expectation, in units of 2^-24 (RankTables::zero_units).
struct KeptCount {
  std::uint64_t exact = 0, zero_units = 0;
};

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
        kept_(new std::atomic<std::uint64_t>[n_]),
        kept_units_(new std::atomic<std::uint64_t>[n_]) {
    for (std::uint32_t i = 0; i < n_; ++i) kept_[i] = kept_units_[i] = 0;
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
    const double out_factor = T::ties ? lambda_ : lambda_ * (normalize_ ? 1.0 / sum : 1.0);
    drop_threshold_ = drop_ ? keep_threshold(1.0 - density_) : 0.0f;  // 0: u >= 0 keeps all
    keep_from_ = keep_from(drop_threshold_);
    zero_units_ = drop_ ? kDrawOne - std::min(keep_from_, kDrawOne) : 0;
    // DARE's per-model factor for survivors: w_i / density (rescale) or w_i.
    for (double x : weights_) {
      nonnegative_weights_ = nonnegative_weights_ && x >= 0;
      const double c = rescale_ ? x / density_ : x;
      const float sign = x > 0 ? 1.0f : x < 0 ? -1.0f : 0.0f;
      double_.add_model(c, x, sign);
      float_.add_model(c, x, sign);
    }
    double_.out_factor = out_factor;
    float_.out_factor = static_cast<float>(out_factor);
    if constexpr (kDella) {
      if (drop_) cache_tables(job);
    }
  }

  void map(const sdk::Chunk& c, sdk::Span<float> out) {
    const std::size_t count = out.size();
    std::vector<std::uint64_t> keys(drop_ ? n_ : 0);
    for (std::uint32_t i = 0; i < keys.size(); ++i) keys[i] = job_.random_key(c.tensor(), i);
    std::vector<KeptCount> kept(n_);
    bool della = false;
    if constexpr (kDella) {
      // Whole rows (CFX_PASS_WHOLE_ROWS).
      const auto len = static_cast<std::size_t>(c.tensor().row_length);  // numel (1) for a scalar
      if (len >= (std::size_t{1} << 31)) throw sdk::Error("della ranks rows of fewer than 2^31 entries");
      if (len == 0 || count % len != 0)
        throw sdk::Error("internal: della needs chunks of whole rows (chunk of " + std::to_string(count) +
                         " entries, rows of " + std::to_string(len) + ")");
      const auto [lo, step] = spread(len);
      // Without a spread every q is density: DARE's arithmetic, which needs no ranks.
      della = drop_ && !(step == 0.0 && lo == density_);
      if (della) {
        with_inputs(c, [&](auto models, auto base) { run_della(c, models, base, len, keys, kept, out.data()); });
      }
    }
    if (!della) {
      // Float32 (a BF16 output) in one group of models, with float_guard's fallback to double;
      // the election only with weights >= 0, whose agreeing terms cannot cancel. Stored BF16
      // inputs for the DARE plugins (CFX_PASS_BF16_INPUTS), float32 otherwise.
      with_inputs(c, [&](auto models, auto base) {
        if (c.float32_suffices() && n_ <= kGroup && (!T::ties || nonnegative_weights_))
          run_dare<float>(c, models, base, float_, keys, kept, out.data());
        else
          run_dare<double>(c, models, base, double_, keys, kept, out.data());
      });
    }
    // Whole kept entries, and the fractions of the zeros' expectations apart (integers both:
    // the totals do not depend on the order the chunks finish in).
    for (std::uint32_t i = 0; i < n_; ++i) {
      kept_[i].fetch_add(drop_ ? kept[i].exact + (kept[i].zero_units >> kDrawBits) : count, std::memory_order_relaxed);
      kept_units_[i].fetch_add(kept[i].zero_units & (kDrawOne - 1), std::memory_order_relaxed);
    }
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
      const std::uint64_t kept = kept_[i].load() + ((kept_units_[i].load() + kDrawOne / 2) >> kDrawBits);
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
  // Per-model constants in one arithmetic V: survivor factors, weights, signs of the weights,
  // and the output factor (lambda, or for the sum lambda / sum w).
  template <class V>
  struct Factors {
    std::vector<V> c, w;
    std::vector<float> s;
    V out_factor = 1;
    void add_model(double ci, double wi, float si) {
      c.push_back(static_cast<V>(ci));
      w.push_back(static_cast<V>(wi));
      s.push_back(si);
    }
  };

  // DELLA's lowest keep probability and step per rank for rows of `len` entries.
  std::pair<double, double> spread(std::size_t len) const {
    const double step = len > 1 ? 2.0 * epsilon_ / static_cast<double>(len - 1) : 0.0;
    const double lo = len > 1 ? density_ - epsilon_ : density_;
    return {lo, step};
  }

  // Rank tables for the job's row lengths, while they fit kTableBudget (built once: the map
  // then only reads them, from any thread).
  void cache_tables(const sdk::Job& job) {
    std::size_t bytes = 0;
    for (const cfx_tensor& t : job.tensors()) {
      const auto len = static_cast<std::size_t>(t.row_length);
      if (len < 2 || len >= (std::size_t{1} << 31) || tables_.count(len)) continue;
      const std::size_t b = RankTables::bytes(len, n_);
      if (bytes + b > kTableBudget) continue;
      bytes += b;
      const auto [lo, step] = spread(len);
      tables_.emplace(len, RankTables(len, lo, step, weights_, rescale_));
    }
  }

  // DARE (and DELLA without a spread): blocks of kBlock entries, groups of kGroup models.
  template <class V, class In>
  void run_dare(const sdk::Chunk& c, const In* const* models, const In* base_in, const Factors<V>& fac,
                const std::vector<std::uint64_t>& keys, std::vector<KeptCount>& kept, float* out) const {
    const std::size_t count = c.count();
    const ScratchPool::Lease lease = pool_.get();
    Scratch& s = *lease;
    // State between groups (more than kGroup models only).
    const bool carry = n_ > kGroup;
    Sums<V>& sums = s.carry<V>();
    V* acc = carry && !T::ties ? at_least(sums.acc, kBlock) : nullptr;
    if (carry && T::ties) sums.election.reserve(kBlock);
    const Election<V> st = carry && T::ties ? sums.election.at(0) : Election<V>{};
    active::Sparse sparse;
    if (!carry) sparse = sparse_start<V>(n_);
    for (std::size_t k0 = 0; k0 < count;) {
      // A block stops at a multiple of 2^32 in element index: its draws share hi32 (the salt).
      const std::uint64_t e0 = c.begin() + k0;
      const std::uint64_t to_wrap = (std::uint64_t{1} << 32) - (e0 & 0xFFFFFFFFu);
      const auto m = static_cast<std::size_t>(std::min<std::uint64_t>({kBlock, count - k0, to_wrap}));
      const In* base = base_in + k0;
      for (std::uint32_t i0 = 0; i0 < n_; i0 += kGroup) {
        const unsigned g = std::min(kGroup, n_ - i0);
        Group<V, In> grp{};
        grp.lo = static_cast<std::uint32_t>(e0);
        for (unsigned j = 0; j < g; ++j) {
          const std::uint32_t i = i0 + j;
          grp.x[j] = models[i] + k0;
          grp.c[j] = fac.c[i];
          grp.w[j] = fac.w[i];
          grp.s[j] = fac.s[i];
          const std::uint64_t key = drop_ ? keys[i] : 0;  // without a drop every draw keeps
          grp.k0[j] = static_cast<std::uint32_t>(key);
          grp.salt[j] = static_cast<std::uint32_t>(key >> 32) ^ (static_cast<std::uint32_t>(e0 >> 32) * 0x9E3779B9u);
        }
        std::uint32_t counts[2 * kGroup] = {};  // see Group
        const bool first = i0 == 0, last = i0 + g == n_;
        float* o = last ? out + k0 : nullptr;
        // On sparse blocks of the only group the sweep runs on the active entries only (the same
        // bits, common/active.h; with carried state `sparse` is off).
        if (!sweep_gathered(g, grp, m, base, out + k0, sparse, counts)) {
          if constexpr (std::is_same_v<V, float>)  // one group (float32 only then): the guard as it goes
            redo(g, grp, m, base, out + k0, sweep_sole(g, grp, m, base, out + k0, counts));
          else if constexpr (T::ties)
            ties_group<V>(g, normalize_, carry, grp, keep_from_, m, first ? nullptr : &st, &st, base, fac.out_factor,
                          o, counts);
          else
            linear_group<V>(g, grp, keep_from_, m, first ? nullptr : acc, acc, base, fac.out_factor, o, counts);
        }
        for (unsigned j = 0; j < g; ++j) {
          kept[i0 + j].exact += counts[j];
          kept[i0 + j].zero_units += (m - counts[kGroup + j]) * zero_units_;
        }
      }
      k0 += m;
    }
  }

  // A block of the only group through the gathered sweep when it is sparse (active.h): returns
  // false, having done nothing, when it is not (or this CPU cannot gather), for the dense sweep.
  template <class V, class In>
  bool sweep_gathered(unsigned g, const Group<V, In>& grp, std::size_t m, const In* base, float* out,
                      active::Sparse& sparse, std::uint32_t* counts) const {
    if (!sparse.next()) return false;
    active::Lanes& a = active::thread_lanes();
    // (The gather's counts are not needed: the sweep counts what it keeps.)
    if (!active::gather_active<In>(g, grp.x, base, m, a, nullptr, nullptr)) {
      sparse.off();
      return false;
    }
    if (!sparse.worth(a.count, m)) return false;
    Group<V, float> ga{};
    ga.idx = a.idx;
    ga.lo = grp.lo;
    for (unsigned j = 0; j < g; ++j) {
      ga.x[j] = a.xs[j];
      ga.k0[j] = grp.k0[j];
      ga.salt[j] = grp.salt[j];
      ga.c[j] = grp.c[j];
      ga.w[j] = grp.w[j];
      ga.s[j] = grp.s[j];
    }
    // The inactive entries count as zeros of every model (their nonzero counts add 0), and so
    // do the padding's (Lanes::padded: whole vectors).
    if constexpr (std::is_same_v<V, float>)
      redo(g, ga, a.padded(), a.b, a.r, sweep_sole(g, ga, a.padded(), a.b, a.r, counts));
    else
      sweep_sole(g, ga, a.padded(), a.b, a.r, counts);
    active::fill_base_plus_f32(base, m, sparse.z, out);
    active::scatter(a, out);
    return true;
  }

  // The inactive entries' result of the only group's sweep in V (active.h: base -0 and a zero
  // task vector give r = -0 + z = z); the gathered path is on where it is a zero (and, float32,
  // passes the guard).
  template <class V>
  active::Sparse sparse_start(unsigned g) const {
    active::Sparse sparse;
    const float minus_zero = -0.0f;
    const float* zeros[kGroup] = {&minus_zero, &minus_zero, &minus_zero, &minus_zero};
    Group<V, float> one{};
    for (unsigned j = 0; j < g; ++j) {
      one.x[j] = zeros[j];
      one.c[j] = factors<V>().c[j];
      one.w[j] = factors<V>().w[j];
      one.s[j] = factors<V>().s[j];
    }
    std::uint32_t ignored[2 * kGroup] = {};
    float z = 1.0f;
    if (sweep_sole(g, one, 1, &minus_zero, &z, ignored) == 0) sparse.start(z);
    return sparse;
  }

  // The sweep of a DARE block's only group: in float32 testing float_guard as it goes (returns
  // how many entries fail the test), or in double (returns 0).
  template <class V, class In>
  std::uint32_t sweep_sole(unsigned g, const Group<V, In>& grp, std::size_t m, const In* base, float* out,
                           std::uint32_t* counts) const {
    const V f = factors<V>().out_factor;
    if constexpr (T::ties) return ties_sole(g, normalize_, grp, keep_from_, m, base, f, out, counts);
    else return linear_sole(g, grp, keep_from_, m, base, f, out, counts);
  }

  // After a float32 block with `unsafe` entries failing float_guard's test: those entries (found
  // by halving, float_guard::redo) again in double, with the same draws.
  template <class In>
  void redo(unsigned g, const Group<float, In>& grp, std::size_t m, const In* base, float* out,
            std::uint32_t unsafe) const {
    std::uint32_t ignored[2 * kGroup] = {};  // the block's kept entries are counted already
    // Entries k.. of the block as a group of their own (gathered: entry k's draw is at
    // lo + idx[k]; a single entry is an ungathered group drawing at that index).
    auto entry = [&](auto& one, std::size_t k, std::size_t n) {
      using V = std::decay_t<decltype(one.c[0])>;
      if (grp.idx && n > 1) {
        one.idx = grp.idx + k;
        one.lo = grp.lo;
      } else {
        one.lo = grp.lo + (grp.idx ? grp.idx[k] : static_cast<std::uint32_t>(k));
      }
      for (unsigned j = 0; j < g; ++j) {
        one.x[j] = grp.x[j] + k;
        one.k0[j] = grp.k0[j];
        one.salt[j] = grp.salt[j];
        one.c[j] = factors<V>().c[j];
        one.w[j] = factors<V>().w[j];
        one.s[j] = factors<V>().s[j];
      }
    };
    fg::redo(
        m, unsafe,
        [&](std::size_t k, std::size_t n) {
          Group<float, In> one{};
          entry(one, k, n);
          return sweep_sole(g, one, n, base + k, out + k, ignored);
        },
        [&](std::size_t k, std::size_t) {
          Group<double, In> one{};
          entry(one, k, 1);
          if constexpr (T::ties)
            ties_group<double>(g, normalize_, false, one, keep_from_, 1, nullptr, nullptr, base + k,
                               double_.out_factor, out + k, ignored);
          else
            linear_group<double>(g, one, keep_from_, 1, nullptr, nullptr, base + k, double_.out_factor, out + k,
                                 ignored);
        });
  }

  // DELLA with a spread (in double): groups of whole rows, each row of each model through
  // della_row, its kept entries into the group's cells, then the group's finish.
  template <class In>
  void run_della(const sdk::Chunk& c, const In* const* models, const In* base_in, std::size_t len,
                 const std::vector<std::uint64_t>& keys, std::vector<KeptCount>& kept, float* out) const {
    if constexpr (!T::ties)
      run_della_as<DellaAcc>(c, models, base_in, len, keys, kept, out);
    else if (normalize_)
      run_della_as<DellaVotes<true>>(c, models, base_in, len, keys, kept, out);
    else
      run_della_as<DellaVotes<false>>(c, models, base_in, len, keys, kept, out);
  }
  template <class Cell, class In>
  void run_della_as(const sdk::Chunk& c, const In* const* models, const In* base_in, std::size_t len,
                    const std::vector<std::uint64_t>& keys, std::vector<KeptCount>& kept, float* out) const {
    using V = double;
    const Factors<V>& fac = double_;
    std::unique_ptr<RankTables> own;
    const RankTables& tab = tables_for(len, own);
    const std::size_t count = c.count();
    const std::size_t group = std::max<std::size_t>(1, kRowGroup / len) * len;
    const ScratchPool::Lease lease = pool_.get();
    Scratch& s = *lease;
    RowBuffers rb{at_least(s.key, len + 16),  at_least(s.idx, len + 16), at_least(s.mnz, len + 16),
                  at_least(s.cand, len + 16), at_least(s.rank, len + 16), at_least(s.draw, len),
                  at_least(s.a, len),         at_least(s.b, len)};
    // The cells are zero at rest: the finish clears what the group used (nothing in between
    // throws). A dropped entry adds nothing, so only the kept ones take a cell.
    DellaPool<Cell>& cells = s.cells<Cell>();
    cells.reserve(std::min(group, count));
    for (std::size_t g0 = 0; g0 < count; g0 += group) {
      const std::size_t m = std::min(group, count - g0);
      // Row by row, and each row through the models in order (every entry takes its models'
      // terms in model order): a row's cells stay in the nearest cache while its models add.
      for (std::size_t r0 = 0; r0 < m; r0 += len) {
        for (std::uint32_t i = 0; i < n_; ++i) {
          const In* x = models[i] + g0 + r0;
          const In* base = base_in + g0 + r0;
          const std::size_t n = della_row(x, base, RowDraws(keys[i], c.begin() + g0 + r0), tab, len, rb, kept[i]);
          // W = (w_i / q_r) * d, or w_i * d without rescale (double: the sign of W decides).
          const V* cv = tab.factors(i);
          const V wi = fac.w[i];
          for (std::size_t e = 0; e < n; ++e) {
            const std::uint32_t k = rb.cand[e];
            cells.add(static_cast<std::uint32_t>(r0) + k,
                      cv[rb.rank[e]] * static_cast<V>(value(x, k) - value(base, k)), wi);
          }
        }
      }
      finish_della(base_in + g0, cells, m, fac.out_factor, out + g0);
    }
  }

  // Scratch arrays of one row (see RowSplit, rank_candidates).
  struct RowBuffers {
    std::uint32_t *key, *idx, *mnz;
    std::uint32_t *cand, *rank, *draw;
    std::uint64_t *a, *b;
  };

  // One row of one model (task vector x - base, the model's draws for the row, rank tables):
  // adds its kept entries to `kept` and returns how many there are, n: kept entry e < n is
  // entry rb.cand[e] of the row, of rank rb.rank[e] in the row, in ascending entry order.
  template <class In>
  static std::size_t della_row(const In* x, const In* base, const RowDraws& draws, const RankTables& tab,
                               std::size_t len, const RowBuffers& rb, KeptCount& kept) {
    RowSplit split{rb.key, rb.idx, rb.mnz};
    split_row(x, base, draws, len, rb.draw, split);
    // Zeros take ranks 0 .. zeros-1 in index order (their W is 0 kept or not), the nonzero
    // entries ranks zeros .. len-1 in magnitude order.
    const std::size_t zeros = len - split.nonzero;
    kept.zero_units += tab.zero_units[zeros];
    const std::uint32_t* from = tab.from.data();
    std::uint32_t* cand = rb.cand;
    std::uint32_t* rank = rb.rank;
    const std::size_t c = rank_candidates(split, from[len - 1], cand, rank, rb.a, rb.b);
    // The kept candidates, compacted in place (entry of the row, rank in the row) without a
    // branch on the keep decisions (coin flips).
    std::size_t n = 0;
    for (std::size_t e = 0; e < c; ++e) {
      const std::uint32_t j = cand[e];
      const auto r = static_cast<std::uint32_t>(zeros) + rank[e];
      cand[n] = rb.idx[j];
      rank[n] = r;
      n += rb.mnz[j] >= from[r] ? 1 : 0;
    }
    kept.exact += n;
    return n;
  }

  // The rank tables of rows of `len` entries: the job's, else built into `own`.
  const RankTables& tables_for(std::size_t len, std::unique_ptr<RankTables>& own) const {
    if (const auto it = tables_.find(len); it != tables_.end()) return it->second;
    const auto [lo, step] = spread(len);
    own = std::make_unique<RankTables>(len, lo, step, weights_, rescale_);
    return *own;
  }

  template <class V>
  const Factors<V>& factors() const {
    if constexpr (std::is_same_v<V, double>)
      return double_;
    else
      return float_;
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
  bool drop_ = true;            // density < 1
  float drop_threshold_ = 0;    // DARE: keep_threshold(1 - density); 0 (keep all) without drop
  std::uint32_t keep_from_ = 0;  // keep_from(drop_threshold_): the draws that keep
  std::uint64_t zero_units_ = 0;  // DARE: a zero's expected keep, in units of 2^-24 (KeptCount)
  std::vector<double> weights_;
  Factors<double> double_;
  Factors<float> float_;
  bool nonnegative_weights_ = true;
  std::map<std::size_t, RankTables> tables_;  // DELLA: by row length
  mutable ScratchPool pool_;
  // Kept entries per model (DELLA's zeros at their expectation: kept_units_ holds the parts
  // below 1, in units of 2^-24).
  std::unique_ptr<std::atomic<std::uint64_t>[]> kept_;
  std::unique_ptr<std::atomic<std::uint64_t>[]> kept_units_;
  std::atomic<std::uint64_t> elements_{0};
};

}  // namespace conflux::plugins::drop_merge
