// ram: Reinforced Agent Merging, RAM and RAM+ (arXiv 2601.13572).
//
// RL task vectors d_i = theta_i - theta_base are sparse and barely overlap, so averaging them
// dilutes each agent's update. RAM looks at each entry separately:
//   m_i = |d_i| > epsilon (agent i is active),  c = sum_i m_i
//   c == 0: 0;   c == 1: lambda_i * d_i (the one active agent);   c >= 2: sum_i m_i d_i / c
//   out = theta_base + merged
// RAM+ rescales the unique entries of agents whose updates are largely shared with others:
//   rho_i    = shared_i / unique_i  (entries where i is active with c >= 2, resp. c == 1)
//   lambda_i = 1 + r * clip(rho_i, 0, alpha)   ("clip", the paper's RAM+)
//            = 1 + r * rho_i / (1 + rho_i)      ("soft", the paper's RAM+s)
// rho_i is counted over the whole model (scope "model", as the paper defines it: a statistics
// pass over every tensor, then the merge pass) or per tensor (scope "tensor", as mergekit's
// ramplus_tl). With r = 0 (plain RAM) lambda_i = 1 and the merge is a single pass; the counts
// are then gathered during it, for the report.
// Guard: an agent with no unique entry has rho_i = alpha when it has shared entries (it is
// saturated: all of its update is shared), else 0 (it changed nothing).
// Task vectors are float32, x_i - base formed in the kernels from the raw values (the host's task
// vector, without its separate sweep); the arithmetic per entry is float32 for a BF16 output and
// double otherwise, rounded once.
#include <conflux/plugin.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "common/float_guard.h"
#include "common/inputs.h"

namespace sdk = conflux::sdk;
namespace fg = conflux::plugins::float_guard;
using conflux::plugins::value;
using conflux::plugins::with_inputs;

