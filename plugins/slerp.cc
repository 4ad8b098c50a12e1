// slerp: spherical linear interpolation of two models (mergekit's "slerp").
//
// INPUTS. Exactly two checkpoints: v0 ("model 1") and v1 ("model 2").
//   - a base and one model:    v0 = the base,      v1 = models[0]   (mergekit: base_model + one)
//   - two models, no base:     v0 = models[0],     v1 = models[1]
// Anything else (one model alone, three models, a base and two models) is refused before any
// tensor is read. t = 0 gives v0, t = 1 gives v1.
//
// DEFINITION, per floating tensor (flattened; a, b its float32 values in v0 and v1, n elements):
//   ss0 = sum a[k]^2,  ss1 = sum b[k]^2,  dot = sum a[k] b[k]        (double; order below)
//   n0 = sqrt(ss0), n1 = sqrt(ss1)
//   n0 == 0 or n1 == 0 (a zero tensor has no direction)    -> linear:  c0 = 1 - t, c1 = t
//   else cos = dot / (n0 * n1)
//        |cos| > 0.9995 (near-parallel or -antiparallel)   -> linear:  c0 = 1 - t, c1 = t
//        else theta = acos(cos), s = sin(theta)             -> spherical:
//             c0 = sin(theta - theta * t) / s,  c1 = sin(theta * t) / s
//   out[k] = c0 * a[k] + c1 * b[k]   rounded once to float32 (the host then rounds to the output
//                                    dtype, nearest-even); computed in float32 for a BF16 output
//                                    (c0, c1 rounded to float32; plugin.h, CFX_FLOAT32_OUTPUT_BITS;
//                                    entries whose terms cancel are computed again in double,
//                                    common/float_guard.h), else in double
// This is mergekit's slerp (DOT_THRESHOLD 0.9995; cos of the normalized vectors, here dot/(n0 n1),
// the same quantity) with its statistics and coefficients in double instead of float32.
// Differences from mergekit:
//   - a zero-norm tensor falls back to linear interpolation; mergekit leaves a vector of norm
//     <= 1e-8 unnormalized and interpolates with a meaningless angle (~90 degrees);
//   - t is one number in [0, 1]; mergekit also accepts per-layer gradients of t (a list
//     interpolated over the layers), which this plugin does not (write one job per t instead).
//
// ORDER OF THE SUMS (what makes the statistics, hence the output, bit-identical at any thread
// count and chunking). The statistics pass runs on whole rows (CFX_PASS_WHOLE_ROWS; the last
// dimension; a 1-D tensor is one row, a scalar a row of one element). Within a row, element j
// (0-based in the row) is added to lane j mod 16, each lane in increasing j, products exact in
// double (float x float); the row's value is ((l0 + l1) + l2) + ... + l15. Row values are stored
// per row and folded in reduce_done in row order: ((row0 + row1) + row2) + ... So a sum depends
// only on the tensor's values and shape, never on how the host cut it into chunks. Memory: three
// doubles per row of the tensors being processed. The statistics kernel may fuse a product and
// its sum (FMA): the product of two floats is exact in double, so that changes no bit.
// SPECULATION (one read of the inputs). Checkpoints merged with slerp usually share their
// pretraining, so most tensors are near-parallel and take the linear branch, whose coefficients
// (1 - t, t) need no statistics. The statistics pass therefore also computes a chunk's linear
// output (CFX_PASS_SPECULATIVE_OUTPUT, first execution) when each of the chunk's rows is
// near-parallel on its own (|cos| of the row > 0.9995, or a zero-norm row): the output of the
// map pass's linear branch, bit for bit. When the tensor turns out linear (near-parallel or zero
// norm) and every chunk wrote its output, that output is final and the map pass is skipped (the
// report's "one_read"); otherwise the map pass runs as without speculation. Whether a tensor
// is finished in one read depends only on its rows, never on chunking or threads. A spherical
// tensor costs more only in its chunks whose rows are each near-parallel: their linear output
// is written, then overwritten by the map pass (chunks with a spherical row do not speculate).
// Both passes take BF16 tensors as stored (CFX_PASS_BF16_INPUTS: read straight from the mapped
// files, no conversion sweep by the host); a BF16 value widens to float32 exactly, so the kernels,
// templated on the input type, give the same bits as from float32 copies.
//
// REPORT (conflux-manifest.json, "report"): t, which checkpoints are v0 and v1, how many tensors
// were interpolated spherically / linearly (near-parallel) / linearly (zero norm), how many of
// them were finished in one read ("one_read"), the range of the angles, and per tensor its
// method, cos, c0 and c1 (numbers printed with %.17g).
#include <conflux/plugin.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>

