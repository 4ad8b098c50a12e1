// The `dare_linear`, `dare_ties`, `della` and `della_linear` strategy plugins end to end through
// the library (run_job), on synthetic bf16 checkpoints with odd tensor shapes (a 3-D tensor, a
// 1-D one, a scalar, an empty one, rows longer than a chunk, rows of equal magnitudes). Every
// keep decision is reproduced here from the host's counter-based stream
// (random_uniform_at(random_key(seed, tensor, model i), element)); DELLA's ranks come from an
// independent stable sort. Outputs are compared with float64 references within 1 ulp of the
// output dtype, kept counts with the plugins' reports and with the binomial expectation.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <boost/json.hpp>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "conflux/checkpoint.h"
#include "conflux/convert.h"
#include "conflux/kernels.h"
#include "conflux/merge.h"
#include "conflux/writer.h"
#include "test_util.h"
#include "strategy_test_util.h"
#include "../plugins/common/drop_merge.h"

namespace {

namespace fs = std::filesystem;
namespace json = boost::json;
using namespace conflux;
using ::testing::HasSubstr;

using conflux_test::Spec;
using conflux_test::numel;
using conflux_test::ulp;
using conflux_test::num;
using conflux_test::flag;
using conflux_test::list;
using conflux_test::write_checkpoint;
using conflux_test::rnd;
using conflux_test::name_id;
using conflux_test::near_rel;
using conflux_test::number;
using conflux_test::count;
using conflux_test::expect_error;

// ---------------------------------------------------------------------------------------------
// Synthetic checkpoints
// ---------------------------------------------------------------------------------------------

float bf16(double x) { return bf16_bits_to_f32(f32_to_bf16_bits(static_cast<float>(x))); }

// Odd sizes (none a multiple of 8, 16 or 1000), a 3-D tensor (rows of 7), a 1-D one (one row),
// a scalar, an empty tensor, rows longer than a chunk of 1000 ("long_rows"), and rows whose
// magnitudes take only three values ("equal"), so DELLA's tie rule decides most ranks.
std::vector<Spec> scenario_specs() {
  return {
      {"model.embed.weight", {37, 29}},
      {"layers.0.attn.w", {61, 47}},
      {"layers.0.bias", {47}},
      {"layers.1.mlp.w", {3, 5, 7}},
      {"scalar", {}},
      {"empty", {0}},
      {"position_ids", {3, 11}, DType::I64},
      {"big.w", {97, 101}},
      {"long_rows", {3, 1501}},
      {"equal", {5, 67}},
      {"norm.weight", {1031}},
  };
}

// Base values of magnitude 0.05..0.5; each model changes an entry with probability `change`
// (0.7) by 0.004..0.03 (else leaves it exactly), with signs that differ between models so the
// election matters. In "equal" the base is 0.5 and a change is one of 0, +-2^-6, +-2^-5 (exact
// in bf16). Sparse: like RL task vectors, mostly 2% changes, and every third run of 700 entries
// at `change`, so a tensor has both sparse and dense blocks (the plugins' gathered and dense
// kernels, which must give the same bits).
struct Scenario {
  std::vector<Spec> specs = scenario_specs();
  std::size_t models = 3;
  double change = 0.7;
  bool sparse = false;

  float base(std::size_t ti, std::uint64_t j) const {
    const std::uint64_t t = name_id(specs[ti].name);
    if (specs[ti].name == "equal") return 0.5f;
    const double sign = rnd(t, j, 1) < 0.5 ? -1.0 : 1.0;
    return bf16(sign * (0.05 + 0.45 * rnd(t, j, 2)));
  }
  float agent(std::size_t ti, std::uint64_t j, std::size_t i) const {
    const std::uint64_t t = name_id(specs[ti].name);
    const float b = base(ti, j);
    if (specs[ti].name == "equal") {
      const double steps[5] = {0.0, 0x1p-6, -0x1p-6, 0x1p-5, -0x1p-5};
      return bf16(b + steps[static_cast<int>(rnd(t, j, 10 + i) * 5)]);
    }
    const double rate = sparse && (j / 700) % 3 != 0 ? 0.02 : change;
    if (rnd(t, j, 20 + i) >= rate) return b;
    // Model 0 leans positive, model 1 negative, model 2 either way.
    const double up = i == 0 ? 0.7 : i == 1 ? 0.3 : 0.5;
    const double sign = rnd(t, j, 30 + i) < up ? 1.0 : -1.0;
    return bf16(b + sign * (0.004 + 0.026 * rnd(t, j, 40 + i)));
  }
};

// ---------------------------------------------------------------------------------------------
// References
// ---------------------------------------------------------------------------------------------

// The inputs as the host hands them to a plugin: base values and float32 task vectors.
struct TensorInputs {
  std::string name;
  std::uint64_t row_length = 1;
  std::vector<double> base;
  std::vector<std::vector<float>> d;  // d[i][k] = float(theta_i) - float(theta_base)
};

std::vector<TensorInputs> read_inputs(const fs::path& base_dir, const std::vector<fs::path>& model_dirs) {
  const Checkpoint base = Checkpoint::open(base_dir);
  std::vector<Checkpoint> models;
  for (const auto& m : model_dirs) models.push_back(Checkpoint::open(m));
  std::vector<TensorInputs> out;
  for (const TensorRef& t : base.tensors()) {
    if (!dtype_is_mergeable(t.info->dtype)) continue;
    TensorInputs in;
    in.name = t.name();
    in.row_length = t.info->shape.empty() ? 1 : t.info->shape.back();
    const TensorView b = base.view(t);
    const std::size_t n = static_cast<std::size_t>(t.info->numel);
    in.base.resize(n);
    for (std::size_t k = 0; k < n; ++k) in.base[k] = b.element(k);
    for (const Checkpoint& c : models) {
      const TensorView v = c.view(c.at(t.name()));
      std::vector<float> d(n);
      for (std::size_t k = 0; k < n; ++k) d[k] = static_cast<float>(v.element(k)) - static_cast<float>(in.base[k]);
      in.d.push_back(std::move(d));
    }
    out.push_back(std::move(in));
  }
  return out;
}

struct Params {
  explicit Params(std::string s) : strategy(std::move(s)) {}
  std::string strategy;
  double density = 1.0;
  std::optional<double> epsilon;  // della, della_linear: default 0.15
  std::vector<double> weights;    // empty: the default (1 for every model)
  double lambda = 1.0;
  std::optional<bool> normalize;  // empty: the plugin's default
  bool rescale = true;
  std::uint64_t seed = 0;