namespace {

constexpr const char* kScopes[] = {"model", "tensor"};
constexpr const char* kForms[] = {"clip", "soft"};

// Arithmetic: T = float32 for a BF16 output (plugin.h, CFX_FLOAT32_OUTPUT_BITS), else double;
// per entry in agent order, rounded once to float32. Activity is tested on the float32 task
// vector against float_threshold(epsilon), which is |d| > epsilon exactly, in both.
//
// Up to kFused agents, one sweep per block takes every agent's entry at once (operands in
// registers); more agents go blockwise, one loop per agent over the block. Both add the same
// terms in the same order: the same bits.
constexpr std::uint32_t kFused = 4;
constexpr std::size_t kBlock = 256;

// The smallest float above eps: for a float d, |d| > eps exactly when |d| >= float_threshold(eps),
// so activity can be tested on float lanes and still match the definition in double.
float float_threshold(double eps) {
  float f = static_cast<float>(eps);
  if (static_cast<double>(f) <= eps) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

// Per-agent tallies of a sweep: one integer sum per agent, unique entries (c == 1) in the low 16
// bits and shared ones (c >= 2) in the high 16 (a single integer reduction vectorizes where two
// counters would not), so a sweep covers fewer than 2^16 entries.
constexpr std::size_t kTallySpan = 1u << 15;
static_assert(fg::kSpan <= kTallySpan);
inline std::uint32_t tally_tag(std::uint32_t count) { return count == 1 ? 1u : 0x10000u; }
inline void add_tally(std::uint32_t tally, std::uint64_t& unique, std::uint64_t& shared) {
  unique += tally & 0xFFFFu;
  shared += tally >> 16;
}

// One sweep over m <= kTallySpan entries of N agents:
//   out = base + (c == 1 ? unique-scaled value : c >= 2 ? mean of active values : 0)
// Lambda: unique entries scaled by lambda_i (else lambda_i = 1: the sum is the value). Count:
// also tally each agent's unique and shared entries. Write: the output (else counting only, `out` unused).
// Guard (float32): returns how many results fail float_guard's test, with magnitudes
// |base| + lambda_max * sum of |active values|.
template <class T, std::uint32_t N, bool Lambda, bool Count, bool Guard = false, bool Write = true, class In>
CONFLUX_MULTIVERSION std::uint32_t fused_sweep(const In* const* d, const In* base, std::size_t m, float eps,
                                               const T* lambda, float* out, std::uint64_t* unique,
                                               std::uint64_t* shared) {
  static_assert(N >= 1 && N <= kFused);
  const In *d0 = d[0], *d1 = d[N > 1 ? 1 : 0], *d2 = d[N > 2 ? 2 : 0], *d3 = d[N > 3 ? 3 : 0];
  const T l0 = lambda[0], l1 = lambda[N > 1 ? 1 : 0], l2 = lambda[N > 2 ? 2 : 0], l3 = lambda[N > 3 ? 3 : 0];
  const T lmax = std::max(std::max(l0, l1), std::max(l2, l3));
  std::uint32_t t0 = 0, t1 = 0, t2 = 0, t3 = 0, unsafe = 0;
  for (std::size_t k = 0; k < m; ++k) {
    // The float32 task vectors, formed here from the raw values (the host's subtraction: the
    // same bits, without a separate sweep).
    const float b0 = value(base, k);
    const float v0 = value(d0, k) - b0, v1 = N > 1 ? value(d1, k) - b0 : 0.0f, v2 = N > 2 ? value(d2, k) - b0 : 0.0f,
                v3 = N > 3 ? value(d3, k) - b0 : 0.0f;
    const bool a0 = std::fabs(v0) >= eps, a1 = N > 1 && std::fabs(v1) >= eps, a2 = N > 2 && std::fabs(v2) >= eps,
               a3 = N > 3 && std::fabs(v3) >= eps;
    const std::uint32_t c = static_cast<std::uint32_t>(a0) + a1 + a2 + a3;
    if constexpr (Write) {
      T sum = 0, uniq = 0;
      sum += a0 ? static_cast<T>(v0) : T(0);
      if constexpr (N > 1) sum += a1 ? static_cast<T>(v1) : T(0);
      if constexpr (N > 2) sum += a2 ? static_cast<T>(v2) : T(0);
      if constexpr (N > 3) sum += a3 ? static_cast<T>(v3) : T(0);
      if constexpr (Lambda) {
        uniq += a0 ? l0 * static_cast<T>(v0) : T(0);
        if constexpr (N > 1) uniq += a1 ? l1 * static_cast<T>(v1) : T(0);
        if constexpr (N > 2) uniq += a2 ? l2 * static_cast<T>(v2) : T(0);
        if constexpr (N > 3) uniq += a3 ? l3 * static_cast<T>(v3) : T(0);
      } else {
        uniq = sum;
      }
      // c == 0: the sum is +0, and +0 / 1 the 0 of the definition; c == 1: the value / 1. One
      // division for every entry keeps the loop free of branches.
      const T merged = (c == 1 ? uniq : sum) / static_cast<T>(c > 1 ? c : 1u);
      const T b = static_cast<T>(b0), r = b + merged;
      out[k] = static_cast<float>(r);
      if constexpr (Guard) {
        const float mag = (a0 ? std::fabs(v0) : 0.0f) + (a1 ? std::fabs(v1) : 0.0f) + (a2 ? std::fabs(v2) : 0.0f) +
                          (a3 ? std::fabs(v3) : 0.0f);
        unsafe += fg::unsafe(r, std::fabs(b) + (Lambda ? lmax : T(1)) * mag);
      }
    }
    if constexpr (Count) {
      const std::uint32_t tag = tally_tag(c);
      t0 += a0 ? tag : 0u;
      if constexpr (N > 1) t1 += a1 ? tag : 0u;
      if constexpr (N > 2) t2 += a2 ? tag : 0u;
      if constexpr (N > 3) t3 += a3 ? tag : 0u;
    }
  }
  if constexpr (Count) {
    const std::uint32_t t[] = {t0, t1, t2, t3};
    for (std::uint32_t i = 0; i < N; ++i) add_tally(t[i], unique[i], shared[i]);
  }
  return unsafe;
}

template <class T, bool Lambda, bool Count, bool Guard = false, bool Write = true, class In>
std::uint32_t fused(std::uint32_t n, const In* const* d, const In* base, std::size_t m, float eps,
                    const T* lambda, float* out, std::uint64_t* unique, std::uint64_t* shared) {
  switch (n) {
    case 1: return fused_sweep<T, 1, Lambda, Count, Guard, Write>(d, base, m, eps, lambda, out, unique, shared);
    case 2: return fused_sweep<T, 2, Lambda, Count, Guard, Write>(d, base, m, eps, lambda, out, unique, shared);
    case 3: return fused_sweep<T, 3, Lambda, Count, Guard, Write>(d, base, m, eps, lambda, out, unique, shared);
    default: return fused_sweep<T, 4, Lambda, Count, Guard, Write>(d, base, m, eps, lambda, out, unique, shared);
  }
}

// The blockwise path (more than kFused agents), agent by agent over a block.
template <class T>
struct Block {
  T sum[kBlock], unique[kBlock];
  std::uint32_t active[kBlock];
};

// Adds agent i's entries: active count, sum of active values, lambda_i * active values.
template <class T, class In>
CONFLUX_MULTIVERSION void accumulate(const In* x, const In* base, std::size_t m, float eps, T lambda, Block<T>& b) {
  for (std::size_t k = 0; k < m; ++k) {
    const float d = value(x, k) - value(base, k);
    const bool on = std::fabs(d) >= eps;
    b.active[k] += on ? 1u : 0u;
    b.sum[k] += on ? static_cast<T>(d) : T(0);
    b.unique[k] += on ? lambda * static_cast<T>(d) : T(0);
  }
}

// out = base + (one active: its lambda-scaled value; several: their mean; none: 0).
template <class T, class In>
CONFLUX_MULTIVERSION void combine_block(const In* base, std::size_t m, const Block<T>& b, float* out) {
  for (std::size_t k = 0; k < m; ++k) {
    const std::uint32_t n = b.active[k];
    const T merged = (n == 1 ? b.unique[k] : b.sum[k]) / static_cast<T>(n > 1 ? n : 1u);  // as fused_sweep
    out[k] = static_cast<float>(static_cast<T>(value(base, k)) + merged);
  }
}

// Agent i's unique and shared active entries in a block.
static_assert(kBlock < kTallySpan);
template <class In>
CONFLUX_MULTIVERSION void count_block(const In* x, const In* base, std::size_t m, float eps,
                                      const std::uint32_t* active, std::uint64_t& unique, std::uint64_t& shared) {
  std::uint32_t tally = 0;
  for (std::size_t k = 0; k < m; ++k)
    tally += std::fabs(value(x, k) - value(base, k)) >= eps ? tally_tag(active[k]) : 0u;
  add_tally(tally, unique, shared);
}

// Blockwise over a span of n > kFused agents: output (unless null) and/or tallies.
template <class T, class In>
void blockwise(std::uint32_t n, const In* const* d, const In* base, std::size_t count, float eps,
               const T* lambda, float* out, std::uint64_t* unique, std::uint64_t* shared) {
  Block<T> b;
  for (std::size_t k0 = 0; k0 < count; k0 += kBlock) {
    const std::size_t m = std::min(kBlock, count - k0);
    std::fill_n(b.active, m, 0u);
    std::fill_n(b.sum, m, T(0));
    std::fill_n(b.unique, m, T(0));
    for (std::uint32_t i = 0; i < n; ++i) accumulate(d[i] + k0, base + k0, m, eps, lambda[i], b);
    if (out) combine_block(base + k0, m, b, out + k0);
    if (unique)
      for (std::uint32_t i = 0; i < n; ++i) count_block(d[i] + k0, base + k0, m, eps, b.active, unique[i], shared[i]);
  }
}

}  // namespace

struct Ram {
  static constexpr sdk::Info info{"ram", "1.1.0",
                                  "Reinforced Agent Merging: unique entries kept (RAM+: rescaled), shared ones "
                                  "averaged over the active agents",
                                  2, 0, CFX_BASE_REQUIRED};
  static inline const sdk::Param params[] = {
      sdk::Param::real("epsilon", 1e-5, "an entry is active when |theta_i - theta_base| > epsilon").min(0),
      sdk::Param::real("r", 0.0, "rescaling strength: 0 = RAM, 0.1 = RAM+ as in the paper").min(0),
      sdk::Param::real("alpha", 2.0, "upper clip of rho_i (shared/unique ratio)").min(0),
      sdk::Param::string("scope", "model", "count rho_i over the whole model, or per tensor").one_of(kScopes),
      sdk::Param::string("lambda_form", "clip", "clip: 1 + r*clip(rho, 0, alpha); soft: 1 + r*rho/(1+rho)")
          .one_of(kForms),
  };