#include "common/float_guard.h"
#include "common/inputs.h"
#include "common/widen.h"

namespace sdk = conflux::sdk;
namespace fg = conflux::plugins::float_guard;
using conflux::plugins::value;
using conflux::plugins::with_inputs;

namespace {

// GCC/Clang vector extensions: element-wise IEEE double arithmetic in a fixed lane layout, the
// same bits on every instruction set (plugins are built with -ffp-contract=off).
using conflux::plugins::v4d;
using conflux::plugins::widen4;
constexpr std::size_t kLanes = 16;


// The statistics kernel: both operands of every product are floats, so the product is exact in
// double and a fused multiply-add rounds exactly as the product and then the sum do. Contraction
// is allowed here alone (it halves the arithmetic), on CPUs with FMA (x86-64-v3, v4); the
// baseline version multiplies then adds, with the same bits.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__ELF__)
#define CFX_EXACT_FMA \
  __attribute__((optimize("fp-contract=fast"), target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CFX_EXACT_FMA
#endif

double fold_lanes(const double* l) {
  double s = l[0];
  for (std::size_t j = 1; j < kLanes; ++j) s += l[j];
  return s;
}

// out[0] = sum a^2, out[1] = sum b^2, out[2] = sum a b over one row, in the lane order above, in
// sweeps of W lanes (W = 16: one sweep; 8: lanes 0-7, then 8-15). A sweep keeps its lanes of the
// three sums in registers: 3 W / 4 accumulators and W / 2 operands, which fit AVX-512's 32
// vector registers for W = 16 and AVX2's 16 for W = 8. Each lane adds its elements in
// increasing j either way, so W changes no bit. In: float32 or stored BF16 inputs
// (common/inputs.h; a BF16 value widens to the same double as its float32 copy).
template <std::size_t W, class In>
CFX_EXACT_FMA void row_sums(const In* a, const In* b, std::size_t n, double* out) {
  static_assert(W % 4 == 0 && kLanes % W == 0);
  constexpr std::size_t V = W / 4;  // vectors per sum
  double aa[kLanes], bb[kLanes], ab[kLanes];
  for (std::size_t g = 0; g < kLanes; g += W) {
    v4d saa[V] = {}, sbb[V] = {}, sab[V] = {};
    std::size_t k = g;
    for (; k + W <= n; k += kLanes)
      for (std::size_t v = 0; v < V; ++v) {
        v4d x, y;
        widen4(a + k + 4 * v, x);
        widen4(b + k + 4 * v, y);
        saa[v] += x * x, sbb[v] += y * y, sab[v] += x * y;
      }
    std::memcpy(aa + g, saa, sizeof saa);
    std::memcpy(bb + g, sbb, sizeof sbb);
    std::memcpy(ab + g, sab, sizeof sab);
    // The row ends inside this sweep's lanes: its last elements, lane by lane.
    for (std::size_t j = 0; j < W && k + j < n; ++j) {
      const double x = value(a, k + j), y = value(b, k + j);
      aa[g + j] += x * x;
      bb[g + j] += y * y;
      ab[g + j] += x * y;
    }
  }
  out[0] = fold_lanes(aa);
  out[1] = fold_lanes(bb);
  out[2] = fold_lanes(ab);
}

#ifdef CONFLUX_PLUGINS_AVX512_LOADS
// row_sums<16> in AVX-512 registers: lanes 0-7 of each sum in one vector of 8 doubles, 8-15 in
// another, each lane adding its elements in increasing j with an exact fused multiply-add (the
// products of floats are exact in double): the same additions as row_sums, with fewer
// conversions (16 inputs widen once to float32, then to two vectors of doubles; measured: 23%
// fewer CPU samples in the kernel on the benchmark's slerp).
__attribute__((target("avx512f"), always_inline)) inline void halves(__m512 v, __m512d& lo, __m512d& hi) {
  // (The zero-masking forms with every lane on: GCC 12 warns that the plain forms' undefined
  // source "may be used uninitialized".)
  const auto all = static_cast<__mmask8>(0xFF), half = static_cast<__mmask8>(0xF);
  lo = _mm512_maskz_cvtps_pd(all, _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(half, _mm512_castps_pd(v), 0)));
  hi = _mm512_maskz_cvtps_pd(all, _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(half, _mm512_castps_pd(v), 1)));
}

template <class In>
__attribute__((target("avx512f,fma"))) void row_sums_avx512(const In* a, const In* b, std::size_t n, double* out) {
  using conflux::plugins::load16;
  __m512d aa0 = _mm512_setzero_pd(), aa1 = aa0, bb0 = aa0, bb1 = aa0, ab0 = aa0, ab1 = aa0;
  std::size_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    __m512d x0, x1, y0, y1;
    halves(load16(a + k), x0, x1);
    halves(load16(b + k), y0, y1);
    aa0 = _mm512_fmadd_pd(x0, x0, aa0);
    aa1 = _mm512_fmadd_pd(x1, x1, aa1);
    bb0 = _mm512_fmadd_pd(y0, y0, bb0);
    bb1 = _mm512_fmadd_pd(y1, y1, bb1);
    ab0 = _mm512_fmadd_pd(x0, y0, ab0);
    ab1 = _mm512_fmadd_pd(x1, y1, ab1);
  }
  alignas(64) double aa[kLanes], bb[kLanes], ab[kLanes];
  _mm512_store_pd(aa, aa0);
  _mm512_store_pd(aa + 8, aa1);
  _mm512_store_pd(bb, bb0);
  _mm512_store_pd(bb + 8, bb1);
  _mm512_store_pd(ab, ab0);
  _mm512_store_pd(ab + 8, ab1);
  for (std::size_t j = 0; k + j < n; ++j) {  // the row's last elements, lane by lane
    const double x = value(a, k + j), y = value(b, k + j);
    aa[j] += x * x;
    bb[j] += y * y;
    ab[j] += x * y;
  }
  out[0] = fold_lanes(aa);
  out[1] = fold_lanes(bb);
  out[2] = fold_lanes(ab);
}
#endif

