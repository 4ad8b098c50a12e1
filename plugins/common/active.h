// The active entries of a block: those where some model's float32 task vector d_i = x_i - base
// is nonzero (a NaN counts as nonzero). Sparse task vectors (RL fine-tunes: a few percent of
// entries each) leave most of a block's entries inactive, and an inactive entry's merge is the
// empty one, base + z with z the output factor times the empty merge, the same for every such
// entry. So a merge kernel that computes its result from each entry's own operands gives the
// same bits when it runs on the active entries only, gathered into dense arrays (their inputs
// widened to float32, exactly), and the other entries get base + z: the strategies' sparse
// paths (trim_merge.h, drop_merge.h) do that, and fall back to their dense sweep where a block
// is not sparse. Which path runs changes no bit, only the cost.
//
// gather_active is AVX-512 (register compress, then full-width stores: the arrays keep 16
// spare lanes); on other CPUs it reports that it cannot run, and the callers sweep densely.
// Header-only, for the plugins and their tests.
#pragma once

#include <conflux/plugin.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "inputs.h"

namespace conflux::plugins::active {

inline constexpr std::size_t kMaxBlock = 1024;  // entries per call, at most
inline constexpr std::uint32_t kMaxModels = 4;  // models per call, at most

// The active entries of one block, in index order: entry j is the block's entry idx[j], with
// base b[j] and model values x[i][j] (float32). r: room for the results of a kernel run on them.
// Past the count, up to padded(), the lanes hold zeros (index 0, base and values +0: an entry
// with nothing to merge), so a vectorized kernel can run whole vectors, padded() entries, with
// no scalar remainder (the gathered blocks are short: the remainder was half a kernel's time);
// the results past the count are not used.
struct Lanes {
  static constexpr std::size_t kRoom = kMaxBlock + 16;
  std::uint32_t count = 0;
  std::uint32_t padded() const { return (count + 15) & ~15u; }
  alignas(64) std::uint32_t idx[kRoom];
  alignas(64) float b[kRoom];
  alignas(64) float x[kMaxModels][kRoom];
  alignas(64) float r[kRoom];
  const float* xs[kMaxModels] = {x[0], x[1], x[2], x[3]};
  Lanes() = default;
  Lanes(const Lanes&) = delete;
  Lanes& operator=(const Lanes&) = delete;
};

// One per thread (about 37 KiB), for the kernels' blocks.
inline Lanes& thread_lanes() {
  thread_local Lanes lanes;
  return lanes;
}

// Entry k's task-vector entries: whether any is nonzero (d != 0, or a NaN), model i's nonzero
// flag added to nonzero[i], and its magnitude's key (the float32 bits without the sign) folded
// into least[i] where it is nonzero.
template <std::uint32_t N, class In>
inline bool active_at(const In* const* x, const In* b, std::size_t k, std::uint32_t* nonzero, std::uint32_t* least) {
  bool any = false;
  const float bk = value(b, k);
  for (std::uint32_t i = 0; i < N; ++i) {
    const float d = value(x[i], k) - bk;
    std::uint32_t key;
    std::memcpy(&key, &d, sizeof key);
    key &= 0x7FFFFFFFu;
    const bool nz = key != 0;
    nonzero[i] += nz ? 1u : 0u;
    if (nz && key < least[i]) least[i] = key;
    any = any || nz;
  }
  return any;
}

template <std::uint32_t N, class In>
inline void put(const In* const* x, const In* b, std::size_t k, Lanes& out) {
  const std::uint32_t j = out.count++;
  out.idx[j] = static_cast<std::uint32_t>(k);
  out.b[j] = value(b, k);
  for (std::uint32_t i = 0; i < N; ++i) out.x[i][j] = value(x[i], k);
}

#ifdef CONFLUX_PLUGINS_AVX512_LOADS
// Whether this CPU compresses 16-bit lanes (AVX512-VBMI2), for the BF16 gather's wide steps.
inline bool have_vbmi2() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vbmi2") != 0 && __builtin_cpu_supports("avx512bw") != 0;
  }();
  return yes;
}

// A gather in progress: per model its nonzero count and the lanes' smallest nonzero keys (kept
// only with Count: a caller that counts for itself, as DARE's sweep, skips that work).
template <std::uint32_t N, bool Count>
struct GatherState {
  __m512i low[N];
  std::uint32_t nz[kMaxModels] = {};
};

