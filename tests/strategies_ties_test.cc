// The `ties`, `breadcrumbs` and `breadcrumbs_ties` strategy plugins end to end through the
// library (run_job), against float64 references computed here from the stored inputs (task
// vectors in float32, as the host computes them). The trim's kept set is the reference's
// stable sort by (|d| descending, index ascending): bf16 inputs with few distinct deltas make
// magnitude ties common at every boundary, float32 tensors exercise the low-bits round (and
// ties inside it), a tensor of several chunks puts the tie boundary inside a chunk.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <initializer_list>
#include <map>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include <boost/json.hpp>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "conflux/checkpoint.h"
#include "conflux/convert.h"
#include "conflux/merge.h"
#include "conflux/writer.h"
#include "test_util.h"
#include "strategy_test_util.h"

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
using conflux_test::TensorInputs;
using conflux_test::read_inputs;

// ---------------------------------------------------------------------------------------------
// Synthetic checkpoints
// ---------------------------------------------------------------------------------------------

float bf16(float x) { return bf16_bits_to_f32(f32_to_bf16_bits(x)); }

// How a tensor's values are made.
enum class Kind {
  steps,     // bf16: base in +-[0.5, 1), deltas of a few bf16 steps (many equal magnitudes)
  sparse,    // bf16: as steps, but 90% of the deltas are 0
  mixed,     // bf16: as steps, but 5% of the base values are tiny, so their deltas have low
             // bits: impure bins whose boundary is often the pure step value itself
  f32_cont,  // f32: continuous base and deltas (no ties; the low-bits round)
  f32_ties,  // f32: base 0, deltas from a few full-mantissa values, half of them in one
             // high-bits bin (low-bits round, then a pass of tie counts)
  f32_many,  // f32: base 0, deltas from 16 full-mantissa values in distinct bins (low-bits
             // round, ties counted from its lists)
  // As f32_ties and f32_many, each chunk of 1000 scaled by 1, 16 or 256 in turn: every chunk's
  // own cut lies far from the tensor's, so the chunks' windows miss it (topk.h, WINDOWS) and the
  // later executions run.
  f32_ties_far,
  f32_many_far,
};

struct TensorPlan {
  Spec spec;
  Kind kind = Kind::steps;
};

struct Scenario {
  std::vector<TensorPlan> tensors;

  std::vector<Spec> specs() const {
    std::vector<Spec> s;
    for (const auto& t : tensors) s.push_back(t.spec);
    return s;
  }
  float base(std::size_t ti, std::uint64_t j) const {
    const std::uint64_t t = name_id(tensors[ti].spec.name);
    const double sign = rnd(t, j, 1) < 0.5 ? -1.0 : 1.0;
    switch (tensors[ti].kind) {
      case Kind::steps:
      case Kind::sparse: return bf16(static_cast<float>(sign * (0.5 + 0.5 * rnd(t, j, 2))));
      case Kind::mixed:
        if (rnd(t, j, 3) < 0.05) return bf16(static_cast<float>(sign * 1e-5 * (1 + rnd(t, j, 2))));
        return bf16(static_cast<float>(sign * (0.5 + 0.5 * rnd(t, j, 2))));
      case Kind::f32_cont: return static_cast<float>(sign * (0.1 + rnd(t, j, 2)));
      case Kind::f32_ties:
      case Kind::f32_many:
      case Kind::f32_ties_far:
      case Kind::f32_many_far: return 0.0f;
    }
    return 0;
  }
  float agent(std::size_t ti, std::uint64_t j, std::size_t i) const {
    const std::uint64_t t = name_id(tensors[ti].spec.name);
    const float b = base(ti, j);
    const double sign = rnd(t, j, 20 + i) < 0.5 ? -1.0 : 1.0;
    const double u = rnd(t, j, 30 + i);
    const double far = std::ldexp(1.0, 4 * static_cast<int>((j / 1000) % 3));
    switch (tensors[ti].kind) {
      case Kind::steps:
      case Kind::sparse:
      case Kind::mixed: {
        if (u < (tensors[ti].kind == Kind::sparse ? 0.9 : 0.15)) return b;
        // 1..3 steps of 2^-8 (the bf16 spacing in [0.5, 1)), sometimes an outlier of 8..40.
        const double steps = rnd(t, j, 40 + i) < 0.05 ? 8 + std::floor(33 * rnd(t, j, 50 + i))
                                                      : 1 + std::floor(3 * rnd(t, j, 50 + i));
        return bf16(static_cast<float>(b + sign * steps * 0x1p-8));
      }
      case Kind::f32_cont:
        return static_cast<float>(b + sign * 0.05 * rnd(t, j, 40 + i));
      case Kind::f32_ties:
      case Kind::f32_ties_far: {
        if (u < 0.1) return 0.0f;
        // Full-mantissa values; 0.3f and its neighbours share their high 16 bits.
        static const float kValues[] = {0.3f, std::nextafter(0.3f, 1.0f),
                                        std::nextafter(std::nextafter(0.3f, 1.0f), 1.0f),
                                        0.1f, std::nextafter(0.1f, 0.0f), 0.7f};
        const auto v = kValues[static_cast<std::size_t>(rnd(t, j, 40 + i) * 6)];
        return static_cast<float>(sign * v * (tensors[ti].kind == Kind::f32_ties_far ? far : 1.0));
      }
      case Kind::f32_many:
      case Kind::f32_many_far: {
        if (u < 0.1) return 0.0f;
        const double step = std::floor(16 * rnd(t, j, 40 + i));
        return static_cast<float>(sign * static_cast<double>(0.3f * static_cast<float>(1 + step / 16)) *
                                  (tensors[ti].kind == Kind::f32_many_far ? far : 1.0));
      }
    }
    return 0;
  }
};