template <class In>
using RowSums = void (*)(const In*, const In*, std::size_t, double*);

// The kernel for this CPU: AVX-512's, else sweeps of 8 lanes (with AVX2's 16 registers one
// sweep of 16 spills accumulators: 1.7 times slower there).
template <class In>
RowSums<In> pick_row_sums() {
#ifdef CONFLUX_PLUGINS_AVX512_LOADS
  if (conflux::plugins::have_avx512()) return row_sums_avx512<In>;
#endif
  return row_sums<8, In>;
}

// out[k] = c0 * a[k] + c1 * b[k] in T, rounded once. Guard (float32): returns how many results
// fail float_guard's test (the two terms cancelling). In: float32 or stored BF16 inputs.
template <class T, bool Guard = false, class In>
CONFLUX_MULTIVERSION std::uint32_t mix(const In* a, const In* b, std::size_t n, T c0, T c1, float* out) {
  std::uint32_t unsafe = 0;
  for (std::size_t k = 0; k < n; ++k) {
    const T t0 = c0 * static_cast<T>(value(a, k)), t1 = c1 * static_cast<T>(value(b, k)), r = t0 + t1;
    out[k] = static_cast<float>(r);
    if constexpr (Guard) unsafe += fg::unsafe(r, std::fabs(t0) + std::fabs(t1));
  }
  return unsafe;
}