  bool della() const { return strategy == "della" || strategy == "della_linear"; }
  bool ties() const { return strategy == "dare_ties" || strategy == "della"; }
  // mergekit's defaults: normalize only for della.
  bool normalized() const { return normalize.value_or(strategy == "della"); }
  double eps() const { return epsilon.value_or(0.15); }
};

struct Reference {
  std::map<std::string, std::vector<double>> out;
  std::vector<std::uint64_t> kept;          // per model: entries whose keep decision was "keep"
  // Per model, the count the plugins report: DELLA does not draw for the zeros of the rows it
  // ranks (their drop changes nothing) and counts them at their expectation, sum q.
  std::vector<double> reported;
  std::vector<std::uint64_t> undrawn;       // per model: those zeros
  std::vector<double> expected, variance;   // per model: sum of q and of q (1 - q)
  std::uint64_t elements = 0;
  std::uint64_t survivors_nonzero = 0;      // kept entries with d != 0
};

// DELLA's ranks of one row: ascending |d|, equal magnitudes by lower index first.
std::vector<std::size_t> ranks_of(const float* d, std::size_t n) {
  std::vector<std::size_t> order(n), rank(n);
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](std::size_t a, std::size_t b) { return std::fabs(d[a]) < std::fabs(d[b]); });
  for (std::size_t r = 0; r < n; ++r) rank[order[r]] = r;
  return rank;
}

Reference reference(const std::vector<TensorInputs>& inputs, const Params& p) {
  const std::size_t n = inputs.front().d.size();
  std::vector<double> w = p.weights.empty() ? std::vector<double>(n, 1.0) : p.weights;
  Reference ref;
  ref.kept.assign(n, 0);
  ref.reported.assign(n, 0);
  ref.undrawn.assign(n, 0);
  ref.expected.assign(n, 0);
  ref.variance.assign(n, 0);
  double wsum = 0;
  for (double x : w) wsum += x;
  const bool pruning = p.density < 1.0;
  for (const TensorInputs& t : inputs) {
    const std::size_t count = t.base.size();
    // Keep probabilities and decisions of every model.
    std::vector<std::vector<double>> W(n, std::vector<double>(count, 0.0));
    for (std::size_t i = 0; i < n; ++i) {
      const std::uint64_t key = random_key(p.seed, t.name.c_str(), static_cast<std::uint32_t>(i));
      std::vector<double> q(count, 1.0);
      if (pruning && !p.della()) std::fill(q.begin(), q.end(), p.density);
      if (pruning && p.della()) {
        const std::size_t len = static_cast<std::size_t>(t.row_length);
        for (std::size_t r0 = 0; r0 < count; r0 += len) {
          const std::vector<std::size_t> rank = ranks_of(t.d[i].data() + r0, len);
          for (std::size_t k = 0; k < len; ++k)
            q[r0 + k] = len == 1 ? p.density
                                 : std::min(1.0, (p.density - p.eps()) +
                                                     static_cast<double>(rank[k]) *
                                                         (2.0 * p.eps() / static_cast<double>(len - 1)));
        }
      }
      for (std::size_t k = 0; k < count; ++k) {
        const bool keep = static_cast<double>(random_uniform_at(key, k)) >= 1.0 - q[k];
        ref.kept[i] += keep;
        // A zero's keep decision changes no output: DARE and DELLA count zeros at q.
        const bool undrawn = pruning && t.d[i][k] == 0;
        ref.reported[i] += undrawn ? q[k] : keep ? 1.0 : 0.0;
        ref.undrawn[i] += undrawn;
        ref.expected[i] += q[k];
        ref.variance[i] += q[k] * (1 - q[k]);
        ref.survivors_nonzero += keep && t.d[i][k] != 0;
        const double d = t.d[i][k];
        // (w_i / q) * d, the order the definition fixes: where votes cancel exactly, the
        // elected sign depends on the last bit.
        if (keep) W[i][k] = p.rescale ? (w[i] / q[k]) * d : w[i] * d;
      }
    }
    std::vector<double> out(count);
    for (std::size_t k = 0; k < count; ++k) {
      double merged = 0;
      if (p.ties()) {
        double vote = 0;
        for (std::size_t i = 0; i < n; ++i) vote += W[i][k];
        double sum = 0, div = 0;
        for (std::size_t i = 0; i < n; ++i)
          if (vote >= 0 ? W[i][k] > 0 : W[i][k] < 0) sum += W[i][k], div += w[i];
        merged = p.normalized() ? (div != 0 ? sum / div : 0.0) : sum;
      } else {
        for (std::size_t i = 0; i < n; ++i) merged += W[i][k];
        if (p.normalized()) merged /= wsum;
      }
      out[k] = t.base[k] + p.lambda * merged;
    }
    ref.elements += count;
    ref.out[t.name] = std::move(out);
  }
  return ref;
}

// Max error of the output's floating tensors against `ref`, in ulps of the output dtype; every
// element must be within 1 ulp.
double max_ulps(const fs::path& out_dir, const std::map<std::string, std::vector<double>>& ref) {
  const Checkpoint merged = Checkpoint::open(out_dir);
  double worst = 0;
  std::size_t seen = 0, failures = 0;
  for (const TensorRef& t : merged.tensors()) {
    if (!dtype_is_mergeable(t.info->dtype)) continue;
    ++seen;
    const auto it = ref.find(t.name());
    EXPECT_NE(it, ref.end()) << t.name();
    if (it == ref.end()) continue;
    EXPECT_EQ(it->second.size(), t.info->numel) << t.name();
    const TensorView v = merged.view(t);
    for (std::size_t k = 0; k < it->second.size() && k < t.info->numel; ++k) {
      const double r = it->second[k];
      const double err = std::abs(v.element(k) - r) / ulp(t.info->dtype, r);
      if (err > 1.0 && ++failures <= 10)
        ADD_FAILURE() << t.name() << "[" << k << "]: got " << v.element(k) << ", expected " << r;
      worst = std::max(worst, err);
    }
  }
  EXPECT_EQ(seen, ref.size());
  EXPECT_EQ(failures, 0u);
  return worst;
}

constexpr const char* kStrategies[] = {"dare_linear", "dare_ties", "della", "della_linear"};

// ---------------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------------

class DareDellaTest : public conflux_test::StrategyFixture {
 protected:
  void write_scenario(const Scenario& sc = Scenario()) {
    write_checkpoint(dir_ / "base", sc.specs, [&](std::size_t ti, std::uint64_t j) { return sc.base(ti, j); });
    for (std::size_t i = 0; i < sc.models; ++i)
      write_checkpoint(dir_ / model_name(i), sc.specs,
                       [&](std::size_t ti, std::uint64_t j) { return sc.agent(ti, j, i); });
    models_ = sc.models;
  }

  static std::string model_name(std::size_t i) { return "m" + std::to_string(i); }
  std::vector<fs::path> model_dirs() const {
    std::vector<fs::path> m;
    for (std::size_t i = 0; i < models_; ++i) m.push_back(dir_ / model_name(i));
    return m;
  }
  std::vector<TensorInputs> inputs() const { return read_inputs(dir_ / "base", model_dirs()); }

  JobConfig job(const Params& p, const std::string& out) const {
    JobConfig j;
    j.name = "test";
    j.strategy = p.strategy;
    j.base = dir_ / "base";
    j.models = model_dirs();
    j.output = dir_ / out;
    j.seed = p.seed;
    j.params.push_back(num("density", p.density));
    if (p.epsilon && p.della()) j.params.push_back(num("epsilon", *p.epsilon));  // DARE has none
    if (!p.weights.empty()) j.params.push_back(list("weights", p.weights));
    j.params.push_back(num("lambda", p.lambda));
    if (p.normalize) j.params.push_back(flag("normalize", *p.normalize));
    j.params.push_back(flag("rescale", p.rescale));
    return j;
  }