  explicit Ram(const sdk::Job& job)
      : job_(job),
        n_(job.model_count()),
        epsilon_(job.number("epsilon")),
        eps_f_(float_threshold(epsilon_)),
        r_(job.number("r")),
        alpha_(job.number("alpha")),
        model_scope_(job.string("scope") == "model"),
        soft_(job.string("lambda_form") == "soft"),
        lambdas_(n_, 1.0),
        totals_(new std::atomic<std::uint64_t>[2 * n_]) {
    for (std::uint32_t i = 0; i < 2 * n_; ++i) totals_[i] = 0;
    if (!model_scope_ && r_ > 0) tensor_lambdas_.assign(job.tensors().size() * n_, 1.0);
  }

  // The statistics pass runs only when the lambdas depend on it (RAM+).
  bool model_pass() const { return model_scope_ && r_ > 0; }
  bool tensor_pass() const { return !model_scope_ && r_ > 0; }
  // Statistics: unique counts of every agent, then shared counts.
  std::size_t stats_count(std::uint32_t) const { return 2 * n_; }

  void count(const sdk::Chunk& c, sdk::Span<std::uint64_t> st) {
    with_inputs(c, [&](auto models, auto base) { count_chunk(c, models, base, st.data()); });
  }

  void combine(const cfx_tensor*, sdk::Span<std::uint64_t> into, sdk::Span<const std::uint64_t> from) {
    for (std::size_t k = 0; k < into.size(); ++k) into[k] += from[k];
  }

