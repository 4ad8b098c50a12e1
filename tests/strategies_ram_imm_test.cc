// The `ram` (RAM / RAM+ / RAM+s) and `imm` strategy plugins end to end through the library
// (run_job), on synthetic RL-like bf16 checkpoints: sparse task vectors with controlled overlap,
// changes well above a bf16 ulp, sub-epsilon changes on near-zero base values, odd tensor sizes.
// Outputs are compared with float64 references computed here from the stored inputs (task
// vectors in float32, as the host computes them), the manifest reports with the reference's
// counts, rho and lambda; imm's keep decisions with the host's counter-based random stream.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <map>
#include <optional>
#include <string>
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
using conflux_test::str;
using conflux_test::write_checkpoint;
using conflux_test::rnd;
using conflux_test::TensorInputs;
using conflux_test::read_inputs;
using conflux_test::elements_of;
using conflux_test::near_rel;
using conflux_test::number;
using conflux_test::count;
using conflux_test::entries;
using conflux_test::expect_error;

// ---------------------------------------------------------------------------------------------
// Synthetic checkpoints
// ---------------------------------------------------------------------------------------------

float bf16(float x) { return bf16_bits_to_f32(f32_to_bf16_bits(x)); }
// k bf16 steps away from zero (k > 0) or towards it (k < 0); x must stay clear of zero.
float bf16_step(float x, int k) {
  return bf16_bits_to_f32(static_cast<unsigned short>(static_cast<int>(f32_to_bf16_bits(x)) + k));
}

constexpr double kEps = 1e-5;  // ram's default epsilon

// One tensor of a scenario. An entry is a "shared site" with probability `shared`: every agent
// in `mask` changes it. Otherwise agent i changes it with probability solo[i].
struct TensorPlan {
  Spec spec;
  double shared = 0;
  unsigned mask = 0;
  std::vector<double> solo;
};

// Base values: magnitudes 0.05..0.5 and, for `near_zero` of the entries, 1e-5..2e-4 (where the
// bf16 spacing is below 1e-6, so sub-epsilon changes are representable). Active changes are
// |delta| in 0.008..0.03 (far above a bf16 ulp at 0.5), or on a near-zero base sometimes just
// above epsilon (1.1e-5..4.1e-5). An inactive agent moves a near-zero base by 1..3 bf16 steps
// (|d| < 6e-6, nonzero) with probability tiny[i], else leaves it exactly unchanged.
struct Scenario {
  std::vector<TensorPlan> tensors;
  std::vector<double> tiny;  // per agent
  double near_zero = 0.15;

  std::size_t agents() const { return tiny.size(); }
  std::vector<Spec> specs() const {
    std::vector<Spec> s;
    for (const auto& t : tensors) s.push_back(t.spec);
    return s;
  }
  // FNV-1a of the name: the same scenario with every standard library.
  static std::uint64_t id(const TensorPlan& t) {
    return conflux_test::name_id(t.spec.name);
  }
  static bool near_zero_value(float b) { return std::fabs(b) < 1e-3f; }

  float base(std::size_t ti, std::uint64_t j) const {
    const std::uint64_t t = id(tensors[ti]);
    const double sign = rnd(t, j, 1) < 0.5 ? -1.0 : 1.0;
    const double mag = rnd(t, j, 0) < near_zero ? 1e-5 + 1.9e-4 * rnd(t, j, 2) : 0.05 + 0.45 * rnd(t, j, 2);
    return bf16(static_cast<float>(sign * mag));
  }
  bool active(std::size_t ti, std::uint64_t j, std::size_t i) const {
    const TensorPlan& p = tensors[ti];
    const std::uint64_t t = id(p);
    if (((p.mask >> i) & 1u) && rnd(t, j, 3) < p.shared) return true;
    return rnd(t, j, 10 + i) < p.solo[i];
  }
  bool tiny_change(std::size_t ti, std::uint64_t j, std::size_t i) const {
    return !active(ti, j, i) && near_zero_value(base(ti, j)) && rnd(id(tensors[ti]), j, 50 + i) < tiny[i];
  }
  float agent(std::size_t ti, std::uint64_t j, std::size_t i) const {
    const std::uint64_t t = id(tensors[ti]);
    const float b = base(ti, j);
    if (active(ti, j, i)) {
      const double sign = rnd(t, j, 20 + i) < 0.5 ? -1.0 : 1.0;
      const double mag = near_zero_value(b) && rnd(t, j, 30 + i) < 0.3 ? 1.1e-5 + 3e-5 * rnd(t, j, 40 + i)
                                                                         : 0.008 + 0.022 * rnd(t, j, 40 + i);
      return bf16(static_cast<float>(b + sign * mag));
    }
    if (tiny_change(ti, j, i)) {
      const int k = 1 + static_cast<int>(rnd(t, j, 60 + i) * 3);
      return bf16_step(b, rnd(t, j, 70 + i) < 0.5 ? -k : k);
    }
    return b;
  }
};

