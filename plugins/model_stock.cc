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
//            in double (t / N and 1 - t computed once), rounded once to float32 (the host then
//            rounds to the output dtype, nearest-even): t * mean(theta_i) + (1 - t) * theta_0.
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
// dtype, here in double).
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
// Two and three models have dedicated kernels (one sweep per row, all in registers); more
// models go through blocks of 256 elements, one statistic at a time. Both follow the order above
// with the same operations, so they give the same bits.
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
#include <vector>

namespace sdk = conflux::sdk;

namespace {

// Element-wise IEEE double arithmetic in GCC/Clang vector types (see plugins/slerp.cc): one
// zmm / two ymm / four xmm per vector under CONFLUX_MULTIVERSION, the same bits on each.
typedef double v8d __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
constexpr std::size_t kLanes = 16;
constexpr std::size_t kBlock = 256;  // elements per block of a row (a multiple of kLanes)
static_assert(kBlock % kLanes == 0);

double fold_lanes(const double* l) {
  double s = l[0];
  for (std::size_t j = 1; j < kLanes; ++j) s += l[j];
  return s;
}

// d[k] = x[k] - base[k] in double.
CONFLUX_MULTIVERSION void deltas(const float* x, const double* base, std::size_t m, double* d) {
  for (std::size_t k = 0; k < m; ++k) d[k] = static_cast<double>(x[k]) - base[k];
}

CONFLUX_MULTIVERSION void widen(const float* x, std::size_t m, double* out) {
  for (std::size_t k = 0; k < m; ++k) out[k] = static_cast<double>(x[k]);
}

// lanes[k mod 16] += x[k] * y[k] for k < m, each lane in increasing k.
CONFLUX_MULTIVERSION void accumulate(const double* x, const double* y, std::size_t m, double* lanes) {
  v8d l0, l1;
  std::memcpy(&l0, lanes, sizeof l0);
  std::memcpy(&l1, lanes + 8, sizeof l1);
  std::size_t k = 0;
  for (; k + kLanes <= m; k += kLanes) {
    v8d x0, x1, y0, y1;
    std::memcpy(&x0, x + k, sizeof x0);
    std::memcpy(&x1, x + k + 8, sizeof x1);
    std::memcpy(&y0, y + k, sizeof y0);
    std::memcpy(&y1, y + k + 8, sizeof y1);
    l0 += x0 * y0;
    l1 += x1 * y1;
  }
  std::memcpy(lanes, &l0, sizeof l0);
  std::memcpy(lanes + 8, &l1, sizeof l1);
  for (std::size_t j = 0; k + j < m; ++j) lanes[j] += x[k + j] * y[k + j];
}

// Two and three models, the common cases: one row in one sweep, deltas and the 16 lanes of
// every statistic in registers (out: the unfolded lanes, statistic q at out + 16 q). The same
// operations in the same order as the blockwise path below, hence the same bits.
#define CFX_LOAD(v, p)                     \
  do {                                     \
    v8f f_;                                \
    std::memcpy(&f_, (p), sizeof f_);      \
    (v) = __builtin_convertvector(f_, v8d); \
  } while (0)

CONFLUX_MULTIVERSION void row_lanes2(const float* const* x, const float* b, std::size_t n, double* out) {
  v8d s0a = {}, s0b = {}, s1a = {}, s1b = {}, p01a = {}, p01b = {};
  std::size_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    v8d ba, bb, d0a, d0b, d1a, d1b;
    CFX_LOAD(ba, b + k);
    CFX_LOAD(bb, b + k + 8);
    CFX_LOAD(d0a, x[0] + k);
    CFX_LOAD(d0b, x[0] + k + 8);
    CFX_LOAD(d1a, x[1] + k);
    CFX_LOAD(d1b, x[1] + k + 8);
    d0a -= ba, d0b -= bb, d1a -= ba, d1b -= bb;
    s0a += d0a * d0a, s0b += d0b * d0b, s1a += d1a * d1a, s1b += d1b * d1b;
    p01a += d0a * d1a, p01b += d0b * d1b;
  }
  const v8d* acc[] = {&s0a, &s0b, &s1a, &s1b, &p01a, &p01b};
  for (std::size_t q = 0; q < 6; ++q) std::memcpy(out + 8 * q, acc[q], sizeof(v8d));
  for (std::size_t j = 0; k + j < n; ++j) {
    const double bj = b[k + j], d0 = x[0][k + j] - bj, d1 = x[1][k + j] - bj;
    out[j] += d0 * d0, out[16 + j] += d1 * d1, out[32 + j] += d0 * d1;
  }
}