Scenario main_scenario() {
  Scenario sc;
  // Odd sizes (none a multiple of 8, 16 or 1000); big.w spans ten chunks of 1000.
  sc.tensors = {
      {{"model.embed.weight", {37, 29}}, Kind::steps},
      {{"layers.0.attn.w", {61, 47}}, Kind::steps},
      {{"layers.0.bias", {47}}, Kind::steps},
      {{"layers.1.mlp.w", {3, 5, 7}}, Kind::steps},
      {{"scalar", {}}, Kind::steps},
      {{"empty", {0}}, Kind::steps},
      {{"position_ids", {3, 11}, DType::I64}, Kind::steps},
      {{"sparse.w", {1031}}, Kind::sparse},
      {{"f32.cont", {53, 19}, DType::F32}, Kind::f32_cont},
      {{"f32.ties", {2503}, DType::F32}, Kind::f32_ties},
      {{"f32.many", {41, 43}, DType::F32}, Kind::f32_many},
      {{"big.w", {97, 101}}, Kind::steps},
      {{"f32.ties.far", {3001}, DType::F32}, Kind::f32_ties_far},
      {{"f32.many.far", {3109}, DType::F32}, Kind::f32_many_far},
      {{"mixed.steps", {2999}}, Kind::mixed},
  };
  return sc;
}

// ---------------------------------------------------------------------------------------------
// References
// ---------------------------------------------------------------------------------------------

struct Params {
  std::vector<double> density, gamma, weights;  // per model; gamma empty: none (ties)
  double lambda = 1;
  bool normalize = true;
  bool elect = true;
};

// Model i's kept entries: ranks [a, a + k) of a stable sort by |d| descending.
std::vector<bool> kept_set(const std::vector<float>& d, double density, double gamma) {
  const std::uint64_t n = d.size();
  const auto k = static_cast<std::uint64_t>(density * static_cast<double>(n));
  auto a = static_cast<std::uint64_t>(gamma * static_cast<double>(n));
  if (a + k > n) a = n - k;
  std::vector<std::size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::size_t x, std::size_t y) {
    return std::fabs(static_cast<double>(d[x])) > std::fabs(static_cast<double>(d[y]));
  });
  std::vector<bool> keep(n, false);
  for (std::uint64_t r = a; r < a + k; ++r) keep[order[r]] = true;
  return keep;
}

struct Reference {
  std::map<std::string, std::vector<double>> out;
  std::vector<std::uint64_t> kept;  // per model, over all tensors
  std::uint64_t elements = 0;
};

Reference reference(const std::vector<TensorInputs>& inputs, const Params& p) {
  const std::size_t n = inputs.front().d.size();
  Reference ref;
  ref.kept.assign(n, 0);
  double wsum = 0;
  for (double w : p.weights) wsum += w;
  for (const TensorInputs& t : inputs) {
    const std::size_t size = t.base.size();
    ref.elements += size;
    std::vector<std::vector<double>> W(n, std::vector<double>(size, 0.0));
    for (std::size_t i = 0; i < n; ++i) {
      const auto keep = kept_set(t.d[i], p.density[i], p.gamma.empty() ? 0.0 : p.gamma[i]);
      for (std::size_t k = 0; k < size; ++k) {
        ref.kept[i] += keep[k];
        if (keep[k]) W[i][k] = p.weights[i] * static_cast<double>(t.d[i][k]);
      }
    }
    std::vector<double> out(size);
    for (std::size_t k = 0; k < size; ++k) {
      if (p.elect) {
        double vote = 0, sum = 0, div = 0;
        for (std::size_t i = 0; i < n; ++i) vote += W[i][k];
        for (std::size_t i = 0; i < n; ++i) {
          const bool on = vote >= 0 ? W[i][k] > 0 : W[i][k] < 0;
          if (on) sum += W[i][k], div += p.weights[i];
        }
        const double merged = p.normalize ? (div != 0 ? sum / div : 0.0) : sum;
        out[k] = t.base[k] + p.lambda * merged;
      } else {
        double acc = 0;
        for (std::size_t i = 0; i < n; ++i) {
          const double scale = p.weights[i] * p.lambda / (p.normalize ? wsum : 1.0);
          acc += W[i][k] == 0 ? 0.0 : scale * static_cast<double>(t.d[i][k]);
        }
        out[k] = t.base[k] + acc;
      }
    }
    ref.out[t.name] = std::move(out);
  }
  return ref;
}

