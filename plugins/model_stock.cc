// model_stock: Model Stock (Jang et al. 2024, arXiv 2403.19522; mergekit's "model_stock").
//
// The base theta_0 and N >= 2 fine-tuned models theta_1..theta_N. Per tensor (or, with
// filter_wise, per row: the last dimension; a 1-D tensor is one row, a scalar a row of one):
//   d_i    = theta_i - theta_0                         per element, in double (float32 inputs)
//   s_i    = sum d_i^2,   p_ij = sum d_i d_j (i < j)   over the tensor (row); order below
//   cos_ij = p_ij / (sqrt(s_i) * sqrt(s_j)), clamped to [-1, 1];  0 when s_i or s_j is 0
//   cos    = (sum over pairs i < j, in order (1,2), (1,3), ..., (1,N), (2,3), ...) / (N(N-1)/2)
//   t      = N cos / (1 + (N - 1) cos);   t = 0 when 1 + (N - 1) cos <= 0
//   out    = (t / N) * (((theta_1 + theta_2) + ...) + theta_N) + (1 - t) * theta_0
//            rounded once to float32 (the host then rounds to the output dtype, nearest-even):
//            t * mean(theta_i) + (1 - t) * theta_0. t / N and 1 - t are computed once in double;
//            the rest is in float32 for a BF16 output of up to 4 models (both rounded to float32;
//            plugin.h, CFX_FLOAT32_OUTPUT_BITS; entries whose terms cancel are computed again in
//            double, common/float_guard.h), else in double.
//
// Zero task vectors: a model that left the tensor (row) unchanged has no direction; its pairs
// count as cos = 0 (they still count in the mean). If every model left it unchanged, cos = 0,
// t = 0 and the output is the base exactly. mergekit divides by max(|d_i| |d_j|, 1e-6) instead,
// which also gives 0 for a zero vector but shrinks the cosine of small nonzero task vectors
// (|d_i| |d_j| < 1e-6) towards 0; here the cosine of any nonzero pair is its true cosine.
// Negative cosines: as in mergekit, t is negative when the mean cosine is (the merge moves away
// from the models' average), and |t| grows without bound near the pole cos = -1/(N-1). The mean
// cosine reaches the pole only when the unit task vectors sum to zero (e.g. two exactly opposite
// task vectors, N = 2), and passes it only through rounding; there mergekit divides by zero, here
// t = 0: the base.
// Differences from mergekit otherwise: none in the definition (mergekit computes in the tensors'
// dtype, here the statistics in double and the output as above).
//
// REPORT (conflux-manifest.json, "report"): the range and mean of t over the tensors (filter_wise:
// rows), how many had a zero task vector, all zero, or hit the pole, and per tensor its mean
// cosine and t (filter_wise: rows, t_min, t_max, t_mean), numbers printed with %.17g.
//
// ORDER OF THE SUMS (bit-identical output at any thread count and chunking). The statistics
// pass runs on whole rows (CFX_PASS_WHOLE_ROWS). Within a row, element j (0-based in the row)
// goes to lane j mod 16 of each statistic, each lane in increasing j, with d_i d_j rounded to
// double; the row's value is ((l0 + l1) + l2) + ... + l15. Row values are stored per row (N +
// N(N-1)/2 doubles each, only for the tensors being processed: O(rows x pairs), not O(elements))
// and, per tensor, folded in reduce_done in row order: ((row0 + row1) + row2) + ... With
// filter_wise each row keeps its own t (one double per row until the tensor is written).
// Up to four models, a kernel per model count keeps the deltas and the lanes of every statistic
// in registers: with AVX-512 all 16 lanes (one sweep of the row), else one group of four lanes
// at a time (lanes 0-3, 4-7, 8-11, 12-15: a sweep per group); more models go through blocks of
// 256 elements, one statistic at a time. All follow the order above with the same operations (no
// fused multiply-add: d_i d_j is rounded before it is added), so they give the same bits.
// Both passes take BF16 tensors as stored (CFX_PASS_BF16_INPUTS: read straight from the mapped
// files, no conversion sweep by the host); a BF16 value widens to float32 exactly, so the kernels,
// templated on the input type, give the same bits as from float32 copies.
#include <conflux/plugin.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "common/float_guard.h"
#include "common/inputs.h"
#include "common/stock_lanes.h"
#include "common/widen.h"