// Model i's task-vector keys (float32 bits without the sign) of 16 lanes, folded into the state
// with Count (lanes past the gathered ones hold zeros: key 0, not counted); returns the lanes
// where it is nonzero (d != 0, or a NaN).
template <std::uint32_t N, bool Count>
__attribute__((target("avx512f,popcnt"), always_inline)) inline __mmask16 fold_keys(GatherState<N, Count>& g,
                                                                                     std::uint32_t i, __m512 x,
                                                                                     __m512 b) {
  const __m512i key = _mm512_and_si512(_mm512_castps_si512(_mm512_sub_ps(x, b)), _mm512_set1_epi32(0x7FFFFFFF));
  const __mmask16 on = _mm512_test_epi32_mask(key, key);
  if constexpr (Count) {
    g.low[i] = _mm512_mask_min_epu32(g.low[i], on, g.low[i], key);
    g.nz[i] += static_cast<std::uint32_t>(__builtin_popcount(on));
  }
  return on;
}

// Entries [k, k + 16): float32 lanes, each stored array compressed to its active entries (the
// keys folded at full width: one vector either way).
template <std::uint32_t N, bool Count, class In>
__attribute__((target("avx512f,popcnt"), always_inline)) inline void step16(const In* const* x, const In* b, std::size_t k,
                                                                            Lanes& out, GatherState<N, Count>& g) {
  const __m512 bk = load16(b + k);
  __m512 xv[N];
  unsigned any = 0;
  for (std::uint32_t i = 0; i < N; ++i) {
    xv[i] = load16(x[i] + k);
    any |= fold_keys(g, i, xv[i], bk);
  }
  if (any == 0) return;
  const auto mask = static_cast<__mmask16>(any);
  const __m512i at = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(k)),
                                      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const std::uint32_t n = out.count;
  _mm512_storeu_si512(out.idx + n, _mm512_maskz_compress_epi32(mask, at));
  _mm512_storeu_ps(out.b + n, _mm512_maskz_compress_ps(mask, bk));
  for (std::uint32_t i = 0; i < N; ++i) _mm512_storeu_ps(out.x[i] + n, _mm512_maskz_compress_ps(mask, xv[i]));
  out.count = n + static_cast<std::uint32_t>(__builtin_popcount(any));
}

#define CONFLUX_GATHER_WIDE_TARGET target("avx512f,avx512bw,avx512vbmi2,popcnt")

// The low and high 16 of 32 16-bit lanes, zero-extended to 32 bits, and as float32 lanes from
// stored BF16. (The zero-masking forms with every lane on, as load16's.)
__attribute__((CONFLUX_GATHER_WIDE_TARGET, always_inline)) inline __m512i low16(__m512i v) {
  return _mm512_maskz_cvtepu16_epi32(static_cast<__mmask16>(0xFFFF),
                                     _mm512_maskz_extracti64x4_epi64(static_cast<__mmask8>(0xF), v, 0));
}
__attribute__((CONFLUX_GATHER_WIDE_TARGET, always_inline)) inline __m512i high16(__m512i v) {
  return _mm512_maskz_cvtepu16_epi32(static_cast<__mmask16>(0xFFFF),
                                     _mm512_maskz_extracti64x4_epi64(static_cast<__mmask8>(0xF), v, 1));
}
__attribute__((CONFLUX_GATHER_WIDE_TARGET, always_inline)) inline __m512 widen_low(__m512i v) {
  return bf16_as_f32(low16(v));
}
__attribute__((CONFLUX_GATHER_WIDE_TARGET, always_inline)) inline __m512 widen_high(__m512i v) {
  return bf16_as_f32(high16(v));
}

// Which of 32 stored BF16 values are an Inf or a NaN. With the bitwise x != b, this finds every
// entry whose task-vector entry d = x - b may be nonzero without widening: d is nonzero (or a
// NaN) exactly where the two are not equal numbers, so x != b bitwise, or b (then x too) is an
// Inf or NaN, where the difference is a NaN. (+0 against -0 is picked too: callers that need
// the exact set test the widened d.)
__attribute__((CONFLUX_GATHER_WIDE_TARGET, always_inline)) inline __mmask32 inf_or_nan16(__m512i b) {
  const __m512i exponent = _mm512_set1_epi16(0x7F80);
  return _mm512_cmpeq_epi16_mask(_mm512_and_si512(b, exponent), exponent);
}

