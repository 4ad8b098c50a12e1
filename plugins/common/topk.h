// Exact streaming top-k selection by magnitude, per tensor, for the trimming strategies (ties,
// breadcrumbs, breadcrumbs_ties). Header-only; used inside one tensor-scope reduce pass that
// repeats itself, and the map pass after it.
//
// DEFINITION
//   The entries of a tensor (n of them) of one source, a model's float32 task vector
//   d = x - base, are ranked by (|d| descending, flat index ascending). The passes take the raw
//   values and the base (no CFX_PASS_TASK_VECTORS) and form d = x - base in float32 inside their
//   kernels: the same IEEE subtraction as the host's task vectors, without a separate sweep.
//   The kernels read float32 arrays or, for BF16 tensors, the stored BF16 values
//   (CFX_PASS_BF16_INPUTS, common/inputs.h: a `class In` of float or std::uint16_t); a BF16 value
//   widens to float32 exactly, so both give the same d, bit for bit.
//   A target "top m" selects the entries of rank < m: exactly m entries, and among equal
//   magnitudes the lower flat index wins.
//   Magnitudes compare as the float32 bit patterns with the sign bit cleared (the "key"):
//   for non-negative floats the unsigned order of the bits is the order of the values; -0 and
//   +0 are the same magnitude; a NaN ranks above +inf.
//   mergekit ranks with torch.argsort / torch.sort, whose order among equal values is
//   unspecified (and differs between CPU and GPU, and between releases): it keeps the same
//   number of entries and the same magnitudes, but which of several equal magnitudes at the
//   boundary survive is up to torch. Here it is always the lowest flat indices.
//
// HOW (no sort, nothing materialised; every target of every source in the same passes)
//   Execution 1 (of the tensor's reduce pass): per source, a histogram of the high 16 key bits
//     (65536 bins; exact zeros counted apart, so sparse task vectors do not serialise on one
//     bin) and a byte flag per bin for "impure" bins (bins holding a key whose low 15 bits are
//     not 0).
//     reduce_done walks each target's histogram from the top: the boundary bin B holds the
//     m-th entry; `above` entries lie above it, `need` = m - above (1 <= need <= count(B)).
//       need == count(B)        -> resolved: select key >= B << 15.
//       B pure (low bits all 0) -> the threshold T = B << 15 is known: ties (below).
//       otherwise               -> low round.
//   Low round (next execution): a histogram of the low 15 key bits of the entries in bin B
//     (32768 bins per target) pins the exact key T, its count and the entries above it;
//     need == count(T) resolves it (select key >= T), otherwise ties. When bin B holds at most
//     min(kListBudget, n / 8) entries, each chunk also keeps the low bits of its bin-B entries
//     (in index order), so the tie counts come from these lists in reduce_done, without another
//     pass.
//   Ties (next execution): each chunk counts its entries with key == T; the counts are kept
//     per chunk (plugin memory, indexed by chunk->begin / chunk size: the chunking guarantee
//     of plugin.h gives the map pass the same chunks), and reduce_done turns them into an
//     exclusive prefix. The map then knows how many T-valued entries precede each chunk: a
//     chunk selects key > T, plus its first `quota` entries with key == T.
//   T == 0 needs no tie counts: which zero entries are "selected" cannot change a merge (a zero
//   task-vector entry adds nothing), so all of them are; the set differs from the exact-k one
//   only in zero entries, the merge not at all. That is the usual case for sparse task vectors
//   with a density above their fill.
//   WINDOWS (what usually spares the low round and the tie counts their execution): in the
//   histogram's execution each chunk also builds its own histogram, finds where its share of
//   each target, max(1, m * count / numel) entries, would cut, and keeps the counts of the
//   kWindowBins high bins centred there, with the keys of those bins whose low bits are not 0
//   (up to kWindowList of them; more: the window serves pure bins only). reduce_done: when
//   every chunk's window covers the boundary bin B (and lists its impure keys, if B has any),
//   the windows give B's low-bits histogram (its pure keys are all B << 15) and every chunk's
//   count of the threshold key, so the target is settled, or ready with its tie counts, in that
//   execution; else the rounds below run as described. Chunks of one tensor that look alike
//   (the usual case: a layer's weights, bf16 task vectors whose keys are mostly pure) cut close
//   to each other, so their windows meet; the outcome is the same either way, only the number
//   of executions differs, and it depends on the data alone.
//   So a tensor's reduce pass runs 1 time (boundary resolved by the coarse histogram: k == 0,
//   k == n, a boundary bin taken whole, threshold 0, or the windows), 2 times (bf16-like data:
//   pure bin, tie counts; float32-like data: low round, with listed ties) or at most 3 times (a
//   boundary bin too large to list, with ties), for all targets at once; a target that needs
//   fewer executions does nothing in the later ones.
//
// MEMORY
//   One partial (execution 1): per source a 65536-bin uint32 histogram and 64 KiB of flags
//   (about 320 KiB per source; combine folds only the bins the chunks touched); later
//   executions use the first targets x 32768 words of the same partial (targets <= 2 x
//   sources). Per thread: a chunk's keys and its own histogram (2 x 256 KiB, zero at rest).
//   During the histogram's execution, per chunk and target a window (kWindowBins words and at
//   most kWindowList listed keys: under 1.3 KiB), freed by its reduce_done, and at most
//   kWindowBudget per tensor (past it the windows are dropped; 7 MiB for the benchmark's
//   largest tensor, 136M entries, 6 targets, chunks of 32768). Per tensor: a few
//   words per target, a word per source (its smallest nonzero key, for the map: least_key),
//   and for targets that need tie counts one uint32 per chunk (numel / chunk), freed when the
//   tensor's map pass has seen all its elements; during a low round, at most
//   min(kListBudget, n / 8) uint16 (2 MiB) per target, freed when it ends.
//   Counts are uint32: a tensor must have fewer than 2^32 elements (checked at construction).
//
// SPECULATION (a host with CFX_PASS_SPECULATIVE_OUTPUT hands the first execution room for the
// output)
//   Sparse task vectors often have fewer nonzero entries than a kept target's m: the selection
//   then keeps every nonzero entry (the zeros it keeps or not change no merge), which the merge
//   can compute without the threshold. So in execution 1 of a tensor whose every open target is
//   a kept one, a chunk whose every source has at most m * count / numel nonzero entries (each
//   target's share of the chunk, exact integer test) only counts them, and the caller merges
//   it with every nonzero entry kept (reduce returns true); other chunks build the histogram.
//   The caller counts too, a stripe at a time in the same sweep as its merge (Selector::reduce),
//   so a speculating chunk's inputs are read once; a chunk found dense discards that merge.
//   reduce_done: every chunk counted, so every source has at most m nonzero entries (the shares
//   sum to m) -> the selection is "keep all" and the speculative output is final; no chunk did
//   -> the histogram is complete, go on as above; some did -> execution 2 builds the whole
//   histogram (one more read, for a tensor dense in places). The decisions depend only on each
//   chunk's data, so outputs and reports do not depend on threads.
#pragma once