double max_ulps(const fs::path& out_dir, const std::map<std::string, std::vector<double>>& ref) {
  const Checkpoint merged = Checkpoint::open(out_dir);
  double worst = 0;
  std::size_t seen = 0;
  for (const TensorRef& t : merged.tensors()) {
    if (!dtype_is_mergeable(t.info->dtype)) continue;
    ++seen;
    const auto it = ref.find(t.name());
    EXPECT_NE(it, ref.end()) << t.name();
    if (it == ref.end()) continue;
    EXPECT_EQ(it->second.size(), t.info->numel) << t.name();
    const TensorView v = merged.view(t);
    int reported = 0;
    for (std::size_t k = 0; k < it->second.size() && k < t.info->numel; ++k) {
      const double r = it->second[k];
      const double err = std::abs(v.element(k) - r) / ulp(t.info->dtype, r);
      if (err > 1.0 && reported++ < 5)
        ADD_FAILURE() << t.name() << "[" << k << "]: got " << v.element(k) << ", expected " << r;
      worst = std::max(worst, err);
    }
  }
  EXPECT_EQ(seen, ref.size());
  return worst;
}

// ---------------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------------

class TiesTest : public conflux_test::StrategyFixture {
 protected:
  void SetUp() override {
    StrategyFixture::SetUp();
    if (HasFatalFailure()) return;
    const Scenario sc = main_scenario();
    write_checkpoint(dir_ / "base", sc.specs(), [&](std::size_t ti, std::uint64_t j) { return sc.base(ti, j); });
    for (std::size_t i = 0; i < kWritten; ++i)
      write_checkpoint(dir_ / model_name(i), sc.specs(),
                       [&](std::size_t ti, std::uint64_t j) { return sc.agent(ti, j, i); });
  }

  static constexpr std::size_t kModels = 3;   // most tests
  static constexpr std::size_t kWritten = 5;  // more than the fused kernels take (4)
  static std::string model_name(std::size_t i) { return "m" + std::to_string(i); }

  std::vector<fs::path> model_dirs(std::size_t n, std::size_t first = 0) const {
    std::vector<fs::path> m;
    for (std::size_t i = first; i < first + n; ++i) m.push_back(dir_ / model_name(i));
    return m;
  }

  static std::vector<RawParam> params_of(const Params& p) {
    std::vector<RawParam> v{list("density", p.density), list("weights", p.weights), num("lambda", p.lambda),
                            flag("normalize", p.normalize)};
    if (!p.gamma.empty()) v.push_back(list("gamma", p.gamma));
    return v;
  }

  JobConfig job(const std::string& strategy, std::vector<fs::path> models, std::vector<RawParam> params,
                const std::string& out, std::optional<DType> out_dtype = {}) const {
    JobConfig j;
    j.name = "test";
    j.strategy = strategy;
    j.base = dir_ / "base";
    j.models = std::move(models);
    j.output = dir_ / out;
    j.params = std::move(params);
    j.out_dtype = out_dtype;
    return j;
  }

  // The output's tensor data (the file's metadata names the strategy).
  std::string bytes(const std::string& out) const {
    const Checkpoint c = Checkpoint::open(dir_ / out);
    std::string all;
    for (const TensorRef& t : c.tensors()) {
      const TensorView v = c.view(t);
      all += t.name() + ":";
      all.append(reinterpret_cast<const char*>(v.bytes.data()), v.bytes.size());
    }
    return all;
  }

  // Runs `strategy` with `p` on all models, checks the output within 1 ulp of the reference
  // (bf16 and float32 outputs) and the report's kept counts.
  Reference check(const std::string& strategy, const Params& p, const std::string& out) {
    const std::size_t models = p.weights.size();
    const Reference ref = reference(read_inputs(dir_ / "base", model_dirs(models)), p);
    for (const auto dtype : {DType::BF16, DType::F32}) {
      SCOPED_TRACE(std::string(strategy) + " -> " + std::string(dtype_name(dtype)));
      const std::string o = out + "_" + std::string(dtype_name(dtype));
      run(job(strategy, model_dirs(models), params_of(p), o, dtype));
      EXPECT_LE(max_ulps(dir_ / o, ref.out), 1.0);
      const json::object rep = report(o);
      EXPECT_EQ(rep.at("method").as_string(), strategy);
      EXPECT_EQ(rep.at("elements").to_number<std::uint64_t>(), ref.elements);
      const json::array& kept = rep.at("kept").as_array();
      EXPECT_EQ(kept.size(), models);
      for (std::size_t i = 0; i < kept.size() && i < models; ++i)
        EXPECT_EQ(kept[i].to_number<std::uint64_t>(), ref.kept[i]);
    }
    return ref;
  }

