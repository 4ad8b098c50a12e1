// The `slerp` and `model_stock` strategy plugins end to end through the library (run_job), on
// synthetic checkpoints with odd shapes (1-D, 3-D, a scalar, an empty tensor, rows longer than a
// chunk, rows of 1 and 3, tensors of several chunks), bf16 and f32 inputs and outputs.
//
// Outputs are compared with float64 references computed here from the stored inputs. The
// references follow the plugins' documented summation order (16 lanes per row, rows in order),
// so their statistics are the plugins' to the bit: the output must then be the reference value
// rounded once to float32 (f32 output: bit-exact; bf16 output: within 1 ulp, the float32
// intermediate rounding included). A long-double check confirms that the documented order loses
// nothing worth mentioning (relative 1e-12 on every statistic).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
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
#include "conflux/merge.h"
#include "conflux/writer.h"
#include "test_util.h"
#include "strategy_test_util.h"
#include "../plugins/common/stock_lanes.h"

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
using conflux_test::write_checkpoint;
using conflux_test::rnd;
using conflux_test::name_id;
using conflux_test::near_rel;
using conflux_test::elements_of;
using conflux_test::number;
using conflux_test::count;
using conflux_test::entries;
using conflux_test::expect_error;

// ---------------------------------------------------------------------------------------------
// Synthetic checkpoints
// ---------------------------------------------------------------------------------------------

// A standard normal deviate that depends only on (a, b, c) (Box-Muller).
double gauss(std::uint64_t a, std::uint64_t b, std::uint64_t c) {
  const double u1 = 1.0 - rnd(a, b, 2 * c), u2 = rnd(a, b, 2 * c + 1);
  return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
}

// ---------------------------------------------------------------------------------------------
// Reading inputs and outputs
// ---------------------------------------------------------------------------------------------

struct TensorValues {
  std::string name;
  std::vector<std::uint64_t> shape;
  std::vector<std::vector<double>> v;  // v[input][k]: float values widened to double
};

std::uint64_t row_length(const std::vector<std::uint64_t>& shape, std::uint64_t n) {
  return shape.empty() ? n : shape.back();
}

// The floating tensors of `dirs` (in the order of the first), each input's values.
std::vector<TensorValues> read_values(const std::vector<fs::path>& dirs) {
  std::vector<Checkpoint> cks;
  for (const auto& d : dirs) cks.push_back(Checkpoint::open(d));
  std::vector<TensorValues> out;
  for (const TensorRef& t : cks.front().tensors()) {
    if (!dtype_is_mergeable(t.info->dtype)) continue;
    TensorValues tv;
    tv.name = t.name();
    tv.shape = t.info->shape;
    for (const Checkpoint& c : cks) {
      const TensorView view = c.view(c.at(t.name()));
      std::vector<double> x(static_cast<std::size_t>(t.info->numel));
      for (std::size_t k = 0; k < x.size(); ++k) x[k] = view.element(k);
      tv.v.push_back(std::move(x));
    }
    out.push_back(std::move(tv));
  }
  return out;
}

// sum_k term(k) in the plugins' documented order: per row, element j into lane j mod 16, lanes
// folded l0 + l1 + ... + l15; rows folded in row order.
template <class F>
double ordered_sum(std::size_t n, std::size_t row, F term) {
  double total = 0;
  for (std::size_t r0 = 0; r0 < n; r0 += row) {
    double lanes[16] = {};
    for (std::size_t j = 0; j < row; ++j) lanes[j % 16] += term(r0 + j);
    double s = lanes[0];
    for (std::size_t q = 1; q < 16; ++q) s += lanes[q];
    total += s;
  }
  return total;
}

// The same sum in long double, straight through (the independent check).
template <class F>
long double plain_sum(std::size_t n, F term) {
  long double s = 0;
  for (std::size_t k = 0; k < n; ++k) s += static_cast<long double>(term(k));
  return s;
}

// A sum in the documented order against the long-double sum: within 1e-12 of sum |term|.
template <class F>
::testing::AssertionResult accurate_sum(double got, std::size_t n, F term) {
  const long double exact = plain_sum(n, term);
  const long double size = plain_sum(n, [&](std::size_t k) { return std::fabs(term(k)); });
  if (std::fabs(static_cast<long double>(got) - exact) <= 1e-12L * size) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "sum " << got << " vs " << static_cast<double>(exact);
}

using Outputs = std::map<std::string, std::vector<double>>;

// Checks every floating tensor of the output against `ref` (double values before the plugin's
// float32 rounding): within 1 ulp of the output dtype, and for float32 outputs equal to the
// reference rounded once. Returns the largest error in ulps.
double check_output(const fs::path& out_dir, const Outputs& ref) {
  const Checkpoint out = Checkpoint::open(out_dir);
  double worst = 0;
  std::size_t seen = 0, inexact = 0;
  for (const TensorRef& t : out.tensors()) {
    if (!dtype_is_mergeable(t.info->dtype)) continue;
    const auto it = ref.find(t.name());
    if (it == ref.end()) {
      ADD_FAILURE() << "no reference for " << t.name();
      continue;
    }
    ++seen;
    const TensorView v = out.view(t);
    EXPECT_EQ(it->second.size(), t.info->numel) << t.name();
    for (std::size_t k = 0; k < it->second.size() && k < t.info->numel; ++k) {
      const double r = it->second[k], got = v.element(k);
      const double err = got == r ? 0.0 : std::abs(got - r) / ulp(t.info->dtype, r);
      EXPECT_LE(err, 1.0) << t.name() << "[" << k << "]: got " << got << ", expected " << r;
      if (t.info->dtype == DType::F32 && got != static_cast<double>(static_cast<float>(r))) ++inexact;
      worst = std::max(worst, err);
    }
  }
  EXPECT_EQ(seen, ref.size());
  EXPECT_EQ(inexact, 0u) << "float32 outputs that are not the reference rounded once";
  return worst;
}

// Exact numbers come from the plugin's own report text (MergeResult::report), read with strtod:
// the manifest's copy went through Boost.JSON's parser, which (Boost 1.81) may be 1 ulp off.
// The field `key` of the per_tensor entry of tensor `name`, or the first `key` when name is empty.
double raw_number(const std::string& report, const std::string& name, const std::string& key) {
  std::size_t at = 0, end = report.size();
  if (!name.empty()) {
    at = report.find("{\"name\":\"" + name + "\"");
    if (at == std::string::npos) {
      ADD_FAILURE() << "no per_tensor entry for " << name;
      return std::nan("");
    }
    end = report.find('}', at);
  }
  const std::size_t k = report.find("\"" + key + "\":", at);
  if (k == std::string::npos || k > end) {
    ADD_FAILURE() << "no '" << key << "' for '" << name << "'";
    return std::nan("");
  }
  return std::strtod(report.c_str() + k + key.size() + 3, nullptr);
}