// The 3-agent scenario of the main RAM tests. Agent 1 changes little on its own and sits in
// most shared sites (rho far above alpha: the clip matters); agents 0 and 2 are mostly unique.
Scenario main_scenario(std::size_t agents = 3) {
  Scenario sc;
  // Odd sizes: 1073, 2867, 47, 105, 1, 0, 1031, 2503 (none a multiple of 8, 16 or 1000).
  sc.tensors = {
      {{"model.embed.weight", {37, 29}}, 0.05, 0b111, {0.15, 0.02, 0.05}},
      {{"layers.0.attn.w", {61, 47}}, 0.20, 0b110, {0.05, 0.02, 0.20}},
      {{"layers.0.bias", {47}}, 0.30, 0b110, {0.30, 0.0, 0.10}},
      {{"layers.1.mlp.w", {3, 5, 7}}, 0.0, 0, {0.20, 0.20, 0.20}},
      {{"scalar", {}}, 0.0, 0, {1.0, 0.0, 0.0}},
      {{"empty", {0}}, 0.0, 0, {0.5, 0.5, 0.5}},
      {{"position_ids", {3, 11}, DType::I64}, 0.0, 0, {0, 0, 0}},
      {{"norm.weight", {1031}}, 0.01, 0b111, {0.02, 0.02, 0.02}},
      {{"lm_head.weight", {2503}}, 0.10, 0b111, {0.10, 0.01, 0.10}},
  };
  sc.tiny = {0.5, 0.5, 0.5};
  for (auto& t : sc.tensors) t.solo.resize(agents, 0.1);
  sc.tiny.resize(agents, 0.5);
  return sc;
}

// ---------------------------------------------------------------------------------------------
// References
// ---------------------------------------------------------------------------------------------

struct RamParams {
  double eps = kEps, r = 0, alpha = 2;
  bool model_scope = true, soft = false;
};

struct RamRef {
  std::map<std::string, std::vector<double>> out;
  std::vector<std::uint64_t> unique, shared;
  std::vector<double> rho, lambda;  // model-wide
  std::vector<double> tensor_lambda_min, tensor_lambda_max;
  std::map<std::string, std::vector<double>> tensor_lambda;  // tensor scope
  std::uint64_t elements = 0;
  std::uint64_t tiny = 0;                    // entries with 0 < |d_i| <= eps
  std::uint64_t by_count[4] = {0, 0, 0, 0};  // entries with c = 0, 1, 2, >= 3
};

double rho_of(std::uint64_t unique, std::uint64_t shared, double alpha) {
  if (unique == 0) return shared > 0 ? alpha : 0.0;
  return static_cast<double>(shared) / static_cast<double>(unique);
}
double lambda_of(double rho, const RamParams& p) {
  return 1.0 + p.r * (p.soft ? rho / (1.0 + rho) : std::clamp(rho, 0.0, p.alpha));
}

RamRef ram_reference(const std::vector<TensorInputs>& inputs, const RamParams& p) {
  const std::size_t n = inputs.front().d.size();
  RamRef ref;
  ref.unique.assign(n, 0);
  ref.shared.assign(n, 0);
  // Pass 1: counts per tensor and over the model.
  std::vector<std::vector<std::uint64_t>> tu, ts;
  for (const TensorInputs& t : inputs) {
    std::vector<std::uint64_t> u(n, 0), s(n, 0);
    for (std::size_t k = 0; k < t.base.size(); ++k) {
      std::size_t c = 0;
      for (std::size_t i = 0; i < n; ++i) {
        const double a = std::fabs(static_cast<double>(t.d[i][k]));
        c += a > p.eps;
        ref.tiny += a > 0 && a <= p.eps;
      }
      ++ref.by_count[std::min<std::size_t>(c, 3)];
      for (std::size_t i = 0; i < n; ++i)
        if (std::fabs(static_cast<double>(t.d[i][k])) > p.eps) ++(c == 1 ? u[i] : s[i]);
    }
    for (std::size_t i = 0; i < n; ++i) ref.unique[i] += u[i], ref.shared[i] += s[i];
    ref.elements += t.base.size();
    tu.push_back(u);
    ts.push_back(s);
  }
  for (std::size_t i = 0; i < n; ++i) {
    ref.rho.push_back(rho_of(ref.unique[i], ref.shared[i], p.alpha));
    ref.lambda.push_back(lambda_of(ref.rho.back(), p));
  }
  ref.tensor_lambda_min = ref.tensor_lambda_max = ref.lambda;
  if (!p.model_scope) {
    ref.tensor_lambda_min.assign(n, 1e300);
    ref.tensor_lambda_max.assign(n, -1e300);
  }
  // Pass 2: the merge.
  for (std::size_t ti = 0; ti < inputs.size(); ++ti) {
    const TensorInputs& t = inputs[ti];
    std::vector<double> lambda(n, 1.0);
    if (p.r > 0 && p.model_scope) lambda = ref.lambda;
    if (!p.model_scope) {
      for (std::size_t i = 0; i < n; ++i) {
        const double l = lambda_of(rho_of(tu[ti][i], ts[ti][i], p.alpha), p);
        ref.tensor_lambda_min[i] = std::min(ref.tensor_lambda_min[i], l);
        ref.tensor_lambda_max[i] = std::max(ref.tensor_lambda_max[i], l);
        if (p.r > 0) lambda[i] = l;
      }
      ref.tensor_lambda[t.name] = lambda;
    }
    std::vector<double> out(t.base.size());
    for (std::size_t k = 0; k < t.base.size(); ++k) {
      std::size_t c = 0, last = 0;
      double sum = 0;
      for (std::size_t i = 0; i < n; ++i)
        if (std::fabs(static_cast<double>(t.d[i][k])) > p.eps) ++c, last = i, sum += t.d[i][k];
      const double merged = c == 0 ? 0.0 : c == 1 ? lambda[last] * t.d[last][k] : sum / static_cast<double>(c);
      out[k] = t.base[k] + merged;
    }
    ref.out[t.name] = std::move(out);
  }
  return ref;
}