  // One model alone, weight 1, no normalization, float32 output: out = base + (kept ? d : 0),
  // which shows the kept set entry by entry. Compared exactly with the reference's set.
  void check_kept_set(const std::string& strategy, std::size_t model, double density, double gamma) {
    SCOPED_TRACE(strategy + " model " + std::to_string(model) + " density " + std::to_string(density) + " gamma " +
                 std::to_string(gamma));
    std::vector<RawParam> params{num("density", density), flag("normalize", false)};
    if (strategy != "ties") params.push_back(num("gamma", gamma));
    const std::string out = "kept_" + strategy;
    fs::remove_all(dir_ / out);
    run(job(strategy, model_dirs(1, model), params, out, DType::F32));
    const auto inputs = read_inputs(dir_ / "base", model_dirs(1, model));
    const Checkpoint merged = Checkpoint::open(dir_ / out);
    std::size_t differences = 0, kept_nonzero = 0;
    for (const TensorInputs& t : inputs) {
      const auto keep = kept_set(t.d[0], density, strategy == "ties" ? 0.0 : gamma);
      const TensorView v = merged.view(merged.at(t.name));
      for (std::size_t k = 0; k < t.base.size(); ++k) {
        const double want = keep[k] ? static_cast<double>(static_cast<float>(t.base[k] + t.d[0][k])) : t.base[k];
        kept_nonzero += keep[k] && t.d[0][k] != 0;
        if (v.element(k) != want && differences++ < 5)
          ADD_FAILURE() << t.name << "[" << k << "]: got " << v.element(k) << ", expected " << want << " (d "
                        << t.d[0][k] << (keep[k] ? ", kept)" : ", dropped)");
      }
    }
    EXPECT_EQ(differences, 0u);
    EXPECT_GT(kept_nonzero, 0u);
  }
};