// ---------------------------------------------------------------------------------------------
// slerp scenario and reference
// ---------------------------------------------------------------------------------------------

// How v1 relates to v0 in a tensor (x, y independent N(0, 0.1^2) per element). For the
// plugin's speculation (one read of a linear tensor whose every row is near-parallel):
// parallel_but_a_row is near-parallel as a whole but its row 3 (1000 times smaller in both
// models, independent) is not, so the tensor is linear yet needs the map pass;
// rows_alternate has rows each near-parallel, alternately with + and -, so its chunks
// speculate and the tensor is spherical after all (the map pass overwrites their output).
enum class Rel {
  independent,
  correlated,
  opposed,
  parallel,
  antiparallel,
  zero0,
  zero1,
  parallel_but_a_row,
  rows_alternate
};

struct SlerpTensor {
  Spec spec;
  Rel rel;
};

std::vector<SlerpTensor> slerp_tensors() {
  return {
      {{"embed.weight", {97, 101}}, Rel::independent},        // 9797: several chunks of 1000 and 4096
      {{"layers.0.q.weight", {61, 47}}, Rel::correlated},
      {{"layers.0.q.bias", {47}}, Rel::opposed},
      {{"layers.0.k.weight", {64, 517}}, Rel::correlated},    // 33088 elements
      {{"layers.0.v.weight", {37, 29}}, Rel::parallel},       // cos > 0.9995
      {{"layers.0.o.weight", {3, 5, 7}}, Rel::antiparallel},  // cos < -0.9995
      {{"layers.1.wide", {5, 2003}}, Rel::independent},       // rows longer than a chunk
      {{"layers.1.narrow", {200, 3}}, Rel::correlated},       // rows shorter than the lanes
      {{"norm.weight", {1031}}, Rel::zero1},                  // v1 all zero
      {{"norm.bias", {29}}, Rel::zero0},                      // v0 all zero
      {{"f32.weight", {33, 65}, DType::F32}, Rel::correlated},
      {{"scalar", {}}, Rel::independent},                     // one element: |cos| = 1
      {{"layers.2.w", {41, 31}}, Rel::parallel_but_a_row},
      {{"layers.2.v", {6, 50}}, Rel::rows_alternate},
      {{"empty", {0}}, Rel::independent},
      {{"position_ids", {3, 11}, DType::I64}, Rel::independent},
  };
}

float slerp_value(const SlerpTensor& t, std::uint64_t j, int which) {
  const std::uint64_t id = name_id(t.spec.name);
  const double x = 0.1 * gauss(id, j, 0), y = 0.1 * gauss(id, j, 1);
  const std::uint64_t row = t.spec.shape.empty() ? 0 : j / t.spec.shape.back();
  if (t.rel == Rel::parallel_but_a_row && row == 3) return static_cast<float>(0.001 * (which == 0 ? x : y));
  if (which == 0) return t.rel == Rel::zero0 ? 0.0f : static_cast<float>(x);
  switch (t.rel) {
    case Rel::independent: return static_cast<float>(y);
    case Rel::correlated: return static_cast<float>(0.8 * x + 0.5 * y);
    case Rel::opposed: return static_cast<float>(-0.5 * x + 0.5 * y);
    case Rel::parallel: return static_cast<float>(1.5 * x + 0.01 * y);
    case Rel::antiparallel: return static_cast<float>(-x + 0.005 * y);
    case Rel::zero0: return static_cast<float>(y);
    case Rel::zero1: return 0.0f;
    case Rel::parallel_but_a_row: return static_cast<float>(1.5 * x + 0.01 * y);
    case Rel::rows_alternate: return static_cast<float>((row % 2 ? -1.5 : 1.5) * x + 0.01 * y);
  }
  return 0.0f;
}

struct SlerpRef {
  Outputs out;
  std::map<std::string, std::string> kind;  // "spherical", "parallel", "zero"
  std::map<std::string, double> cos, c0, c1;
  double angle_min = 1e9, angle_max = -1e9;  // degrees
};

SlerpRef slerp_reference(const std::vector<TensorValues>& inputs, double t) {
  SlerpRef ref;
  for (const TensorValues& tv : inputs) {
    const std::vector<double>&a = tv.v[0], &b = tv.v[1];
    const std::size_t n = a.size();
    std::vector<double>& out = ref.out[tv.name];
    if (n == 0) continue;
    const std::size_t row = static_cast<std::size_t>(row_length(tv.shape, n));
    const double ss0 = ordered_sum(n, row, [&](std::size_t k) { return a[k] * a[k]; });
    const double ss1 = ordered_sum(n, row, [&](std::size_t k) { return b[k] * b[k]; });
    const double dot = ordered_sum(n, row, [&](std::size_t k) { return a[k] * b[k]; });
    EXPECT_TRUE(accurate_sum(ss0, n, [&](std::size_t k) { return a[k] * a[k]; })) << tv.name;
    EXPECT_TRUE(accurate_sum(ss1, n, [&](std::size_t k) { return b[k] * b[k]; })) << tv.name;
    EXPECT_TRUE(accurate_sum(dot, n, [&](std::size_t k) { return a[k] * b[k]; })) << tv.name;
    const double n0 = std::sqrt(ss0), n1 = std::sqrt(ss1);
    double c0 = 1 - t, c1 = t;
    if (n0 == 0 || n1 == 0) {
      ref.kind[tv.name] = "zero";
    } else {
      const double cos = dot / (n0 * n1);
      const double angle = std::acos(std::clamp(cos, -1.0, 1.0)) * (180.0 / 3.14159265358979323846);  // as the plugin
      ref.angle_min = std::min(ref.angle_min, angle);
      ref.angle_max = std::max(ref.angle_max, angle);
      if (std::fabs(cos) > 0.9995) {
        ref.kind[tv.name] = "parallel";
      } else {
        ref.kind[tv.name] = "spherical";
        const double theta = std::acos(cos), s = std::sin(theta);
        c0 = std::sin(theta - theta * t) / s;
        c1 = std::sin(theta * t) / s;
      }
    }
    if (n0 != 0 && n1 != 0) ref.cos[tv.name] = dot / (n0 * n1);
    ref.c0[tv.name] = c0;
    ref.c1[tv.name] = c1;
    out.resize(n);
    for (std::size_t k = 0; k < n; ++k) out[k] = c0 * a[k] + c1 * b[k];
  }
  return ref;
}