namespace sdk = conflux::sdk;
namespace fg = conflux::plugins::float_guard;
using conflux::plugins::value;
using conflux::plugins::with_inputs;

namespace {

// Element-wise IEEE double arithmetic in GCC/Clang vector types (see plugins/slerp.cc): four
// doubles per vector, the same bits on every instruction set under CONFLUX_MULTIVERSION.
using conflux::plugins::v4d;
using conflux::plugins::stock_lanes::kLanes;
using conflux::plugins::stock_lanes::RowKernel;
using conflux::plugins::stock_lanes::row_kernel;
constexpr std::size_t kBlock = 256;       // elements per block of a row, general path (a multiple of kLanes)
constexpr std::size_t kMapBlock = 512;    // elements per block of the map pass, more than four models
constexpr std::uint32_t kRegisterModels = 4;  // up to this many models, statistics in registers (stock_lanes.h)
static_assert(kBlock % kLanes == 0);


double fold_lanes(const double* l) {
  double s = l[0];
  for (std::size_t j = 1; j < kLanes; ++j) s += l[j];
  return s;
}


// General path. d[k] = x[k] - base[k] in double.
template <class In>
CONFLUX_MULTIVERSION void deltas(const In* x, const double* base, std::size_t m, double* d) {
  for (std::size_t k = 0; k < m; ++k) d[k] = static_cast<double>(value(x, k)) - base[k];
}

template <class In>
CONFLUX_MULTIVERSION void widen(const In* x, std::size_t m, double* out) {
  for (std::size_t k = 0; k < m; ++k) out[k] = static_cast<double>(value(x, k));
}

// lanes[k mod 16] += x[k] * y[k] for k < m, each lane in increasing k (four accumulators of four
// lanes, in registers).
CONFLUX_MULTIVERSION void accumulate(const double* x, const double* y, std::size_t m, double* lanes) {
  v4d l[4];
  std::memcpy(l, lanes, sizeof l);
  std::size_t k = 0;
  for (; k + kLanes <= m; k += kLanes) {
    v4d xv[4], yv[4];
    std::memcpy(xv, x + k, sizeof xv);
    std::memcpy(yv, y + k, sizeof yv);
    l[0] += xv[0] * yv[0], l[1] += xv[1] * yv[1], l[2] += xv[2] * yv[2], l[3] += xv[3] * yv[3];
  }
  std::memcpy(lanes, l, sizeof l);
  for (std::size_t j = 0; k + j < m; ++j) lanes[j] += x[k + j] * y[k + j];
}

// The map pass. Up to four models (G) summed in model order in T, continuing acc_in (Chained;
// else from the first of them); Last (the last group): out = a * sum + u * base is rounded to out
// instead of the sum kept in acc. One sweep per group, its operands in registers. Guard (float32,
// one group: not Chained, Last): returns how many results fail float_guard's test (magnitudes
// |a| sum |theta_i| + |u base|: the sum and the two terms may cancel). In: float32 or stored BF16
// inputs (common/inputs.h). Chained and Last are template arguments: runtime tests in the loop
// keep it from vectorizing for BF16 inputs (too large to unswitch).
template <class T, unsigned G, bool Guard, bool Chained, bool Last, class In>
CONFLUX_MULTIVERSION std::uint32_t blend(const In* const* x, const In* base, std::size_t m, const T* acc_in, T* acc,
                                         T a, T u, float* out) {
  static_assert(G >= 1 && G <= 4);
  static_assert(!Guard || (!Chained && Last));
  // Named locals: the vectorizer does not see through arrays of pointers.
  const In *x0 = x[0], *x1 = x[G > 1 ? 1 : 0], *x2 = x[G > 2 ? 2 : 0], *x3 = x[G > 3 ? 3 : 0];
  const T abs_a = std::fabs(a);
  std::uint32_t unsafe = 0;
  for (std::size_t k = 0; k < m; ++k) {
    const T v0 = static_cast<T>(value(x0, k)), v1 = G > 1 ? static_cast<T>(value(x1, k)) : T(0);
    const T v2 = G > 2 ? static_cast<T>(value(x2, k)) : T(0), v3 = G > 3 ? static_cast<T>(value(x3, k)) : T(0);
    T s = v0;
    if constexpr (Chained) s = acc_in[k] + v0;
    if constexpr (G > 1) s += v1;
    if constexpr (G > 2) s += v2;
    if constexpr (G > 3) s += v3;
    if constexpr (Last) {
      const T ub = u * static_cast<T>(value(base, k)), r = a * s + ub;
      out[k] = static_cast<float>(r);
      if constexpr (Guard) {
        const T models = std::fabs(v0) + std::fabs(v1) + std::fabs(v2) + std::fabs(v3);
        unsafe += fg::unsafe(r, abs_a * models + std::fabs(ub));
      }
    } else {
      acc[k] = s;
    }
  }
  return unsafe;
}

template <class T, bool Guard, bool Chained, bool Last, class In>
std::uint32_t blend_n(unsigned g, const In* const* x, const In* base, std::size_t m, const T* acc_in, T* acc, T a, T u,
                      float* out) {
  switch (g) {
    case 1: return blend<T, 1, Guard, Chained, Last>(x, base, m, acc_in, acc, a, u, out);
    case 2: return blend<T, 2, Guard, Chained, Last>(x, base, m, acc_in, acc, a, u, out);
    case 3: return blend<T, 3, Guard, Chained, Last>(x, base, m, acc_in, acc, a, u, out);
    default: return blend<T, 4, Guard, Chained, Last>(x, base, m, acc_in, acc, a, u, out);
  }
}

// blend for a group of g models: Chained when acc_in is given, Last when out is. Guard: one group
// (acc_in null, out given).
template <class T, bool Guard = false, class In>
std::uint32_t blend_group(unsigned g, const In* const* x, const In* base, std::size_t m, const T* acc_in, T* acc, T a,
                          T u, float* out) {
  if constexpr (Guard) {
    return blend_n<T, true, false, true>(g, x, base, m, nullptr, nullptr, a, u, out);
  } else if (acc_in) {
    return out ? blend_n<T, false, true, true>(g, x, base, m, acc_in, acc, a, u, out)
               : blend_n<T, false, true, false>(g, x, base, m, acc_in, acc, a, u, out);
  } else {
    return out ? blend_n<T, false, false, true>(g, x, base, m, acc_in, acc, a, u, out)
               : blend_n<T, false, false, false>(g, x, base, m, acc_in, acc, a, u, out);
  }
}

}  // namespace