  bool model_done(const cfx_tensor*, sdk::Span<const std::uint64_t> st) {
    add_totals(st.data());
    lambdas_ = lambdas_from(st.data());
    return false;
  }

  bool tensor_done(const cfx_tensor* t, sdk::Span<const std::uint64_t> st) {
    add_totals(st.data());
    const std::vector<double> l = lambdas_from(st.data());
    std::copy(l.begin(), l.end(), tensor_lambdas_.begin() + static_cast<std::ptrdiff_t>(t->index * n_));
    return false;
  }

  void map(const sdk::Chunk& c, sdk::Span<float> out) {
    const double* lambda = tensor_lambdas_.empty() ? lambdas_.data() : tensor_lambdas_.data() + c.tensor().index * n_;
    with_inputs(c, [&](auto models, auto base) {
      if (c.float32_suffices() && n_ <= kFused) {
        float l[kFused];
        for (std::uint32_t i = 0; i < n_; ++i) l[i] = static_cast<float>(lambda[i]);
        merge_f32(c, models, base, l, lambda, out.data());
      } else {
        merge_f64(c, models, base, lambda, out.data());
      }
    });
  }

  void finish() {
    std::vector<std::uint64_t> totals(2 * n_);
    for (std::uint32_t i = 0; i < 2 * n_; ++i) totals[i] = totals_[i].load();
    std::uint64_t elements = 0;
    for (const cfx_tensor& t : job_.tensors()) elements += t.numel;
    const std::vector<double> model_lambdas = lambdas_from(totals.data());
    char buf[512];
    std::string json = "{\"method\":\"" + std::string(r_ == 0 ? "RAM" : soft_ ? "RAM+s" : "RAM+") +
                       "\",\"scope\":\"" + (model_scope_ ? "model" : "tensor") + "\",\"lambda_form\":\"" +
                       (soft_ ? "soft" : "clip") + "\"";
    std::snprintf(buf, sizeof buf, ",\"epsilon\":%.17g,\"r\":%.17g,\"alpha\":%.17g,\"elements\":%llu,\"agents\":[",
                  epsilon_, r_, alpha_, static_cast<unsigned long long>(elements));
    json += buf;
    for (std::uint32_t i = 0; i < n_; ++i) {
      const std::uint64_t unique = totals[i], shared = totals[n_ + i], active = unique + shared;
      const double rho = rho_of(unique, shared);
      const double active_fraction = elements ? static_cast<double>(active) / static_cast<double>(elements) : 0;
      const double unique_fraction = active ? static_cast<double>(unique) / static_cast<double>(active) : 0;
      // In tensor scope the lambdas differ per tensor: report their range.
      double lo = model_lambdas[i], hi = lo;
      if (!tensor_lambdas_.empty()) {
        lo = hi = tensor_lambdas_[i];
        for (std::size_t t = 0; t < tensor_lambdas_.size() / n_; ++t) {
          lo = std::min(lo, tensor_lambdas_[t * n_ + i]);
          hi = std::max(hi, tensor_lambdas_[t * n_ + i]);
        }
      }
      std::snprintf(buf, sizeof buf,
                    "%s{\"model\":%u,\"active\":%llu,\"unique\":%llu,\"shared\":%llu,\"active_fraction\":%.9g,"
                    "\"unique_fraction\":%.9g,\"rho\":%.17g,\"lambda\":%.17g",
                    i ? "," : "", i, static_cast<unsigned long long>(active), static_cast<unsigned long long>(unique),
                    static_cast<unsigned long long>(shared), active_fraction, unique_fraction, rho,
                    tensor_lambdas_.empty() ? lambdas_[i] : model_lambdas[i]);
      json += buf;
      if (!tensor_lambdas_.empty()) {
        std::snprintf(buf, sizeof buf, ",\"tensor_lambda_min\":%.17g,\"tensor_lambda_max\":%.17g", lo, hi);
        json += buf;
      }
      json += "}";
      std::snprintf(buf, sizeof buf,
                    "agent %u (%s): active %.4f%% of entries, %.2f%% of them unique, rho %.4g, lambda %.6g%s", i,
                    job_.model_name(i), 100 * active_fraction, 100 * unique_fraction, rho,
                    tensor_lambdas_.empty() ? lambdas_[i] : model_lambdas[i],
                    tensor_lambdas_.empty() ? "" : " (model-wide; per tensor it varies)");
      job_.log(CFX_LOG_INFO, buf);
    }
    json += "]}";
    job_.report(json);
  }