// Entries [k, k + 32) of BF16 inputs: compressed as stored 16-bit values, one compress per array
// instead of two (the compresses are most of a sparse gather's cost), and widened after.
// Indices fit 16 bits (k < kMaxBlock). Which entries go is decided on the stored bits
// (inf_or_nan16), without widening; entries whose task vectors are all zero but stored as +0
// against -0 go too: their merge is computed from their own operands like any other, and
// fold_keys counts them out. The counts are folded from the compressed lanes (every nonzero
// entry is among them): a vector or two instead of two per model.
template <std::uint32_t N, bool Count>
__attribute__((CONFLUX_GATHER_WIDE_TARGET, always_inline)) inline void step32(const std::uint16_t* const* x,
                                                                              const std::uint16_t* b, std::size_t k,
                                                                              Lanes& out, GatherState<N, Count>& g) {
  const __m512i rb = _mm512_loadu_si512(b + k);
  __mmask32 any = inf_or_nan16(rb);
  __m512i rx[N];
  for (std::uint32_t i = 0; i < N; ++i) {
    rx[i] = _mm512_loadu_si512(x[i] + k);
    any |= _mm512_cmpneq_epi16_mask(rx[i], rb);
  }
  if (any == 0) return;
  const std::uint32_t count = static_cast<std::uint32_t>(__builtin_popcount(any));
  const __m512i at = _mm512_add_epi16(
      _mm512_set1_epi16(static_cast<short>(k)),
      _mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6,
                       5, 4, 3, 2, 1, 0));
  const __m512i idx = _mm512_maskz_compress_epi16(any, at);
  const __m512i cb = _mm512_maskz_compress_epi16(any, rb);
  __m512i cx[N];
  for (std::uint32_t i = 0; i < N; ++i) cx[i] = _mm512_maskz_compress_epi16(any, rx[i]);
  // The low 16 always (the arrays' spare lanes take what is past the count), the high 16 where
  // more than 16 are active.
  const std::uint32_t n = out.count;
  _mm512_storeu_si512(out.idx + n, low16(idx));
  const __m512 b0 = widen_low(cb);
  _mm512_storeu_ps(out.b + n, b0);
  for (std::uint32_t i = 0; i < N; ++i) {
    const __m512 x0 = widen_low(cx[i]);
    _mm512_storeu_ps(out.x[i] + n, x0);
    if constexpr (Count) fold_keys(g, i, x0, b0);
  }
  if (count > 16) {
    _mm512_storeu_si512(out.idx + n + 16, high16(idx));
    const __m512 b1 = widen_high(cb);
    _mm512_storeu_ps(out.b + n + 16, b1);
    for (std::uint32_t i = 0; i < N; ++i) {
      const __m512 x1 = widen_high(cx[i]);
      _mm512_storeu_ps(out.x[i] + n + 16, x1);
      if constexpr (Count) fold_keys(g, i, x1, b1);
    }
  }
  out.count = n + count;
}

template <std::uint32_t N, bool Count, class In>
__attribute__((target("avx512f,popcnt"))) std::size_t gather16(const In* const* x, const In* b, std::size_t k,
                                                               std::size_t m, Lanes& out, GatherState<N, Count>& g) {
  for (; k + 16 <= m; k += 16) step16(x, b, k, out, g);
  return k;
}

template <std::uint32_t N, bool Count>
__attribute__((CONFLUX_GATHER_WIDE_TARGET)) std::size_t gather32(const std::uint16_t* const* x, const std::uint16_t* b,
                                                                 std::size_t m, Lanes& out, GatherState<N, Count>& g) {
  std::size_t k = 0;
  for (; k + 32 <= m; k += 32) step32(x, b, k, out, g);
  return k;
}