// Max error of the output's floating tensors against `ref`, in ulps of the output dtype.
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
    for (std::size_t k = 0; k < it->second.size() && k < t.info->numel; ++k) {
      const double r = it->second[k];
      const double err = std::abs(v.element(k) - r) / ulp(t.info->dtype, r);
      EXPECT_LE(err, 1.0) << t.name() << "[" << k << "]: got " << v.element(k) << ", expected " << r;
      worst = std::max(worst, err);
    }
  }
  EXPECT_EQ(seen, ref.size());
  return worst;
}

// ---------------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------------

class StrategiesTest : public conflux_test::StrategyFixture {
 protected:
  // Writes base and m0..m{n-1} of a scenario, and checks that the generator did what it meant
  // to: intended changes survive bf16 rounding (|d| > eps), tiny ones are nonzero and below
  // epsilon, and every other entry is exactly unchanged.
  void write_scenario(const Scenario& sc) {
    scenario_ = sc;
    const auto specs = sc.specs();
    write_checkpoint(dir_ / "base", specs, [&](std::size_t ti, std::uint64_t j) { return sc.base(ti, j); });
    for (std::size_t i = 0; i < sc.agents(); ++i)
      write_checkpoint(dir_ / model_name(i), specs, [&](std::size_t ti, std::uint64_t j) { return sc.agent(ti, j, i); });
    std::uint64_t tiny = 0, changed = 0;
    for (std::size_t ti = 0; ti < sc.tensors.size(); ++ti) {
      if (!dtype_is_mergeable(sc.tensors[ti].spec.dtype)) continue;
      for (std::uint64_t j = 0; j < numel(sc.tensors[ti].spec.shape); ++j)
        for (std::size_t i = 0; i < sc.agents(); ++i) {
          const double d = std::fabs(static_cast<double>(sc.agent(ti, j, i) - sc.base(ti, j)));
          if (sc.active(ti, j, i)) {
            ASSERT_GT(d, kEps) << sc.tensors[ti].spec.name << "[" << j << "] agent " << i;
            ++changed;
          } else if (sc.tiny_change(ti, j, i)) {
            ASSERT_TRUE(d > 0 && d < kEps) << sc.tensors[ti].spec.name << "[" << j << "] agent " << i << ": " << d;
            ++tiny;
          } else {
            ASSERT_EQ(d, 0.0) << sc.tensors[ti].spec.name << "[" << j << "] agent " << i;
          }
        }
    }
    tiny_entries_ = tiny;
    changed_entries_ = changed;
  }

  static std::string model_name(std::size_t i) { return "m" + std::to_string(i); }

  std::vector<fs::path> model_dirs(std::size_t n) const {
    std::vector<fs::path> m;
    for (std::size_t i = 0; i < n; ++i) m.push_back(dir_ / model_name(i));
    return m;
  }

  JobConfig job(const std::string& strategy, std::size_t n_models, std::vector<RawParam> params, const std::string& out) {
    JobConfig j;
    j.name = "test";
    j.strategy = strategy;
    j.base = dir_ / "base";
    j.models = model_dirs(n_models);
    j.output = dir_ / out;
    j.params = std::move(params);
    return j;
  }

  static std::vector<RawParam> ram_params(const RamParams& p) {
    std::vector<RawParam> v{num("epsilon", p.eps), num("r", p.r), num("alpha", p.alpha),
                            str("scope", p.model_scope ? "model" : "tensor"),
                            str("lambda_form", p.soft ? "soft" : "clip")};
    return v;
  }

  // Runs ram with `p`, checks the output within 1 ulp of the reference and the report's
  // per-agent statistics against the reference's. Returns the reference.
  RamRef check_ram(const RamParams& p, const std::string& out, std::optional<DType> out_dtype = {},
                   unsigned threads = 2, std::uint64_t chunk = 1000) {
    const std::size_t n = scenario_.agents();
    JobConfig j = job("ram", n, ram_params(p), out);
    j.out_dtype = out_dtype;
    run(j, threads, chunk);
    const RamRef ref = ram_reference(read_inputs(dir_ / "base", model_dirs(n)), p);
    EXPECT_LE(max_ulps(dir_ / out, ref.out), 1.0);
    check_ram_report(report(out), ref, p);
    return ref;
  }

  static void check_ram_report(const json::object& rep, const RamRef& ref, const RamParams& p) {
    EXPECT_EQ(rep.at("method").as_string(), p.r == 0 ? "RAM" : p.soft ? "RAM+s" : "RAM+");
    EXPECT_EQ(rep.at("scope").as_string(), p.model_scope ? "model" : "tensor");
    EXPECT_EQ(rep.at("lambda_form").as_string(), p.soft ? "soft" : "clip");
    EXPECT_EQ(count(rep, "elements"), ref.elements);
    EXPECT_TRUE(near_rel(number(rep, "epsilon"), p.eps));
    EXPECT_TRUE(near_rel(number(rep, "r"), p.r));
    EXPECT_TRUE(near_rel(number(rep, "alpha"), p.alpha));
    const json::array& agents = rep.at("agents").as_array();
    ASSERT_EQ(agents.size(), ref.unique.size());
    for (std::size_t i = 0; i < agents.size(); ++i) {
      SCOPED_TRACE("agent " + std::to_string(i));
      const json::object& a = agents[i].as_object();
      const std::uint64_t active = ref.unique[i] + ref.shared[i];
      EXPECT_EQ(count(a, "model"), i);
      EXPECT_EQ(count(a, "unique"), ref.unique[i]);
      EXPECT_EQ(count(a, "shared"), ref.shared[i]);
      EXPECT_EQ(count(a, "active"), active);
      EXPECT_TRUE(near_rel(number(a, "rho"), ref.rho[i]));
      EXPECT_TRUE(near_rel(number(a, "lambda"), ref.lambda[i]));
      // Printed with %.9g.
      EXPECT_TRUE(near_rel(number(a, "active_fraction"),
                           ref.elements ? static_cast<double>(active) / static_cast<double>(ref.elements) : 0, 1e-8));
      EXPECT_TRUE(near_rel(number(a, "unique_fraction"),
                           active ? static_cast<double>(ref.unique[i]) / static_cast<double>(active) : 0, 1e-8));
      if (!p.model_scope && p.r > 0) {
        EXPECT_TRUE(near_rel(number(a, "tensor_lambda_min"), ref.tensor_lambda_min[i]));
        EXPECT_TRUE(near_rel(number(a, "tensor_lambda_max"), ref.tensor_lambda_max[i]));
      }
    }
  }