  // Runs `p`, checks every output element within 1 ulp of the reference, the report's kept
  // counts equal to the reference's, and the kept fractions within 4 standard deviations of
  // their expectation (binomial for DARE; for DELLA the sum of independent Bernoulli(q)).
  Reference check(const Params& p, const std::string& out, std::optional<DType> out_dtype = {}) {
    SCOPED_TRACE(p.strategy + " -> " + out);
    JobConfig j = job(p, out);
    j.out_dtype = out_dtype;
    run(j);
    const Reference ref = reference(inputs(), p);
    EXPECT_LE(max_ulps(dir_ / out, ref.out), 1.0);
    const json::object rep = report(out);
    EXPECT_EQ(rep.at("method").as_string(), p.strategy);
    EXPECT_EQ(count(rep, "elements"), ref.elements);
    EXPECT_TRUE(near_rel(number(rep, "density"), p.density));
    EXPECT_EQ(rep.at("normalize").as_bool(), p.normalized());
    EXPECT_EQ(rep.at("rescale").as_bool(), p.rescale);
    EXPECT_TRUE(near_rel(number(rep, "expected_kept_fraction"), p.density));
    if (p.della()) {
      EXPECT_TRUE(near_rel(number(rep, "epsilon"), p.eps()));
    }
    const json::array& models = rep.at("models").as_array();
    EXPECT_EQ(models.size(), models_);
    for (std::size_t i = 0; i < models.size() && i < models_; ++i) {
      SCOPED_TRACE("model " + std::to_string(i));
      const json::object& m = models[i].as_object();
      // Exact where drawn; the undrawn zeros' expectation rounded once, each term within 2^-24.
      if (ref.undrawn[i] == 0) {
        EXPECT_EQ(count(m, "kept"), ref.kept[i]);
      } else {
        EXPECT_NEAR(static_cast<double>(count(m, "kept")), ref.reported[i],
                    0.5 + static_cast<double>(ref.undrawn[i]) * 0x1p-24 + 1e-9 * ref.reported[i]);
      }
      const double kept = static_cast<double>(count(m, "kept"));
      EXPECT_TRUE(near_rel(number(m, "kept_fraction"), kept / static_cast<double>(ref.elements), 1e-8));
      // The mean keep probability is density (DELLA: linear in rank, symmetric about it).
      EXPECT_TRUE(near_rel(ref.expected[i] / static_cast<double>(ref.elements), p.density, 1e-9));
      EXPECT_LE(std::fabs(kept - ref.expected[i]), 4 * std::sqrt(ref.variance[i]) + 1e-9)
          << "kept " << kept << " of " << ref.elements << ", expected " << ref.expected[i];
    }
    return ref;
  }

  std::size_t models_ = 0;
};

// ---------------------------------------------------------------------------------------------
// Outputs against float64 references
// ---------------------------------------------------------------------------------------------

TEST_F(DareDellaTest, DareLinearMatchesReference) {
  write_scenario();
  Params p{"dare_linear"};
  p.density = 0.3;
  p.weights = {1.0, 0.5, 0.8};
  p.lambda = 0.9;
  p.seed = 11;
  const Reference ref = check(p, "plain");
  EXPECT_GT(ref.survivors_nonzero, 5000u);
  p.normalize = true;
  check(p, "normalized");
  p.rescale = false;
  p.normalize = false;
  check(p, "no_rescale");
  p.rescale = true;
  check(p, "f32", DType::F32);
}

TEST_F(DareDellaTest, DareTiesMatchesReference) {
  write_scenario();
  Params p{"dare_ties"};
  p.density = 0.4;
  p.weights = {1.0, 0.6, 1.3};
  p.lambda = 1.1;
  p.seed = 12;
  check(p, "plain");
  p.normalize = true;
  check(p, "normalized");
  check(p, "f32", DType::F32);
  p.rescale = false;
  check(p, "no_rescale");
  // A negative weight flips a model's votes.
  p.weights = {1.0, -0.5, 0.7};
  p.rescale = true;
  check(p, "negative_weight", DType::F32);
}

// Sparse task vectors (most blocks go through the gathered kernels, some dense): the same
// reference, and the zeros' keep decisions counted at their expectation.
TEST_F(DareDellaTest, SparseTaskVectorsMatchReference) {
  Scenario sc;
  sc.sparse = true;
  write_scenario(sc);
  for (const char* strategy : kStrategies) {
    SCOPED_TRACE(strategy);
    Params p{strategy};
    p.density = 0.3;
    p.weights = {1.0, 0.6, 1.3};
    p.lambda = 1.1;
    p.seed = 21;
    const std::string s(strategy);
    const Reference ref = check(p, s + "_plain");
    EXPECT_GT(ref.survivors_nonzero, 500u);
    for (std::uint64_t u : ref.undrawn) EXPECT_GT(u, 10000u);  // the counts' tolerance has teeth
    p.normalize = !p.normalized();
    check(p, s + "_renormalized");
    p.rescale = false;
    check(p, s + "_no_rescale", DType::F32);
  }
}

TEST_F(DareDellaTest, DellaMatchesReference) {
  write_scenario();
  Params p{"della"};
  p.density = 0.5;
  p.epsilon = 0.2;
  p.weights = {1.0, 0.7, 1.2};
  p.seed = 13;
  check(p, "plain");  // normalize: della's default (true)
  check(p, "f32", DType::F32);
  p.normalize = false;
  p.lambda = 0.8;
  check(p, "unnormalized", DType::F32);
  p.rescale = false;
  check(p, "no_rescale");
  // The default epsilon (0.15), and keep probabilities reaching exactly 1.
  p = Params{"della"};
  p.density = 0.85;
  p.seed = 14;
  check(p, "top_one", DType::F32);
}

TEST_F(DareDellaTest, DellaLinearMatchesReference) {
  write_scenario();
  Params p{"della_linear"};
  p.density = 0.35;
  p.epsilon = 0.1;
  p.weights = {0.9, 1.0, 0.4};
  p.lambda = 1.2;
  p.seed = 15;
  check(p, "plain");  // normalize: della_linear's default (false)
  check(p, "f32", DType::F32);
  p.normalize = true;
  check(p, "normalized", DType::F32);
  p.rescale = false;
  check(p, "no_rescale");
}