 private:
  // The map in double: merged values and, for plain RAM (no statistics pass), the counts for the
  // report.
  template <class In>
  void merge_f64(const sdk::Chunk& c, const In* const* models, const In* base_in, const double* lambda, float* out) {
    const bool counting = r_ == 0;
    std::vector<std::uint64_t> st(counting ? 2 * n_ : 0, 0);
    std::uint64_t* unique = counting ? st.data() : nullptr;
    std::uint64_t* shared = counting ? st.data() + n_ : nullptr;
    if (n_ > kFused) {
      blockwise<double>(n_, models, base_in, c.count(), eps_f_, lambda, out, unique, shared);
    } else {
      for (std::size_t k0 = 0; k0 < c.count(); k0 += kTallySpan) {
        const std::size_t m = std::min(kTallySpan, c.count() - k0);
        const In* d[kFused];
        for (std::uint32_t i = 0; i < n_; ++i) d[i] = models[i] + k0;
        const In* base = base_in + k0;
        if (counting)
          fused<double, false, true>(n_, d, base, m, eps_f_, lambda, out + k0, unique, shared);
        else
          fused<double, true, false>(n_, d, base, m, eps_f_, lambda, out + k0, nullptr, nullptr);
      }
    }
    if (counting) add_totals(st.data());
  }