  Scenario scenario_;
  std::uint64_t tiny_entries_ = 0, changed_entries_ = 0;
};

// ---------------------------------------------------------------------------------------------
// ram
// ---------------------------------------------------------------------------------------------

TEST_F(StrategiesTest, RamMatchesFloat64Reference) {
  write_scenario(main_scenario());
  EXPECT_GT(tiny_entries_, 100u);  // sub-epsilon changes exist (and must count as inactive)
  RamParams p;  // r = 0: plain RAM
  const RamRef ref = check_ram(p, "ram");
  // The scenario exercises every case of the definition.
  for (int c = 0; c < 4; ++c) EXPECT_GT(ref.by_count[c], 10u) << "entries with c = " << c;
  EXPECT_EQ(ref.tiny, tiny_entries_);
  for (std::size_t i = 0; i < 3; ++i) {
    EXPECT_GT(ref.unique[i], 0u);
    EXPECT_GT(ref.shared[i], 0u);
    EXPECT_EQ(ref.lambda[i], 1.0);
  }
  // The integer tensor is copied from the base.
  const Checkpoint out = Checkpoint::open(dir_ / "ram"), base = Checkpoint::open(dir_ / "base");
  const auto a = out.view(out.at("position_ids")).bytes, b = base.view(base.at("position_ids")).bytes;
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size()));
}

TEST_F(StrategiesTest, RamFloat32OutputMatchesFloat64Reference) {
  write_scenario(main_scenario());
  check_ram(RamParams{}, "ram32", DType::F32);
  RamParams plus;
  plus.r = 0.1;
  check_ram(plus, "ramplus32", DType::F32);
}

// ram sweeps up to four agents at once and goes agent by agent beyond: both paths, in both
// arithmetics (float32 for BF16 outputs, double for F32), match the reference and count alike.
TEST_F(StrategiesTest, RamWithTwoAndSixAgentsMatchesFloat64Reference) {
  for (const std::size_t agents : {2u, 6u}) {
    SCOPED_TRACE(std::to_string(agents) + " agents");
    write_scenario(main_scenario(agents));
    RamParams plus;
    plus.r = 0.1;
    RamParams tensor_plus = plus;
    tensor_plus.model_scope = false;
    const std::string tag = std::to_string(agents);
    const RamRef ref = check_ram(RamParams{}, "ram" + tag);
    for (std::size_t i = 0; i < agents; ++i) {
      EXPECT_GT(ref.unique[i], 0u);
      EXPECT_GT(ref.shared[i], 0u);
    }
    check_ram(RamParams{}, "ram32_" + tag, DType::F32);
    check_ram(plus, "plus" + tag);
    check_ram(plus, "plus32_" + tag, DType::F32);
    check_ram(tensor_plus, "tplus" + tag);
  }
}

// Float32 arithmetic (BF16 output) where the merged update cancels the base: float32 inputs,
// agents x_i = delta_i (tiny) over a base b, so the mean of the task vectors is -b + mean(delta).
// The entries whose float32 sum cannot see the remainder are computed again in double
// (plugins/common/float_guard.h): every entry stays within 1 ulp of the reference.
TEST_F(StrategiesTest, RamStaysExactWhereTheUpdateCancelsTheBase) {
  const std::vector<Spec> specs = {{"w", {53, 29}, DType::F32}, {"v", {999}, DType::F32}};
  auto base = [&](std::size_t ti, std::uint64_t j) {
    return static_cast<float>(0.5 + 0.5 * rnd(conflux_test::name_id(specs[ti].name), j, 1));
  };
  auto agent = [&](std::size_t ti, std::uint64_t j, std::size_t i) {
    // Agent 2 leaves a third of the entries alone (c = 2 there), the rest c = 3.
    if (i == 2 && rnd(conflux_test::name_id(specs[ti].name), j, 9) < 1.0 / 3) return base(ti, j);
    return static_cast<float>(std::ldexp(rnd(conflux_test::name_id(specs[ti].name), j, 2 + i) - 0.5, -16));
  };
  write_checkpoint(dir_ / "base", specs, base);
  for (std::size_t i = 0; i < 3; ++i)
    write_checkpoint(dir_ / model_name(i), specs, [&](std::size_t ti, std::uint64_t j) { return agent(ti, j, i); });
  for (const double r : {0.0, 0.1}) {
    SCOPED_TRACE("r = " + std::to_string(r));
    RamParams p;
    p.r = r;
    JobConfig j = job("ram", 3, ram_params(p), "cancel" + std::to_string(r > 0));
    j.out_dtype = DType::BF16;
    run(j);
    const RamRef ref = ram_reference(read_inputs(dir_ / "base", model_dirs(3)), p);
    EXPECT_LE(max_ulps(j.output, ref.out), 1.0);
  }
}