CONFLUX_MULTIVERSION void row_lanes3(const float* const* x, const float* b, std::size_t n, double* out) {
  v8d s0a = {}, s0b = {}, s1a = {}, s1b = {}, s2a = {}, s2b = {};
  v8d p01a = {}, p01b = {}, p02a = {}, p02b = {}, p12a = {}, p12b = {};
  std::size_t k = 0;
  for (; k + kLanes <= n; k += kLanes) {
    v8d ba, bb, d0a, d0b, d1a, d1b, d2a, d2b;
    CFX_LOAD(ba, b + k);
    CFX_LOAD(bb, b + k + 8);
    CFX_LOAD(d0a, x[0] + k);
    CFX_LOAD(d0b, x[0] + k + 8);
    CFX_LOAD(d1a, x[1] + k);
    CFX_LOAD(d1b, x[1] + k + 8);
    CFX_LOAD(d2a, x[2] + k);
    CFX_LOAD(d2b, x[2] + k + 8);
    d0a -= ba, d0b -= bb, d1a -= ba, d1b -= bb, d2a -= ba, d2b -= bb;
    s0a += d0a * d0a, s0b += d0b * d0b, s1a += d1a * d1a, s1b += d1b * d1b, s2a += d2a * d2a, s2b += d2b * d2b;
    p01a += d0a * d1a, p01b += d0b * d1b, p02a += d0a * d2a, p02b += d0b * d2b, p12a += d1a * d2a, p12b += d1b * d2b;
  }
  const v8d* acc[] = {&s0a, &s0b, &s1a, &s1b, &s2a, &s2b, &p01a, &p01b, &p02a, &p02b, &p12a, &p12b};
  for (std::size_t q = 0; q < 12; ++q) std::memcpy(out + 8 * q, acc[q], sizeof(v8d));
  for (std::size_t j = 0; k + j < n; ++j) {
    const double bj = b[k + j], d0 = x[0][k + j] - bj, d1 = x[1][k + j] - bj, d2 = x[2][k + j] - bj;
    out[j] += d0 * d0, out[16 + j] += d1 * d1, out[32 + j] += d2 * d2;
    out[48 + j] += d0 * d1, out[64 + j] += d0 * d2, out[80 + j] += d1 * d2;
  }
}
#undef CFX_LOAD

// acc[k] (+)= x[k]
CONFLUX_MULTIVERSION void add_to(const float* x, std::size_t m, double* acc) {
  for (std::size_t k = 0; k < m; ++k) acc[k] += static_cast<double>(x[k]);
}

// The same for two and three models in one sweep (the same operations in the same order).
CONFLUX_MULTIVERSION void blend2(const float* x0, const float* x1, const float* base, std::size_t m, double a, double u,
                                 float* out) {
  for (std::size_t k = 0; k < m; ++k)
    out[k] = static_cast<float>(a * (static_cast<double>(x0[k]) + static_cast<double>(x1[k])) +
                                u * static_cast<double>(base[k]));
}
CONFLUX_MULTIVERSION void blend3(const float* x0, const float* x1, const float* x2, const float* base, std::size_t m,
                                 double a, double u, float* out) {
  for (std::size_t k = 0; k < m; ++k)
    out[k] = static_cast<float>(
        a * ((static_cast<double>(x0[k]) + static_cast<double>(x1[k])) + static_cast<double>(x2[k])) +
        u * static_cast<double>(base[k]));
}

// out[k] = a * sum[k] + u * base[k], rounded once.
CONFLUX_MULTIVERSION void blend(const double* sum, const float* base, std::size_t m, double a, double u, float* out) {
  for (std::size_t k = 0; k < m; ++k) out[k] = static_cast<float>(a * sum[k] + u * static_cast<double>(base[k]));
}

}  // namespace