constexpr double kDotThreshold = 0.9995;  // mergekit's DOT_THRESHOLD
constexpr double kPi = 3.14159265358979323846;

enum class Kind : std::uint8_t { empty, spherical, parallel, zero_norm };

}  // namespace

struct Slerp {
  static constexpr sdk::Info info{"slerp", "1.2.0",
                                  "Spherical linear interpolation of two models (base + one, or two models)", 1, 2,
                                  CFX_BASE_OPTIONAL};
  static inline const sdk::Param params[] = {
      sdk::Param::real("t", 0.5, "interpolation factor: 0 gives the first model (the base), 1 the second")
          .min(0)
          .max(1)
          .required(),
  };

  explicit Slerp(const sdk::Job& job)
      : job_(job),
        t_(job.number("t")),
        has_base_(job.has_base()),
        row_sums_f32_(pick_row_sums<float>()),
        row_sums_bf16_(pick_row_sums<std::uint16_t>()),
        state_(new TensorState[job.tensors().size()]) {
    const std::uint32_t n = job.model_count();
    if (has_base_ ? n != 1 : n != 2)
      throw sdk::Error(
          "slerp interpolates exactly two checkpoints: a base and one model (the base is t = 0), or two models "
          "without a base (models[0] is t = 0); this job gives " +
          std::string(has_base_ ? "a base and " : "no base and ") + std::to_string(n) + (n == 1 ? " model" : " models"));
  }

  // Statistics pass: one row at a time (whole rows), results stored per row; seen[0] counts the
  // rows, seen[1] those whose linear output was written (SPECULATION).
  std::size_t stats_count(std::uint32_t) const { return 2; }
  void stats(const sdk::Chunk& c, sdk::Span<std::uint64_t> seen) {
    const cfx_tensor& t = c.tensor();
    const std::uint64_t len = t.row_length;
    if (len == 0 || c.begin() % len != 0 || c.count() % len != 0)
      throw sdk::Error("internal: the host handed a chunk that is not made of whole rows");
    TensorState& s = state_[t.index];
    std::call_once(s.once, [&] { s.rows.reset(new double[3 * (t.numel / len)]); });
    double* out = s.rows.get() + 3 * (c.begin() / len);
    const std::uint64_t rows = c.count() / len;
    const sdk::Span<float> spec = c.speculative_output();
    with_inputs(c, [&](auto models, auto base) {
      const auto *a = first(models, base), *b = second(models, base);
      const auto row_sums = kernel(a);
      for (std::uint64_t r = 0; r < rows; ++r) row_sums(a + r * len, b + r * len, len, out + 3 * r);
      if (!spec.empty() && rows_near_parallel(out, rows)) {
        mix_chunk(c, a, b, 1 - t_, t_, spec);  // the linear branch's coefficients, as done() sets them
        c.output_written();
        seen[1] += rows;
      }
    });
    seen[0] += rows;
  }

  void combine(const cfx_tensor*, sdk::Span<std::uint64_t> into, sdk::Span<const std::uint64_t> from) {
    into[0] += from[0];
    into[1] += from[1];
  }