#include <conflux/plugin.hpp>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "inputs.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

namespace conflux::plugins::topk {

namespace sdk = conflux::sdk;

inline constexpr std::uint32_t kHiBins = 1u << 16;            // execution 1: key bits 30..15
inline constexpr std::uint32_t kLoBins = 1u << 15;            // low round: key bits 14..0
inline constexpr std::uint32_t kImpureWords = kHiBins / 4 + 16;  // a byte per high bin, and a
                                                                 // dummy slot (kHiBins)
inline constexpr std::uint32_t kNothing = 0x80000000u;        // a key bound above every key
inline constexpr std::size_t kBlock = 1024;                   // entries per kernel call
inline constexpr std::size_t kStripe = 4096;  // a speculating chunk's entries per count-then-merge step
inline constexpr double kGiveUp = 1.25;      // SPECULATION: a chunk's stripes over their share by this give up
inline constexpr std::uint64_t kListBudget = 1u << 20;        // low round: entries listed per target
inline constexpr std::uint32_t kWindowBins = 64;              // WINDOWS: high bins per target and chunk
inline constexpr std::size_t kWindowList = 256;               // WINDOWS: impure keys listed, at most
inline constexpr std::size_t kWindowBudget = std::size_t{32} << 20;  // WINDOWS: bytes per tensor

// The magnitude key of x: its float32 bits without the sign.
inline std::uint32_t key_of(float x) {
  std::uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return u & 0x7FFFFFFFu;
}

// One selection: the top m entries of source `source` (rank < m). kept: the selection is what
// the merge keeps, so when the task vector has at most m nonzero entries, selecting all of them
// gives the same merge (see SPECULATION); false for a set the merge removes.
struct Target {
  std::uint32_t source = 0;
  std::uint64_t m = 0;
  bool kept = true;
};

// Where one target stands in one chunk, for the map: selected are the keys >= U, and also the
// next `quota` entries (in index order) whose key is T (then U == T + 1).
struct Cursor {
  std::uint32_t U = 0;
  std::uint32_t T = 0;
  std::uint64_t quota = 0;
};

// ---------------------------------------------------------------------------------------------
// Kernels (scalar where they scatter; the counting and masking loops vectorize)
// ---------------------------------------------------------------------------------------------

namespace kernels {

// The float32 task-vector entry d = x - b of entry k (In: float32 or stored BF16 inputs).
template <class In>
inline float delta(const In* x, const In* b, std::size_t k) {
  return value(x, k) - value(b, k);
}

// keys[0, nz) = the nonzero keys of d = x - b over [0, m), in order; returns nz. keys has room
// for m + 16.
template <class In>
static inline std::size_t compact_nonzero_scalar(const In* x, const In* b, std::size_t m, std::uint32_t* keys) {
  std::size_t nz = 0;
  for (std::size_t k = 0; k < m; ++k) {  // branch-free
    const std::uint32_t key = key_of(delta(x, b, k));
    keys[nz] = key;
    nz += key != 0 ? 1 : 0;
  }
  return nz;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
// The same with AVX-512 (vpcompressd): sparse task vectors are mostly zeros, and the scalar
// compaction's dependency chain costs more than the histogram itself. In: float32 or stored BF16
// (common/inputs.h, load16).
template <class In>
__attribute__((target("avx512f"))) static inline std::size_t compact_nonzero_avx512(const In* x, const In* b,
                                                                                    std::size_t m,
                                                                                    std::uint32_t* keys) {
  const __m512i magnitude = _mm512_set1_epi32(0x7FFFFFFF);
  std::size_t nz = 0, k = 0;
  for (; k + 16 <= m; k += 16) {
    // The model's input a 4 KiB page (bf16) ahead: blocks are read model by model, and the
    // hardware prefetchers stop at page boundaries (as DELLA's split_row_avx512).
    _mm_prefetch(reinterpret_cast<const char*>(x + k + 2048), _MM_HINT_T0);
    const __m512 d = _mm512_sub_ps(load16(x + k), load16(b + k));
    const __m512i v = _mm512_and_si512(_mm512_castps_si512(d), magnitude);
    const __mmask16 on = _mm512_test_epi32_mask(v, v);
    _mm512_storeu_si512(keys + nz, _mm512_maskz_compress_epi32(on, v));
    nz += static_cast<std::size_t>(__builtin_popcount(on));
  }
  return nz + compact_nonzero_scalar(x + k, b + k, m - k, keys + nz);
}

#endif

template <class In>
static inline std::size_t compact_nonzero(const In* x, const In* b, std::size_t m, std::uint32_t* keys) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (have_avx512()) return compact_nonzero_avx512(x, b, m, keys);
#endif
  return compact_nonzero_scalar(x, b, m, keys);
}

// Whether a key of keys[0, n) has nonzero low 15 bits.
CONFLUX_MULTIVERSION static inline bool any_low_bits(const std::uint32_t* keys, std::size_t n) {
  std::uint32_t any = 0;
  for (std::size_t j = 0; j < n; ++j) any |= keys[j];
  return (any & 0x7FFFu) != 0;
}

// The smallest and largest of keys[0, n).
CONFLUX_MULTIVERSION static inline void key_range(const std::uint32_t* keys, std::size_t n, std::uint32_t& lo,
                                                  std::uint32_t& hi) {
  std::uint32_t a = lo, z = hi;
  for (std::size_t j = 0; j < n; ++j) {
    a = std::min(a, keys[j]);
    z = std::max(z, keys[j]);
  }
  lo = a;
  hi = z;
}

// Execution 1 for one source's chunk, after compact_nonzero: the chunk's own histogram of the
// high 16 key bits of keys[0, nz), in two arrays that are zero at rest (every other key goes to
// `b`: equal magnitudes are common, and increments of one bin in a row wait for each other
// through memory; two arrays halve that chain), and the impure flag of a bin holding a key whose
// low bits are not 0.
static inline void hist_high(const std::uint32_t* keys, std::size_t nz, std::uint32_t* a, std::uint32_t* b,
                             std::uint8_t* impure) {
  std::size_t j = 0;
  for (; j + 2 <= nz; j += 2) {
    const std::uint32_t k0 = keys[j], k1 = keys[j + 1];
    ++a[k0 >> 15];
    ++b[k1 >> 15];
  }
  if (j < nz) ++a[keys[j] >> 15];
  // Impure bins: none in most chunks of bf16-like data (a vectorized test); elsewhere a store
  // of 1 to the bin's flag, or to the dummy slot for a pure key (stores only: no chain, no
  // branch to mispredict).
  if (any_low_bits(keys, nz))
    for (std::size_t i = 0; i < nz; ++i) {
      const std::uint32_t key = keys[i];
      const std::uint32_t on = 0u - static_cast<std::uint32_t>((key & 0x7FFFu) != 0);  // all ones or 0
      impure[((key >> 15) & on) | (kHiBins & ~on)] = 1;
    }
}

// Keys of keys[0, n) in [first, first + span) whose low 15 bits are not 0: how many, and (the
// second: `out` has room for their count + 16) the keys themselves, in order.
CONFLUX_MULTIVERSION static inline std::size_t count_impure(const std::uint32_t* keys, std::size_t n,
                                                            std::uint32_t first, std::uint32_t span) {
  std::uint32_t c = 0;
  for (std::size_t k = 0; k < n; ++k) c += (keys[k] - first < span) & ((keys[k] & 0x7FFFu) != 0) ? 1u : 0u;
  return c;
}
// (Branch-free; the AVX-512 form compresses 16 keys at a time and stores whole vectors.)
static inline void list_impure_scalar(const std::uint32_t* keys, std::size_t n, std::uint32_t first,
                                      std::uint32_t span, std::uint32_t* out) {
  std::size_t c = 0;
  for (std::size_t k = 0; k < n; ++k) {
    out[c] = keys[k];
    c += (keys[k] - first < span) & ((keys[k] & 0x7FFFu) != 0) ? 1 : 0;
  }
}
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target("avx512f"))) static inline void list_impure_avx512(const std::uint32_t* keys, std::size_t n,
                                                                         std::uint32_t first, std::uint32_t span,
                                                                         std::uint32_t* out) {
  const __m512i lo = _mm512_set1_epi32(static_cast<int>(first)), width = _mm512_set1_epi32(static_cast<int>(span));
  const __m512i low_bits = _mm512_set1_epi32(0x7FFF);
  std::size_t c = 0, k = 0;
  for (; k + 16 <= n; k += 16) {
    const __m512i v = _mm512_loadu_si512(keys + k);
    const __mmask16 on = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(v, lo), width) & _mm512_test_epi32_mask(v, low_bits);
    _mm512_storeu_si512(out + c, _mm512_maskz_compress_epi32(on, v));
    c += static_cast<std::size_t>(__builtin_popcount(on));
  }
  list_impure_scalar(keys + k, n - k, first, span, out + c);
}
#endif
static inline void list_impure(const std::uint32_t* keys, std::size_t n, std::uint32_t first, std::uint32_t span,
                               std::uint32_t* out) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (have_avx512()) return list_impure_avx512(keys, n, first, span, out);