template <std::uint32_t N, bool Count, class In>
__attribute__((target("avx512f,popcnt"))) void gather_avx512(const In* const* x, const In* b, std::size_t m,
                                                               Lanes& out, std::uint32_t* nonzero,
                                                               std::uint32_t* least) {
  out.count = 0;
  GatherState<N, Count> g;
  for (std::uint32_t i = 0; i < N; ++i) g.low[i] = _mm512_set1_epi32(-1);
  std::size_t k = 0;
  if constexpr (std::is_same_v<In, std::uint16_t>)
    if (have_vbmi2()) k = gather32(x, b, m, out, g);
  k = gather16(x, b, k, m, out, g);
  std::uint32_t lows[kMaxModels];
  for (std::uint32_t i = 0; i < N; ++i) {  // (GCC 12's _mm512_reduce_min_epu32 trips -Wuninitialized)
    alignas(64) std::uint32_t lane[16];
    _mm512_store_si512(lane, g.low[i]);
    lows[i] = *std::min_element(lane, lane + 16);
  }
  for (; k < m; ++k)
    if (active_at<N>(x, b, k, g.nz, lows)) put<N>(x, b, k, out);
  const __m512i zero = _mm512_setzero_si512();  // the padding (Lanes::padded)
  _mm512_storeu_si512(out.idx + out.count, zero);
  _mm512_storeu_si512(out.b + out.count, zero);
  for (std::uint32_t i = 0; i < N; ++i) _mm512_storeu_si512(out.x[i] + out.count, zero);
  if constexpr (!Count) return;
  for (std::uint32_t i = 0; i < N; ++i) {
    nonzero[i] += g.nz[i];
    least[i] = std::min(least[i], lows[i]);
  }
}
#endif

// Gathers the active entries of the block [0, m) of n models (x[i], b: float32 or stored BF16,
// common/inputs.h) into `out` (for BF16 inputs possibly also entries whose task vectors are all
// zero but whose stored values differ from the base's, +0 against -0: step32), adds each model's
// nonzero entries to nonzero[i] and folds the smallest key (float32 bits without the sign, as
// topk.h's) of its nonzero entries into least[i] (unchanged where it has none; both skipped
// where nonzero is null). Returns false (and does nothing) where this CPU has no AVX-512, or for
// more than kMaxModels models or kMaxBlock entries.
template <class In>
inline bool gather_active(std::uint32_t n, const In* const* x, const In* b, std::size_t m, Lanes& out,
                          std::uint32_t* nonzero, std::uint32_t* least) {
#ifdef CONFLUX_PLUGINS_AVX512_LOADS
  if (!have_avx512() || n == 0 || n > kMaxModels || m > kMaxBlock) return false;
  auto run = [&](auto count) {
    switch (n) {
      case 1: return gather_avx512<1, count.value>(x, b, m, out, nonzero, least);
      case 2: return gather_avx512<2, count.value>(x, b, m, out, nonzero, least);
      case 3: return gather_avx512<3, count.value>(x, b, m, out, nonzero, least);
      default: return gather_avx512<4, count.value>(x, b, m, out, nonzero, least);
    }
  };
  if (nonzero) run(std::true_type{});
  else run(std::false_type{});
  return true;
#else
  (void)n, (void)x, (void)b, (void)m, (void)out, (void)nonzero, (void)least;
  return false;
#endif
}

// A chunk's choice, block by block, between the gathered and the dense kernels (the same bits
// either way): gathered while blocks are sparse; after a dense block (more than half of it
// active) the next `retry` blocks go straight to the dense sweep, 7 at first, twice as many
// after each further dense block up to kMaxRetry (dense task vectors then pay for a gather in
// about one block of 32), and 7 again after a sparse one.
struct Sparse {
  static constexpr unsigned kFirstRetry = 7, kMaxRetry = 31;
  float z = 0.0f;  // the inactive entries' base + z
  bool on = false;
  unsigned wait = 0, retry = kFirstRetry;
  // z from the kernel (a zero of either sign: else the gathered path stays off).
  void start(float inactive) {
    z = inactive;
    on = inactive == 0.0f;
  }
  void off() { on = false; }
  bool next() {
    if (!on) return false;
    if (wait == 0) return true;
    --wait;
    return false;
  }
  bool worth(std::uint32_t active, std::size_t m) {
    if (2 * std::size_t{active} <= m) {
      retry = kFirstRetry;
      return true;
    }
    wait = retry;
    retry = std::min(2 * retry + 1, kMaxRetry);
    return false;
  }
};

// out[k] = base[k] + z for the block's m entries (float32: the inactive entries' result).
template <class In>
CONFLUX_MULTIVERSION void fill_base_plus_f32(const In* __restrict base, std::size_t m, float z, float* __restrict out) {
  for (std::size_t k = 0; k < m; ++k) out[k] = value(base, k) + z;
}

// out[idx[j]] = r[j] for the gathered entries.
inline void scatter(const Lanes& a, float* out) {
  for (std::uint32_t j = 0; j < a.count; ++j) out[a.idx[j]] = a.r[j];
}

}  // namespace conflux::plugins::active