  sdk::Next done(const cfx_tensor* t, sdk::Span<const std::uint64_t> seen) {
    TensorState& s = state_[t->index];
    const std::uint64_t rows = t->numel == 0 ? 0 : t->numel / t->row_length;
    if (seen[0] != rows) throw sdk::Error("internal: the statistics pass did not see every row once");
    if (rows == 0) return sdk::Next::proceed;  // empty tensor: never mapped
    double ss0 = 0, ss1 = 0, dot = 0;
    const double* r = s.rows.get();
    for (std::uint64_t i = 0; i < rows; ++i) {
      ss0 += r[3 * i];
      ss1 += r[3 * i + 1];
      dot += r[3 * i + 2];
    }
    s.rows.reset();
    const double n0 = std::sqrt(ss0), n1 = std::sqrt(ss1);
    s.c0 = 1 - t_;
    s.c1 = t_;
    // A linear tensor whose every chunk wrote the linear output is finished.
    const auto linear = [&] {
      s.one_read = seen[1] == rows;
      return s.one_read ? sdk::Next::output_final : sdk::Next::proceed;
    };
    if (n0 == 0 || n1 == 0) {
      s.kind = Kind::zero_norm;
      return linear();
    }
    const double cos = dot / (n0 * n1);
    s.cos = cos;
    s.angle = std::acos(std::clamp(cos, -1.0, 1.0));
    if (std::fabs(cos) > kDotThreshold) {
      s.kind = Kind::parallel;
      return linear();
    }
    s.kind = Kind::spherical;
    const double theta = s.angle, sin_theta = std::sin(theta), theta_t = theta * t_;  // |cos| <= 0.9995: unclamped
    s.c0 = std::sin(theta - theta_t) / sin_theta;
    s.c1 = std::sin(theta_t) / sin_theta;
    return sdk::Next::proceed;
  }

  void map(const sdk::Chunk& c, sdk::Span<float> out) {
    const TensorState& s = state_[c.tensor().index];
    with_inputs(c, [&](auto models, auto base) { mix_chunk(c, first(models, base), second(models, base), s.c0, s.c1, out); });
  }

  void finish() {
    std::uint64_t counts[4] = {0, 0, 0, 0}, one_read = 0;
    double lo = 0, hi = 0;
    bool any_angle = false;
    for (std::size_t i = 0; i < job_.tensors().size(); ++i) {
      const TensorState& s = state_[i];
      ++counts[static_cast<int>(s.kind)];
      one_read += s.one_read ? 1 : 0;
      if (s.kind == Kind::spherical || s.kind == Kind::parallel) {
        lo = any_angle ? std::min(lo, s.angle) : s.angle;
        hi = any_angle ? std::max(hi, s.angle) : s.angle;
        any_angle = true;
      }
    }
    const double deg = 180.0 / kPi;
    char buf[512];
    std::snprintf(buf, sizeof buf,
                  "{\"t\":%.17g,\"v0\":\"%s\",\"v1\":\"%s\",\"tensors\":%llu,\"spherical\":%llu,"
                  "\"linear_near_parallel\":%llu,\"linear_zero_norm\":%llu,\"one_read\":%llu",
                  t_, has_base_ ? "base" : "models[0]", has_base_ ? "models[0]" : "models[1]",
                  static_cast<unsigned long long>(counts[1] + counts[2] + counts[3]),
                  static_cast<unsigned long long>(counts[1]), static_cast<unsigned long long>(counts[2]),
                  static_cast<unsigned long long>(counts[3]), static_cast<unsigned long long>(one_read));
    std::string json = buf;
    if (any_angle) {
      std::snprintf(buf, sizeof buf, ",\"angle_min_degrees\":%.17g,\"angle_max_degrees\":%.17g", lo * deg, hi * deg);
      json += buf;
    }
    // Every tensor: how it was interpolated, its cosine and the coefficients.
    json += ",\"per_tensor\":[";
    for (std::size_t i = 0; i < job_.tensors().size(); ++i) {
      const TensorState& s = state_[i];
      if (s.kind == Kind::empty) continue;
      static constexpr const char* kMethods[] = {"", "spherical", "linear_near_parallel", "linear_zero_norm"};
      json += (json.back() == '[' ? "{\"name\":" : ",{\"name\":") + sdk::json_quote(job_.tensors()[i].name) +
              ",\"method\":\"" + kMethods[static_cast<int>(s.kind)] + "\"";
      if (s.kind != Kind::zero_norm) {
        std::snprintf(buf, sizeof buf, ",\"cos\":%.17g", s.cos);
        json += buf;
      }
      std::snprintf(buf, sizeof buf, ",\"c0\":%.17g,\"c1\":%.17g}", s.c0, s.c1);
      json += buf;
    }
    json += "]}";
    job_.report(json);
    std::snprintf(buf, sizeof buf,
                  "slerp t = %g: %llu tensors spherical, %llu linear (near-parallel), %llu linear (zero norm)%s", t_,
                  static_cast<unsigned long long>(counts[1]), static_cast<unsigned long long>(counts[2]),
                  static_cast<unsigned long long>(counts[3]), any_angle ? "; angles " : "");
    std::string line = buf;
    if (any_angle) {
      std::snprintf(buf, sizeof buf, "%.4g to %.4g degrees", lo * deg, hi * deg);
      line += buf;
    }
    job_.log(CFX_LOG_INFO, line);
  }