// ---------------------------------------------------------------------------------------------
// model_stock scenario and reference
// ---------------------------------------------------------------------------------------------

// Task vectors d_i = 0.02 (rho s + sqrt(1 - rho^2) e_i) with s shared by the models and e_i
// each model's own (N(0,1) per element), so cos(d_i, d_j) ~ rho^2. Variants per tensor.
enum class Stock {
  typical,     // rho = 0.8
  weak,        // rho = 0.3
  unchanged1,  // model 1 equals the base (its task vector is zero)
  unchanged,   // every model equals the base
  negative,    // model 1's shared part has the opposite sign
  rows,        // rho varies by row; every 7th row unchanged in every model
  signs        // f32, rows of one element: +delta / opposite signs / model 1 unchanged
};

struct StockTensor {
  Spec spec;
  Stock kind;
};

std::vector<StockTensor> stock_tensors() {
  return {
      {{"embed.weight", {97, 101}}, Stock::typical},  // several chunks
      {{"layers.0.q.weight", {61, 47}}, Stock::weak},
      {{"layers.0.q.bias", {47}}, Stock::negative},
      {{"layers.0.k.weight", {64, 517}}, Stock::rows},  // 33088 elements
      {{"layers.0.v.weight", {37, 29}}, Stock::unchanged1},
      {{"layers.0.o.weight", {3, 5, 7}}, Stock::rows},
      {{"layers.1.wide", {5, 2003}}, Stock::typical},  // rows longer than a chunk
      {{"layers.1.narrow", {200, 3}}, Stock::rows},    // rows shorter than the lanes
      {{"norm.weight", {1031}}, Stock::unchanged},
      {{"f32.weight", {33, 65}, DType::F32}, Stock::rows},
      {{"f32.signs", {40, 1}, DType::F32}, Stock::signs},
      {{"scalar", {}}, Stock::typical},
      {{"empty", {0}}, Stock::typical},
      {{"position_ids", {3, 11}, DType::I64}, Stock::typical},
  };
}

float stock_base(const StockTensor& t, std::uint64_t j) {
  if (t.kind == Stock::signs) return static_cast<float>(static_cast<int>(j % 9) - 4) / 64.0f;  // exact
  return static_cast<float>(0.2 * gauss(name_id(t.spec.name), j, 0));
}

// Model i (0-based) of a stock tensor.
float stock_value(const StockTensor& t, std::uint64_t j, std::size_t i) {
  const float b = stock_base(t, j);
  const std::uint64_t id = name_id(t.spec.name);
  const std::uint64_t row = j / row_length(t.spec.shape, numel(t.spec.shape));
  if (t.kind == Stock::signs) {
    const float delta = static_cast<float>(j % 5 + 1) / 256.0f;  // exact in f32, as b +- delta
    switch (row % 3) {
      case 0: return b + delta;                         // same direction: cos 1
      case 1: return i == 1 ? b - delta : b + delta;    // opposite: cos -1 (the pole for N = 2)
      default: return i == 1 ? b : b + delta;           // model 1 unchanged: cos 0
    }
  }
  if (t.kind == Stock::unchanged || (t.kind == Stock::unchanged1 && i == 1)) return b;
  if (t.kind == Stock::rows && row % 7 == 3) return b;
  double rho = t.kind == Stock::weak ? 0.3 : 0.8;
  if (t.kind == Stock::rows) rho = static_cast<double>(row % 5) / 4.0;
  double shared = gauss(id, j, 1);
  if (t.kind == Stock::negative && i == 1) shared = -shared;
  const double d = 0.02 * (rho * shared + std::sqrt(1 - rho * rho) * gauss(id, j, 2 + i));
  return static_cast<float>(b + d);
}

struct StockRef {
  Outputs out;
  std::vector<double> t;                   // every tensor's (or row's) t
  std::map<std::string, double> tensor_t, tensor_cos;  // not filter_wise
  std::map<std::string, std::vector<double>> row_t;     // filter_wise
  std::uint64_t some_zero = 0, all_zero = 0, pole = 0;
};

// inputs: v[0] the base, v[1..N] the models.
StockRef stock_reference(const std::vector<TensorValues>& inputs, bool filter_wise) {
  StockRef ref;
  for (const TensorValues& tv : inputs) {
    const std::size_t n = tv.v[0].size(), N = tv.v.size() - 1;
    std::vector<double>& out = ref.out[tv.name];
    if (n == 0) continue;
    const std::size_t row = static_cast<std::size_t>(row_length(tv.shape, n));
    std::vector<std::vector<double>> d(N, std::vector<double>(n));
    for (std::size_t i = 0; i < N; ++i)
      for (std::size_t k = 0; k < n; ++k) d[i][k] = tv.v[i + 1][k] - tv.v[0][k];
    // One statistics group: the whole tensor, or one row.
    auto t_of = [&](std::size_t first, std::size_t len) {
      auto sum = [&](std::size_t i, std::size_t j) {
        const auto term = [&](std::size_t k) { return d[i][first + k] * d[j][first + k]; };
        const double v = ordered_sum(len, row < len ? row : len, term);
        EXPECT_TRUE(accurate_sum(v, len, term)) << tv.name;
        return v;
      };
      std::vector<double> s(N);
      std::size_t zero = 0;
      for (std::size_t i = 0; i < N; ++i) zero += (s[i] = sum(i, i)) == 0;
      double cos_sum = 0;
      for (std::size_t i = 0; i < N; ++i)
        for (std::size_t j = i + 1; j < N; ++j) {
          const double norms = std::sqrt(s[i]) * std::sqrt(s[j]);
          cos_sum += norms > 0 ? std::clamp(sum(i, j) / norms, -1.0, 1.0) : 0.0;
        }
      const double nn = static_cast<double>(N);
      const double cos = cos_sum / static_cast<double>(N * (N - 1) / 2);
      const double denom = 1 + (nn - 1) * cos;
      const double t = denom > 0 ? nn * cos / denom : 0.0;
      ref.t.push_back(t);
      if (filter_wise) {
        ref.row_t[tv.name].push_back(t);
      } else {
        ref.tensor_cos[tv.name] = cos;
      }
      ref.some_zero += zero > 0;
      ref.all_zero += zero == N;
      ref.pole += denom > 0 ? 0 : 1;
      return t;
    };
    std::vector<double> t_of_element(n);
    if (filter_wise) {
      for (std::size_t r0 = 0; r0 < n; r0 += row) std::fill_n(t_of_element.begin() + static_cast<std::ptrdiff_t>(r0), row, t_of(r0, row));
    } else {
      std::fill(t_of_element.begin(), t_of_element.end(), ref.tensor_t[tv.name] = t_of(0, n));
    }
    out.resize(n);
    for (std::size_t k = 0; k < n; ++k) {
      const double t = t_of_element[k];
      double sum = tv.v[1][k];
      for (std::size_t i = 2; i <= N; ++i) sum += tv.v[i][k];
      out[k] = (t / static_cast<double>(N)) * sum + (1 - t) * tv.v[0][k];
    }
  }
  return ref;
}