TEST_F(StrategiesTest, RamPlusModelScopeMatchesFloat64Reference) {
  write_scenario(main_scenario());
  RamParams p;
  p.r = 0.1;
  p.alpha = 2;
  const RamRef ref = check_ram(p, "ramplus");
  // Agent 1 is mostly shared (its rho is clipped at alpha), the others are mostly unique.
  EXPECT_GT(ref.rho[1], p.alpha);
  EXPECT_DOUBLE_EQ(ref.lambda[1], 1.2);
  for (std::size_t i : {0u, 2u}) {
    EXPECT_GT(ref.rho[i], 0.0);
    EXPECT_LT(ref.rho[i], p.alpha);
  }
  // RAM+ differs from RAM where an agent's unique entries are rescaled.
  check_ram(RamParams{}, "ram");
  const auto plus = elements_of(dir_ / "ramplus", "lm_head.weight"), plain = elements_of(dir_ / "ram", "lm_head.weight");
  EXPECT_NE(plus, plain);
}

TEST_F(StrategiesTest, RamPlusTensorScopeMatchesFloat64Reference) {
  write_scenario(main_scenario());
  RamParams p;
  p.r = 0.1;
  p.model_scope = false;
  const RamRef ref = check_ram(p, "ramplus_tl");
  for (std::size_t i = 0; i < 3; ++i) EXPECT_LT(ref.tensor_lambda_min[i], ref.tensor_lambda_max[i]) << i;
  // The same at one thread and another chunk size, bit for bit.
  check_ram(p, "ramplus_tl_1", {}, 1, 4096);
  EXPECT_EQ(conflux_test::read_file(dir_ / "ramplus_tl" / "model.safetensors"),
            conflux_test::read_file(dir_ / "ramplus_tl_1" / "model.safetensors"));
}

TEST_F(StrategiesTest, RamPlusSoftMatchesFloat64Reference) {
  write_scenario(main_scenario());
  RamParams p;
  p.r = 0.1;
  p.soft = true;
  const RamRef ref = check_ram(p, "ramplus_s");
  for (std::size_t i = 0; i < 3; ++i) EXPECT_DOUBLE_EQ(ref.lambda[i], 1 + 0.1 * ref.rho[i] / (1 + ref.rho[i]));
  p.model_scope = false;
  check_ram(p, "ramplus_s_tl");
}

TEST_F(StrategiesTest, RamModelScopeDiffersFromTensorScope) {
  // Tensor A: agent 0 overlaps heavily with agent 1. Tensor B: agent 0 alone (all unique).
  Scenario sc;
  sc.tensors = {{{"a.w", {53, 19}}, 0.4, 0b11, {0.05, 0.10}}, {{"b.w", {1999}}, 0.0, 0, {0.30, 0.0}}};
  sc.tiny = {0.5, 0.5};
  write_scenario(sc);
  RamParams model;
  model.r = 0.1;
  RamParams tensor = model;
  tensor.model_scope = false;
  const RamRef rm = check_ram(model, "model");
  const RamRef rt = check_ram(tensor, "tensor");
  // Per tensor: agent 0 is clipped at alpha in A (lambda 1.2) and has rho 0 in B (lambda 1);
  // over the model its rho is in between.
  EXPECT_DOUBLE_EQ(rt.tensor_lambda.at("a.w")[0], 1.2);
  EXPECT_DOUBLE_EQ(rt.tensor_lambda.at("b.w")[0], 1.0);
  EXPECT_GT(rm.lambda[0], 1.0);
  EXPECT_LT(rm.lambda[0], 1.2);
  // The report's per-tensor range and the model-wide lambda differ.
  const json::object a0 = report("tensor").at("agents").as_array()[0].as_object();
  EXPECT_TRUE(near_rel(number(a0, "tensor_lambda_min"), 1.0));
  EXPECT_TRUE(near_rel(number(a0, "tensor_lambda_max"), 1.2));
  EXPECT_TRUE(near_rel(number(a0, "lambda"), rm.lambda[0]));
  EXPECT_GT(number(a0, "lambda"), number(a0, "tensor_lambda_min"));
  EXPECT_LT(number(a0, "lambda"), number(a0, "tensor_lambda_max"));
  EXPECT_FALSE(report("model").at("agents").as_array()[0].as_object().contains("tensor_lambda_min"));
  // And the outputs differ in both tensors.
  for (const char* name : {"a.w", "b.w"}) {
    const auto x = elements_of(dir_ / "model", name), y = elements_of(dir_ / "tensor", name);
    std::size_t differ = 0;
    for (std::size_t k = 0; k < x.size(); ++k) differ += x[k] != y[k];
    EXPECT_GT(differ, 10u) << name;
  }
}