std::uint64_t at(const json::object& rep, std::size_t passes) {
  return rep.at("selection").as_object().at("tensors_by_passes").as_array().at(passes).to_number<std::uint64_t>();
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

TEST_F(TiesTest, TiesMatchesFloat64Reference) {
  Params p;
  p.density = {0.3, 0.55, 0.02};  // 0.02: k = 0 on the 47-entry bias, 2 of 105, ...
  p.weights = {1.0, 0.5, 2.0};
  check("ties", p, "ties");
  // Every selection path ran: the coarse histogram alone, boundaries settled from the chunks'
  // windows in the same execution, tie counts after it (bf16), the low-bits round then tie
  // counts (float32 with equal full-mantissa values, chunks far apart).
  const json::object rep = report("ties_F32");
  const json::object& sel = rep.at("selection").as_object();
  EXPECT_GE(at(rep, 1), 1u);
  EXPECT_GE(at(rep, 2), 1u);
  EXPECT_GE(at(rep, 3), 1u);
  EXPECT_GE(sel.at("tie_breaks").to_number<std::uint64_t>(), 1u);
  EXPECT_GE(sel.at("tie_breaks_from_lists").to_number<std::uint64_t>(), 1u);
  EXPECT_GE(sel.at("boundaries_from_windows").to_number<std::uint64_t>(), 1u);
  EXPECT_EQ(at(rep, 0) + at(rep, 1) + at(rep, 2) + at(rep, 3), 14u);  // the floating tensors

  p.density = {0.3, 0.5, 0.4};
  p.normalize = false;
  p.lambda = 0.7;
  p.weights = {-0.5, 1.0, 0.75};
  check("ties", p, "ties_raw");
  // sparse.w: 90% zeros, so every threshold is 0 and the coarse histogram settles it.
  EXPECT_GE(at(report("ties_raw_F32"), 1), 1u);
}

TEST_F(TiesTest, BreadcrumbsMatchesFloat64Reference) {
  Params p;
  p.density = {0.3, 0.5, 0.9};
  p.gamma = {0.05, 0.0, 0.2};  // the last: gamma + density > 1, so fewer top entries go
  p.weights = {1.0, 0.5, 2.0};
  p.normalize = false;
  p.elect = false;
  check("breadcrumbs", p, "bc");
  p.normalize = true;
  p.lambda = 1.5;
  check("breadcrumbs", p, "bc_norm");
}

TEST_F(TiesTest, BreadcrumbsTiesMatchesFloat64Reference) {
  Params p;
  p.density = {0.4, 0.25, 0.6};
  p.gamma = {0.01, 0.1, 0.03};
  p.weights = {1.0, 1.0, 0.5};
  check("breadcrumbs_ties", p, "bct");
}

// Five models: past the fused kernels (up to four), the blockwise path of every block.
TEST_F(TiesTest, FiveModelsMatchFloat64Reference) {
  Params p;
  p.density = {0.3, 0.55, 0.2, 0.7, 0.45};
  p.weights = {1.0, 0.5, 2.0, -0.25, 1.0};
  check("ties", p, "ties5");
  p.gamma = {0.05, 0.0, 0.1, 0.02, 0.3};
  check("breadcrumbs_ties", p, "bct5");
  p.normalize = false;
  p.elect = false;
  check("breadcrumbs", p, "bc5");
}

TEST_F(TiesTest, KeptSetIsExactlyTheReferences) {
  for (std::size_t model = 0; model < kModels; ++model) {
    check_kept_set("ties", model, 0.37, 0);
    check_kept_set("breadcrumbs", model, 0.45, 0.07);
    check_kept_set("breadcrumbs_ties", model, 0.2, 0.3);
  }
  check_kept_set("ties", 1, 1.0 / 3.0, 0);
  check_kept_set("breadcrumbs", 2, 0.8, 0.5);  // clamped: a = n - k
}

TEST_F(TiesTest, DensityOneIsTheUntrimmedElection) {
  Params p;
  p.density = {1, 1, 1};
  p.weights = {1.0, 0.5, 2.0};
  check("ties", p, "full");
  // No selection pass ran.
  const json::object rep = report("full_F32");
  for (std::size_t e = 0; e < 4; ++e) EXPECT_EQ(at(rep, e), 0u) << e;
  // breadcrumbs_ties with gamma 0 is ties; with density 1 gamma cannot remove anything.
  std::vector<RawParam> params{list("density", {1, 1, 1}), list("weights", p.weights)};
  run(job("ties", model_dirs(kModels), params, "t"));
  params.push_back(num("gamma", 0.25));
  run(job("breadcrumbs_ties", model_dirs(kModels), params, "bt"));
  EXPECT_EQ(bytes("t"), bytes("bt"));
}

TEST_F(TiesTest, BreadcrumbsWithoutTrimmingIsTaskArithmetic) {
  const std::vector<double> w{1.0, 0.5, 2.0};
  run(job("task_arithmetic", model_dirs(kModels), {list("weights", w), num("lambda", 0.8)}, "ta"));
  run(job("breadcrumbs", model_dirs(kModels), {list("weights", w), num("lambda", 0.8), num("gamma", 0.0)}, "bc0"));
  run(job("breadcrumbs", model_dirs(kModels), {list("weights", w), num("lambda", 0.8)}, "bc1"));  // density 1
  EXPECT_EQ(bytes("ta"), bytes("bc0"));
  EXPECT_EQ(bytes("ta"), bytes("bc1"));
}

TEST_F(TiesTest, BreadcrumbsTiesWithoutGammaIsTies) {
  std::vector<RawParam> params{list("density", {0.3, 0.6, 0.45}), list("weights", {1.0, 0.25, 1.0})};
  run(job("ties", model_dirs(kModels), params, "t"));
  params.push_back(num("gamma", 0.0));
  run(job("breadcrumbs_ties", model_dirs(kModels), params, "bt"));
  EXPECT_EQ(bytes("t"), bytes("bt"));
}

// Float32 arithmetic (BF16 output) where the terms cancel. The entries whose float32 result cannot
// be trusted are computed again in double (fused_block_f32 in plugins/common/trim_merge.h,
// plugins/common/float_guard.h): every entry stays within 1 ulp of the reference, and the kept
// counts are the reference's. Float32 inputs on three models, trimmed lightly:
//   vote: base 0, x2 = -(x0 + x1 + delta): the TIES vote is about -delta, below what float32
//         resolves of terms near 1, so float32 alone would elect the wrong side (out 0.75
//         instead of -1.25, or the reverse);
//   base: agents of tiny values over a base they all undo: the merged update (the mean of the
//         task vectors, about -base) leaves a result 2^16 times smaller than the base;
//   sum:  breadcrumbs with weights (1, 1, -1), base 0, x2 = x0 + x1 + delta: the result is
//         -delta;
//   tiny: base 0, subnormal task vectors (small multiples of 2^-149) and weights below 1: the
//         float32 products w_i * t_i round to a few bits or to 0 (no cancellation, but the
//         same loss of the terms' bits), which lambda = 2^120 makes visible.
TEST_F(TiesTest, StaysExactWhereTermsCancel) {
  const std::vector<Spec> specs = {{"w", {41, 37}, DType::F32}, {"v", {1003}, DType::F32}};
  auto r = [&](std::size_t ti, std::uint64_t j, std::uint64_t c) { return rnd(name_id(specs[ti].name), j, c); };
  enum class Case { vote, base, sum, tiny };
  for (const Case cs : {Case::vote, Case::base, Case::sum, Case::tiny}) {
    const std::string name = cs == Case::vote ? "vote" : cs == Case::base ? "base" : cs == Case::sum ? "sum" : "tiny";
    SCOPED_TRACE(name);
    auto base = [&](std::size_t ti, std::uint64_t j) {
      return cs == Case::base ? static_cast<float>(0.5 + 0.5 * r(ti, j, 1)) : 0.0f;
    };
    auto agent = [&](std::size_t ti, std::uint64_t j, std::size_t i) {
      if (cs == Case::base) return static_cast<float>(std::ldexp(r(ti, j, 2 + i) - 0.5, -16));
      if (cs == Case::tiny) return static_cast<float>(std::ldexp(std::floor(80 * r(ti, j, 2 + i)) - 40, -149));
      const double a = 0.5 + 0.5 * r(ti, j, 2), c = 0.25 + 0.5 * r(ti, j, 3);
      if (i == 0) return static_cast<float>(a);
      if (i == 1) return static_cast<float>(c);
      const double s = static_cast<double>(static_cast<float>(a)) + static_cast<float>(c) +
                       std::ldexp(r(ti, j, 4) - 0.5, -18);
      return static_cast<float>(cs == Case::vote ? -s : s);
    };
    write_checkpoint(dir_ / "base", specs, base);
    for (std::size_t i = 0; i < kModels; ++i)
      write_checkpoint(dir_ / model_name(i), specs, [&](std::size_t ti, std::uint64_t j) { return agent(ti, j, i); });
    const auto inputs = read_inputs(dir_ / "base", model_dirs(kModels));
    Params p;
    p.density = {0.9, 0.95, 0.85};
    p.weights = {1.0, 1.0, 1.0};
    std::vector<std::string> strategies = {"ties", "breadcrumbs_ties"};
    if (cs == Case::sum) {
      strategies = {"breadcrumbs"};
      p.weights = {1.0, 1.0, -1.0};
      p.normalize = false;
      p.elect = false;
    }
    if (cs == Case::tiny) {
      strategies = {"ties", "ties_raw"};  // normalized and not
      p.weights = {0.3, 0.7, 0.45};
      p.lambda = 0x1p120;
    }
    for (const std::string& label : strategies) {
      SCOPED_TRACE(label);
      const std::string strategy = label == "ties_raw" ? "ties" : label;
      Params q = p;
      if (strategy != "ties") q.gamma = {0.02, 0.0, 0.05};
      if (label == "ties_raw") q.normalize = false;
      const Reference ref = reference(inputs, q);
      const std::string out = "cancel_" + name + "_" + label;
      run(job(strategy, model_dirs(kModels), params_of(q), out, DType::BF16));
      EXPECT_LE(max_ulps(dir_ / out, ref.out), 1.0);
      const json::array& kept = report(out).at("kept").as_array();
      for (std::size_t i = 0; i < kModels; ++i) EXPECT_EQ(kept.at(i).to_number<std::uint64_t>(), ref.kept[i]);
    }
  }
}

// The chunks' windows (topk.h, WINDOWS) have a budget per tensor; past it they are dropped and
// the later executions settle the thresholds. Chunks of one element: every chunk's window
// covers the boundary (four float32 magnitudes within 16 high-bits bins, none zero), so 10000
// of them settle every target in the histogram's execution, while 25000 exceed the budget (six
// targets of about 290 bytes a chunk: 43 MB against 32 MiB). Both within 1 ulp of the
// reference, with its kept counts.
TEST_F(TiesTest, WindowsPastTheirBudgetGiveWayToLaterPasses) {
  Params p;
  p.density = {0.3, 0.3, 0.3};
  p.gamma = {0.05, 0.05, 0.05};
  p.weights = {1.0, 0.5, 2.0};
  p.normalize = false;
  p.elect = false;
  for (const std::uint64_t n : {10000u, 25000u}) {
    SCOPED_TRACE(std::to_string(n) + " chunks");
    const std::vector<Spec> specs = {{"w", {n}, DType::F32}};
    const fs::path root = dir_ / ("budget" + std::to_string(n));
    write_checkpoint(root / "base", specs, [](std::size_t, std::uint64_t) { return 0.0f; });
    std::vector<fs::path> models;
    for (std::size_t i = 0; i < 3; ++i) {
      models.push_back(root / ("m" + std::to_string(i)));
      write_checkpoint(models.back(), specs, [&](std::size_t, std::uint64_t j) {
        const double sign = rnd(7, j, 20 + i) < 0.5 ? -1.0 : 1.0;
        const double step = std::floor(4 * rnd(7, j, 40 + i));
        return static_cast<float>(sign * static_cast<double>(0.3f * static_cast<float>(1 + step / 64)));
      });
    }
    const Reference ref = reference(read_inputs(root / "base", models), p);
    JobConfig j = job("breadcrumbs", models, params_of(p), "budget/" + std::to_string(n), DType::F32);
    j.base = root / "base";
    MergeRequest r;
    r.config = &config_;
    r.job = &j;
    r.threads = 2;
    r.chunk_elements = 1;
    run_job(r, plugins_);
    EXPECT_LE(max_ulps(j.output, ref.out), 1.0);
    const json::object rep = report("budget/" + std::to_string(n));
    const json::array& kept = rep.at("kept").as_array();
    for (std::size_t i = 0; i < 3; ++i) EXPECT_EQ(kept[i].to_number<std::uint64_t>(), ref.kept[i]);
    const auto from_windows = rep.at("selection").as_object().at("boundaries_from_windows").to_number<std::uint64_t>();
    if (n == 10000) {
      EXPECT_EQ(from_windows, 6u);
      EXPECT_EQ(at(rep, 1), 1u);  // settled in the histogram's execution
    } else {
      EXPECT_EQ(from_windows, 0u);
      EXPECT_EQ(at(rep, 1), 0u);  // the later executions ran
    }
  }
}

// Sparse task vectors with fewer nonzero entries than k: the selection pass merges them itself
// (topk.h, SPECULATION), the same bits as the two passes, within 1 ulp of the reference; tensors
// sparse only in places fall back to the histogram.
TEST_F(TiesTest, SparseTensorsAreMergedInTheSelectionPass) {
  // Chunks of 1000. Each tensor's nonzero fraction per chunk (density 0.3 below: k = 0.3 n).
  struct Sparse {
    Spec spec;
    std::vector<double> fill;  // per chunk of 1000
    bool merged;               // expected to finish in the selection pass
  };
  const std::vector<Sparse> tensors = {
      {{"all.sparse", {3, 1001}}, {0.1, 0.1, 0.1, 0.1}, true},        // every chunk sparse
      {{"mixed.over", {3000}}, {0.1, 0.1, 0.9}, false},                // one dense chunk, nnz > k
      {{"mixed.fits", {3000}}, {0.5, 0.1, 0.1}, false},                // one dense chunk, nnz <= k
      {{"exact.k", {1000}}, {0.3}, true},                               // nnz == k exactly
      {{"neg.zero", {1500}}, {0.2, 0.2}, true},                         // -0 deltas too
      {{"f32.sparse", {2100}, DType::F32}, {0.05, 0.05, 0.05}, true},  // float32 inputs
  };
  std::vector<Spec> specs;
  for (const auto& t : tensors) specs.push_back(t.spec);
  // Entry j of model i is nonzero for exactly round(fill * length) entries of each chunk, in a
  // per-model shuffled order (exact counts: exact.k has k nonzero entries).
  auto nonzero = [&](std::size_t ti, std::uint64_t j, std::size_t i) {
    const std::uint64_t c = j / 1000, in_chunk = j % 1000;
    const std::uint64_t length = std::min<std::uint64_t>(1000, numel(tensors[ti].spec.shape) - c * 1000);
    const auto count = static_cast<std::uint64_t>(std::llround(tensors[ti].fill[c] * static_cast<double>(length)));
    const std::uint64_t slot = (in_chunk * 389 + 97 * i + 13 * ti) % 1000;  // 389 is prime to 1000
    return slot < count;
  };
  auto base = [&](std::size_t ti, std::uint64_t j) -> float {
    if (tensors[ti].spec.name == "neg.zero") return 0.0f;
    const double sign = rnd(ti, j, 1) < 0.5 ? -1.0 : 1.0;
    return bf16(static_cast<float>(sign * (0.5 + 0.5 * rnd(ti, j, 2))));
  };
  const fs::path root = dir_ / "spec";
  write_checkpoint(root / "base", specs, base);
  std::vector<fs::path> models;
  for (std::size_t i = 0; i < 3; ++i) {
    models.push_back(root / ("m" + std::to_string(i)));
    write_checkpoint(models.back(), specs, [&](std::size_t ti, std::uint64_t j) -> float {
      const float b = base(ti, j);
      if (!nonzero(ti, j, i)) return tensors[ti].spec.name == "neg.zero" && j % 2 ? -0.0f : b;
      const double sign = rnd(ti, j, 20 + i) < 0.5 ? -1.0 : 1.0;
      return bf16(static_cast<float>(b + sign * (1 + std::floor(3 * rnd(ti, j, 50 + i))) * 0x1p-8));
    });
  }
  Params p;
  p.density = {0.3, 0.3, 0.3};
  p.weights = {1.0, 0.5, 2.0};
  const Reference ref = reference(read_inputs(root / "base", models), p);
  std::size_t expect_merged = 0;
  for (const auto& t : tensors) expect_merged += t.merged ? 1 : 0;

  auto merge = [&](const std::string& strategy, std::vector<RawParam> params, const std::string& out, DType dtype,
                   unsigned threads, bool speculative) {
    JobConfig j = job(strategy, models, std::move(params), "spec/" + out, dtype);
    j.base = root / "base";
    MergeRequest r;
    r.config = &config_;
    r.job = &j;
    r.threads = threads;
    r.chunk_elements = 1000;
    r.speculative_output = speculative;
    return run_job(r, plugins_);
  };
  auto merged_in_selection = [&](const std::string& out) {
    return report("spec/" + out).at("selection").as_object().at("tensors_merged_in_selection_pass").to_number<std::uint64_t>();
  };
  for (const auto dtype : {DType::BF16, DType::F32}) {
    const std::string d(dtype_name(dtype));
    SCOPED_TRACE(d);
    const auto outcome = merge("ties", params_of(p), "on_" + d, dtype, 2, true);
    EXPECT_EQ(outcome.result.speculated_tensors, expect_merged);
    EXPECT_EQ(merged_in_selection("on_" + d), expect_merged);
    EXPECT_LE(max_ulps(root / ("on_" + d), ref.out), 1.0);
    const json::array& kept = report("spec/on_" + d).at("kept").as_array();
    for (std::size_t i = 0; i < 3; ++i) EXPECT_EQ(kept[i].to_number<std::uint64_t>(), ref.kept[i]);
    // The same bits without speculation, and at one thread.
    EXPECT_EQ(merge("ties", params_of(p), "off_" + d, dtype, 2, false).result.speculated_tensors, 0u);
    EXPECT_EQ(merged_in_selection("off_" + d), 0u);
    merge("ties", params_of(p), "one_" + d, dtype, 1, true);
    EXPECT_EQ(bytes("spec/on_" + d), bytes("spec/off_" + d));
    EXPECT_EQ(bytes("spec/on_" + d), bytes("spec/one_" + d));
  }
  // A model whose k is 0 in every tensor keeps nothing while the others speculate.
  {
    Params z = p;
    z.density = {0.3, 0.3, 0.0001};
    merge("ties", params_of(z), "k0", DType::F32, 2, true);
    EXPECT_EQ(merged_in_selection("k0"), expect_merged);
    EXPECT_LE(max_ulps(root / "k0", reference(read_inputs(root / "base", models), z).out), 1.0);
    EXPECT_EQ(report("spec/k0").at("kept").as_array()[2].to_number<std::uint64_t>(), 0u);
  }
  // breadcrumbs_ties without gamma keeps a top k alone: it speculates too; with gamma it removes
  // a top set, which a sparse task vector does not settle: it never does.
  Params b = p;
  b.gamma = {0.0, 0.0, 0.0};
  merge("breadcrumbs_ties", params_of(b), "bt0", DType::F32, 2, true);
  EXPECT_EQ(merged_in_selection("bt0"), expect_merged);
  EXPECT_LE(max_ulps(root / "bt0", ref.out), 1.0);
  b.gamma = {0.01, 0.01, 0.01};
  merge("breadcrumbs_ties", params_of(b), "bt1", DType::F32, 2, true);
  EXPECT_EQ(merged_in_selection("bt1"), 0u);
  EXPECT_LE(max_ulps(root / "bt1", reference(read_inputs(root / "base", models), b).out), 1.0);
}

TEST_F(TiesTest, BitIdenticalAcrossThreadsAndChunks) {
  for (const char* strategy : {"ties", "breadcrumbs", "breadcrumbs_ties"}) {
    SCOPED_TRACE(strategy);
    std::vector<RawParam> params{list("density", {0.3, 0.55, 0.4}), list("weights", {1.0, 0.5, 2.0})};
    if (std::string(strategy) != "ties") params.push_back(num("gamma", 0.05));
    const auto j = [&](const std::string& out) { return job(strategy, model_dirs(kModels), params, out); };
    run(j("a"), 1, 1000);
    run(j("b"), 2, 1000);
    run(j("c"), 2, 4096);
    run(j("d"), 1, 333);
    run(j("e"), 2, 1 << 16);
    const std::string first = bytes("a");
    for (const char* o : {"b", "c", "d", "e"}) EXPECT_EQ(first, bytes(o)) << o;
    for (const char* o : {"a", "b", "c", "d", "e"}) fs::remove_all(dir_ / o);
  }
}

template <class E, class F>
void expect_error(F&& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "expected an error mentioning " << *parts.begin();
  } catch (const E& e) {
    for (const auto& part : parts) EXPECT_THAT(e.what(), HasSubstr(part));
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
  }
}

