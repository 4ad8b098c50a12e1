// model_stock's statistics kernels for up to four models (plugins/model_stock.cc, ORDER OF THE
// SUMS): the 16 lanes of every statistic of one row, element j of the row in lane j mod 16, each
// lane in increasing j, d_i d_j rounded to double before it is added. Two forms give the same
// bits: a portable one (GCC vector types, one group of four lanes per sweep of the row, under
// CONFLUX_MULTIVERSION) and, where the CPU has it, AVX-512 (every lane in registers, one sweep).
// In: float32 or stored BF16 inputs (common/inputs.h). Header-only, for the plugin and its tests.
#pragma once

#include <conflux/plugin.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "inputs.h"
#include "widen.h"

namespace conflux::plugins::stock_lanes {

constexpr std::size_t kLanes = 16;
constexpr std::size_t kGroup = 4;       // lanes per sweep of the portable kernels (one v4d)
constexpr std::size_t kRowBlock = 512;  // elements of a row per round of those sweeps (a multiple of kLanes)
static_assert(kRowBlock % kLanes == 0 && kLanes % kGroup == 0);

// Element k's products added to one lane of every statistic (statistic q's at lane + 16 q): the
// elements past the vector sweeps.
template <std::uint32_t N, class In>
[[gnu::always_inline]] inline void add_element(const In* const* xs, const In* b, std::size_t k, double* lane) {
  double d[N];
  for (std::uint32_t i = 0; i < N; ++i) d[i] = static_cast<double>(value(xs[i], k)) - static_cast<double>(value(b, k));
  for (std::uint32_t i = 0; i < N; ++i, lane += kLanes) *lane += d[i] * d[i];
  for (std::uint32_t i = 0; i < N; ++i)
    for (std::uint32_t j = i + 1; j < N; ++j, lane += kLanes) *lane += d[i] * d[j];
}

// One group of four lanes of up to four models' statistics (lanes + 16 q: statistic q's lanes)
// over the elements [from, end) that fall in those lanes (from: a block's start plus the group's
// first lane), continuing the lanes' sums. The base, the N deltas and the S sums stay in
// registers (at most 1 + 4 + 10 vectors, within AVX2's sixteen). In: float32 or stored BF16
// inputs (common/inputs.h).
template <std::uint32_t N, std::uint32_t S, class In>
[[gnu::always_inline]] inline void sweep_group(const In* const* xs, const In* b, std::size_t from, std::size_t end,
                                               double* lanes) {
  v4d acc[S];
  for (std::uint32_t q = 0; q < S; ++q) std::memcpy(&acc[q], lanes + kLanes * q, sizeof acc[q]);
  std::size_t k = from;
  for (; k + kGroup <= end; k += kLanes) {
    v4d bk, d[N];
    widen4(b + k, bk);
    for (std::uint32_t i = 0; i < N; ++i) {
      v4d x;
      widen4(xs[i] + k, x);
      d[i] = x - bk;
    }
    std::uint32_t q = 0;
    for (std::uint32_t i = 0; i < N; ++i) acc[q++] += d[i] * d[i];
    for (std::uint32_t i = 0; i < N; ++i)
      for (std::uint32_t j = i + 1; j < N; ++j) acc[q++] += d[i] * d[j];
  }
  for (std::uint32_t q = 0; q < S; ++q) std::memcpy(lanes + kLanes * q, &acc[q], sizeof acc[q]);
  // The row ends inside this group (in its last block): the last elements, lane by lane.
  for (std::size_t l = 0; l < kGroup && k + l < end; ++l) {
    add_element<N>(xs, b, k + l, lanes + l);
  }
}

// Up to four models: the 16 lanes of every statistic of one row (statistic q at out + 16 q), one
// sweep per group of four lanes, in blocks of kRowBlock elements so that the four sweeps over a
// block read it from L1 (a long row would come from L2 four times). Every lane still adds its
// elements in increasing j.
template <std::uint32_t N, class In>
[[gnu::always_inline]] inline void row_lanes(const In* const* x, const In* b, std::size_t n, double* out) {
  constexpr std::uint32_t S = N + N * (N - 1) / 2;
  const In* xs[N];
  for (std::uint32_t i = 0; i < N; ++i) xs[i] = x[i];
  std::memset(out, 0, sizeof(double) * kLanes * S);
  for (std::size_t k0 = 0; k0 < n; k0 += kRowBlock)
    for (std::size_t g = 0; g < kLanes; g += kGroup)
      sweep_group<N, S>(xs, b, k0 + g, std::min(n, k0 + kRowBlock), out + g);
}

template <class In>
CONFLUX_MULTIVERSION void row_lanes2(const In* const* x, const In* b, std::size_t n, double* out) {
  row_lanes<2>(x, b, n, out);
}
template <class In>
CONFLUX_MULTIVERSION void row_lanes3(const In* const* x, const In* b, std::size_t n, double* out) {
  row_lanes<3>(x, b, n, out);
}
template <class In>
CONFLUX_MULTIVERSION void row_lanes4(const In* const* x, const In* b, std::size_t n, double* out) {
  row_lanes<4>(x, b, n, out);
}

template <class In>
using RowKernel = void (*)(const In* const*, const In*, std::size_t, double*);

#ifdef CONFLUX_PLUGINS_AVX512_LOADS
// 8 inputs widened to 8 doubles (a BF16 value shifted into the high half of its float32). The
// zero-masking conversion with every lane on: GCC 12 warns that the plain form's undefined
// source "may be used uninitialized".
__attribute__((target("avx512f"))) inline __m512d widen8(const float* p) {
  return _mm512_maskz_cvtps_pd(static_cast<__mmask8>(0xFF), _mm256_loadu_ps(p));
}
__attribute__((target("avx512f"))) inline __m512d widen8(const std::uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_maskz_cvtps_pd(static_cast<__mmask8>(0xFF), _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
}
template <class In>
__attribute__((target("avx512f"))) inline void widen16(const In* p, __m512d& lo, __m512d& hi) {
  lo = widen8(p);
  hi = widen8(p + 8);
}

// row_lanes with AVX-512: the 16 lanes of every statistic in registers (two vectors each: at
// most 20 accumulators, the base and 8 delta vectors, within the 32 registers), so one sweep
// reads the row once where the four-lane kernels sweep each block four times. The operations
// per lane are the same and in the same order (products rounded, then added: the plugin is
// built with -ffp-contract=off), so are the bits; the elements past the last multiple of 16
// go lane by lane, as in sweep_group.
template <std::uint32_t N, class In>
__attribute__((target("avx512f"))) void row_lanes_avx512(const In* const* x, const In* b, std::size_t n,
                                                          double* out) {
  constexpr std::uint32_t S = N + N * (N - 1) / 2;
  __m512d acc[S][2];
  for (std::uint32_t q = 0; q < S; ++q) acc[q][0] = acc[q][1] = _mm512_setzero_pd();
  const In* xs[N];
  for (std::uint32_t i = 0; i < N; ++i) xs[i] = x[i];
  std::size_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    __m512d b0, b1, d[N][2];
    widen16(b + k, b0, b1);
    for (std::uint32_t i = 0; i < N; ++i) {
      widen16(xs[i] + k, d[i][0], d[i][1]);
      d[i][0] = _mm512_sub_pd(d[i][0], b0);
      d[i][1] = _mm512_sub_pd(d[i][1], b1);
    }
    std::uint32_t q = 0;
    for (std::uint32_t i = 0; i < N; ++i, ++q)
      for (int h = 0; h < 2; ++h) acc[q][h] = _mm512_add_pd(acc[q][h], _mm512_mul_pd(d[i][h], d[i][h]));
    for (std::uint32_t i = 0; i < N; ++i)
      for (std::uint32_t j = i + 1; j < N; ++j, ++q)
        for (int h = 0; h < 2; ++h) acc[q][h] = _mm512_add_pd(acc[q][h], _mm512_mul_pd(d[i][h], d[j][h]));
  }
  for (std::uint32_t q = 0; q < S; ++q) {
    _mm512_storeu_pd(out + kLanes * q, acc[q][0]);
    _mm512_storeu_pd(out + kLanes * q + 8, acc[q][1]);
  }
  for (std::size_t l = 0; k + l < n; ++l) {
    add_element<N>(xs, b, k + l, out + l);
  }
}

#endif

// The portable kernel for n models (nullptr: n outside 2..4), whatever the CPU.
template <class In>
RowKernel<In> portable_row_kernel(std::uint32_t n) {
  return n == 2 ? row_lanes2<In> : n == 3 ? row_lanes3<In> : n == 4 ? row_lanes4<In> : nullptr;
}

// This CPU's kernel for n models (nullptr: n outside 2..4).
template <class In>
RowKernel<In> row_kernel(std::uint32_t n) {
#ifdef CONFLUX_PLUGINS_AVX512_LOADS
  if (have_avx512())
    return n == 2 ? row_lanes_avx512<2, In> : n == 3 ? row_lanes_avx512<3, In> : n == 4 ? row_lanes_avx512<4, In> : nullptr;
#endif
  return portable_row_kernel<In>(n);
}

}  // namespace conflux::plugins::stock_lanes