TEST_F(StrategiesTest, RamGuardSaturatedAndIdleAgents) {
  // Agent 0 changes only entries agent 1 changes too (unique 0, shared > 0: saturated); agent 2
  // changes nothing at all; agent 3 changes only by less than epsilon.
  Scenario sc;
  sc.tensors = {{{"g.w", {29, 31}}, 0.2, 0b0011, {0.0, 0.2, 0.0, 0.0}},
                {{"g.b", {31}}, 0.3, 0b0011, {0.0, 0.2, 0.0, 0.0}}};
  sc.tiny = {0.5, 0.5, 0.0, 0.6};
  write_scenario(sc);
  for (bool soft : {false, true})
    for (bool model_scope : {true, false}) {
      SCOPED_TRACE(std::string(soft ? "soft" : "clip") + (model_scope ? " model" : " tensor"));
      RamParams p;
      p.r = 0.1;
      p.alpha = 1.5;
      p.soft = soft;
      p.model_scope = model_scope;
      const std::string out = std::string("guard_") + (soft ? "s" : "c") + (model_scope ? "m" : "t");
      const RamRef ref = check_ram(p, out);
      const double saturated = soft ? 1 + 0.1 * 1.5 / 2.5 : 1 + 0.1 * 1.5;
      const json::object rep = report(out);
      const json::array& agents = rep.at("agents").as_array();
      const json::object& a0 = agents[0].as_object();
      EXPECT_EQ(count(a0, "unique"), 0u);
      EXPECT_GT(count(a0, "shared"), 0u);
      EXPECT_EQ(number(a0, "rho"), 1.5);
      EXPECT_TRUE(near_rel(number(a0, "lambda"), saturated));
      if (!model_scope) {
        EXPECT_TRUE(near_rel(number(a0, "tensor_lambda_min"), saturated));
        EXPECT_TRUE(near_rel(number(a0, "tensor_lambda_max"), saturated));
      }
      for (std::size_t i : {2u, 3u}) {
        SCOPED_TRACE("agent " + std::to_string(i));
        const json::object& a = agents[i].as_object();
        EXPECT_EQ(count(a, "active"), 0u);
        EXPECT_EQ(number(a, "rho"), 0.0);
        EXPECT_EQ(number(a, "lambda"), 1.0);
        EXPECT_EQ(number(a, "active_fraction"), 0.0);
        EXPECT_EQ(number(a, "unique_fraction"), 0.0);
        if (!model_scope) {
          EXPECT_EQ(number(a, "tensor_lambda_min"), 1.0);
          EXPECT_EQ(number(a, "tensor_lambda_max"), 1.0);
        }
      }
      EXPECT_EQ(ref.rho[0], 1.5);
    }
}

TEST_F(StrategiesTest, RamEpsilonThresholdIsStrict) {
  // Base 2^-10 (bf16 spacing 2^-17 there). With epsilon = 2^-17 a change of exactly one step is
  // inactive (|d| > epsilon is strict), two steps are active.
  const float b = 0x1p-10f, s = 0x1p-17f;
  const std::vector<Spec> specs{{"e", {7}}};
  const float m0[7] = {b + s, b + 2 * s, b - s, b, b + 2 * s, b - 2 * s, b + s};
  const float m1[7] = {b, b, b, b + 4 * s, b + 4 * s, b - s, b - 4 * s};
  write_checkpoint(dir_ / "base", specs, [&](std::size_t, std::uint64_t) { return b; });
  write_checkpoint(dir_ / "m0", specs, [&](std::size_t, std::uint64_t j) { return m0[j]; });
  write_checkpoint(dir_ / "m1", specs, [&](std::size_t, std::uint64_t j) { return m1[j]; });
  scenario_.tiny = {0, 0};
  RamParams p;
  p.eps = 0x1p-17;
  const RamRef ref = check_ram(p, "strict", DType::F32);
  const std::vector<double> want{b, b + 2 * s, b, b + 4 * s, b + 3 * s, b - 2 * s, b - 4 * s};
  EXPECT_EQ(elements_of(dir_ / "strict", "e"), want);
  EXPECT_EQ(ref.unique[0], 2u);
  EXPECT_EQ(ref.shared[0], 1u);
  // epsilon = 0: every nonzero change is active.
  p.eps = 0;
  check_ram(p, "zero", DType::F32);
  const std::vector<double> want0{b + s, b + 2 * s, b - s, b + 4 * s, b + 3 * s, b - 1.5 * s, b - 1.5 * s};
  EXPECT_EQ(elements_of(dir_ / "zero", "e"), want0);
}

TEST_F(StrategiesTest, RamEpsilonZeroCountsSubEpsilonChanges) {
  write_scenario(main_scenario());
  RamParams p;
  p.eps = 0;
  p.r = 0.1;
  const RamRef ref = check_ram(p, "eps0");
  RamParams d;
  d.r = 0.1;
  const RamRef ref_default = ram_reference(read_inputs(dir_ / "base", model_dirs(3)), d);
  std::uint64_t a0 = 0, a1 = 0;
  for (std::size_t i = 0; i < 3; ++i) a0 += ref.unique[i] + ref.shared[i], a1 += ref_default.unique[i] + ref_default.shared[i];
  EXPECT_EQ(a0, a1 + tiny_entries_);
}

// ---------------------------------------------------------------------------------------------
// imm
// ---------------------------------------------------------------------------------------------

Scenario imm_scenario() {
  Scenario sc;
  sc.tensors = {
      {{"model.embed.weight", {37, 29}}, 0, 0, {0.6}},
      {{"layers.0.attn.w", {61, 47}}, 0, 0, {0.5}},
      {{"layers.0.bias", {47}}, 0, 0, {0.7}},
      {{"layers.1.mlp.w", {3, 5, 7}}, 0, 0, {0.6}},
      {{"scalar", {}}, 0, 0, {1.0}},
      {{"empty", {0}}, 0, 0, {0.5}},
      {{"position_ids", {3, 11}, DType::I64}, 0, 0, {0}},
      {{"big.w", {97, 101}}, 0, 0, {0.6}},  // 9797: several chunks of 1000 and of 4096
      {{"norm.weight", {1031}}, 0, 0, {0.6}},
  };
  sc.tiny = {0.5};
  return sc;
}