// One model, f32 output: every keep decision shows in the output (dropped: the base exactly;
// kept: the base plus the rescaled change), so the counts seen in the output follow the
// stream's decisions and DELLA's per-rank rescale (1/q differs between neighbouring ranks).
TEST_F(DareDellaTest, SingleModelShowsEveryDecision) {
  Scenario sc;
  sc.models = 1;
  write_scenario(sc);
  for (const char* strategy : kStrategies) {
    Params p{strategy};
    p.density = 0.4;
    p.epsilon = 0.25;
    p.seed = 21;
    const Reference ref = check(p, std::string(strategy), DType::F32);
    // Count the entries that changed in the output against the kept nonzero changes.
    const Checkpoint out = Checkpoint::open(dir_ / strategy);
    std::uint64_t changed = 0;
    for (const TensorInputs& t : inputs()) {
      const TensorView v = out.view(out.at(t.name));
      for (std::size_t k = 0; k < t.base.size(); ++k) changed += v.element(k) != t.base[k];
    }
    EXPECT_EQ(changed, ref.survivors_nonzero) << strategy;
  }
}

// More models than one fused sweep takes (4): the sums carry between groups of models.
TEST_F(DareDellaTest, FiveModelsMatchReference) {
  Scenario sc;
  sc.models = 5;
  write_scenario(sc);
  for (const char* strategy : kStrategies) {
    Params p{strategy};
    p.density = 0.4;
    p.epsilon = 0.2;
    p.weights = {1.0, 0.6, 1.3, -0.4, 0.8};
    p.lambda = 0.9;
    p.seed = 31;
    check(p, std::string(strategy) + "_bf16");
    p.normalize = !p.normalized();
    check(p, std::string(strategy) + "_f32", DType::F32);
  }
}

// ---------------------------------------------------------------------------------------------
// DELLA's row kernels (common/drop_merge.h), each path whatever this CPU and these rows make
// the plugins choose: the scalar and the AVX-512 split, ranks counted directly and radix-sorted,
// against a stable sort.
// ---------------------------------------------------------------------------------------------

namespace dm = conflux::plugins::drop_merge;

std::uint32_t magnitude_bits(float x) {
  std::uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b & 0x7FFFFFFFu;  // orders like |x|, NaNs last
}

// A row of `len` entries, a fraction `nonzero` of them changed. kind 0: random magnitudes;
// 1: three magnitudes (ties everywhere); 2: also infinities, NaNs and signed zeros.
struct Row {
  std::vector<float> x, base;
};
Row make_row(std::size_t len, double nonzero, int kind, std::uint64_t seed) {
  Row r;
  for (std::size_t k = 0; k < len; ++k) {
    const float b = static_cast<float>(rnd(seed, k, 1) - 0.5);
    float x = b;
    if (rnd(seed, k, 2) < nonzero) {
      const double v = rnd(seed, k, 3);
      if (kind == 1)
        x = b + static_cast<float>((v < 0.5 ? -1 : 1) * std::ldexp(1.0, -6 - static_cast<int>(v * 6) % 3));
      else
        x = b + static_cast<float>((v - 0.5) * std::ldexp(1.0, -static_cast<int>(rnd(seed, k, 4) * 20)));
      if (kind == 2 && rnd(seed, k, 5) < 0.1) x = rnd(seed, k, 6) < 0.5 ? INFINITY : NAN;
    }
    if (kind == 2 && rnd(seed, k, 7) < 0.05) x = -b;  // exact cancellations of sign
    float bk = b;
    if (kind == 2 && rnd(seed, k, 8) < 0.04) {
      // Stored bits that differ with a zero task vector (+0 against -0), and equal special
      // values whose difference is a NaN (nonzero).
      const float pairs[][2] = {{0.0f, -0.0f}, {-0.0f, 0.0f}, {INFINITY, INFINITY}, {NAN, NAN}, {-INFINITY, 1.0f}};
      const auto& p = pairs[static_cast<std::size_t>(rnd(seed, k, 9) * 5) % 5];
      bk = p[0];
      x = p[1];
    }
    r.x.push_back(x);
    r.base.push_back(bk);
  }
  return r;
}

// The portable split, its draws filled in first (as split_row does on a CPU without AVX-512).
template <class In>
void split_scalar(const In* x, const In* base, const dm::RowDraws& draws, std::size_t n, dm::RowSplit& s) {
  std::vector<std::uint32_t> draw(n);
  dm::fill_draws(draws, n, draw.data());
  dm::split_row_scalar(x, base, draw.data(), n, s);
}

// The split of stored BF16 inputs (CFX_PASS_BF16_INPUTS), given float32 values that are
// BF16 values: their bits are the stored form.
template <void (*Split)(const std::uint16_t*, const std::uint16_t*, const dm::RowDraws&, std::size_t, dm::RowSplit&)>
void split_stored_bf16(const float* x, const float* base, const dm::RowDraws& draws, std::size_t n, dm::RowSplit& s) {
  std::vector<std::uint16_t> xb(n), bb(n);
  for (std::size_t k = 0; k < n; ++k) {
    xb[k] = f32_to_bf16_bits(x[k]);
    bb[k] = f32_to_bf16_bits(base[k]);
    EXPECT_EQ(magnitude_bits(bf16_bits_to_f32(xb[k])), magnitude_bits(x[k])) << "not a BF16 value";
  }
  Split(xb.data(), bb.data(), draws, n, s);
}