#endif
  list_impure_scalar(keys, n, first, span, out);
}

// hist[k] += a[k] + b[k], a[k] = b[k] = 0 over [first, last].
CONFLUX_MULTIVERSION static inline void fold(std::uint32_t* hist, std::uint32_t* a, std::uint32_t* b,
                                             std::size_t first, std::size_t last) {
  for (std::size_t k = first; k <= last; ++k) {
    hist[k] += a[k] + b[k];
    a[k] = 0;
    b[k] = 0;
  }
}

// Entries whose key lies in high bin `bin`.
template <class In>
CONFLUX_MULTIVERSION static inline std::uint32_t count_in_bin(const In* x, const In* b, std::size_t m,
                                                             std::uint32_t bin) {
  std::uint32_t c = 0;
  for (std::size_t k = 0; k < m; ++k) c += (key_of(delta(x, b, k)) >> 15) == bin ? 1u : 0u;
  return c;
}

// Low round for one target's block: hist[key & 0x7FFF] += 1 for the keys in high bin `bin`
// (rare: groups of 64 without one are skipped after a vectorized count), and their low bits
// appended to `list` in index order when it is not null.
template <class In>
static inline void hist_low(const In* x, const In* b, std::size_t m, std::uint32_t bin, std::uint32_t* hist,
                            std::vector<std::uint16_t>* list) {
  std::uint16_t lows[64];
  for (std::size_t g = 0; g < m; g += 64) {
    const std::size_t e = std::min(m, g + 64);
    if (count_in_bin(x + g, b + g, e - g, bin) == 0) continue;
    std::size_t hits = 0;
    for (std::size_t k = g; k < e; ++k) {  // branch-free compaction of the bin's low bits
      const std::uint32_t key = key_of(delta(x, b, k));
      lows[hits] = static_cast<std::uint16_t>(key & 0x7FFFu);
      hits += (key >> 15) == bin ? 1 : 0;
    }
    for (std::size_t j = 0; j < hits; ++j) ++hist[lows[j]];
    if (list) list->insert(list->end(), lows, lows + hits);
  }
}

// Nonzero task-vector entries, and the smallest nonzero key folded into `least`.
template <class In>
CONFLUX_MULTIVERSION static inline std::uint32_t count_nonzero(const In* x, const In* b, std::size_t m,
                                                              std::uint32_t& least) {
  // Zeros as kNothing (above every key) for the minimum; plain arithmetic, which vectorizes.
  std::uint32_t c = 0, low = kNothing;
  for (std::size_t k = 0; k < m; ++k) {
    const std::uint32_t key = key_of(delta(x, b, k));
    const std::uint32_t zero = static_cast<std::uint32_t>(key == 0);
    c += 1u - zero;
    low = std::min(low, key | (zero << 31));
  }
  if (low != kNothing) least = std::min(least, low);
  return c;
}

// Entries whose key is T.
template <class In>
CONFLUX_MULTIVERSION static inline std::uint32_t count_equal(const In* x, const In* b, std::size_t m,
                                                            std::uint32_t T) {
  std::uint32_t c = 0;
  for (std::size_t k = 0; k < m; ++k) c += key_of(delta(x, b, k)) == T ? 1u : 0u;
  return c;
}

// out[k] = d[k] where lo <= key < hi, else 0.
template <class In>
CONFLUX_MULTIVERSION static inline void select_range(const In* x, const In* b, std::size_t m, std::uint32_t lo,
                                                     std::uint32_t hi, float* out) {
  for (std::size_t k = 0; k < m; ++k) {
    const float d = delta(x, b, k);
    const std::uint32_t key = key_of(d);
    out[k] = ((key >= lo) & (key < hi)) ? d : 0.0f;
  }
}

CONFLUX_MULTIVERSION static inline void add_words(std::uint32_t* into, const std::uint32_t* from, std::size_t n) {
  for (std::size_t k = 0; k < n; ++k) into[k] += from[k];
}

CONFLUX_MULTIVERSION static inline void or_bytes(std::uint8_t* into, const std::uint8_t* from, std::size_t n) {
  for (std::size_t k = 0; k < n; ++k) into[k] |= from[k];
}

}  // namespace kernels

// out[k] = d[k] = x[k] - b[k] where entry k of the block is selected by `keep` and not by
// `drop` (a target selecting a subset of keep's entries: breadcrumbs' top outliers; a
// Cursor{kNothing} for none), else 0. The cursors advance through the block (call block by
// block, in order).
template <class In>
inline void select_block(const In* x, const In* b, std::size_t m, Cursor& keep, Cursor& drop, float* out) {
  if (keep.quota == 0 && drop.quota == 0) return kernels::select_range(x, b, m, keep.U, drop.U, out);
  for (std::size_t k = 0; k < m; ++k) {  // the chunk where ties straddle a boundary
    const float d = kernels::delta(x, b, k);
    const std::uint32_t key = key_of(d);
    bool in_keep = key >= keep.U, in_drop = key >= drop.U;
    if (key == keep.T && keep.quota > 0) in_keep = true, --keep.quota;
    if (key == drop.T && drop.quota > 0) in_drop = true, --drop.quota;
    out[k] = in_keep && !in_drop ? d : 0.0f;
  }
}