struct ImmEntry {
  double base = 0;
  float d = 0;
  bool keep = true;
};

// Every element of every floating tensor with its keep decision from the host's stream:
// random_uniform_at(random_key(seed, tensor name, 0), e) >= p.
std::map<std::string, std::vector<ImmEntry>> imm_entries(const fs::path& dir, std::uint64_t seed, double p) {
  std::map<std::string, std::vector<ImmEntry>> out;
  for (const TensorInputs& t : read_inputs(dir / "base", {dir / "m0"})) {
    const std::uint64_t key = random_key(seed, t.name.c_str(), 0);
    std::vector<ImmEntry> e(t.base.size());
    for (std::size_t k = 0; k < e.size(); ++k)
      e[k] = {t.base[k], t.d[0][k], p == 0 || static_cast<double>(random_uniform_at(key, k)) >= p};
    out[t.name] = std::move(e);
  }
  return out;
}

TEST_F(StrategiesTest, ImmWithoutDropMatchesFloat64Reference) {
  write_scenario(imm_scenario());
  JobConfig j = job("imm", 1, {num("weight", 0.7), num("drop_rate", 0.0)}, "imm");
  run(j);
  std::map<std::string, std::vector<double>> ref;
  std::uint64_t elements = 0;
  for (const auto& [name, es] : imm_entries(dir_.path(), 0, 0)) {
    for (const ImmEntry& e : es) ref[name].push_back(e.base + 0.7 * static_cast<double>(e.d));
    ref[name];  // empty tensors too
    elements += es.size();
  }
  EXPECT_LE(max_ulps(dir_ / "imm", ref), 1.0);
  const json::object rep = report("imm");
  EXPECT_EQ(count(rep, "elements"), elements);
  EXPECT_EQ(count(rep, "kept"), elements);
  EXPECT_EQ(number(rep, "kept_fraction"), 1.0);
  EXPECT_TRUE(near_rel(number(rep, "weight"), 0.7));
  EXPECT_EQ(number(rep, "drop_rate"), 0.0);
  EXPECT_TRUE(near_rel(number(rep, "scale_of_kept"), 0.7));
  // Also at f32 output.
  j = job("imm", 1, {num("weight", 0.7), num("drop_rate", 0.0)}, "imm32");
  j.out_dtype = DType::F32;
  run(j);
  EXPECT_LE(max_ulps(dir_ / "imm32", ref), 1.0);
}

// Checks an imm output with drop rate p against the keep decisions of the host's stream.
void check_imm_dropped(const fs::path& out_dir, const std::map<std::string, std::vector<ImmEntry>>& entries, double weight,
                       double p, bool rescale) {
  const Checkpoint out = Checkpoint::open(out_dir);
  std::uint64_t nonzero = 0, kept_nonzero = 0, distinguishable = 0, seen_kept = 0;
  for (const auto& [name, es] : entries) {
    const TensorView v = out.view(out.at(name));
    for (std::size_t k = 0; k < es.size(); ++k) {
      const ImmEntry& e = es[k];
      const double got = v.element(k);
      if (e.d == 0) {
        EXPECT_EQ(got, e.base) << name << "[" << k << "]";
        continue;
      }
      ++nonzero;
      const double scaled = weight * static_cast<double>(e.d) / (rescale ? 1 - p : 1.0);
      if (e.keep) {
        ++kept_nonzero;
        const double r = e.base + scaled;
        EXPECT_LE(std::abs(got - r) / ulp(DType::BF16, r), 1.0)
            << name << "[" << k << "] kept: got " << got << ", expected " << r;
      } else {
        EXPECT_EQ(got, e.base) << name << "[" << k << "] dropped: got " << got << ", expected the base " << e.base;
      }
      // Where a survivor cannot round back to the base, the output shows the decision.
      if (std::fabs(scaled) >= 2 * ulp(DType::BF16, e.base)) {
        ++distinguishable;
        seen_kept += got != e.base;
        EXPECT_EQ(got != e.base, e.keep) << name << "[" << k << "]";
      }
    }
  }
  EXPECT_GT(nonzero, 5000u);
  EXPECT_GT(distinguishable, nonzero * 8 / 10);
  // Binomial: kept ~ B(n, 1 - p); within 4 standard deviations.
  auto within = [p](std::uint64_t kept, std::uint64_t n) {
    const double nn = static_cast<double>(n), sd = std::sqrt(nn * p * (1 - p));
    return std::fabs(static_cast<double>(kept) - nn * (1 - p)) <= 4 * sd;
  };
  EXPECT_TRUE(within(kept_nonzero, nonzero)) << kept_nonzero << " of " << nonzero;
  EXPECT_TRUE(within(seen_kept, distinguishable)) << seen_kept << " of " << distinguishable;
}

TEST_F(StrategiesTest, ImmDropKeepsTheHostsRandomStream) {
  write_scenario(imm_scenario());
  const double p = 0.3;
  JobConfig j = job("imm", 1, {num("weight", 0.5), num("drop_rate", p)}, "imm");
  j.seed = 1234;
  run(j);
  const auto es = imm_entries(dir_.path(), 1234, p);
  check_imm_dropped(dir_ / "imm", es, 0.5, p, true);
  std::uint64_t kept = 0, elements = 0;
  for (const auto& [name, v] : es)
    for (const ImmEntry& e : v) kept += e.keep, ++elements;
  const json::object rep = report("imm");
  EXPECT_EQ(count(rep, "elements"), elements);
  EXPECT_EQ(count(rep, "kept"), kept);
  EXPECT_TRUE(near_rel(number(rep, "kept_fraction"), static_cast<double>(kept) / static_cast<double>(elements), 1e-8));
  EXPECT_TRUE(near_rel(number(rep, "drop_rate"), p));
  EXPECT_TRUE(near_rel(number(rep, "scale_of_kept"), 0.5 / 0.7, 1e-15));
}