// ---------------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------------

class SlerpStockTest : public conflux_test::StrategyFixture {
 protected:
  // Checkpoints "a" (v0) and "b" (v1).
  void write_slerp() {
    const auto ts = slerp_tensors();
    std::vector<Spec> specs;
    for (const auto& t : ts) specs.push_back(t.spec);
    for (int which : {0, 1})
      write_checkpoint(dir_ / (which ? "b" : "a"), specs,
                       [&](std::size_t i, std::uint64_t j) { return slerp_value(ts[i], j, which); });
  }

  // Checkpoints "base" and "m0" .. "m{n-1}".
  void write_stock(std::size_t n) {
    const auto ts = stock_tensors();
    std::vector<Spec> specs;
    for (const auto& t : ts) specs.push_back(t.spec);
    write_checkpoint(dir_ / "base", specs, [&](std::size_t i, std::uint64_t j) { return stock_base(ts[i], j); });
    for (std::size_t m = 0; m < n; ++m)
      write_checkpoint(dir_ / ("m" + std::to_string(m)), specs,
                       [&](std::size_t i, std::uint64_t j) { return stock_value(ts[i], j, m); });
  }

  JobConfig slerp_job(double t, const std::string& out, bool with_base = true) {
    JobConfig j;
    j.name = "test";
    j.strategy = "slerp";
    if (with_base) {
      j.base = dir_ / "a";
      j.models = {dir_ / "b"};
    } else {
      j.models = {dir_ / "a", dir_ / "b"};
    }
    j.output = dir_ / out;
    j.params = {num("t", t)};
    return j;
  }

  JobConfig stock_job(std::size_t n, bool filter_wise, const std::string& out) {
    JobConfig j;
    j.name = "test";
    j.strategy = "model_stock";
    j.base = dir_ / "base";
    for (std::size_t m = 0; m < n; ++m) j.models.push_back(dir_ / ("m" + std::to_string(m)));
    j.output = dir_ / out;
    j.params = {flag("filter_wise", filter_wise)};
    return j;
  }

  std::string bytes(const std::string& out) const { return conflux_test::read_file(dir_ / out / "model.safetensors"); }

  // Runs model_stock and checks it against the reference; returns the reference.
  StockRef check_stock(std::size_t n, bool filter_wise, const std::string& out, std::optional<DType> dtype = {}) {
    JobConfig j = stock_job(n, filter_wise, out);
    j.out_dtype = dtype;
    const std::string raw = run(j).result.report;
    std::vector<fs::path> dirs{dir_ / "base"};
    for (std::size_t m = 0; m < n; ++m) dirs.push_back(dir_ / ("m" + std::to_string(m)));
    StockRef ref = stock_reference(read_values(dirs), filter_wise);
    EXPECT_LE(check_output(dir_ / out, ref.out), 1.0);
    const json::object rep = report(out);
    EXPECT_EQ(count(rep, "models"), n);
    EXPECT_EQ(rep.at("filter_wise").as_bool(), filter_wise);
    EXPECT_EQ(count(rep, "tensors"), 12u);  // the non-empty floating tensors
    EXPECT_EQ(count(rep, "rows"), filter_wise ? ref.t.size() : 0u);
    EXPECT_EQ(raw_number(raw, "", "t_min"), *std::min_element(ref.t.begin(), ref.t.end()));
    EXPECT_EQ(raw_number(raw, "", "t_max"), *std::max_element(ref.t.begin(), ref.t.end()));
    double sum = 0;
    for (double t : ref.t) sum += t;
    EXPECT_TRUE(near_rel(number(rep, "t_mean"), sum / static_cast<double>(ref.t.size()), 1e-9));
    EXPECT_EQ(count(rep, "with_zero_task_vector"), ref.some_zero);
    EXPECT_EQ(count(rep, "all_task_vectors_zero"), ref.all_zero);
    EXPECT_EQ(count(rep, "at_pole"), ref.pole);
    // Per tensor, to the bit (%.17g): the statistics follow the documented order.
    const json::array& per = rep.at("per_tensor").as_array();
    EXPECT_EQ(per.size(), 12u);
    for (const json::value& v : per) {
      const json::object& o = v.as_object();
      const std::string name(o.at("name").as_string());
      SCOPED_TRACE(name);
      if (filter_wise) {
        const std::vector<double>& rt = ref.row_t.at(name);
        double rsum = 0;
        for (double t : rt) rsum += t;
        EXPECT_EQ(count(o, "rows"), rt.size());
        EXPECT_EQ(raw_number(raw, name, "t_min"), *std::min_element(rt.begin(), rt.end()));
        EXPECT_EQ(raw_number(raw, name, "t_max"), *std::max_element(rt.begin(), rt.end()));
        EXPECT_EQ(raw_number(raw, name, "t_mean"), rsum / static_cast<double>(rt.size()));
      } else {
        EXPECT_EQ(raw_number(raw, name, "cos"), ref.tensor_cos.at(name));
        EXPECT_EQ(raw_number(raw, name, "t"), ref.tensor_t.at(name));
      }
    }
    return ref;
  }
};

// ---------------------------------------------------------------------------------------------
// slerp
// ---------------------------------------------------------------------------------------------