// The gather of a block's active entries (common/active.h, the sparse paths of DARE and the
// trimming strategies) against a scalar reading of its definition: every entry with some nonzero
// float32 task-vector entry (NaN included, -0 not), in index order with their values bit for
// bit, and besides them only entries whose stored values differ from the base's bitwise (+0
// against -0: the BF16 gather decides on the stored bits); each model's nonzero count and
// smallest nonzero key; for float32 and BF16 inputs, 1-4 models, full blocks and tails, sparse
// and dense blocks.
template <class In>
void check_gather(std::uint32_t n, std::size_t m, double fill, std::uint64_t seed) {
  namespace act = conflux::plugins::active;
  SCOPED_TRACE("models " + std::to_string(n) + ", entries " + std::to_string(m) + ", fill " + std::to_string(fill) +
               (std::is_same_v<In, float> ? ", f32" : ", bf16"));
  auto encode = [](float v) -> In {
    if constexpr (std::is_same_v<In, float>) return v;
    else return f32_to_bf16_bits(v);
  };
  auto decode = [](In v) -> float {
    if constexpr (std::is_same_v<In, float>) return v;
    else return bf16_bits_to_f32(v);
  };
  std::vector<In> b(m);
  std::vector<std::vector<In>> x(n, std::vector<In>(m));
  const float specials[] = {std::numeric_limits<float>::quiet_NaN(), -0.0f, 0.0f,
                            std::numeric_limits<float>::infinity(), 0x1p-140f};
  for (std::size_t k = 0; k < m; ++k) {
    const float bk = rnd(seed, k, 1) < 0.05 ? specials[k % 5] : static_cast<float>(rnd(seed, k, 2) - 0.5);
    b[k] = encode(bk);
    for (std::uint32_t i = 0; i < n; ++i) {
      float v = decode(b[k]);
      if (rnd(seed, k, 10 + i) < fill)
        v = rnd(seed, k, 20 + i) < 0.1 ? specials[(k + i) % 5]
                                       : v + static_cast<float>(rnd(seed, k, 30 + i) - 0.5) * 0x1p-6f;
      x[i][k] = encode(v);
    }
  }
  std::vector<const In*> xs;
  for (const auto& v : x) xs.push_back(v.data());
  // The reference.
  std::vector<std::uint32_t> idx, nonzero(n, 0), least(n, 0xFFFFFFFFu);
  std::vector<bool> may(m, false);  // not active, but stored bits differ: may be gathered
  for (std::size_t k = 0; k < m; ++k) {
    bool any = false;
    for (std::uint32_t i = 0; i < n; ++i) may[k] = may[k] || std::memcmp(&x[i][k], &b[k], sizeof(In)) != 0;
    for (std::uint32_t i = 0; i < n; ++i) {
      const float d = decode(x[i][k]) - decode(b[k]);
      std::uint32_t key;
      std::memcpy(&key, &d, sizeof key);
      key &= 0x7FFFFFFFu;
      if (key == 0) continue;
      any = true;
      ++nonzero[i];
      least[i] = std::min(least[i], key);
    }
    if (any) idx.push_back(static_cast<std::uint32_t>(k));
  }
  auto lanes = std::make_unique<act::Lanes>();
  std::memset(lanes->idx, 0xA5, sizeof lanes->idx);  // what an earlier block left
  std::memset(lanes->b, 0xA5, sizeof lanes->b);
  std::memset(lanes->x, 0xA5, sizeof lanes->x);
  std::vector<std::uint32_t> got_nonzero(n, 7), got_least(n, 0xFFFFFFFFu);  // counts add to 7
  if (!act::gather_active(n, xs.data(), b.data(), m, *lanes, got_nonzero.data(), got_least.data())) {
    EXPECT_FALSE(conflux::plugins::have_avx512()) << "the gather must run on an AVX-512 CPU";
    return;
  }
  std::size_t next = 0, extra = 0;  // the next active entry expected; others gathered
  for (std::size_t j = 0; j < lanes->count; ++j) {
    const std::uint32_t k = lanes->idx[j];
    ASSERT_LT(k, m) << "lane " << j;
    ASSERT_TRUE(j == 0 || k > lanes->idx[j - 1]) << "lane " << j << ": not in index order";
    if (next < idx.size() && k == idx[next]) {
      ++next;
    } else {
      ASSERT_TRUE(may[k]) << "lane " << j << ": entry " << k << " has no task vector entry to gather";
      ++extra;
    }
    const float bv = decode(b[k]);
    EXPECT_EQ(std::memcmp(&lanes->b[j], &bv, sizeof bv), 0) << "lane " << j;
    for (std::uint32_t i = 0; i < n; ++i) {
      const float xv = decode(x[i][k]);
      EXPECT_EQ(std::memcmp(&lanes->x[i][j], &xv, sizeof xv), 0) << "lane " << j << ", model " << i;
    }
  }
  ASSERT_EQ(next, idx.size()) << "active entry " << (next < idx.size() ? idx[next] : 0) << " was not gathered";
  if (std::is_same_v<In, float>) {
    EXPECT_EQ(extra, 0u) << "float32 inputs gather exactly the active entries";
  }
  // The padding to whole vectors: zero entries (index 0, +0 values).
  auto bits = [](float v) {
    std::uint32_t u;
    std::memcpy(&u, &v, sizeof u);
    return u;
  };
  ASSERT_LE(lanes->padded(), act::Lanes::kRoom);
  EXPECT_EQ(lanes->padded() % 16, 0u);
  EXPECT_LT(lanes->padded() - lanes->count, 16u);
  for (std::size_t j = lanes->count; j < lanes->padded(); ++j) {
    EXPECT_EQ(lanes->idx[j], 0u) << "padding lane " << j;
    EXPECT_EQ(bits(lanes->b[j]), 0u) << "padding lane " << j;
    for (std::uint32_t i = 0; i < n; ++i) EXPECT_EQ(bits(lanes->x[i][j]), 0u) << "padding lane " << j;
  }
  for (std::uint32_t i = 0; i < n; ++i) {
    EXPECT_EQ(got_nonzero[i], nonzero[i] + 7) << "model " << i;
    EXPECT_EQ(got_least[i], least[i]) << "model " << i;
  }
}

TEST(ActiveEntries, GatherMatchesTheDefinition) {
  std::uint64_t seed = 1;
  for (std::uint32_t n = 1; n <= 4; ++n)
    for (const std::size_t m : {std::size_t{1}, std::size_t{15}, std::size_t{16}, std::size_t{17}, std::size_t{31}, std::size_t{32}, std::size_t{33},
                                std::size_t{63}, std::size_t{512},
                                std::size_t{1000}, std::size_t{1024}})
      for (const double fill : {0.0, 0.03, 0.3, 1.0}) {
        check_gather<float>(n, m, fill, ++seed);
        check_gather<std::uint16_t>(n, m, fill, ++seed);
      }
}

// DARE's in-register draws are the host's uniforms (plugin.h's definition), also past 2^32 in
// element index, and keep_from turns the keep test u >= pf into an integer test exactly.
TEST(DareDraws, AreTheHostsUniforms) {
  for (const std::uint64_t key : {std::uint64_t{0}, std::uint64_t{0x0123456789ABCDEFull}, ~std::uint64_t{0}})
    for (const std::uint64_t e : {std::uint64_t{0}, std::uint64_t{1}, std::uint64_t{1023}, std::uint64_t{0xFFFFFFFFull},
                                  std::uint64_t{0x100000000ull}, std::uint64_t{0x100000001ull},
                                  std::uint64_t{0x123456789ABull}}) {
      const auto salt = static_cast<std::uint32_t>(key >> 32) ^ (static_cast<std::uint32_t>(e >> 32) * 0x9E3779B9u);
      const std::uint32_t m = dm::draw(static_cast<std::uint32_t>(key), salt, static_cast<std::uint32_t>(e));
      EXPECT_EQ(static_cast<float>(m) * 0x1p-24f, conflux::random_uniform_at(key, e)) << "key " << key << " e " << e;
    }
  for (const float pf : {0.0f, 0x1p-24f, 0.2f, 0.5f, 0.8f, std::nextafter(1.0f, 0.0f), 1.0f}) {
    const std::uint32_t from = dm::keep_from(pf);
    for (const std::uint32_t m : {from > 0 ? from - 1 : 0u, from, from + 1})
      if (m < (1u << 24)) {
        EXPECT_EQ(m >= from, static_cast<float>(m) * 0x1p-24f >= pf) << "pf " << pf << " m " << m;
      }
  }
}

