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
// Task vectors are float32 (the host's), the arithmetic per entry is double, rounded once.
#include <conflux/plugin.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <memory>
#include <string>
#include <vector>

namespace sdk = conflux::sdk;

namespace {

constexpr const char* kScopes[] = {"model", "tensor"};
constexpr const char* kForms[] = {"clip", "soft"};

// The kernels work on blocks of entries, agent by agent: loops over one array at a time, each in
// a single lane width (mixing float and double lanes defeats the vectorizer), which with
// CONFLUX_MULTIVERSION become AVX-512, AVX2 or SSE2 code. Element-wise IEEE arithmetic in a
// fixed agent order: the same bits as the scalar definition, on every CPU.
constexpr std::size_t kBlock = 256;
struct Block {
  double active[kBlock], sum[kBlock], unique[kBlock];
};

// The smallest float above eps: for a float d, |d| > eps exactly when |d| >= float_threshold(eps),
// so activity can be tested on float lanes and still match the definition in double.
float float_threshold(double eps) {
  float f = static_cast<float>(eps);
  if (static_cast<double>(f) <= eps) f = std::nextafter(f, std::numeric_limits<float>::infinity());
  return f;
}

// Adds agent i's entries: active count, sum of active values, lambda_i * active values.
CONFLUX_MULTIVERSION void accumulate(const float* d, std::size_t m, double eps, double lambda, Block& b) {
  for (std::size_t k = 0; k < m; ++k) {
    const double v = d[k];
    const bool on = std::fabs(v) >= eps;
    b.active[k] += on ? 1.0 : 0.0;
    b.sum[k] += on ? v : 0.0;
    b.unique[k] += on ? lambda * v : 0.0;
  }
}

// Only the active counts (the statistics pass needs no values).
CONFLUX_MULTIVERSION void count_active(const float* d, std::size_t m, float eps, float* active) {
  for (std::size_t k = 0; k < m; ++k) active[k] += std::fabs(d[k]) >= eps ? 1.0f : 0.0f;
}

// out = base + (one active: its lambda-scaled value; several: their mean; none: 0).
CONFLUX_MULTIVERSION void combine_block(const float* base, std::size_t m, const Block& b, float* out) {
  for (std::size_t k = 0; k < m; ++k) {
    const double n = b.active[k];  // exact small integers
    const double merged = n == 1.0 ? b.unique[k] : n >= 2.0 ? b.sum[k] / n : 0.0;
    out[k] = static_cast<float>(base[k] + merged);
  }
}

// Agent i's unique and shared active entries in a block, with T the lane type (float in the
// statistics pass, double beside the map's sums). One integer sum (unique entries in the low 16
// bits, shared ones in the high 16; a block has fewer than 2^16 entries) vectorizes, where a
// floating-point or two-counter reduction would not.
static_assert(kBlock < (1u << 16));
template <class T>
CONFLUX_MULTIVERSION void count_block(const float* d, std::size_t m, T eps, const T* active, std::uint64_t& unique,
                                      std::uint64_t& shared) {
  std::uint32_t tally = 0;
  for (std::size_t k = 0; k < m; ++k) {
    const bool on = std::fabs(static_cast<T>(d[k])) >= eps;
    const std::uint32_t tag = active[k] == T(1) ? 1u : 0x10000u;
    tally += on ? tag : 0u;
  }
  unique += tally & 0xFFFFu;
  shared += tally >> 16;
}

}  // namespace

struct Ram {
  static constexpr sdk::Info info{"ram", "1.0.0",
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

  void count(const sdk::Chunk& c, sdk::Span<std::uint64_t> st) { count_chunk(c, st.data()); }

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
    // Plain RAM has no statistics pass: count here, for the report.
    const bool counting = r_ == 0;
    std::vector<std::uint64_t> st(counting ? 2 * n_ : 0, 0);
    const double eps = eps_f_;
    Block b;
    for (std::size_t k0 = 0; k0 < out.size(); k0 += kBlock) {
      const std::size_t m = std::min(kBlock, out.size() - k0);
      std::fill_n(b.active, m, 0.0);
      std::fill_n(b.sum, m, 0.0);
      std::fill_n(b.unique, m, 0.0);
      for (std::uint32_t i = 0; i < n_; ++i) accumulate(c.models()[i] + k0, m, eps, lambda[i], b);
      combine_block(c.base().data() + k0, m, b, out.data() + k0);
      if (counting)
        for (std::uint32_t i = 0; i < n_; ++i) count_block<double>(c.models()[i] + k0, m, eps, b.active, st[i], st[n_ + i]);
    }
    if (counting) add_totals(st.data());
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
  void count_chunk(const sdk::Chunk& c, std::uint64_t* st) const {
    float active[kBlock];
    for (std::size_t k0 = 0; k0 < c.count(); k0 += kBlock) {
      const std::size_t m = std::min(kBlock, c.count() - k0);
      std::fill_n(active, m, 0.0f);
      for (std::uint32_t i = 0; i < n_; ++i) count_active(c.models()[i] + k0, m, eps_f_, active);
      for (std::uint32_t i = 0; i < n_; ++i) count_block<float>(c.models()[i] + k0, m, eps_f_, active, st[i], st[n_ + i]);
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
                       CFX_PASS_MODEL_REDUCE, CFX_PASS_TASK_VECTORS)),
               sdk::only_if<Ram, &Ram::tensor_pass>(
                   sdk::reduce_pass<Ram, std::uint64_t, 1, &Ram::count, &Ram::combine, &Ram::tensor_done>(
                       CFX_PASS_TENSOR_REDUCE, CFX_PASS_TASK_VECTORS)),
               sdk::map_pass<Ram, &Ram::map>(CFX_PASS_TASK_VECTORS))