struct ModelStock {
  static constexpr sdk::Info info{"model_stock", "1.1.0",
                                  "Model Stock: t * mean of the models + (1 - t) * base, t from the angle between "
                                  "their task vectors",
                                  2, 0, CFX_BASE_REQUIRED};
  static inline const sdk::Param params[] = {
      sdk::Param::boolean("filter_wise", false, "one t per row (the last dimension) instead of one per tensor"),
  };

  explicit ModelStock(const sdk::Job& job)
      : job_(job),
        n_(job.model_count()),
        pairs_(n_ * (n_ - 1) / 2),
        stats_(n_ + pairs_),
        filter_wise_(job.flag("filter_wise")),
        state_(new TensorState[job.tensors().size()]) {}

  // Statistics pass: whole rows; per row s_1..s_N then p_12, p_13, ..., stored per row.
  void stats(const sdk::Chunk& c, sdk::Span<std::uint64_t> rows_seen) {
    const cfx_tensor& t = c.tensor();
    const std::uint64_t len = t.row_length;
    if (len == 0 || c.begin() % len != 0 || c.count() % len != 0)
      throw sdk::Error("internal: the host handed a chunk that is not made of whole rows");
    TensorState& s = state_[t.index];
    std::call_once(s.once, [&] { s.rows.reset(new double[stats_ * (t.numel / len)]); });
    const std::uint64_t rows = c.count() / len;
    double* out = s.rows.get() + stats_ * (c.begin() / len);
    with_inputs(c, [&](auto models, auto base) {
      if (n_ <= kRegisterModels)
        register_rows(models, base, len, rows, out);
      else
        block_rows(models, base, len, rows, out);
    });
    rows_seen[0] += rows;
  }