// Zeros are not drawn: the kept count takes the zeros of a row (ranks 0 .. z-1) at their
// expected number, zero_units[z] * 2^-24. It is the sum of the definition's keep probabilities
// P(u >= 1 - q_r) over those ranks, within the 2^-24 grid of the uniforms per rank.
TEST(DellaRankTables, ZeroUnitsAreTheZerosExpectedKeptCount) {
  for (const std::size_t len : {2, 17, 896, 4864})
    for (const auto& [density, epsilon] : {std::pair{0.2, 0.15}, std::pair{0.5, 0.5}, std::pair{0.9, 0.1}}) {
      SCOPED_TRACE("len " + std::to_string(len) + ", density " + std::to_string(density));
      const double lo = density - epsilon, step = 2 * epsilon / static_cast<double>(len - 1);
      const dm::RankTables tables(len, lo, step, {1.0, 2.0}, true);
      ASSERT_EQ(tables.zero_units.size(), len + 1);
      EXPECT_EQ(tables.zero_units[0], 0u);
      double expected = 0;
      for (std::size_t z = 1; z <= len; ++z) {
        const double q = std::min(lo + static_cast<double>(z - 1) * step, 1.0);
        expected += q;
        // The draws m in [0, 2^24) that keep at rank z - 1, counted by the definition's test.
        const float pf = tables.pf[z - 1];
        const auto first = static_cast<std::uint32_t>(std::ceil(static_cast<double>(pf) * 0x1p24));
        ASSERT_GE(static_cast<float>(first) * 0x1p-24f, pf);
        if (first > 0) {
          ASSERT_LT(static_cast<float>(first - 1) * 0x1p-24f, pf);
        }
        EXPECT_EQ(tables.zero_units[z] - tables.zero_units[z - 1], (1u << 24) - std::min(first, 1u << 24));
        EXPECT_NEAR(static_cast<double>(tables.zero_units[z]) * 0x1p-24, expected,
                    static_cast<double>(z) * 0x1p-24 + 1e-9 * expected);
      }
      EXPECT_NEAR(static_cast<double>(tables.zero_units[len]) * 0x1p-24, density * static_cast<double>(len),
                  static_cast<double>(len) * 0x1p-24 + 1e-9 * static_cast<double>(len));
    }
}

TEST(DellaRowKernels, SplitsAndRanksMatchAStableSort) {
  using Split = void (*)(const float*, const float*, const dm::RowDraws&, std::size_t, dm::RowSplit&);
  std::vector<std::pair<const char*, Split>> float_splits{{"scalar", split_scalar<float>}};
  std::vector<std::pair<const char*, Split>> bf16_splits{
      {"scalar, stored bf16", split_stored_bf16<split_scalar<std::uint16_t>>}};
#if CONFLUX_DROP_MERGE_AVX512
  if (dm::have_avx512()) {
    float_splits.emplace_back("avx512", dm::split_row_avx512<float>);
    bf16_splits.emplace_back("avx512, stored bf16", split_stored_bf16<dm::split_row_avx512<std::uint16_t>>);
    if (conflux::plugins::active::have_vbmi2())
      bf16_splits.emplace_back("avx512-vbmi2, stored bf16", split_stored_bf16<dm::split_row_vbmi2>);
  }
#endif
  std::uint64_t seed = 0, rows = 0, counted = 0;
  for (const std::size_t len : {2, 15, 16, 17, 33, 100, 896, 1501, 4864})
    for (const double nonzero : {0.0, 0.06, 0.5, 1.0})
      for (const int kind : {0, 1, 2, 3}) {
        SCOPED_TRACE("len " + std::to_string(len) + ", nonzero " + std::to_string(nonzero) + ", kind " +
                     std::to_string(kind));
        // kind 3: kind 2's row rounded to BF16 values, through the float32 and the stored-BF16 splits.
        Row row = make_row(len, nonzero, std::min(kind, 2), ++seed);
        auto splits = float_splits;
        if (kind == 3) {
          for (auto* v : {&row.x, &row.base})
            for (float& f : *v) f = bf16_bits_to_f32(f32_to_bf16_bits(f));
          splits.insert(splits.end(), bf16_splits.begin(), bf16_splits.end());
        }
        // density 0.2, epsilon 0.15: thresholds 1 - q from 0.95 down to 0.65.
        const dm::RankTables tables(len, 0.05, 0.3 / static_cast<double>(len - 1), {1.0}, true);
        const float* pf = tables.pf.data();
        // The model's stream for this row: the host's uniforms (also rows that cross a multiple
        // of 2^32 in element index, where the salt changes), u = m * 2^-24.
        const std::uint64_t stream = 0x9E3779B97F4A7C15ull * seed;
        const std::uint64_t starts[] = {0, 4096 * seed, 0xFFFFFFFFull - len / 2, 0x100000000ull + 3};
        const std::uint64_t e0 = starts[seed % 4];
        const dm::RowDraws draws(stream, e0);
        std::vector<std::uint32_t> m(len);
        for (std::size_t k = 0; k < len; ++k) {
          const float u = conflux::random_uniform_at(stream, e0 + k);
          m[k] = static_cast<std::uint32_t>(static_cast<double>(u) * 0x1p24);
          ASSERT_EQ(static_cast<double>(m[k]) * 0x1p-24, static_cast<double>(u));
          ASSERT_EQ(draws.at(k), m[k]) << "entry " << k;
        }
        // The reference: ranks by a stable sort of the float32 task vector's magnitudes.
        std::vector<std::uint32_t> mag(len);
        for (std::size_t k = 0; k < len; ++k) mag[k] = magnitude_bits(row.x[k] - row.base[k]);
        std::vector<std::size_t> order(len), rank(len);
        std::iota(order.begin(), order.end(), std::size_t{0});
        std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return mag[a] < mag[b]; });
        for (std::size_t r = 0; r < len; ++r) rank[order[r]] = r;
        // The integer test on the draw is the definition's u >= pf; then some thresholds moved
        // exactly onto their entry's draw (kept) or just above it (dropped).
        std::vector<std::uint32_t> from = tables.from;
        for (std::size_t k = 0; k < len; ++k)
          ASSERT_EQ(m[k] >= from[rank[k]], conflux::random_uniform_at(stream, e0 + k) >= pf[rank[k]]) << "entry " << k;
        for (std::size_t k = 0; k < len; k += 3) from[rank[k]] = m[k] + (k % 2 ? 0u : 1u);
        std::size_t zeros = 0;
        std::vector<std::uint32_t> nonzero_idx;
        for (std::size_t k = 0; k < len; ++k) {
          if (mag[k] != 0)
            nonzero_idx.push_back(static_cast<std::uint32_t>(k));
          else
            ++zeros;
        }
        for (const auto& [name, split] : splits) {
          SCOPED_TRACE(name);
          std::vector<std::uint32_t> key(len + 16), idx(len + 16), cand(len + 16);
          std::vector<std::uint32_t> mnz(len + 16);
          std::vector<std::uint64_t> a(len), b(len);
          dm::RowSplit s{key.data(), idx.data(), mnz.data()};
          split(row.x.data(), row.base.data(), draws, len, s);
          ASSERT_EQ(s.nonzero, nonzero_idx.size());
          std::uint32_t any = 0, all = ~0u;
          for (std::size_t j = 0; j < s.nonzero; ++j) {
            ASSERT_EQ(idx[j], nonzero_idx[j]);
            EXPECT_EQ(key[j], mag[idx[j]]);
            EXPECT_EQ(mnz[j], m[idx[j]]);
            any |= key[j];
            all &= key[j];
          }
          EXPECT_EQ(s.varying, s.nonzero ? any & ~all : 0u);
          // Every path gives each visited entry its rank among the nonzero entries.
          auto expect_rank = [&](std::size_t r, std::uint32_t j) {
            ASSERT_LT(j, s.nonzero);
            EXPECT_EQ(zeros + r, rank[idx[j]]) << "entry " << idx[j];
          };
          std::vector<int> seen(s.nonzero, 0);
          if (s.nonzero > 1 && s.varying != 0) {
            dm::radix_ranks(s, a.data(), b.data(), [&](std::size_t r, std::uint32_t j) {
              expect_rank(r, j);
              ++seen[j];
            });
            for (const int n : seen) EXPECT_EQ(n, 1);
#if CONFLUX_DROP_MERGE_AVX512
            if (dm::have_avx512()) {
              std::fill_n(key.data() + s.nonzero, 16, 0xFFFFFFFFu);
              for (std::size_t j = 0; j < s.nonzero; ++j) expect_rank(dm::rank_avx512(key.data(), s.nonzero, j), static_cast<std::uint32_t>(j));
              counted += s.nonzero;
            }
#endif
          }
          // The plugins' choice: at least every entry that may be kept, each once.
          std::fill(seen.begin(), seen.end(), 0);
          std::vector<std::uint32_t> cand_rank(len + 16);
          const std::size_t c =
              dm::rank_candidates(s, from[len - 1], cand.data(), cand_rank.data(), a.data(), b.data());
          for (std::size_t e = 0; e < c; ++e) {
            if (e > 0) {
              EXPECT_LT(cand[e - 1], cand[e]) << "candidates in ascending order";
            }
            expect_rank(cand_rank[e], cand[e]);
            ++seen.at(cand[e]);
          }
          for (std::size_t j = 0; j < s.nonzero; ++j) {
            EXPECT_LE(seen[j], 1);
            if (mnz[j] >= from[len - 1]) {
              EXPECT_EQ(seen[j], 1) << "entry " << idx[j] << " may be kept";
            }
          }
          ++rows;
        }
      }
  EXPECT_GT(rows, 0u);
  const char* portable = std::getenv("CONFLUX_PORTABLE_KERNELS");
  if (portable && std::strcmp(portable, "1") == 0) {
    EXPECT_EQ(counted, 0u) << "CONFLUX_PORTABLE_KERNELS=1 must rule out the AVX-512 kernels";
  }
  std::printf("row kernels: %llu rows checked, %llu ranks counted with AVX-512\n",
              static_cast<unsigned long long>(rows), static_cast<unsigned long long>(counted));
}