// ---------------------------------------------------------------------------------------------
// The selector: state of every tensor's targets, the reduce pass's callbacks, the map's cursors
// ---------------------------------------------------------------------------------------------

class Selector {
 public:
  // `targets(tensor, j)` gives target j (< targets_per_tensor) of a tensor; targets_per_tensor
  // <= 2 * sources. Thread-safety as the plugin callbacks that call in.
  template <class F>
  Selector(sdk::Span<const cfx_tensor> tensors, std::uint32_t sources, std::uint32_t targets_per_tensor, F&& targets)
      : sources_(sources), per_tensor_(targets_per_tensor), tensors_(new TensorState[tensors.size()]) {
    if (targets_per_tensor > 2 * sources) throw sdk::Error("internal: more than two targets per source");
    for (const cfx_tensor& t : tensors) {
      TensorState& ts = tensors_[t.index];
      ts.targets.resize(per_tensor_);
      bool open_removed = false;  // an unsettled target selects a set the merge removes
      for (std::uint32_t j = 0; j < per_tensor_; ++j) {
        const Target g = targets(t, j);
        State& s = ts.targets[j];
        s.source = g.source;
        s.m = g.m;
        if (g.m > t.numel) throw sdk::Error("internal: a target selects more entries than the tensor has");
        if (g.m == 0) s.U = kNothing;
        else if (g.m == t.numel) s.U = 0;
        else s.phase = Phase::high;
        if (s.phase != Phase::done) ts.trivial = false;
        if (s.phase != Phase::done && !g.kept) open_removed = true;
      }
      ts.speculate = !ts.trivial && !open_removed;
      ts.least.reset(new std::atomic<std::uint32_t>[sources_]);
      for (std::uint32_t i = 0; i < sources_; ++i) ts.least[i].store(uses(ts, i) ? 0xFFFFFFFFu : 0u);
      if (!ts.trivial) {
        active_ = true;
        if (t.numel >= (std::uint64_t{1} << 32))
          throw sdk::Error("tensor '" + std::string(t.name) + "' has " + std::to_string(t.numel) +
                           " elements; magnitude selection supports fewer than 2^32 per tensor");
      }
    }
  }

  // True when some tensor has a target that needs the reduce pass (else the pass is skipped).
  bool active() const { return active_; }

  // uint32 words of one partial of the reduce pass.
  // (The histogram's execution: a histogram and impure flags per source, then per source the
  // bins its nonzero keys touched, [first, end) (end 0: none), and its zero count, which is bin
  // 0's share kept apart so that combine and done need only the touched bins.)
  // Then, for speculation, per source its nonzero count (two words, low first), the count of
  // chunks that speculated, and 1 once a chunk built histograms (a partial of speculated chunks
  // only has none to combine); then 1 once the low round's histograms are zeroed.
  std::size_t stats_words() const { return low_flag() + 1; }

  // Words at the start of a partial the host need not zero (cfx_pass.instance_stats_unzeroed):
  // the histograms and flags. Only their touched bins are ever read, and the bins are zeroed as
  // they are first touched (cover), the low round's histograms when it starts on the partial:
  // zeroing about 320 KiB per source for every partial cost more than a sparse tensor's whole
  // statistics, which touch none of it when its chunks speculate.
  std::size_t stats_unzeroed_words() const { return meta_offset(); }

  // Float32 or stored BF16 inputs (the pass has CFX_PASS_BF16_INPUTS). True: the chunk
  // speculated (see SPECULATION), and its merge with every nonzero entry kept is in the
  // speculative output. The merge is the caller's, and so is the count it rests on (merging and
  // counting in one sweep of the inputs): while a chunk speculates, the selection calls
  // merge(first, count, nonzero, least) for each stripe of kStripe entries in order, which
  // merges the stripe with every nonzero entry kept and adds each source's nonzero entries in
  // it to nonzero[i] and folds their smallest key into least[i] (sources entries each, which
  // start at 0 and 0xFFFFFFFF: the smallest so far bounds the stripe's keys from below, for the
  // merge's Small test, counted before the stripe is merged). When the chunk turns out not to
  // be sparse after all, that output is left unwritten and the chunk builds the histogram.
  template <class Merge>
  bool reduce(const sdk::Chunk& c, sdk::Span<std::uint32_t> partial, Merge&& merge) {
    TensorState& ts = tensors_[c.tensor().index];
    if (ts.trivial) return false;
    bool speculated = false;
    with_inputs(c, [&](auto models, auto base) { speculated = reduce_inputs(ts, c, models, base, partial, merge); });
    return speculated;
  }

  void combine(const cfx_tensor* t, sdk::Span<std::uint32_t> into, sdk::Span<const std::uint32_t> from) {
    const TensorState& ts = tensors_[t->index];
    if (ts.trivial) return;
    if (ts.executions == 0 && ts.speculate) {
      const std::size_t o = spec_offset();
      for (std::uint32_t i = 0; i < sources_; ++i) add_u64(into.data() + o + 2 * i, read_u64(from.data() + o + 2 * i));
      into[o + 2 * sources_] += from[o + 2 * sources_];
    }
    if (ts.executions == ts.hist_at) {
      const std::size_t used = spec_offset() + 2 * std::size_t{sources_} + 1;
      if (from[used] == 0) return;
      into[used] = 1;
      for (std::uint32_t i = 0; i < sources_; ++i) {
        if (!uses(ts, i)) continue;
        const std::uint32_t* fm = from.data() + meta_offset() + 3 * std::size_t{i};
        std::uint32_t* im = into.data() + meta_offset() + 3 * std::size_t{i};
        im[2] += fm[2];
        if (fm[1] == 0) continue;  // no nonzero key
        cover(into.data(), i, fm[0], fm[1]);
        const std::size_t h = std::size_t{i} * kHiBins;
        kernels::add_words(into.data() + h + fm[0], from.data() + h + fm[0], fm[1] - fm[0]);
        auto* ib = reinterpret_cast<std::uint8_t*>(into.data() + impure_offset(i));
        const auto* fb = reinterpret_cast<const std::uint8_t*>(from.data() + impure_offset(i));
        kernels::or_bytes(ib + fm[0], fb + fm[0], fm[1] - fm[0]);
      }
      return;
    }
    if (from[low_flag()] == 0) return;  // (every partial has seen a chunk: not expected)
    zero_low(ts, into.data());
    for (std::uint32_t j = 0; j < per_tensor_; ++j)
      if (ts.targets[j].phase == Phase::low)
        kernels::add_words(into.data() + std::size_t{j} * kLoBins, from.data() + std::size_t{j} * kLoBins, kLoBins);
  }