  // Up to kRegisterModels models: one kernel call per row.
  template <class In>
  void register_rows(const In* const* models, const In* base, std::uint64_t len, std::uint64_t rows,
                     double* out) const {
    const RowKernel<In> kernel = row_kernel<In>(n_);
    double lanes[kLanes * (kRegisterModels + kRegisterModels * (kRegisterModels - 1) / 2)];
    const In* x[kRegisterModels];
    for (std::uint64_t r = 0; r < rows; ++r) {
      for (std::uint32_t i = 0; i < n_; ++i) x[i] = models[i] + r * len;
      kernel(x, base + r * len, len, lanes);
      for (std::size_t q = 0; q < stats_; ++q) out[stats_ * r + q] = fold_lanes(lanes + q * kLanes);
    }
  }

  // More models: blocks of kBlock elements, one statistic at a time.
  template <class In>
  void block_rows(const In* const* models, const In* base_in, std::uint64_t len, std::uint64_t rows,
                  double* out) const {
    std::vector<double> base(kBlock), d(n_ * kBlock), lanes(stats_ * kLanes);
    for (std::uint64_t r = 0; r < rows; ++r) {
      std::fill(lanes.begin(), lanes.end(), 0.0);
      for (std::uint64_t k0 = 0; k0 < len; k0 += kBlock) {
        const std::size_t m = static_cast<std::size_t>(std::min<std::uint64_t>(kBlock, len - k0));
        const std::uint64_t off = r * len + k0;
        widen(base_in + off, m, base.data());
        for (std::uint32_t i = 0; i < n_; ++i) deltas(models[i] + off, base.data(), m, d.data() + i * kBlock);
        double* l = lanes.data();
        for (std::uint32_t i = 0; i < n_; ++i, l += kLanes) accumulate(d.data() + i * kBlock, d.data() + i * kBlock, m, l);
        for (std::uint32_t i = 0; i < n_; ++i)
          for (std::uint32_t j = i + 1; j < n_; ++j, l += kLanes)
            accumulate(d.data() + i * kBlock, d.data() + j * kBlock, m, l);
      }
      for (std::size_t q = 0; q < stats_; ++q) out[stats_ * r + q] = fold_lanes(lanes.data() + q * kLanes);
    }
  }

  void combine(const cfx_tensor*, sdk::Span<std::uint64_t> into, sdk::Span<const std::uint64_t> from) {
    into[0] += from[0];
  }

  bool done(const cfx_tensor* t, sdk::Span<const std::uint64_t> rows_seen) {
    TensorState& s = state_[t->index];
    const std::uint64_t rows = t->numel == 0 ? 0 : t->numel / t->row_length;
    if (rows_seen[0] != rows) throw sdk::Error("internal: the statistics pass did not see every row once");
    if (rows == 0) return false;  // empty tensor: never mapped
    const double* r = s.rows.get();
    if (filter_wise_) {
      s.t_rows.reset(new double[rows]);
      for (std::uint64_t i = 0; i < rows; ++i) s.t_rows[i] = t_of(r + stats_ * i, s.summary);
    } else {
      std::vector<double> total(stats_, 0.0);
      for (std::uint64_t i = 0; i < rows; ++i)
        for (std::size_t q = 0; q < stats_; ++q) total[q] += r[stats_ * i + q];
      s.t = t_of(total.data(), s.summary, &s.cos);
    }
    s.rows.reset();
    return false;
  }

  void map(const sdk::Chunk& c, sdk::Span<float> out) {
    with_inputs(c, [&](auto models, auto base) { map_inputs(c, models, base, out); });
  }

  template <class In>
  void map_inputs(const sdk::Chunk& c, const In* const* models, const In* base, sdk::Span<float> out) {
    const cfx_tensor& t = c.tensor();
    TensorState& s = state_[t.index];
    const bool f32 = c.float32_suffices();
    if (!filter_wise_) {
      merge(f32, models, base, 0, out.size(), s.t, out.data());
      return;
    }
    // Row by row (a chunk may start or end inside a row).
    const std::uint64_t len = t.row_length;
    for (std::size_t k = 0; k < out.size();) {
      const std::uint64_t e = c.begin() + k, row = e / len;
      const std::size_t m = static_cast<std::size_t>(std::min<std::uint64_t>(out.size() - k, (row + 1) * len - e));
      merge(f32, models, base, k, m, s.t_rows[row], out.data());
      k += m;
    }
    // The last chunk of the tensor frees its per-row t (every other chunk is done with it).
    if (s.mapped.fetch_add(out.size(), std::memory_order_acq_rel) + out.size() == t.numel) s.t_rows.reset();
  }