// ---------------------------------------------------------------------------------------------
// Special cases
// ---------------------------------------------------------------------------------------------

// Float32 arithmetic (BF16 output) where the terms cancel: dare_linear with weights (1, 1, -1)
// on base 0 and x2 = x0 + x1 + delta (the result is -delta), dare_ties with agents of tiny
// values over a base they all undo (the mean update nearly cancels the base). The entries whose
// float32 result cannot see the remainder are computed again in double
// (plugins/common/float_guard.h): within 1 ulp of the reference everywhere.
TEST_F(DareDellaTest, DareStaysExactWhereTermsCancel) {
  const std::vector<Spec> specs = {{"w", {41, 37}, DType::F32}, {"v", {1003}, DType::F32}};
  auto r = [&](std::size_t ti, std::uint64_t j, std::uint64_t c) { return rnd(name_id(specs[ti].name), j, c); };
  for (const bool ties : {false, true}) {
    SCOPED_TRACE(ties ? "dare_ties" : "dare_linear");
    auto base = [&](std::size_t ti, std::uint64_t j) {
      return ties ? static_cast<float>(0.5 + 0.5 * r(ti, j, 1)) : 0.0f;
    };
    auto agent = [&](std::size_t ti, std::uint64_t j, std::size_t i) {
      if (ties) return static_cast<float>(std::ldexp(r(ti, j, 2 + i) - 0.5, -16));
      const double a = 0.5 + 0.5 * r(ti, j, 2), c = 0.25 + 0.5 * r(ti, j, 3);
      if (i == 0) return static_cast<float>(a);
      if (i == 1) return static_cast<float>(c);
      return static_cast<float>(static_cast<double>(static_cast<float>(a)) + static_cast<float>(c) +
                                std::ldexp(r(ti, j, 4) - 0.5, -18));
    };
    conflux_test::write_checkpoint(dir_ / "base", specs, base);
    for (std::size_t i = 0; i < 3; ++i)
      conflux_test::write_checkpoint(dir_ / model_name(i), specs,
                                     [&](std::size_t ti, std::uint64_t j) { return agent(ti, j, i); });
    models_ = 3;
    Params p{ties ? "dare_ties" : "dare_linear"};
    p.density = 0.7;
    p.seed = 3;
    p.rescale = false;  // survivors unscaled: the kept updates undo the base exactly
    if (!ties) p.weights = {1.0, 1.0, -1.0};
    if (ties) p.normalize = true;
    JobConfig j = job(p, ties ? "cancel_ties" : "cancel_linear");
    j.out_dtype = DType::BF16;
    run(j);
    EXPECT_LE(max_ulps(j.output, reference(inputs(), p).out), 1.0);
  }
}

// dare_ties' float32 election where the vote cancels: task vectors (1, -2^-25, -1) * scale, whose
// float32 vote rounds to 0 (elected +) while the exact vote is -2^-25 * scale (elected -), and
// their mirror images. The guard sends these entries to double: the elected sign, and so the
// merged value (about -0.5, not 1), are the reference's.
TEST_F(DareDellaTest, DareTiesElectsTheExactSignWhereTheVoteCancels) {
  const std::vector<Spec> specs = {{"e", {96}, DType::F32}};
  conflux_test::write_checkpoint(dir_ / "base", specs, [](std::size_t, std::uint64_t) { return 0.0f; });
  for (std::size_t i = 0; i < 3; ++i)
    conflux_test::write_checkpoint(dir_ / model_name(i), specs, [&](std::size_t, std::uint64_t j) {
      const double terms[3] = {1.0, -0x1p-25, -1.0};
      const double sign = j % 2 ? -1.0 : 1.0;
      return static_cast<float>(sign * std::ldexp(terms[i], static_cast<int>(j % 24) - 12));
    });
  models_ = 3;
  for (const bool normalize : {true, false}) {
    SCOPED_TRACE(normalize ? "normalize" : "no normalize");
    Params p{"dare_ties"};
    p.density = 1.0;
    p.normalize = normalize;
    JobConfig j = job(p, normalize ? "vote_norm" : "vote_sum");
    j.out_dtype = DType::BF16;
    run(j);
    const auto ref = reference(inputs(), p).out;
    EXPECT_LE(max_ulps(j.output, ref), 1.0);
    EXPECT_LT(ref.at("e")[0], 0.0);  // the exact vote elects -: the check above has teeth
  }
}