struct ModelStock {
  static constexpr sdk::Info info{"model_stock", "1.0.0",
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
    std::vector<double> base(kBlock), d(n_ * kBlock), lanes(stats_ * kLanes);
    std::vector<const float*> x(n_);
    const std::uint64_t rows = c.count() / len;
    double* out = s.rows.get() + stats_ * (c.begin() / len);
    for (std::uint64_t r = 0; r < rows; ++r) {
      if (n_ == 2 || n_ == 3) {
        for (std::uint32_t i = 0; i < n_; ++i) x[i] = c.models()[i] + r * len;
        (n_ == 2 ? row_lanes2 : row_lanes3)(x.data(), c.base().data() + r * len, len, lanes.data());
        for (std::size_t q = 0; q < stats_; ++q) out[stats_ * r + q] = fold_lanes(lanes.data() + q * kLanes);
        continue;
      }
      // Any number of models: blocks of kBlock elements, one statistic at a time.
      std::fill(lanes.begin(), lanes.end(), 0.0);
      for (std::uint64_t k0 = 0; k0 < len; k0 += kBlock) {
        const std::size_t m = static_cast<std::size_t>(std::min<std::uint64_t>(kBlock, len - k0));
        const std::uint64_t off = r * len + k0;
        widen(c.base().data() + off, m, base.data());
        for (std::uint32_t i = 0; i < n_; ++i) deltas(c.models()[i] + off, base.data(), m, d.data() + i * kBlock);
        double* l = lanes.data();
        for (std::uint32_t i = 0; i < n_; ++i, l += kLanes) accumulate(d.data() + i * kBlock, d.data() + i * kBlock, m, l);
        for (std::uint32_t i = 0; i < n_; ++i)
          for (std::uint32_t j = i + 1; j < n_; ++j, l += kLanes)
            accumulate(d.data() + i * kBlock, d.data() + j * kBlock, m, l);
      }
      for (std::size_t q = 0; q < stats_; ++q) out[stats_ * r + q] = fold_lanes(lanes.data() + q * kLanes);
    }
    rows_seen[0] += rows;
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
    const cfx_tensor& t = c.tensor();
    TensorState& s = state_[t.index];
    if (!filter_wise_) {
      merge(c, 0, out.size(), s.t, out.data());
      return;
    }
    // Row by row (a chunk may start or end inside a row).
    const std::uint64_t len = t.row_length;
    for (std::size_t k = 0; k < out.size();) {
      const std::uint64_t e = c.begin() + k, row = e / len;
      const std::size_t m = static_cast<std::size_t>(std::min<std::uint64_t>(out.size() - k, (row + 1) * len - e));
      merge(c, k, m, s.t_rows[row], out.data());
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

  // out[k0 .. k0+m) = (t / N) * sum_i theta_i + (1 - t) * base, in blocks.
  void merge(const sdk::Chunk& c, std::size_t k0, std::size_t m, double t, float* out) const {
    const double a = t / static_cast<double>(n_), u = 1 - t;
    const float* const* x = c.models();
    if (n_ == 2) return blend2(x[0] + k0, x[1] + k0, c.base().data() + k0, m, a, u, out + k0);
    if (n_ == 3) return blend3(x[0] + k0, x[1] + k0, x[2] + k0, c.base().data() + k0, m, a, u, out + k0);
    double acc[kBlock];
    for (std::size_t b = 0; b < m; b += kBlock) {
      const std::size_t len = std::min(kBlock, m - b), off = k0 + b;
      widen(c.models()[0] + off, len, acc);
      for (std::uint32_t i = 1; i < n_; ++i) add_to(c.models()[i] + off, len, acc);
      blend(acc, c.base().data() + off, len, a, u, out + off);
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
                                &ModelStock::done>(CFX_PASS_TENSOR_REDUCE, CFX_PASS_WHOLE_ROWS),
               sdk::map_pass<ModelStock, &ModelStock::map>())