  // The tensor's statistics of one execution: what next (output_final: the speculative output
  // stands, see SPECULATION).
  sdk::Next done(const cfx_tensor* t, sdk::Span<const std::uint32_t> stats) {
    TensorState& ts = tensors_[t->index];
    // The windows serve the execution that recorded them only.
    struct Clear {
      TensorState& ts;
      ~Clear() {
        std::vector<std::unique_ptr<ChunkWindows>>().swap(ts.windows);
        ts.window_bytes = 0;
      }
    } clear{ts};
    if (ts.trivial) {
      ++executions_hist_[0];
      return sdk::Next::proceed;
    }
    if (ts.executions == 0 && ts.speculate) {
      const std::size_t o = spec_offset();
      const std::uint64_t speculated = stats[o + 2 * sources_];
      ts.speculate = false;
      if (speculated == chunk_count(ts, *t)) {
        bool all = true;
        for (const State& s : ts.targets)
          all = all && (s.phase == Phase::done || read_u64(stats.data() + o + 2 * s.source) <= s.m);
        if (all) {
          for (State& s : ts.targets)
            if (s.phase != Phase::done) finish(s, 0);
          ts.executions = 1;
          ++executions_hist_[1];
          ++speculated_;
          return sdk::Next::output_final;
        }
      }
      if (speculated != 0) {  // a histogram of part of the tensor: build it again, whole
        ts.executions = ts.hist_at = 1;
        return sdk::Next::again;
      }
    }
    const std::uint32_t executions = ++ts.executions;
    for (std::uint32_t j = 0; j < per_tensor_; ++j) {
      State& s = ts.targets[j];
      switch (s.phase) {
        case Phase::done: break;
        case Phase::high: {
          const std::uint32_t* hist = stats.data() + std::size_t{s.source} * kHiBins;
          const auto* impure = reinterpret_cast<const std::uint8_t*>(stats.data() + impure_offset(s.source));
          const std::uint32_t* meta = stats.data() + meta_offset() + 3 * std::size_t{s.source};
          // Bin 0 with the zeros; no bin outside [meta[0], meta[1]) (the touched bins) holds any,
          // and only the touched bins' words are set (cover).
          auto touched = [&](std::uint32_t bin) { return bin >= meta[0] && bin < meta[1]; };
          auto count = [&](std::uint32_t bin) -> std::uint64_t {
            return (touched(bin) ? hist[bin] : 0u) + (bin == 0 ? meta[2] : 0u);
          };
          auto is_impure = [&](std::uint32_t bin) { return touched(bin) && impure[bin] != 0; };
          std::uint32_t b = meta[1] > 0 ? meta[1] - 1 : 0;
          std::uint64_t above = 0;
          while (above + count(b) < s.m) above += count(b--);  // stops: the bins sum to numel >= m
          s.above = above;
          s.need = s.m - above;
          if (s.need == count(b)) {
            finish(s, b << 15);
          } else if (from_windows(ts, *t, j, s, b, count(b), is_impure(b))) {
            // settled, or its tie counts known, from the chunks' windows (WINDOWS)
          } else if (!is_impure(b)) {
            start_ties(ts, *t, s, b << 15, count(b));
          } else {
            s.bin = b;
            s.phase = Phase::low;
            // Small enough: keep the bin's low bits per chunk, so the tie counts need no pass.
            if (count(b) <= std::min(kListBudget, t->numel / 8))
              s.listing = std::make_unique<Listing>(count(b), chunk_count(ts, *t));
          }
          break;
        }
        case Phase::low: {
          if (stats[low_flag()] == 0)
            throw sdk::Error("internal: tensor '" + std::string(t->name) + "': a low round saw no chunk");
          const std::uint32_t* hist = stats.data() + std::size_t{j} * kLoBins;
          std::uint32_t b = kLoBins - 1;
          std::uint64_t above = 0;
          while (above + hist[b] < s.need) above += hist[b--];
          s.above += above;
          s.need -= above;
          const std::uint32_t T = (s.bin << 15) | b;
          if (s.need == hist[b]) {
            finish(s, T);
          } else {
            start_ties(ts, *t, s, T, hist[b]);
            if (s.listing && s.phase == Phase::ties) {  // count the ties from the lists
              s.listing->count(static_cast<std::uint16_t>(b), s.chunk_ties);
              make_prefix(*t, s);
              ++listed_tie_breaks_;
            }
          }
          s.listing.reset();
          break;
        }
        case Phase::ties: make_prefix(*t, s); break;  // the chunk counts of this execution
        case Phase::ready: break;
      }
    }
    // Targets that moved to `low` or `ties` in this call need another execution.
    bool again = false;
    for (const State& s : ts.targets) again = again || s.phase == Phase::low || s.phase == Phase::ties;
    if (!again) ++executions_hist_[std::min<std::uint32_t>(executions, 3)];
    return again ? sdk::Next::again : sdk::Next::proceed;
  }

  // Target j's cursor at the start of chunk c (map pass; while execution 1 speculates, an open
  // target's selects every entry: U is 0 until the target is settled).
  Cursor cursor(const sdk::Chunk& c, std::uint32_t j) const {
    const TensorState& ts = tensors_[c.tensor().index];
    const State& s = ts.targets[j];
    if (s.phase != Phase::ready) return Cursor{s.U, 0, 0};
    const std::size_t idx = chunk_index(ts, c);
    const std::uint64_t before = s.chunk_ties[idx];
    const std::uint64_t here = (idx + 1 < s.chunk_ties.size() ? s.chunk_ties[idx + 1] : s.tie_count) - before;
    const std::uint64_t quota = s.need > before ? std::min(s.need - before, here) : 0;
    if (quota == here) return Cursor{s.T, 0, 0};      // every tie of this chunk is selected
    if (quota == 0) return Cursor{s.T + 1, 0, 0};     // none
    return Cursor{s.T + 1, s.T, quota};
  }

  // The smallest nonzero key of source i's task vector over the chunk's tensor (0xFFFFFFFF: it
  // is all zeros), as execution 1 saw it; 0 (a bound, not the value) for a source it did not
  // scan (nothing to select, or no reduce pass). For the map, after the tensor's reduce pass.
  std::uint32_t least_key(const sdk::Chunk& c, std::uint32_t source) const {
    return tensors_[c.tensor().index].least[source].load(std::memory_order_relaxed);
  }

  // Called by the map after a chunk: frees the tensor's per-chunk counts after its last chunk.
  void mapped(const sdk::Chunk& c) {
    TensorState& ts = tensors_[c.tensor().index];
    if (!ts.has_chunk_counts) return;
    if (ts.mapped.fetch_add(c.count(), std::memory_order_acq_rel) + c.count() == c.tensor().numel)
      for (State& s : ts.targets) std::vector<std::uint32_t>().swap(s.chunk_ties);
  }