  // The map in float32 (up to kFused agents), entries that fail float_guard's test again in
  // double (lambda_d: the same lambdas in double).
  template <class In>
  void merge_f32(const sdk::Chunk& c, const In* const* models, const In* base_in, const float* lambda,
                 const double* lambda_d, float* out) {
    const bool counting = r_ == 0;
    std::uint64_t st[2 * kFused] = {};
    for (std::size_t k0 = 0; k0 < c.count(); k0 += fg::kSpan) {
      const std::size_t m = std::min(fg::kSpan, c.count() - k0);
      const In* d[kFused];
      auto at = [&](std::size_t offset) {
        for (std::uint32_t i = 0; i < n_; ++i) d[i] = models[i] + k0 + offset;
        return base_in + k0 + offset;
      };
      // r = 0 makes every lambda 1: the unique value is the sum, no products needed.
      const std::uint32_t unsafe =
          counting ? fused<float, false, true, true>(n_, d, at(0), m, eps_f_, lambda, out + k0, st, st + n_)
                   : fused<float, true, false, true>(n_, d, at(0), m, eps_f_, lambda, out + k0, nullptr, nullptr);
      fg::redo(
          m, unsafe,
          [&](std::size_t k, std::size_t n) {
            const In* base = at(k);
            return counting ? fused<float, false, false, true>(n_, d, base, n, eps_f_, lambda, out + k0 + k, nullptr, nullptr)
                            : fused<float, true, false, true>(n_, d, base, n, eps_f_, lambda, out + k0 + k, nullptr, nullptr);
          },
          [&](std::size_t k, std::size_t n) {
            const In* base = at(k);
            fused<double, true, false>(n_, d, base, n, eps_f_, lambda_d, out + k0 + k, nullptr, nullptr);
          });
    }
    if (counting) add_totals(st);  // unique[n_], then shared[n_]
  }

  // The statistics pass: each agent's unique and shared entries.
  template <class In>
  void count_chunk(const sdk::Chunk& c, const In* const* models, const In* base, std::uint64_t* st) const {
    const float one[kFused] = {1.0f, 1.0f, 1.0f, 1.0f};
    if (n_ > kFused) {
      std::vector<float> ones(n_, 1.0f);
      blockwise<float>(n_, models, base, c.count(), eps_f_, ones.data(), nullptr, st, st + n_);
      return;
    }
    for (std::size_t k0 = 0; k0 < c.count(); k0 += kTallySpan) {
      const std::size_t m = std::min(kTallySpan, c.count() - k0);
      const In* d[kFused];
      for (std::uint32_t i = 0; i < n_; ++i) d[i] = models[i] + k0;
      fused<float, false, true, false, false>(n_, d, base + k0, m, eps_f_, one, nullptr, st, st + n_);
    }
  }

  void add_totals(const std::uint64_t* st) {
    for (std::uint32_t i = 0; i < 2 * n_; ++i) totals_[i].fetch_add(st[i], std::memory_order_relaxed);
  }

  double rho_of(std::uint64_t unique, std::uint64_t shared) const {
    if (unique == 0) return shared > 0 ? alpha_ : 0.0;  // the guard (see the top of the file)
    return static_cast<double>(shared) / static_cast<double>(unique);
  }

  std::vector<double> lambdas_from(const std::uint64_t* st) const {
    std::vector<double> l(n_);
    for (std::uint32_t i = 0; i < n_; ++i) {
      const double rho = rho_of(st[i], st[n_ + i]);
      l[i] = 1.0 + r_ * (soft_ ? rho / (1.0 + rho) : std::clamp(rho, 0.0, alpha_));
    }
    return l;
  }

  const sdk::Job& job_;
  std::uint32_t n_;
  double epsilon_;
  float eps_f_;  // float_threshold(epsilon_)
  double r_, alpha_;
  bool model_scope_, soft_;
  std::vector<double> lambdas_;         // model scope (or all 1 for RAM)
  std::vector<double> tensor_lambdas_;  // tensor scope: tensor_count x n
  std::unique_ptr<std::atomic<std::uint64_t>[]> totals_;  // unique[n], shared[n] over the model
};

CONFLUX_PLUGIN(Ram,
               sdk::only_if<Ram, &Ram::model_pass>(
                   sdk::reduce_pass<Ram, std::uint64_t, 0, &Ram::count, &Ram::combine, &Ram::model_done>(
                       CFX_PASS_MODEL_REDUCE, CFX_PASS_BF16_INPUTS)),
               sdk::only_if<Ram, &Ram::tensor_pass>(
                   sdk::reduce_pass<Ram, std::uint64_t, 1, &Ram::count, &Ram::combine, &Ram::tensor_done>(
                       CFX_PASS_TENSOR_REDUCE, CFX_PASS_BF16_INPUTS)),
               sdk::map_pass<Ram, &Ram::map>(CFX_PASS_BF16_INPUTS))