TEST_F(StrategiesTest, ImmWithoutRescaleKeepsTheWeightedDelta) {
  write_scenario(imm_scenario());
  const double p = 0.3;
  JobConfig j = job("imm", 1, {num("weight", 0.5), num("drop_rate", p), flag("rescale", false)}, "imm");
  j.seed = 77;
  run(j);
  check_imm_dropped(dir_ / "imm", imm_entries(dir_.path(), 77, p), 0.5, p, false);
  EXPECT_TRUE(near_rel(number(report("imm"), "scale_of_kept"), 0.5));
}

TEST_F(StrategiesTest, ImmIsBitIdenticalAcrossThreadsAndChunksAndFollowsTheSeed) {
  write_scenario(imm_scenario());
  auto make = [&](const std::string& out, std::uint64_t seed) {
    JobConfig j = job("imm", 1, {num("weight", 0.5), num("drop_rate", 0.3)}, out);
    j.seed = seed;
    return j;
  };
  run(make("t1", 1234), 1, 1000);
  run(make("t2", 1234), 2, 1000);
  run(make("t3", 1234), 2, 4096);
  run(make("t4", 1234), 1, 4096);
  run(make("other", 1235), 2, 1000);
  const std::string first = conflux_test::read_file(dir_ / "t1" / "model.safetensors");
  for (const char* o : {"t2", "t3", "t4"})
    EXPECT_EQ(first, conflux_test::read_file(dir_ / o / "model.safetensors")) << o;
  EXPECT_NE(first, conflux_test::read_file(dir_ / "other" / "model.safetensors"));
  check_imm_dropped(dir_ / "other", imm_entries(dir_.path(), 1235, 0.3), 0.5, 0.3, true);
}

// ---------------------------------------------------------------------------------------------
// Bad jobs: clear errors before any tensor is written
// ---------------------------------------------------------------------------------------------

TEST_F(StrategiesTest, BadJobsFailBeforeWritingAnything) {
  write_scenario(main_scenario(2));
  const auto nothing_written = [&] {
    EXPECT_FALSE(fs::exists(dir_ / "out"));
    for (const auto& name : entries(dir_.path())) EXPECT_FALSE(name.starts_with(".")) << name;
  };
  expect_error<ConfigError>([&] { run(job("ram", 1, {}, "out")); }, {"'models'", "at least 2", "ram"});
  nothing_written();
  expect_error<ConfigError>([&] { run(job("imm", 2, {}, "out")); }, {"'models'", "exactly 1", "imm"});
  nothing_written();
  JobConfig no_base = job("ram", 2, {}, "out");
  no_base.base.reset();
  expect_error<ConfigError>([&] { run(no_base); }, {"'base'"});
  nothing_written();
  no_base = job("imm", 1, {}, "out");
  no_base.base.reset();
  expect_error<ConfigError>([&] { run(no_base); }, {"'base'"});
  nothing_written();
  expect_error<ConfigError>([&] { run(job("ram", 2, {str("lambda_form", "cubic")}, "out")); },
                            {"lambda_form", "\"clip\"", "\"soft\"", "cubic"});
  nothing_written();
  expect_error<ConfigError>([&] { run(job("ram", 2, {str("scope", "layer")}, "out")); },
                            {"scope", "\"model\"", "\"tensor\"", "layer"});
  nothing_written();
  expect_error<ConfigError>([&] { run(job("ram", 2, {num("r", -0.1)}, "out")); }, {"params.r", ">= 0"});
  nothing_written();
  expect_error<ConfigError>([&] { run(job("imm", 1, {num("drop_rate", 1.0)}, "out")); }, {"drop_rate", "[0, 1)"});
  nothing_written();
  expect_error<ConfigError>([&] { run(job("imm", 1, {num("drop_ratio", 0.1)}, "out")); }, {"drop_ratio", "drop_rate"});
  nothing_written();

  // A tensor missing from one agent, a shape that differs: the plan names tensor and model.
  auto specs = main_scenario(2).specs();
  auto write_bad = [&](const std::string& name, const std::vector<Spec>& s) {
    write_checkpoint(dir_ / name, s, [](std::size_t, std::uint64_t j) { return static_cast<float>(j % 7) * 0.125f; });
  };
  auto missing = specs;
  missing.erase(missing.begin() + 2);  // layers.0.bias
  write_bad("missing", missing);
  auto reshaped = specs;
  reshaped[1].shape = {47, 61};  // layers.0.attn.w
  write_bad("reshaped", reshaped);
  for (const char* strategy : {"ram", "imm"}) {
    SCOPED_TRACE(strategy);
    const bool ram = std::string(strategy) == "ram";
    JobConfig j = job(strategy, ram ? 2 : 1, {}, "out");
    j.models.back() = dir_ / "missing";
    expect_error<MergeError>([&] { run(j); }, {"'layers.0.bias'", (dir_ / "missing").string(), "missing"});
    nothing_written();
    j.models.back() = dir_ / "reshaped";
    expect_error<MergeError>([&] { run(j); }, {"'layers.0.attn.w'", (dir_ / "reshaped").string(), "shape"});
    nothing_written();
  }
}

}  // namespace