TEST_F(SlerpStockTest, SlerpMatchesFloat64Reference) {
  write_slerp();
  const auto inputs = read_values({dir_ / "a", dir_ / "b"});
  for (const double t : {0.3, 0.75}) {
    SCOPED_TRACE("t = " + std::to_string(t));
    const SlerpRef ref = slerp_reference(inputs, t);
    const std::string out = "slerp" + std::to_string(static_cast<int>(t * 100));
    const std::string raw = run(slerp_job(t, out)).result.report;
    EXPECT_LE(check_output(dir_ / out, ref.out), 1.0);
    JobConfig j32 = slerp_job(t, out + "_f32");
    j32.out_dtype = DType::F32;
    run(j32);
    EXPECT_LE(check_output(dir_ / (out + "_f32"), ref.out), 0.5);  // the reference rounded once

    // The scenario covers every branch, as intended.
    const std::map<std::string, std::string> want{
        {"embed.weight", "spherical"},    {"layers.0.q.weight", "spherical"}, {"layers.0.q.bias", "spherical"},
        {"layers.0.k.weight", "spherical"}, {"layers.0.v.weight", "parallel"}, {"layers.0.o.weight", "parallel"},
        {"layers.1.wide", "spherical"},   {"layers.1.narrow", "spherical"},   {"norm.weight", "zero"},
        {"norm.bias", "zero"},            {"f32.weight", "spherical"},        {"scalar", "parallel"},
        {"layers.2.w", "parallel"},       {"layers.2.v", "spherical"}};
    EXPECT_EQ(ref.kind, want);
    const json::object rep = report(out);
    EXPECT_EQ(number(rep, "t"), t);
    EXPECT_EQ(rep.at("v0").as_string(), "base");
    EXPECT_EQ(rep.at("v1").as_string(), "models[0]");
    EXPECT_EQ(count(rep, "tensors"), 14u);
    EXPECT_EQ(count(rep, "spherical"), 8u);
    EXPECT_EQ(count(rep, "linear_near_parallel"), 4u);
    EXPECT_EQ(count(rep, "linear_zero_norm"), 2u);
    // Finished in one read: the linear tensors whose every row is near-parallel or of zero norm
    // (all but layers.2.w).
    EXPECT_EQ(count(rep, "one_read"), 5u);
    // To the bit (%.17g): the plugin's statistics are the reference's.
    EXPECT_EQ(raw_number(raw, "", "angle_min_degrees"), ref.angle_min);
    EXPECT_EQ(raw_number(raw, "", "angle_max_degrees"), ref.angle_max);
    const json::array& per = rep.at("per_tensor").as_array();
    EXPECT_EQ(per.size(), 14u);
    const std::map<std::string, std::string> method{
        {"spherical", "spherical"}, {"parallel", "linear_near_parallel"}, {"zero", "linear_zero_norm"}};
    for (const json::value& v : per) {
      const json::object& o = v.as_object();
      const std::string name(o.at("name").as_string());
      SCOPED_TRACE(name);
      EXPECT_EQ(o.at("method").as_string(), method.at(ref.kind.at(name)));
      EXPECT_EQ(o.contains("cos"), ref.cos.count(name) == 1);
      if (ref.cos.count(name)) {
        EXPECT_EQ(raw_number(raw, name, "cos"), ref.cos.at(name));
      }
      EXPECT_EQ(raw_number(raw, name, "c0"), ref.c0.at(name));
      EXPECT_EQ(raw_number(raw, name, "c1"), ref.c1.at(name));
    }
  }
  // The integer tensor is copied from v0.
  const Checkpoint out = Checkpoint::open(dir_ / "slerp30"), a = Checkpoint::open(dir_ / "a");
  const auto x = out.view(out.at("position_ids")).bytes, y = a.view(a.at("position_ids")).bytes;
  ASSERT_EQ(x.size(), y.size());
  EXPECT_EQ(0, std::memcmp(x.data(), y.data(), x.size()));
}

TEST_F(SlerpStockTest, SlerpLinearBranchesAreLerp) {
  // Near-parallel, antiparallel and zero-norm tensors are (1 - t) v0 + t v1 exactly as defined,
  // and the spherical ones are not (the output shows which branch ran).
  write_slerp();
  const double t = 0.3;
  run(slerp_job(t, "s"));
  const auto inputs = read_values({dir_ / "a", dir_ / "b"});
  const SlerpRef ref = slerp_reference(inputs, t);
  for (const TensorValues& tv : inputs) {
    if (tv.v[0].empty()) continue;
    SCOPED_TRACE(tv.name);
    const auto got = elements_of(dir_ / "s", tv.name);
    std::size_t off_lerp = 0;
    for (std::size_t k = 0; k < got.size(); ++k) {
      const double lerp = (1 - t) * tv.v[0][k] + t * tv.v[1][k];
      const double err = std::abs(got[k] - lerp) / ulp(DType::BF16, lerp);
      off_lerp += err > 1.0;
    }
    if (ref.kind.at(tv.name) == "spherical") {
      if (got.size() > 100) {
        EXPECT_GT(off_lerp, got.size() / 4);
      }
    } else {
      EXPECT_EQ(off_lerp, 0u);
    }
  }
  // The zero tensors: v1 = 0 gives (1 - t) v0, v0 = 0 gives t v1.
  for (const TensorValues& tv : inputs) {
    if (tv.name != "norm.weight" && tv.name != "norm.bias") continue;
    const auto got = elements_of(dir_ / "s", tv.name);
    const bool v1_zero = tv.name == "norm.weight";
    for (std::size_t k = 0; k < got.size(); ++k) {
      EXPECT_EQ(v1_zero ? tv.v[1][k] : tv.v[0][k], 0.0);
      const double want = v1_zero ? 0.7 * tv.v[0][k] : 0.3 * tv.v[1][k];
      EXPECT_LE(std::abs(got[k] - want), ulp(DType::BF16, want)) << tv.name << "[" << k << "]";
    }
  }
}

TEST_F(SlerpStockTest, SlerpEndpointsReproduceTheInputs) {
  write_slerp();
  run(slerp_job(0.0, "t0"));
  run(slerp_job(1.0, "t1"));
  for (const auto& [out, src] : {std::pair<std::string, std::string>{"t0", "a"}, {"t1", "b"}}) {
    SCOPED_TRACE(out);
    const Checkpoint o = Checkpoint::open(dir_ / out), s = Checkpoint::open(dir_ / src);
    for (const TensorRef& t : s.tensors()) {
      if (!dtype_is_mergeable(t.info->dtype)) continue;
      const auto x = o.view(o.at(t.name())).bytes, y = s.view(t).bytes;
      ASSERT_EQ(x.size(), y.size()) << t.name();
      EXPECT_EQ(0, std::memcmp(x.data(), y.data(), x.size())) << t.name();
    }
  }
}