TEST_F(TiesTest, BadParametersAreRejected) {
  for (const char* strategy : {"ties", "breadcrumbs", "breadcrumbs_ties"}) {
    SCOPED_TRACE(strategy);
    for (double density : {0.0, 1.5, -0.1})
      expect_error<ConfigError>([&] { run(job(strategy, model_dirs(2), {num("density", density)}, "out")); },
                                {"params.density", "(0, 1]"});
    expect_error<ConfigError>([&] { run(job(strategy, model_dirs(2), {list("density", {0.5, 1.01})}, "out")); },
                              {"params.density", "(0, 1]", "1.01"});
    expect_error<ConfigError>([&] { run(job(strategy, model_dirs(2), {list("density", {0.5, 0.5, 0.5})}, "out")); },
                              {"params.density", "3 values", "2 models"});
    EXPECT_FALSE(fs::exists(dir_ / "out"));
  }
  for (const char* strategy : {"breadcrumbs", "breadcrumbs_ties"}) {
    SCOPED_TRACE(strategy);
    for (double gamma : {-0.1, 1.0, 2.0})
      expect_error<ConfigError>([&] { run(job(strategy, model_dirs(2), {num("gamma", gamma)}, "out")); },
                                {"params.gamma", "[0, 1)"});
  }
  expect_error<ConfigError>([&] { run(job("ties", model_dirs(2), {num("gamma", 0.1)}, "out")); },
                            {"params.gamma", "unknown parameter"});
  expect_error<MergeError>(
      [&] { run(job("breadcrumbs", model_dirs(2), {list("weights", {1, -1}), flag("normalize", true)}, "out")); },
      {"weights sum to 0"});
  JobConfig no_base = job("ties", model_dirs(2), {}, "out");
  no_base.base.reset();
  expect_error<ConfigError>([&] { run(no_base); }, {"'base'"});
  EXPECT_FALSE(fs::exists(dir_ / "out"));
}

}  // namespace