TEST_F(DareDellaTest, DensityOneIsTaskArithmeticOrTiesWithoutTrimming) {
  write_scenario();
  const std::vector<TensorInputs> in = inputs();
  const std::vector<double> w{1.0, 0.5, 0.8};
  // Computed here from the definitions, without the drop machinery.
  std::map<std::string, std::vector<double>> ta, ties, ties_norm;
  for (const TensorInputs& t : in)
    for (std::size_t k = 0; k < t.base.size(); ++k) {
      double sum = 0, vote = 0, agree = 0, div = 0;
      for (std::size_t i = 0; i < 3; ++i) sum += w[i] * t.d[i][k], vote += w[i] * t.d[i][k];
      for (std::size_t i = 0; i < 3; ++i) {
        const double x = w[i] * t.d[i][k];
        if (vote >= 0 ? x > 0 : x < 0) agree += x, div += w[i];
      }
      ta[t.name].push_back(t.base[k] + 0.9 * sum);
      ties[t.name].push_back(t.base[k] + 0.9 * agree);
      ties_norm[t.name].push_back(t.base[k] + 0.9 * (div != 0 ? agree / div : 0.0));
    }
  for (const TensorInputs& t : in) {  // empty tensors too
    ta.try_emplace(t.name);
    ties.try_emplace(t.name);
    ties_norm.try_emplace(t.name);
  }
  for (const char* strategy : kStrategies) {
    SCOPED_TRACE(strategy);
    Params p{strategy};
    p.density = 1.0;
    p.weights = w;
    p.lambda = 0.9;
    p.normalize = false;
    p.seed = 5;
    const std::string out = std::string(strategy) + "_1";
    run(job(p, out));
    EXPECT_LE(max_ulps(dir_ / out, p.ties() ? ties : ta), 1.0);
    const json::object rep = report(out);
    for (const auto& m : rep.at("models").as_array()) EXPECT_EQ(count(m.as_object(), "kept"), count(rep, "elements"));
    if (p.ties()) {
      p.normalize = true;
      run(job(p, out + "n"));
      EXPECT_LE(max_ulps(dir_ / (out + "n"), ties_norm), 1.0);
    }
  }
  // DELLA with density 1 prunes nothing whatever epsilon is (mergekit's della_magprune).
  Params p{"della_linear"};
  p.density = 1.0;
  p.epsilon = 0.4;
  p.weights = w;
  p.lambda = 0.9;
  run(job(p, "della_eps"));
  EXPECT_LE(max_ulps(dir_ / "della_eps", ta), 1.0);
}

// With epsilon = 0 every keep probability is density: DELLA is DARE, bit for bit.
TEST_F(DareDellaTest, DellaWithoutSpreadIsDare) {
  write_scenario();
  for (const auto& [della, dare] : {std::pair{"della", "dare_ties"}, std::pair{"della_linear", "dare_linear"}}) {
    Params a{della}, b{dare};
    a.density = b.density = 0.3;
    a.epsilon = 0.0;
    a.weights = b.weights = {1.0, 0.5, 0.8};
    a.normalize = b.normalize = true;
    a.seed = b.seed = 99;
    run(job(a, della));
    run(job(b, dare));
    const Checkpoint x = Checkpoint::open(dir_ / della), y = Checkpoint::open(dir_ / dare);
    for (const TensorRef& t : x.tensors()) {
      const TensorView u = x.view(t), v = y.view(y.at(t.name()));
      EXPECT_TRUE(std::equal(u.bytes.begin(), u.bytes.end(), v.bytes.begin(), v.bytes.end()))
          << della << " vs " << dare << ": " << t.name();
    }
  }
}

TEST_F(DareDellaTest, BitIdenticalAcrossThreadsAndChunksAndFollowsTheSeed) {
  for (const bool sparse : {false, true}) {
    Scenario sc;
    sc.sparse = sparse;
    write_scenario(sc);
    for (const char* strategy : kStrategies) {
      SCOPED_TRACE(std::string(strategy) + (sparse ? ", sparse" : ""));
      Params p{strategy};
      p.density = 0.3;
      p.epsilon = 0.2;
      p.weights = {1.0, 0.5, 0.8};
      p.seed = 1234;
      const std::string s(strategy);
      run(job(p, s + "_t1"), 1, 1000);
      run(job(p, s + "_t2"), 2, 1000);
      run(job(p, s + "_t3"), 2, 4096);
      run(job(p, s + "_t4"), 1, 333);  // whole-row chunks round this to rows
      run(job(p, s + "_t5"), 2, 1);    // one row (DELLA) or one element (DARE) per chunk
      p.seed = 1235;
      run(job(p, s + "_other"), 2, 1000);
      const std::string first = conflux_test::read_file(dir_ / (s + "_t1") / "model.safetensors");
      for (const char* o : {"_t2", "_t3", "_t4", "_t5"})
        EXPECT_EQ(first, conflux_test::read_file(dir_ / (s + o) / "model.safetensors")) << o;
      EXPECT_NE(first, conflux_test::read_file(dir_ / (s + "_other") / "model.safetensors"));
      for (const char* o : {"_t1", "_t2", "_t3", "_t4", "_t5", "_other"}) fs::remove_all(dir_ / (s + o));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Bad jobs
// ---------------------------------------------------------------------------------------------

TEST_F(DareDellaTest, BadParametersAreRefused) {
  write_scenario();
  const auto nothing_written = [&] { EXPECT_FALSE(fs::exists(dir_ / "out")); };
  for (const char* strategy : kStrategies) {
    SCOPED_TRACE(strategy);
    for (double density : {0.0, 1.5, -0.1}) {
      Params p{strategy};
      p.density = density;
      expect_error<ConfigError>([&] { run(job(p, "out")); }, {"density", "(0, 1]"});
      nothing_written();
    }
  }
  // DELLA: keep probabilities must stay within (0, 1].
  for (const char* strategy : {"della", "della_linear"}) {
    SCOPED_TRACE(strategy);
    Params p{strategy};
    p.density = 0.2;
    p.epsilon = 0.25;
    expect_error<MergeError>([&] { run(job(p, "out")); }, {strategy, "density - epsilon", "(0, 1]"});
    nothing_written();
    p.density = 0.9;
    p.epsilon = 0.15;
    expect_error<MergeError>([&] { run(job(p, "out")); }, {strategy, "density + epsilon", "exceeds 1"});
    nothing_written();
    p.density = 0.5;
    p.epsilon = -0.1;
    expect_error<ConfigError>([&] { run(job(p, "out")); }, {"epsilon", ">= 0"});
    nothing_written();
  }
  // Normalizing weights that sum to 0.
  Params p{"dare_linear"};
  p.weights = {1.0, -1.0, 0.0};
  p.normalize = true;
  expect_error<MergeError>([&] { run(job(p, "out")); }, {"dare_linear", "weights sum to 0"});
  nothing_written();
  // No base: task vectors need one.
  JobConfig j = job(Params{"dare_ties"}, "out");
  j.base.reset();
  expect_error<ConfigError>([&] { run(j); }, {"'base'"});
  nothing_written();
}

}  // namespace