TEST_F(SlerpStockTest, SlerpBasePlusOneEqualsTwoModelsWithoutBase) {
  write_slerp();
  run(slerp_job(0.4, "with_base"));
  run(slerp_job(0.4, "two_models", false));
  EXPECT_EQ(bytes("with_base"), bytes("two_models"));
  EXPECT_EQ(report("two_models").at("v0").as_string(), "models[0]");
  EXPECT_EQ(report("two_models").at("v1").as_string(), "models[1]");
  // Swapping the models is t -> 1 - t.
  JobConfig swapped = slerp_job(0.6, "swapped", false);
  std::swap(swapped.models[0], swapped.models[1]);
  run(swapped);
  const auto inputs = read_values({dir_ / "b", dir_ / "a"});
  EXPECT_LE(check_output(dir_ / "swapped", slerp_reference(inputs, 0.6).out), 1.0);
}

TEST_F(SlerpStockTest, SlerpIsBitIdenticalAcrossThreadsAndChunks) {
  write_slerp();
  // The report holds every tensor's cosine and coefficients (%.17g): equal reports mean equal
  // statistics, bit for bit, not only outputs that round alike.
  const std::string first_report = run(slerp_job(0.3, "r0"), 2, 1000).result.report;
  const std::string first = bytes("r0");
  int i = 0;
  for (const auto& [threads, chunk] : std::vector<std::pair<unsigned, std::uint64_t>>{
           {1, 1000}, {2, 4096}, {1, 333}, {2, 0 /* the engine's default */}, {2, 100000}, {1, 7}}) {
    const std::string out = "r" + std::to_string(++i);
    EXPECT_EQ(first_report, run(slerp_job(0.3, out), threads, chunk).result.report) << threads << " threads, chunk " << chunk;
    EXPECT_EQ(first, bytes(out)) << threads << " threads, chunk " << chunk;
  }
}

// Float32 arithmetic (BF16 output from float32 inputs) where the two terms cancel. At t = 0.5 a
// spherical tensor has c0 == c1 (theta - theta t == theta t), so entries with v1 = -v0 (1 + tiny)
// cancel; at t = 0.3 an antiparallel tensor (linear: c0 = 0.7, c1 = 0.3) with v1 = -(7/3) v0
// (1 + tiny) does. Float32 cannot see the remainder: those entries are computed again in double
// (plugins/common/float_guard.h), so every entry stays within 1 ulp of the reference.
TEST_F(SlerpStockTest, SlerpStaysExactWhereTermsCancel) {
  const std::vector<Spec> specs = {{"sph", {61, 37}, DType::F32}, {"anti", {1001}, DType::F32}};
  auto r = [&](std::size_t ti, std::uint64_t j, std::uint64_t c) { return rnd(name_id(specs[ti].name), j, c); };
  auto v0 = [&](std::size_t ti, std::uint64_t j) { return static_cast<float>(0.5 + 0.5 * r(ti, j, 1)); };
  auto v1 = [&](std::size_t ti, std::uint64_t j) {
    const double x = v0(ti, j), tiny = std::ldexp(r(ti, j, 3) - 0.5, -20);
    if (ti == 1) return static_cast<float>(-(7.0 / 3.0) * x * (1 + tiny));
    if (j % 3 == 0) return static_cast<float>(-x * (1 + tiny));  // cancelling entries
    return static_cast<float>(r(ti, j, 2) - 0.5);                 // the rest keep the angle wide
  };
  write_checkpoint(dir_ / "a", specs, v0);
  write_checkpoint(dir_ / "b", specs, v1);
  const auto inputs = read_values({dir_ / "a", dir_ / "b"});
  for (const double t : {0.5, 0.3}) {
    SCOPED_TRACE("t = " + std::to_string(t));
    JobConfig j = slerp_job(t, "cancel" + std::to_string(static_cast<int>(t * 10)));
    j.out_dtype = DType::BF16;
    run(j);
    const SlerpRef ref = slerp_reference(inputs, t);
    EXPECT_EQ(ref.kind.at("sph"), "spherical");
    EXPECT_EQ(ref.kind.at("anti"), "parallel");
    EXPECT_LE(check_output(j.output, ref.out), 1.0);
  }
}

// ---------------------------------------------------------------------------------------------
// model_stock
// ---------------------------------------------------------------------------------------------

TEST_F(SlerpStockTest, ModelStockMatchesFloat64Reference) {
  write_stock(4);
  for (const std::size_t n : {2u, 3u, 4u}) {  // the register kernels (more models: GeneralPath below)
    SCOPED_TRACE(std::to_string(n) + " models");
    const std::string out = "stock" + std::to_string(n);
    const StockRef ref = check_stock(n, false, out);
    check_stock(n, false, out + "_f32", DType::F32);
    // The special cases happen: one model unchanged in a tensor, every model in another.
    EXPECT_GE(ref.some_zero, 2u);
    EXPECT_EQ(ref.all_zero, 1u);
    EXPECT_EQ(ref.pole, 0u);
    // A tensor nobody changed is the base, bit for bit.
    EXPECT_EQ(elements_of(dir_ / out, "norm.weight"), elements_of(dir_ / "base", "norm.weight"));
  }
  // t of the typical tensor is near its design value (cos ~ rho^2 = 0.64 for every pair).
  const auto inputs = read_values({dir_ / "base", dir_ / "m0", dir_ / "m1", dir_ / "m2"});
  const StockRef r3 = stock_reference(inputs, false);
  ASSERT_EQ(r3.tensor_t.size(), 12u);
  EXPECT_NEAR(r3.tensor_t.at("embed.weight"), 3 * 0.64 / (1 + 2 * 0.64), 0.03);
  EXPECT_NEAR(r3.tensor_t.at("layers.0.q.weight"), 3 * 0.09 / (1 + 2 * 0.09), 0.05);
  EXPECT_LT(r3.tensor_t.at("layers.0.q.bias"), 0.0);  // model 1 opposed to the others
}