  void finish() {
    Summary all;
    std::uint64_t tensors = 0;
    for (std::size_t i = 0; i < job_.tensors().size(); ++i) {
      const Summary& s = state_[i].summary;
      if (s.count == 0) continue;
      ++tensors;
      all.lo = all.count ? std::min(all.lo, s.lo) : s.lo;
      all.hi = all.count ? std::max(all.hi, s.hi) : s.hi;
      all.sum += s.sum;
      all.count += s.count;
      all.some_zero += s.some_zero;
      all.all_zero += s.all_zero;
      all.pole += s.pole;
    }
    const char* unit = filter_wise_ ? "rows" : "tensors";
    char buf[640];
    std::snprintf(buf, sizeof buf,
                  "{\"models\":%u,\"filter_wise\":%s,\"tensors\":%llu,\"rows\":%llu,\"t_min\":%.17g,\"t_max\":%.17g,"
                  "\"t_mean\":%.17g,\"with_zero_task_vector\":%llu,\"all_task_vectors_zero\":%llu,\"at_pole\":%llu,",
                  n_, filter_wise_ ? "true" : "false", static_cast<unsigned long long>(tensors),
                  static_cast<unsigned long long>(filter_wise_ ? all.count : 0), all.count ? all.lo : 0.0,
                  all.count ? all.hi : 0.0, all.count ? all.sum / static_cast<double>(all.count) : 0.0,
                  static_cast<unsigned long long>(all.some_zero), static_cast<unsigned long long>(all.all_zero),
                  static_cast<unsigned long long>(all.pole));
    // Every tensor: its t and mean cosine, or with filter_wise the range and mean of its rows' t.
    std::string json = std::string(buf) + "\"per_tensor\":[";
    for (std::size_t i = 0; i < job_.tensors().size(); ++i) {
      const TensorState& s = state_[i];
      if (s.summary.count == 0) continue;
      json += (json.back() == '[' ? "{\"name\":" : ",{\"name\":") + sdk::json_quote(job_.tensors()[i].name);
      if (filter_wise_)
        std::snprintf(buf, sizeof buf, ",\"rows\":%llu,\"t_min\":%.17g,\"t_max\":%.17g,\"t_mean\":%.17g}",
                      static_cast<unsigned long long>(s.summary.count), s.summary.lo, s.summary.hi,
                      s.summary.sum / static_cast<double>(s.summary.count));
      else
        std::snprintf(buf, sizeof buf, ",\"cos\":%.17g,\"t\":%.17g}", s.cos, s.t);
      json += buf;
    }
    json += "]}";
    job_.report(json);
    std::snprintf(buf, sizeof buf,
                  "model_stock over %u models, one t per %s: t from %.6g to %.6g, mean %.6g over %llu %s; %llu %s with "
                  "an unchanged model (%llu with all unchanged: the base)",
                  n_, filter_wise_ ? "row" : "tensor", all.count ? all.lo : 0.0, all.count ? all.hi : 0.0,
                  all.count ? all.sum / static_cast<double>(all.count) : 0.0,
                  static_cast<unsigned long long>(all.count), unit, static_cast<unsigned long long>(all.some_zero),
                  unit, static_cast<unsigned long long>(all.all_zero));
    job_.log(CFX_LOG_INFO, buf);
  }

 private:
  // t of a tensor or row: min, max and sum of t, and how often the special cases occurred.
  struct Summary {
    double lo = 0, hi = 0, sum = 0;
    std::uint64_t count = 0, some_zero = 0, all_zero = 0, pole = 0;
  };

  struct TensorState {
    std::once_flag once;
    std::unique_ptr<double[]> rows;    // statistics pass: stats_ per row
    std::unique_ptr<double[]> t_rows;  // filter_wise: t of each row, until the tensor is written
    double t = 0, cos = 0;             // not filter_wise
    std::atomic<std::uint64_t> mapped{0};
    Summary summary;                   // written by reduce_done only
  };

