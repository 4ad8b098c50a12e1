// Float32 arithmetic for BF16 outputs, exact where it matters.
//
// A BF16 output keeps 8 significand bits, float32 carries 24: a result computed in float32 from a
// few terms is within about 2^-21 of the magnitudes it combines (m = |base| + sum of |terms|),
// which is far below half a BF16 ulp of the result r unless the terms cancel: the result is then
// within 1 ulp of the exact value whenever |r| * 2^12 >= m. The kernels compute that test per
// entry as they go (a few vector operations) and count the entries that fail it; those entries
// alone are computed again in double. The decision depends only on the entry's own values, so the
// output stays independent of chunking and threads.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

namespace conflux::plugins::float_guard {

// 1 when a float32 result r of magnitudes m may be more than 1 BF16 ulp from the exact value.
inline std::uint32_t unsafe(float r, float m) { return std::fabs(r) * 0x1p12f < m ? 1u : 0u; }

// Entries per float32 sweep (a sweep with failures is searched by halving, see redo).
inline constexpr std::size_t kSpan = 512;

// After a float32 sweep over entries [at, at + m) counted `unsafe` failures: f64(k, 1) on each
// failing entry k. A range with failures is halved until single entries: f32(offset, count)
// sweeps a part again (rewriting its results, and flagging each entry as it does in any sweep:
// the test depends on the entry alone) and returns its failures, so a few failures in a block
// cost a few short sweeps, not one call per entry.
template <class F32, class F64>
void redo_range(std::size_t at, std::size_t m, std::uint32_t unsafe, F32& f32, F64& f64) {
  if (unsafe == 0) return;
  if (m == 1) return f64(at, std::size_t{1});
  const std::size_t half = m / 2;
  const std::uint32_t left = f32(at, half);
  redo_range(at, half, left, f32, f64);
  redo_range(at + half, m - half, unsafe - left, f32, f64);
}

// The same over [0, m).
template <class F32, class F64>
void redo(std::size_t m, std::uint32_t unsafe, F32&& f32, F64&& f64) {
  redo_range(0, m, unsafe, f32, f64);
}

// f32(offset, count) over [0, m) in sweeps of kSpan, each returning how many entries failed the
// test, and redo where some did.
template <class F32, class F64>
void run(std::size_t m, F32&& f32, F64&& f64) {
  for (std::size_t k0 = 0; k0 < m; k0 += kSpan) {
    const std::size_t n = m - k0 < kSpan ? m - k0 : kSpan;
    const std::uint32_t unsafe = f32(k0, n);
    redo_range(k0, n, unsafe, f32, f64);
  }
}

}  // namespace conflux::plugins::float_guard