 private:
  struct TensorState {
    std::once_flag once;
    std::unique_ptr<double[]> rows;  // statistics pass: ss0, ss1, dot of each row
    double c0 = 0, c1 = 0;           // out = c0 * v0 + c1 * v1
    double cos = 0, angle = 0;       // angle in radians (when both norms are nonzero)
    Kind kind = Kind::empty;
    bool one_read = false;           // finished by the statistics pass (SPECULATION)
  };

  // out = c0 * v0 + c1 * v1 over the chunk (the coefficients are the tensor's, in double). For a
  // BF16 output: float32 (the coefficients rounded to it here, the same for every chunk), with
  // float_guard's per-entry fallback to double.
  template <class In>
  static void mix_chunk(const sdk::Chunk& c, const In* a, const In* b, double c0d, double c1d, sdk::Span<float> out) {
    if (!c.float32_suffices()) {
      mix<double>(a, b, out.size(), c0d, c1d, out.data());
      return;
    }
    const float c0 = static_cast<float>(c0d), c1 = static_cast<float>(c1d);
    auto f32 = [&](std::size_t at, std::size_t n) {
      return mix<float, true>(a + at, b + at, n, c0, c1, out.data() + at);
    };
    auto f64 = [&](std::size_t at, std::size_t n) { mix<double>(a + at, b + at, n, c0d, c1d, out.data() + at); };
    fg::run(out.size(), f32, f64);
  }

  // Whether each of `rows` rows (their ss0, ss1, dot) is near-parallel on its own or has a zero
  // norm (SPECULATION: a chunk worth computing the linear output of).
  static bool rows_near_parallel(const double* sums, std::uint64_t rows) {
    for (std::uint64_t i = 0; i < rows; ++i) {
      const double* r = sums + 3 * i;
      const double n0 = std::sqrt(r[0]), n1 = std::sqrt(r[1]);
      if (n0 != 0 && n1 != 0 && !(std::fabs(r[2] / (n0 * n1)) > kDotThreshold)) return false;
    }
    return true;
  }

  // v0 and v1 among a chunk's inputs (float32 or stored BF16).
  template <class In>
  const In* first(const In* const* models, const In* base) const { return has_base_ ? base : models[0]; }
  template <class In>
  const In* second(const In* const* models, const In*) const { return has_base_ ? models[0] : models[1]; }

  // The statistics kernel for this CPU and the input type.
  RowSums<float> kernel(const float*) const { return row_sums_f32_; }
  RowSums<std::uint16_t> kernel(const std::uint16_t*) const { return row_sums_bf16_; }

  const sdk::Job& job_;
  double t_;
  bool has_base_;
  RowSums<float> row_sums_f32_;           // the statistics kernel for this CPU, float32 inputs
  RowSums<std::uint16_t> row_sums_bf16_;  // and stored BF16 inputs
  std::unique_ptr<TensorState[]> state_;  // one per floating tensor
};

CONFLUX_PLUGIN(Slerp,
               sdk::reduce_pass<Slerp, std::uint64_t, 0, &Slerp::stats, &Slerp::combine, &Slerp::done>(
                   CFX_PASS_TENSOR_REDUCE, CFX_PASS_WHOLE_ROWS | CFX_PASS_BF16_INPUTS | CFX_PASS_SPECULATIVE_OUTPUT),
               sdk::map_pass<Slerp, &Slerp::map>(CFX_PASS_BF16_INPUTS))