  // Tensors whose selection took e = 1, 2, 3 executions of the reduce pass (e = 0: tensors with
  // nothing to select, which run it once and do nothing), and targets resolved by tie counts.
  std::uint64_t tensors_by_executions(std::uint32_t e) const {
    return executions_hist_[std::min<std::uint32_t>(e, 3)].load();
  }
  std::uint64_t tie_breaks() const { return tie_breaks_.load(); }
  // Of these, the ones counted from the low round's lists (no pass of their own).
  std::uint64_t listed_tie_breaks() const { return listed_tie_breaks_.load(); }
  // Boundaries settled from the chunks' windows, in the histogram's execution (WINDOWS).
  std::uint64_t window_resolved() const { return window_resolved_.load(); }
  // Tensors merged by the first execution itself (SPECULATION).
  std::uint64_t speculated() const { return speculated_.load(); }

 private:
  enum class Phase : std::uint8_t { done, high, low, ties, ready };
  // The low bits of one target's boundary-bin entries, chunk by chunk (each chunk's run in index
  // order, the runs in any order), in one array of exactly the bin's count.
  struct Listing {
    std::unique_ptr<std::uint16_t[]> data;
    std::uint64_t capacity;
    std::atomic<std::uint64_t> used{0};
    std::vector<std::pair<std::uint64_t, std::uint32_t>> runs;  // per chunk: offset, length

    Listing(std::uint64_t entries, std::size_t chunks)
        : data(new std::uint16_t[entries]), capacity(entries), runs(chunks, {0, 0}) {}
    void add(std::size_t chunk, const std::vector<std::uint16_t>& lows) {
      const std::uint64_t at = used.fetch_add(lows.size(), std::memory_order_relaxed);
      if (at + lows.size() > capacity) throw sdk::Error("internal: a boundary bin grew between passes");
      std::copy(lows.begin(), lows.end(), data.get() + at);
      runs[chunk] = {at, static_cast<std::uint32_t>(lows.size())};
    }
    // counts[c] = entries of chunk c whose low bits are `low`.
    void count(std::uint16_t low, std::vector<std::uint32_t>& counts) const {
      for (std::size_t c = 0; c < runs.size(); ++c) {
        const std::uint16_t* run = data.get() + runs[c].first;
        counts[c] = static_cast<std::uint32_t>(std::count(run, run + runs[c].second, low));
      }
    }
  };

  // One chunk's view of the high bins around a target's cut in that chunk (WINDOWS).
  struct Window {
    std::uint32_t start = 0;                // bins [start, start + kWindowBins)
    bool listed = true;                     // `impure` holds every key of these bins with low bits
    std::uint32_t counts[kWindowBins] = {};  // the chunk's entries per bin (bin 0 with its zeros)
    std::vector<std::uint32_t> impure;      // those keys (at most kWindowList), in any order
  };
  struct ChunkWindows {
    std::uint64_t begin = 0;      // the chunk's first element
    std::vector<Window> targets;  // per target of the tensor (used for the open ones)
  };
  // Per thread: a chunk's nonzero keys and its own histogram (two arrays, zero at rest).
  struct Scratch {
    std::vector<std::uint32_t> keys;
    std::unique_ptr<std::uint32_t[]> a{new std::uint32_t[kHiBins]()}, b{new std::uint32_t[kHiBins]()};
  };
  static Scratch& scratch() {
    thread_local Scratch s;
    return s;
  }

  struct State {
    std::uint32_t source = 0;
    std::uint64_t m = 0;
    Phase phase = Phase::done;
    std::uint32_t bin = 0;        // low: the high bin
    std::uint32_t U = 0;          // done: keys >= U are selected
    std::uint32_t T = 0;          // ties/ready: the threshold key
    std::uint64_t above = 0;      // entries with a key above the candidates
    std::uint64_t need = 0;       // entries still to select among the candidates
    std::uint64_t tie_count = 0;  // ties/ready: entries with key T
    std::vector<std::uint32_t> chunk_ties;  // ties: per chunk counts; ready: exclusive prefix
    std::unique_ptr<Listing> listing;       // low round, when listed
  };
  struct TensorState {
    std::vector<State> targets;
    bool trivial = true;               // every target resolved without data
    bool speculate = false;            // execution 1 may speculate (every open target kept)
    bool has_chunk_counts = false;
    std::uint32_t executions = 0;      // of the reduce pass so far
    std::uint32_t hist_at = 0;         // the execution that builds the histogram
    std::uint64_t chunk_size = 0;      // learned in execution 1
    std::atomic<std::uint64_t> mapped{0};
    std::unique_ptr<std::atomic<std::uint32_t>[]> least;  // per source, see least_key
    std::mutex windows_mutex;
    std::vector<std::unique_ptr<ChunkWindows>> windows;  // the histogram's execution, per chunk
    std::size_t window_bytes = 0;                        // what they took, kept or not
  };