  // t from the statistics s_1..s_N, p_12, p_13, ... (see the top of the file).
  double t_of(const double* st, Summary& sum, double* cos_out = nullptr) const {
    double cos_sum = 0;
    std::size_t q = n_;
    for (std::uint32_t i = 0; i < n_; ++i)
      for (std::uint32_t j = i + 1; j < n_; ++j, ++q) {
        const double norms = std::sqrt(st[i]) * std::sqrt(st[j]);
        cos_sum += norms > 0 ? std::clamp(st[q] / norms, -1.0, 1.0) : 0.0;
      }
    const double n = static_cast<double>(n_);
    const double cos = cos_sum / static_cast<double>(pairs_);
    const double denom = 1 + (n - 1) * cos;
    const double t = denom > 0 ? n * cos / denom : 0.0;
    if (cos_out) *cos_out = cos;
    std::uint32_t zero = 0;
    for (std::uint32_t i = 0; i < n_; ++i) zero += st[i] == 0 ? 1u : 0u;
    sum.lo = sum.count ? std::min(sum.lo, t) : t;
    sum.hi = sum.count ? std::max(sum.hi, t) : t;
    sum.sum += t;
    ++sum.count;
    sum.some_zero += zero > 0 ? 1 : 0;
    sum.all_zero += zero == n_ ? 1 : 0;
    sum.pole += denom > 0 ? 0 : 1;
    return t;
  }

  // out[k0 .. k0+m) = (t / N) * sum_i theta_i + (1 - t) * base, the coefficients in double. For
  // a BF16 output of up to four models (one sweep): float32 (the coefficients rounded to it here),
  // with float_guard's per-entry fallback to double. f32: the chunk's float32_suffices().
  template <class In>
  void merge(bool f32, const In* const* models, const In* base, std::size_t k0, std::size_t m, double t,
             float* out) const {
    const double a = t / static_cast<double>(n_), u = 1 - t;
    if (!f32 || n_ > 4) return merge_double(models, base, k0, m, a, u, out);
    const float af = static_cast<float>(a), uf = static_cast<float>(u);
    auto sweep = [&](auto a_t, auto u_t, std::size_t at, std::size_t count) {
      using T = decltype(a_t);
      const In* x[4];
      for (std::uint32_t j = 0; j < n_; ++j) x[j] = models[j] + k0 + at;
      return blend_group<T, std::is_same_v<T, float>>(n_, x, base + k0 + at, count, nullptr, nullptr, a_t, u_t,
                                                        out + k0 + at);
    };
    fg::run(m, [&](std::size_t at, std::size_t count) { return sweep(af, uf, at, count); },
            [&](std::size_t at, std::size_t count) { sweep(a, u, at, count); });
  }

  // In double: up to four models in one sweep; more in blocks small enough for the stack and the
  // L1 cache, the models four at a time, their partial sums kept in the block.
  template <class In>
  void merge_double(const In* const* models, const In* base, std::size_t k0, std::size_t m, double a, double u,
                    float* out) const {
    const In* x[4];
    if (n_ <= 4) {
      for (std::uint32_t j = 0; j < n_; ++j) x[j] = models[j] + k0;
      blend_group<double>(n_, x, base + k0, m, nullptr, nullptr, a, u, out + k0);
      return;
    }
    for (std::size_t b = 0; b < m; b += kMapBlock) {
      const std::size_t len = std::min(kMapBlock, m - b), off = k0 + b;
      double acc[kMapBlock];
      for (std::uint32_t i = 0; i < n_; i += 4) {
        const unsigned g = std::min(4u, n_ - i);
        for (unsigned j = 0; j < g; ++j) x[j] = models[i + j] + off;
        const bool last = i + g == n_;
        blend_group<double>(g, x, base + off, len, i == 0 ? nullptr : acc, acc, a, u, last ? out + off : nullptr);
      }
    }
  }

  const sdk::Job& job_;
  std::uint32_t n_;
  std::size_t pairs_, stats_;
  bool filter_wise_;
  std::unique_ptr<TensorState[]> state_;  // one per floating tensor
};

CONFLUX_PLUGIN(ModelStock,
               sdk::reduce_pass<ModelStock, std::uint64_t, 0, &ModelStock::stats, &ModelStock::combine,
                                &ModelStock::done>(CFX_PASS_TENSOR_REDUCE, CFX_PASS_WHOLE_ROWS | CFX_PASS_BF16_INPUTS),
               sdk::map_pass<ModelStock, &ModelStock::map>(CFX_PASS_BF16_INPUTS))