TEST_F(SlerpStockTest, ModelStockFilterWiseMatchesFloat64Reference) {
  write_stock(4);
  for (const std::size_t n : {2u, 3u, 4u}) {
    SCOPED_TRACE(std::to_string(n) + " models");
    const std::string out = "fw" + std::to_string(n);
    const StockRef ref = check_stock(n, true, out);
    check_stock(n, true, out + "_f32", DType::F32);
    // Rows differ: t ranges widely, unchanged rows exist, and with two models the rows of
    // f32.signs whose task vectors are exactly opposite hit the pole (t = 0: the base).
    EXPECT_EQ(ref.all_zero, 46u);  // rows r % 7 == 3 of the "rows" tensors, and norm.weight
    EXPECT_EQ(ref.pole, n == 2 ? 13u : 0u);
    const auto [lo, hi] = std::minmax_element(ref.t.begin(), ref.t.end());
    EXPECT_LT(*lo, 0.0);
    EXPECT_EQ(*hi, 1.0);
    // Per row, not per tensor: f32.signs is the mean, the base or the base again, row by row.
    const auto got = elements_of(dir_ / out, "f32.signs"), base = elements_of(dir_ / "base", "f32.signs");
    for (std::size_t r = 0; r < got.size(); ++r) {
      const double delta = static_cast<double>(r % 5 + 1) / 256.0;
      if (r % 3 == 0) {
        EXPECT_EQ(got[r], base[r] + delta) << r;
      } else if (n == 2) {
        EXPECT_EQ(got[r], base[r]) << r;
      }
    }
  }
  // filter_wise changes the result.
  run(stock_job(3, false, "per_tensor"));
  EXPECT_NE(elements_of(dir_ / "fw3", "layers.0.k.weight"), elements_of(dir_ / "per_tensor", "layers.0.k.weight"));
}

TEST_F(SlerpStockTest, ModelStockIsBitIdenticalAcrossThreadsAndChunks) {
  write_stock(3);
  for (const bool fw : {false, true}) {
    SCOPED_TRACE(fw ? "filter_wise" : "per tensor");
    const std::string tag = fw ? "fw" : "pt";
    const std::string first_report = run(stock_job(3, fw, tag + "0"), 2, 1000).result.report;
    const std::string first = bytes(tag + "0");
    int i = 0;
    for (const auto& [threads, chunk] : std::vector<std::pair<unsigned, std::uint64_t>>{
             {1, 1000}, {2, 4096}, {1, 333}, {2, 0}, {2, 100000}, {1, 7}}) {
      const std::string out = tag + std::to_string(++i);
      EXPECT_EQ(first_report, run(stock_job(3, fw, out), threads, chunk).result.report)
          << threads << " threads, chunk " << chunk;
      EXPECT_EQ(first, bytes(out)) << threads << " threads, chunk " << chunk;
    }
  }
}

// Float32 arithmetic (BF16 output from float32 inputs) where the two terms cancel. Rows of one
// element make every cosine +-1: task vectors d_1, d_2 > 0 and d_3 < 0 give a mean cosine of
// -1/3 and t = -3 (up to rounding), so out = -(theta_1 + theta_2 + theta_3) + 4 base, which the
// models are built to cancel (up to a tiny remainder). Float32 cannot see the remainder: those
// entries are computed again in double (plugins/common/float_guard.h), so every entry stays within
// 1 ulp of the reference.
TEST_F(SlerpStockTest, ModelStockStaysExactWhereTermsCancel) {
  const std::vector<Spec> specs = {{"rows", {301, 1}, DType::F32}};
  auto r = [&](std::uint64_t j, std::uint64_t c) { return rnd(name_id("rows"), j, c); };
  auto base = [&](std::size_t, std::uint64_t j) { return static_cast<float>(0.5 + 0.5 * r(j, 1)); };
  auto model = [&](std::uint64_t j, std::size_t i) {
    const double b = base(0, j), d0 = b * (0.6 + 0.4 * r(j, 2)), d1 = b * (0.6 + 0.4 * r(j, 3));
    const double tiny = std::ldexp(r(j, 4) - 0.5, -20);
    const double d[3] = {d0, d1, b * (1 + 4 * tiny) - d0 - d1};  // sum d = b (1 + 4 tiny), d_3 < 0
    return static_cast<float>(b + d[i]);
  };
  write_checkpoint(dir_ / "base", specs, base);
  for (std::size_t m = 0; m < 3; ++m)
    write_checkpoint(dir_ / ("m" + std::to_string(m)), specs,
                     [&](std::size_t, std::uint64_t j) { return model(j, m); });
  JobConfig j = stock_job(3, true, "cancel");
  j.out_dtype = DType::BF16;
  run(j);
  const StockRef ref = stock_reference(read_values({dir_ / "base", dir_ / "m0", dir_ / "m1", dir_ / "m2"}), true);
  for (const double t : ref.t) EXPECT_NEAR(t, -3.0, 1e-12);
  EXPECT_LE(check_output(j.output, ref.out), 1.0);
}