  template <class In, class Merge>
  bool reduce_inputs(TensorState& ts, const sdk::Chunk& c, const In* const* models, const In* b,
                     sdk::Span<std::uint32_t> partial, Merge& merge) {
    const std::size_t n = c.count();
    if (!b) throw sdk::Error("internal: the selection needs the base");
    if (ts.executions == 0 && c.begin() == 0) ts.chunk_size = c.count();  // chunk 0 is full (or the whole tensor)
    if (ts.executions == 0 && ts.speculate && !c.speculative_output().empty()) {
      // Every open target's share of this chunk, m * count / numel, holds its source's nonzeros?
      std::uint32_t nonzero[kMaxSpeculativeSources] = {}, chunk_least[kMaxSpeculativeSources];
      std::fill_n(chunk_least, kMaxSpeculativeSources, 0xFFFFFFFFu);
      bool sparse = sources_ <= kMaxSpeculativeSources;
      // After the last stripe, the exact test. Before it, the chunk gives up once its stripes so
      // far hold more than kGiveUp times their share (m * seen / numel): dense task vectors then
      // lose about one stripe's merge per chunk, not the chunk's. (Whether a chunk speculates
      // changes no output bit, only the work; the test depends on the chunk's data alone.)
      auto fits = [&](std::size_t seen) {
        for (const State& s : ts.targets) {
          if (s.phase == Phase::done) continue;
          const std::uint64_t have = nonzero[s.source];
          if (seen == n) {
            if (have * c.tensor().numel > s.m * n) return false;  // < 2^64: every count is below 2^32
          } else if (static_cast<double>(have) * static_cast<double>(c.tensor().numel) >
                     kGiveUp * static_cast<double>(s.m) * static_cast<double>(seen)) {
            return false;
          }
        }
        return true;
      };
      for (std::size_t s0 = 0; sparse && s0 < n; s0 += kStripe) {
        const std::size_t end = std::min(n, s0 + kStripe);
        merge(s0, end - s0, nonzero, chunk_least);
        sparse = fits(end);
      }
      if (sparse) {
        const std::size_t o = spec_offset();
        for (std::uint32_t i = 0; i < sources_; ++i) add_u64(partial.data() + o + 2 * i, nonzero[i]);
        partial[o + 2 * sources_] += 1;
        return true;
      }
    }
    if (ts.executions == ts.hist_at) {
      partial[spec_offset() + 2 * std::size_t{sources_} + 1] = 1;
      Scratch& sc = scratch();
      auto windows = std::make_unique<ChunkWindows>();
      windows->begin = c.begin();
      windows->targets.resize(per_tensor_);
      for (std::uint32_t i = 0; i < sources_; ++i) {
        if (!uses(ts, i)) continue;
        std::uint32_t* hist = partial.data() + std::size_t{i} * kHiBins;
        auto* impure = reinterpret_cast<std::uint8_t*>(partial.data() + impure_offset(i));
        std::uint32_t* meta = partial.data() + meta_offset() + 3 * std::size_t{i};
        sc.keys.resize(n + 16);
        const std::size_t nz = kernels::compact_nonzero(models[i], b, n, sc.keys.data());
        const auto zeros = static_cast<std::uint32_t>(n - nz);
        meta[2] += zeros;
        std::uint32_t lo = 0xFFFFFFFFu, hi = 0;
        kernels::key_range(sc.keys.data(), nz, lo, hi);
        if (nz) cover(partial.data(), i, lo >> 15, (hi >> 15) + 1);
        kernels::hist_high(sc.keys.data(), nz, sc.a.get(), sc.b.get(), impure);
        for (std::uint32_t j = 0; j < per_tensor_; ++j)
          if (ts.targets[j].source == i && ts.targets[j].phase == Phase::high)
            record_window(ts.targets[j], c, sc, nz, zeros, nz ? hi >> 15 : 0, windows->targets[j]);
        if (nz == 0) continue;
        kernels::fold(hist, sc.a.get(), sc.b.get(), lo >> 15, hi >> 15);  // the chunk's arrays are zero again
        std::atomic<std::uint32_t>& least = ts.least[i];  // the tensor's smallest nonzero key
        for (std::uint32_t was = least.load(std::memory_order_relaxed);
             lo < was && !least.compare_exchange_weak(was, lo, std::memory_order_relaxed);) {
        }
      }
      // Within the tensor's budget, else dropped (then some chunk has no window, and the later
      // executions run: the same whichever chunks came first, since the total decides).
      std::size_t bytes = sizeof(ChunkWindows) + per_tensor_ * sizeof(Window);
      for (const Window& w : windows->targets) bytes += w.impure.capacity() * sizeof(std::uint32_t);
      const std::lock_guard<std::mutex> lock(ts.windows_mutex);
      ts.window_bytes += bytes;
      if (ts.window_bytes <= kWindowBudget) ts.windows.push_back(std::move(windows));
      return false;
    }
    zero_low(ts, partial.data());
    for (std::uint32_t j = 0; j < per_tensor_; ++j) {
      State& s = ts.targets[j];
      const In* x = models[s.source];
      if (s.phase == Phase::low) {
        std::uint32_t* hist = partial.data() + std::size_t{j} * kLoBins;
        std::vector<std::uint16_t> lows;
        for (std::size_t k0 = 0; k0 < n; k0 += kBlock)
          kernels::hist_low(x + k0, b + k0, std::min(kBlock, n - k0), s.bin, hist, s.listing ? &lows : nullptr);
        if (s.listing) s.listing->add(chunk_index(ts, c), lows);
      } else if (s.phase == Phase::ties) {
        std::uint32_t cnt = 0;
        for (std::size_t k0 = 0; k0 < n; k0 += kBlock)
          cnt += kernels::count_equal(x + k0, b + k0, std::min(kBlock, n - k0), s.T);
        s.chunk_ties[chunk_index(ts, c)] = cnt;
      }
    }
    return false;
  }

  // Target s's window in chunk c: the chunk's own cut for its share of the target,
  // max(1, m * count / numel) entries, from the chunk's histogram (sc.a + sc.b, bins up to
  // top_bin; `zeros` zero entries and nz nonzero keys in sc.keys); the window is centred on it.
  static void record_window(const State& s, const sdk::Chunk& c, const Scratch& sc, std::size_t nz,
                            std::uint32_t zeros, std::uint32_t top_bin, Window& w) {
    const std::uint64_t share = std::max<std::uint64_t>(1, s.m * c.count() / c.tensor().numel);  // < 2^64
    std::uint32_t cut = 0;  // the cut among the zeros: bin 0
    if (share <= nz) {
      std::uint64_t above = 0;
      cut = top_bin;
      for (; above + sc.a[cut] + sc.b[cut] < share; --cut) above += sc.a[cut] + sc.b[cut];
    }
    w.start = std::min(cut - std::min(cut, kWindowBins / 2), kHiBins - kWindowBins);
    for (std::uint32_t k = 0; k < kWindowBins; ++k) w.counts[k] = sc.a[w.start + k] + sc.b[w.start + k];
    if (w.start == 0) w.counts[0] += zeros;
    // The impure keys of the window's bins: few in bf16-like data, too many to keep in float32-like
    // data (then the window serves pure bins only).
    const std::uint32_t first = w.start << 15, span = kWindowBins << 15;
    const std::size_t listed = kernels::count_impure(sc.keys.data(), nz, first, span);
    if (listed > kWindowList) {
      w.listed = false;
    } else if (listed > 0) {
      w.impure.resize(listed + 16);  // room for the compaction's last store
      kernels::list_impure(sc.keys.data(), nz, first, span, w.impure.data());
      w.impure.resize(listed);
    }
  }

  // Settles target j (its boundary bin b holds `in_bin` entries; impure: some with low bits), or
  // finds its threshold and per-chunk tie counts, from the chunks' windows, when every chunk's
  // window covers b (and, impure, lists its keys). False: nothing changed, the passes go on.
  bool from_windows(TensorState& ts, const cfx_tensor& t, std::uint32_t j, State& s, std::uint32_t b,
                    std::uint64_t in_bin, bool impure) {
    const std::size_t chunks = chunk_count(ts, t);
    if (ts.windows.size() != chunks) return false;
    std::vector<const Window*> by_chunk(chunks, nullptr);
    for (const auto& rec : ts.windows) {
      const std::uint64_t idx = rec->begin / ts.chunk_size;
      if (rec->begin % ts.chunk_size != 0 || idx >= chunks || by_chunk[idx])
        throw sdk::Error("internal: tensor '" + std::string(t.name) + "': chunk windows do not match its chunks");
      const Window& w = rec->targets[j];
      if (b < w.start || b - w.start >= kWindowBins || (impure && !w.listed)) return false;
      by_chunk[idx] = &w;
    }
    // Per chunk: its entries in bin b, and of these the listed (impure) ones of key `key` (any: -1).
    auto in_b = [b](const Window& w) { return w.counts[b - w.start]; };
    auto listed = [b](const Window& w, std::int64_t key) {
      std::uint32_t n = 0;
      for (const std::uint32_t k : w.impure) n += (k >> 15) == b && (key < 0 || k == key) ? 1u : 0u;
      return n;
    };
    std::uint32_t T = b << 15;
    std::uint64_t need = s.need, above = 0, at_T = in_bin;
    if (impure) {  // the low round, from the lists: the bin's pure keys are all T
      std::vector<std::uint64_t> low(kLoBins, 0);
      std::uint64_t total = 0;
      for (const Window* w : by_chunk) {
        const std::uint32_t n_listed = listed(*w, -1);
        if (n_listed > in_b(*w)) throw sdk::Error("internal: a window lists more keys than its bin holds");
        low[0] += in_b(*w) - n_listed;
        for (const std::uint32_t k : w->impure)
          if ((k >> 15) == b) ++low[k & 0x7FFFu];
        total += in_b(*w);
      }
      if (total != in_bin)
        throw sdk::Error("internal: tensor '" + std::string(t.name) + "': the windows hold " + std::to_string(total) +
                         " entries of a bin the histogram counts " + std::to_string(in_bin) + " in");
      std::uint32_t lb = kLoBins - 1;
      while (above + low[lb] < need) above += low[lb--];
      need -= above;
      T |= lb;
      at_T = low[lb];
    }
    ++window_resolved_;
    s.above += above;
    s.need = need;
    if (need == at_T || T == 0) {  // the key T taken whole, or zeros (see start_ties)
      finish(s, need == at_T ? T : 0);
      return true;
    }
    s.T = T;
    s.tie_count = at_T;
    s.chunk_ties.assign(chunks, 0);
    for (std::size_t c = 0; c < chunks; ++c) {
      const Window& w = *by_chunk[c];
      s.chunk_ties[c] = !impure ? in_b(w) : (T & 0x7FFFu) == 0 ? in_b(w) - listed(w, -1) : listed(w, T);
    }
    s.phase = Phase::ties;
    ts.has_chunk_counts = true;
    make_prefix(t, s);  // checks the counts against the histogram's
    return true;
  }

  // Speculation keeps per-source counts on the stack: up to this many sources.
  static constexpr std::uint32_t kMaxSpeculativeSources = 32;

  // The partial's layout (see stats_words).
  std::size_t impure_offset(std::uint32_t source) const {
    return std::size_t{sources_} * kHiBins + std::size_t{source} * kImpureWords;
  }
  std::size_t meta_offset() const { return std::size_t{sources_} * (kHiBins + kImpureWords); }
  std::size_t spec_offset() const { return meta_offset() + 3 * std::size_t{sources_}; }
  std::size_t low_flag() const { return spec_offset() + 2 * std::size_t{sources_} + 2; }

  // Source i's bins [first, end) join the touched range of its histogram and flags in `partial`
  // (meta: [meta[0], meta[1]), end 0 for none): the bins it gains are zeroed first, since the
  // words outside the range hold whatever the memory held (stats_unzeroed_words).
  void cover(std::uint32_t* partial, std::uint32_t i, std::uint32_t first, std::uint32_t end) const {
    std::uint32_t* meta = partial + meta_offset() + 3 * std::size_t{i};
    std::uint32_t* hist = partial + std::size_t{i} * kHiBins;
    auto* impure = reinterpret_cast<std::uint8_t*>(partial + impure_offset(i));
    auto clear = [&](std::uint32_t a, std::uint32_t z) {
      if (a >= z) return;
      std::memset(hist + a, 0, (z - a) * sizeof(std::uint32_t));
      std::memset(impure + a, 0, z - a);
    };
    if (meta[1] == 0) {
      clear(first, end);
      meta[0] = first;
      meta[1] = end;
      return;
    }
    clear(first, meta[0]);
    clear(meta[1], end);
    meta[0] = std::min(meta[0], first);
    meta[1] = std::max(meta[1], end);
  }

  // The low round's histograms of the open targets zeroed in `partial`, once (low_flag).
  void zero_low(const TensorState& ts, std::uint32_t* partial) const {
    if (partial[low_flag()] != 0) return;
    for (std::uint32_t j = 0; j < per_tensor_; ++j)
      if (ts.targets[j].phase == Phase::low) std::memset(partial + std::size_t{j} * kLoBins, 0, kLoBins * sizeof(std::uint32_t));
    partial[low_flag()] = 1;
  }
  static std::uint64_t read_u64(const std::uint32_t* w) { return w[0] | (std::uint64_t{w[1]} << 32); }
  static void add_u64(std::uint32_t* w, std::uint64_t v) {
    const std::uint64_t sum = read_u64(w) + v;
    w[0] = static_cast<std::uint32_t>(sum);
    w[1] = static_cast<std::uint32_t>(sum >> 32);
  }

  static void finish(State& s, std::uint32_t U) {
    s.U = U;
    s.phase = Phase::done;
  }

  static std::size_t chunk_count(const TensorState& ts, const cfx_tensor& t) {
    if (ts.chunk_size == 0) throw sdk::Error("internal: no chunk size for tensor '" + std::string(t.name) + "'");
    return static_cast<std::size_t>((t.numel + ts.chunk_size - 1) / ts.chunk_size);
  }

  void start_ties(TensorState& ts, const cfx_tensor& t, State& s, std::uint32_t T, std::uint64_t count) {
    if (T == 0) return finish(s, 0);  // zeros: selecting them all changes nothing (see the top)
    s.T = T;
    s.tie_count = count;
    s.chunk_ties.assign(chunk_count(ts, t), 0);
    s.phase = Phase::ties;
    ts.has_chunk_counts = true;
  }

  // Per-chunk tie counts -> exclusive prefix (checked against the histogram's count).
  void make_prefix(const cfx_tensor& t, State& s) {
    std::uint64_t sum = 0;
    for (std::uint32_t& c : s.chunk_ties) {
      const std::uint32_t here = c;
      c = static_cast<std::uint32_t>(sum);
      sum += here;
    }
    if (sum != s.tie_count)
      throw sdk::Error("internal: tensor '" + std::string(t.name) + "': the chunks counted " + std::to_string(sum) +
                       " entries at the threshold, the histogram " + std::to_string(s.tie_count));
    s.phase = Phase::ready;
    ++tie_breaks_;
  }

  bool uses(const TensorState& ts, std::uint32_t source) const {
    for (const State& s : ts.targets)
      if (s.source == source && s.phase != Phase::done) return true;
    return false;
  }

  static std::size_t chunk_index(const TensorState& ts, const sdk::Chunk& c) {
    const std::uint64_t size = ts.chunk_size;
    if (size == 0 || c.begin() % size != 0 || (c.count() != size && c.begin() + c.count() != c.tensor().numel))
      throw sdk::Error("internal: tensor '" + std::string(c.tensor().name) +
                       "' was cut into different chunks by the passes of one job");
    return static_cast<std::size_t>(c.begin() / size);
  }

  std::uint32_t sources_, per_tensor_;
  std::unique_ptr<TensorState[]> tensors_;
  bool active_ = false;
  std::atomic<std::uint64_t> executions_hist_[4] = {};
  std::atomic<std::uint64_t> tie_breaks_{0}, listed_tie_breaks_{0}, speculated_{0}, window_resolved_{0};
};

}  // namespace conflux::plugins::topk