// The statistics kernels (common/stock_lanes.h): this CPU's (AVX-512 where it has it) and the
// portable one give, to the bit, the lanes the documented order defines, computed here one
// element at a time: lane l of statistic q is the sum over j = l, l + 16, ... of d_i d_j, each
// product rounded to double, then added. Rows of every length around the vector widths, inputs
// of several magnitudes (products that round, sums that cancel), float32 and stored BF16.
TEST(ModelStockKernels, LanesFollowTheDocumentedOrderOnEveryPath) {
  namespace sl = conflux::plugins::stock_lanes;
  std::uint64_t state = 0x9E3779B97F4A7C15ull;
  auto uniform = [&] {  // [0, 1), 53 bits
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return static_cast<double>(state >> 11) * 0x1p-53;
  };
  auto check = [&](auto zero, std::uint32_t n, std::size_t len) {
    using In = decltype(zero);
    SCOPED_TRACE(std::string(std::is_same_v<In, float> ? "float32" : "bf16") + ", " + std::to_string(n) +
                 " models, row of " + std::to_string(len));
    std::vector<std::vector<In>> x(n, std::vector<In>(len));
    std::vector<In> b(len);
    auto make = [&](double v) -> In {
      if constexpr (std::is_same_v<In, float>) return static_cast<float>(v);
      else return static_cast<std::uint16_t>(conflux::f32_to_bf16_bits(static_cast<float>(v)));
    };
    for (std::size_t k = 0; k < len; ++k) {
      const double base = (uniform() - 0.5) * std::ldexp(1.0, static_cast<int>(uniform() * 12) - 6);
      b[k] = make(base);
      for (std::uint32_t i = 0; i < n; ++i)  // unchanged, a small change, or a large one
        x[i][k] = uniform() < 0.3 ? b[k] : make(base + (uniform() - 0.5) * (uniform() < 0.5 ? 1e-3 : 3.0));
    }
    const std::size_t stats = n + n * (n - 1) / 2;
    std::vector<double> want(stats * sl::kLanes, 0.0);
    for (std::size_t k = 0; k < len; ++k) {
      std::vector<double> d(n);
      for (std::uint32_t i = 0; i < n; ++i)
        d[i] = static_cast<double>(conflux::plugins::value(x[i].data(), k)) -
               static_cast<double>(conflux::plugins::value(b.data(), k));
      std::size_t q = 0;
      for (std::uint32_t i = 0; i < n; ++i, ++q) want[q * sl::kLanes + k % sl::kLanes] += d[i] * d[i];
      for (std::uint32_t i = 0; i < n; ++i)
        for (std::uint32_t j = i + 1; j < n; ++j, ++q) want[q * sl::kLanes + k % sl::kLanes] += d[i] * d[j];
    }
    std::vector<const In*> xs;
    for (const auto& v : x) xs.push_back(v.data());
    for (const auto kernel : {sl::row_kernel<In>(n), sl::portable_row_kernel<In>(n)}) {
      ASSERT_NE(kernel, nullptr);
      std::vector<double> got(stats * sl::kLanes, -1.0);
      kernel(xs.data(), b.data(), len, got.data());
      for (std::size_t q = 0; q < got.size(); ++q)
        ASSERT_EQ(std::memcmp(&got[q], &want[q], sizeof(double)), 0)
            << "statistic " << q / sl::kLanes << ", lane " << q % sl::kLanes << ": " << got[q] << " vs " << want[q];
    }
  };
  for (std::uint32_t n = 2; n <= 4; ++n)
    for (const std::size_t len : {1, 3, 15, 16, 17, 31, 100, 511, 512, 513, 1043}) {
      check(0.0f, n, len);
      check(std::uint16_t{0}, n, len);
    }
  EXPECT_EQ(sl::row_kernel<float>(5), nullptr);
}

TEST_F(SlerpStockTest, ModelStockGeneralPathMatchesFloat64Reference) {
  // More models than the register kernels take (four): the statistics go through blocks, and the
  // map sums the models four at a time (5 = 4 + 1, 6 = 4 + 2). Same references, same bits.
  write_stock(6);
  for (const std::size_t n : {5u, 6u}) {
    for (const bool fw : {false, true}) {
      SCOPED_TRACE(std::to_string(n) + " models" + (fw ? ", filter_wise" : ""));
      const std::string out = std::string(fw ? "gfw" : "gpt") + std::to_string(n);
      const StockRef ref = check_stock(n, fw, out);
      check_stock(n, fw, out + "_f32", DType::F32);
      EXPECT_EQ(ref.pole, 0u);
      EXPECT_EQ(elements_of(dir_ / out, "norm.weight"), elements_of(dir_ / "base", "norm.weight"));
    }
  }
  const std::string first_report = run(stock_job(5, false, "g0"), 2, 1000).result.report;
  const std::string first = bytes("g0");
  int i = 0;
  for (const auto& [threads, chunk] : std::vector<std::pair<unsigned, std::uint64_t>>{{1, 333}, {2, 0}, {1, 7}}) {
    const std::string out = "g" + std::to_string(++i);
    EXPECT_EQ(first_report, run(stock_job(5, false, out), threads, chunk).result.report)
        << threads << " threads, chunk " << chunk;
    EXPECT_EQ(first, bytes(out)) << threads << " threads, chunk " << chunk;
  }
}

// ---------------------------------------------------------------------------------------------
// Bad jobs: clear errors before any tensor is written
// ---------------------------------------------------------------------------------------------

TEST_F(SlerpStockTest, BadJobsFailBeforeWritingAnything) {
  write_slerp();
  write_checkpoint(dir_ / "c", {{"x", {3}}}, [](std::size_t, std::uint64_t j) { return static_cast<float>(j); });
  write_stock(1);
  const auto nothing_written = [&] {
    EXPECT_FALSE(fs::exists(dir_ / "out"));
    for (const auto& name : entries(dir_.path())) EXPECT_FALSE(name.starts_with(".")) << name;
  };
  // slerp: three models, a base and two models, one model alone.
  JobConfig three = slerp_job(0.5, "out", false);
  three.models.push_back(dir_ / "c");
  expect_error<ConfigError>([&] { run(three); }, {"'models'", "strategy 'slerp'", "1 to 2 models", "lists 3"});
  nothing_written();
  JobConfig base_two = slerp_job(0.5, "out");
  base_two.models.push_back(dir_ / "a");
  expect_error<MergeError>([&] { run(base_two); },
                           {"strategy 'slerp'", "exactly two checkpoints", "this job gives a base and 2 models"});
  nothing_written();
  JobConfig alone = slerp_job(0.5, "out", false);
  alone.models.pop_back();
  expect_error<MergeError>([&] { run(alone); }, {"exactly two checkpoints", "this job gives no base and 1 model"});
  nothing_written();
  // slerp: t missing or out of range.
  JobConfig no_t = slerp_job(0.5, "out");
  no_t.params.clear();
  expect_error<ConfigError>([&] { run(no_t); }, {"params.t", "missing", "slerp"});
  nothing_written();
  expect_error<ConfigError>([&] { run(slerp_job(1.5, "out")); }, {"params.t", "[0, 1]", "1.5"});
  nothing_written();
  expect_error<ConfigError>([&] { run(slerp_job(-0.1, "out")); }, {"params.t", "[0, 1]"});
  nothing_written();
  // model_stock: one fine-tuned model, no base.
  expect_error<ConfigError>([&] { run(stock_job(1, false, "out")); },
                            {"'models'", "strategy 'model_stock'", "at least 2 models", "lists 1"});
  nothing_written();
  JobConfig no_base = stock_job(1, false, "out");
  no_base.models.push_back(dir_ / "m0");
  no_base.base.reset();
  expect_error<ConfigError>([&] { run(no_base); }, {"'base'", "model_stock"});
  nothing_written();
  JobConfig bad_flag = stock_job(1, false, "out");
  bad_flag.models.push_back(dir_ / "m0");
  bad_flag.params = {num("filter_wise", 2)};
  expect_error<ConfigError>([&] { run(bad_flag); }, {"params.filter_wise"});
  nothing_written();
}

}  // namespace
