// The merge engine end to end through the library (run_job): values against float64 references
// computed here, determinism across thread counts and chunk sizes, copying of non-floating
// tensors, the checks of the plan, and that a failed merge publishes nothing.
#include <atomic>
#include <cmath>
#include <fstream>
#include <random>
#include <sstream>

#include <boost/json.hpp>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <openssl/evp.h>

#include "conflux/checkpoint.h"
#include "conflux/convert.h"
#include "conflux/merge.h"
#include "conflux/writer.h"
#include "test_util.h"
#include "strategy_test_util.h"

namespace {

namespace fs = std::filesystem;
using namespace conflux;
using ::testing::HasSubstr;

using conflux_test::Spec;
using conflux_test::numel;
using conflux_test::ulp;
using conflux_test::num;
using conflux_test::flag;
using conflux_test::list;

// Odd sizes: none is a multiple of a vector width or of the chunk sizes used below.
std::vector<Spec> default_specs(DType t) {
  return {{"embed.weight", {131, 37}, t}, {"layer.0.w", {63, 41}, t}, {"layer.0.bias", {41}, t},
          {"layer.1.w", {5, 7, 9}, t},    {"scalar", {}, t},          {"empty", {0}, t},
          {"norm.weight", {1031}, t}};
}

// Writes a checkpoint whose element j of tensor `s` is value(s, j) rounded to the dtype.
template <class F>
void write_checkpoint(const fs::path& dir, const std::vector<Spec>& specs, F value, std::uint64_t shard_size = 1 << 30) {
  conflux_test::write_checkpoint(
      dir, specs, [&](std::size_t i, std::uint64_t j) { return value(specs[i], j); }, shard_size,
      R"({"model_type": "test", "torch_dtype": "float32", "dtype": "float32"})");
  std::ofstream(dir / "tokenizer.json") << R"({"version": "1.0"})";
}

float base_value(const Spec& s, std::uint64_t j) {
  std::mt19937 rng(static_cast<unsigned>(std::hash<std::string>{}(s.name) + j * 7919));
  return std::uniform_real_distribution<float>(-0.5f, 0.5f)(rng);
}

// Model m changes a sparse, partly overlapping set of entries by amounts well above a bf16 ulp.
float model_value(const Spec& s, std::uint64_t j, int m) {
  std::mt19937 rng(static_cast<unsigned>(std::hash<std::string>{}(s.name) * 31 + j * 104729 + static_cast<unsigned>(m) * 15485863));
  std::uniform_real_distribution<float> u(0, 1);
  const float b = base_value(s, j);
  if (u(rng) > 0.3f) return b;
  return b + (u(rng) - 0.5f) * 0.2f;
}

std::string read_bytes(const fs::path& p) { return conflux_test::read_file(p); }

class EngineTest : public conflux_test::StrategyFixture {
 protected:
  void make_inputs(DType t, int n_models = 3, std::uint64_t shard_size = 1 << 30) {
    specs_ = default_specs(t);
    write_checkpoint(dir_ / "base", specs_, base_value, shard_size);
    for (int m = 0; m < n_models; ++m)
      write_checkpoint(dir_ / ("m" + std::to_string(m)), specs_,
                       [m](const Spec& s, std::uint64_t j) { return model_value(s, j, m); }, shard_size);
  }

  // Loads the test plugin built into CONFLUX_TEST_PLUGIN_DIR/<dir> (tests/plugins).
  void load_test_plugin(const char* dir) {
    plugins_.load_dirs({fs::path(CONFLUX_TEST_PLUGIN_DIR) / dir});
    ASSERT_TRUE(plugins_.problems().empty()) << plugins_.problems().front().message;
  }

  JobConfig job(const std::string& strategy, int n_models, std::vector<RawParam> params, const std::string& out) {
    JobConfig j;
    j.name = "test";
    j.strategy = strategy;
    j.base = dir_ / "base";
    for (int m = 0; m < n_models; ++m) j.models.push_back(dir_ / ("m" + std::to_string(m)));
    j.output = dir_ / out;
    j.params = std::move(params);
    return j;
  }

  // Max error of the output against `ref`, in ulps of the output dtype, over every element.
  template <class Ref>
  double max_ulps(const fs::path& out, Ref ref) {
    const Checkpoint merged = Checkpoint::open(out);
    const Checkpoint base = Checkpoint::open(dir_ / "base");
    std::vector<Checkpoint> models;
    for (int m = 0; fs::exists(dir_ / ("m" + std::to_string(m))); ++m)
      models.push_back(Checkpoint::open(dir_ / ("m" + std::to_string(m))));
    double worst = 0;
    for (const TensorRef& t : merged.tensors()) {
      const TensorView v = merged.view(t);
      const TensorView b = base.view(base.at(t.name()));
      std::vector<TensorView> xs;
      for (const auto& c : models) xs.push_back(c.view(c.at(t.name())));
      for (std::uint64_t k = 0; k < t.info->numel; ++k) {
        std::vector<double> x;
        for (const auto& mv : xs) x.push_back(mv.element(k));
        const double r = ref(b.element(k), x);
        const double got = v.element(k);
        const double err = std::abs(got - r) / ulp(t.info->dtype, r);
        worst = std::max(worst, err);
      }
    }
    return worst;
  }

  std::vector<Spec> specs_;
};

TEST_F(EngineTest, TaskArithmeticMatchesFloat64Reference) {
  for (DType out : {DType::BF16, DType::F16, DType::F32}) {
    SCOPED_TRACE(std::string(dtype_name(out)));
    make_inputs(DType::BF16);
    JobConfig j = job("task_arithmetic", 3, {list("weights", {1.0, 0.5, -0.25}), num("lambda", 0.8)}, "ta");
    j.out_dtype = out;
    run(j, 2, 1000, true);
    const double w[] = {1.0, 0.5, -0.25};
    const double e = max_ulps(dir_ / "ta", [&](double b, const std::vector<double>& x) {
      double acc = 0;
      for (std::size_t i = 0; i < x.size(); ++i) acc += w[i] * (x[i] - b);
      return b + 0.8 * acc;
    });
    EXPECT_LE(e, 1.0);
  }
}

// The host tells the strategy the output's precision (ABI 1.1): task_arithmetic computes a BF16
// output in float32 and wider ones in double. Each output equals its arithmetic's result
// exactly, which tells the two apart (the weights are not representable in float32).
TEST_F(EngineTest, ArithmeticFollowsTheOutputPrecision) {
  make_inputs(DType::BF16);
  const double w[] = {0.3, 0.7, -0.1};
  for (DType out : {DType::BF16, DType::F32}) {
    SCOPED_TRACE(std::string(dtype_name(out)));
    JobConfig j = job("task_arithmetic", 3, {list("weights", {w[0], w[1], w[2]})}, std::string("ta_") + std::string(dtype_name(out)));
    j.out_dtype = out;
    run(j);
    std::size_t differ = 0;  // elements where the float32 and double results round apart
    const double e = max_ulps(j.output, [&](double b, const std::vector<double>& x) {
      float acc_f = 0;
      double acc_d = 0;
      for (std::size_t i = 0; i < x.size(); ++i) {
        acc_f += static_cast<float>(w[i]) * (static_cast<float>(x[i]) - static_cast<float>(b));
        acc_d += w[i] * (x[i] - b);
      }
      const float as_float = static_cast<float>(b) + acc_f, as_double = static_cast<float>(b + acc_d);
      if (out == DType::BF16) {
        const double r = bf16_bits_to_f32(f32_to_bf16_bits(as_float));
        differ += r != bf16_bits_to_f32(f32_to_bf16_bits(as_double));
        return r;
      }
      differ += as_float != as_double;
      return static_cast<double>(as_double);
    });
    EXPECT_EQ(e, 0.0);
    if (out == DType::F32) {
      EXPECT_GT(differ, 0u) << "the inputs cannot tell the two arithmetics apart";
    }
  }
}

// Float32 arithmetic (BF16 output) where the task vectors cancel: base 0, x2 = x0 + x1 + delta
// with a tiny delta, weights (1, 1, -1): the exact result is -delta, which float32 sums cannot
// see. Those entries are computed again in double (plugins/common/float_guard.h): every entry
// stays within 1 ulp, the near-zero ones included.
TEST_F(EngineTest, TaskArithmeticStaysExactWhereTermsCancel) {
  specs_ = {{"w", {97, 31}, DType::F32}, {"v", {1001}, DType::F32}};
  auto a = [](const Spec& sp, std::uint64_t j) {
    return static_cast<float>(0.5 + 0.5 * conflux_test::rnd(conflux_test::name_id(sp.name), j, 1));
  };
  auto b = [](const Spec& sp, std::uint64_t j) {
    return static_cast<float>(0.25 + 0.5 * conflux_test::rnd(conflux_test::name_id(sp.name), j, 2));
  };
  auto delta = [](const Spec& sp, std::uint64_t j) {
    return static_cast<float>(std::ldexp(conflux_test::rnd(conflux_test::name_id(sp.name), j, 3) - 0.5, -18));
  };
  write_checkpoint(dir_ / "base", specs_, [](const Spec&, std::uint64_t) { return 0.0f; });
  write_checkpoint(dir_ / "m0", specs_, a);
  write_checkpoint(dir_ / "m1", specs_, b);
  write_checkpoint(dir_ / "m2", specs_, [&](const Spec& sp, std::uint64_t j) {
    return static_cast<float>(static_cast<double>(a(sp, j)) + b(sp, j) + delta(sp, j));
  });
  JobConfig j = job("task_arithmetic", 3, {list("weights", {1.0, 1.0, -1.0})}, "cancel");
  j.out_dtype = DType::BF16;
  run(j);
  const double e = max_ulps(dir_ / "cancel", [](double base, const std::vector<double>& x) {
    return base + (x[0] - base) + (x[1] - base) - (x[2] - base);
  });
  EXPECT_LE(e, 1.0);
}

// More models than task_arithmetic folds in one sweep (4): the groups chain through the
// accumulator, in both arithmetics.
TEST_F(EngineTest, TaskArithmeticWithManyModels) {
  make_inputs(DType::BF16, 6);
  const std::vector<double> w = {1.0, 0.5, -0.25, 0.75, 0.3, -0.6};
  for (DType out : {DType::BF16, DType::F32}) {
    SCOPED_TRACE(std::string(dtype_name(out)));
    for (int n : {5, 6}) {
      JobConfig j = job("task_arithmetic", n, {list("weights", std::vector<double>(w.begin(), w.begin() + n))},
                        "ta" + std::to_string(n) + std::string(dtype_name(out)));
      j.out_dtype = out;
      run(j);
      const double e = max_ulps(j.output, [&](double b, const std::vector<double>& x) {
        double acc = 0;
        for (int i = 0; i < n; ++i) acc += w[static_cast<std::size_t>(i)] * (x[static_cast<std::size_t>(i)] - b);
        return b + acc;
      });
      EXPECT_LE(e, 1.0) << n << " models";
    }
  }
}

TEST_F(EngineTest, TaskArithmeticNormalizeDividesBySumOfWeights) {
  make_inputs(DType::F16);
  JobConfig j = job("task_arithmetic", 3, {list("weights", {2.0, 1.0, 1.0}), flag("normalize", true)}, "ta");
  run(j);
  const double e = max_ulps(dir_ / "ta", [](double b, const std::vector<double>& x) {
    return b + (2 * (x[0] - b) + (x[1] - b) + (x[2] - b)) / 4.0;
  });
  EXPECT_LE(e, 1.0);
}

TEST_F(EngineTest, LinearMatchesFloat64Reference) {
  make_inputs(DType::F32);
  for (bool normalize : {true, false}) {
    SCOPED_TRACE(normalize);
    JobConfig j = job("linear", 3, {list("weights", {3.0, 1.0, 0.5}), flag("normalize", normalize)}, "lin");
    run(j, 1, 777, true);
    const double sum = normalize ? 4.5 : 1.0;
    const double e = max_ulps(dir_ / "lin", [&](double, const std::vector<double>& x) {
      return (3.0 * x[0] + 1.0 * x[1] + 0.5 * x[2]) / sum;
    });
    EXPECT_LE(e, 1.0);
  }
}

TEST_F(EngineTest, PassthroughCopiesBitForBit) {
  make_inputs(DType::BF16, 1);
  JobConfig j = job("passthrough", 1, {}, "copy");
  j.base.reset();
  run(j);
  const Checkpoint a = Checkpoint::open(dir_ / "copy"), b = Checkpoint::open(dir_ / "m0");
  for (const TensorRef& t : b.tensors()) {
    const auto x = b.view(t).bytes, y = a.view(a.at(t.name())).bytes;
    ASSERT_EQ(x.size(), y.size());
    EXPECT_EQ(0, std::memcmp(x.data(), y.data(), x.size())) << t.name();
  }
  JobConfig scaled = job("passthrough", 1, {num("scale", 2.0)}, "scaled");
  scaled.base.reset();
  run(scaled);
  EXPECT_EQ(max_ulps(dir_ / "scaled", [](double, const std::vector<double>& x) { return 2 * x[0]; }), 0.0);
}

TEST_F(EngineTest, OutputIsBitIdenticalAcrossThreadCountsAndChunkSizes) {
  make_inputs(DType::BF16, 3, 6000);  // several input shards
  const auto params = std::vector<RawParam>{list("weights", {1.0, 0.7, 0.3})};
  run(job("task_arithmetic", 3, params, "t1"), 1, 1000);
  run(job("task_arithmetic", 3, params, "t2"), 2, 1000);
  run(job("task_arithmetic", 3, params, "t3"), 2, 4096);
  for (const char* other : {"t2", "t3"}) {
    EXPECT_EQ(read_bytes(dir_ / "t1" / "model.safetensors"), read_bytes(dir_ / other / "model.safetensors")) << other;
  }
}

TEST_F(EngineTest, ShardsTheOutputBySize) {
  make_inputs(DType::BF16);
  JobConfig j = job("task_arithmetic", 3, {}, "sharded");
  j.shard_size = 5000;
  run(j);
  const Checkpoint c = Checkpoint::open(dir_ / "sharded");
  EXPECT_TRUE(c.has_index());
  EXPECT_GT(c.shards().size(), 2u);
  EXPECT_EQ(c.size(), specs_.size());
}

TEST_F(EngineTest, NonFloatingTensorsAreCopiedFromTheBase) {
  specs_ = default_specs(DType::BF16);
  specs_.push_back({"position_ids", {3, 11}, DType::I64});
  specs_.push_back({"mask", {13}, DType::U8});
  write_checkpoint(dir_ / "base", specs_, base_value);
  for (int m = 0; m < 2; ++m)
    write_checkpoint(dir_ / ("m" + std::to_string(m)), specs_, [m](const Spec& s, std::uint64_t j) { return model_value(s, j, m); });
  const MergeOutcome o = run(job("task_arithmetic", 2, {}, "out"));
  EXPECT_EQ(o.result.copied_tensors, 2u);
  const Checkpoint out = Checkpoint::open(dir_ / "out"), base = Checkpoint::open(dir_ / "base");
  for (const char* name : {"position_ids", "mask"}) {
    const auto a = out.view(out.at(name)).bytes, b = base.view(base.at(name)).bytes;
    EXPECT_EQ(out.at(name).info->dtype, base.at(name).info->dtype);
    ASSERT_EQ(a.size(), b.size());
    EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size())) << name;
  }
}

TEST_F(EngineTest, WritesManifestAndAuxiliaryFiles) {
  make_inputs(DType::BF16, 2);
  JobConfig j = job("task_arithmetic", 2, {num("lambda", 0.5)}, "out");
  j.out_dtype = DType::F16;
  j.seed = 42;
  run(j);
  const auto manifest = boost::json::parse(read_bytes(dir_ / "out" / "conflux-manifest.json")).as_object();
  EXPECT_EQ(manifest.at("strategy").at("id").as_string(), "task_arithmetic");
  EXPECT_EQ(manifest.at("strategy").at("version").as_string(), "1.1.0");  // 1.1: float32 for BF16 outputs
  EXPECT_EQ(manifest.at("seed").to_number<std::uint64_t>(), 42u);
  EXPECT_EQ(manifest.at("params").at("lambda").as_double(), 0.5);
  EXPECT_EQ(manifest.at("params").at("weights").as_array().size(), 2u);
  EXPECT_EQ(manifest.at("conflux_version").as_string(), CONFLUX_VERSION);
  const auto& inputs = manifest.at("inputs").as_array();
  ASSERT_EQ(inputs.size(), 3u);
  EXPECT_EQ(inputs[0].at("role").as_string(), "base");
  // The header hash is the SHA-256 of the header bytes of that shard.
  const Checkpoint base = Checkpoint::open(dir_ / "base");
  const auto header = base.shards()[0].header_bytes();
  unsigned char digest[32];
  unsigned len = 0;
  EVP_Digest(header.data(), header.size(), digest, &len, EVP_sha256(), nullptr);
  char hex[65];
  for (int i = 0; i < 32; ++i) std::snprintf(hex + 2 * i, 3, "%02x", digest[i]);
  const auto& file = inputs[0].at("files").as_array()[0].as_object();
  EXPECT_EQ(file.at("header_sha256").as_string(), hex);
  EXPECT_EQ(file.at("size").to_number<std::uint64_t>(), fs::file_size(dir_ / "base" / "model.safetensors"));
  EXPECT_TRUE(manifest.at("timings").as_object().contains("merge_seconds"));

  const auto config = boost::json::parse(read_bytes(dir_ / "out" / "config.json")).as_object();
  EXPECT_EQ(config.at("torch_dtype").as_string(), "float16");
  EXPECT_EQ(config.at("dtype").as_string(), "float16");
  EXPECT_EQ(config.at("model_type").as_string(), "test");
  EXPECT_TRUE(fs::exists(dir_ / "out" / "tokenizer.json"));
}

std::vector<std::string> entries(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

TEST_F(EngineTest, ExistingOutputNeedsForce) {
  make_inputs(DType::BF16, 2);
  const JobConfig j = job("task_arithmetic", 2, {}, "out");
  run(j);
  const std::string before = read_bytes(dir_ / "out" / "model.safetensors");
  EXPECT_THROW(run(j), ConfigError);
  EXPECT_EQ(read_bytes(dir_ / "out" / "model.safetensors"), before);
  const JobConfig j2 = job("task_arithmetic", 2, {num("lambda", 2.0)}, "out");
  run(j2, 2, 1000, /*force=*/true);
  EXPECT_NE(read_bytes(dir_ / "out" / "model.safetensors"), before);
  // No partial or old directories are left beside the output.
  for (const auto& name : entries(dir_.path())) EXPECT_FALSE(name.starts_with(".")) << name;
}

TEST_F(EngineTest, CancelledMergeLeavesNothing) {
  make_inputs(DType::BF16, 2);
  const std::atomic<bool> cancel{true};
  try {
    run(job("task_arithmetic", 2, {}, "out"), 2, 1000, false, &cancel);
    FAIL() << "expected a cancellation";
  } catch (const MergeError& e) {
    EXPECT_THAT(e.what(), HasSubstr("cancelled"));
  }
  EXPECT_FALSE(fs::exists(dir_ / "out"));
  for (const auto& name : entries(dir_.path())) EXPECT_FALSE(name.starts_with(".")) << name;
}

TEST_F(EngineTest, MalformedInputFailsBeforeWritingAnything) {
  make_inputs(DType::BF16, 2);
  // Truncate the second model's file: its header now runs past the data.
  const fs::path f = dir_ / "m1" / "model.safetensors";
  fs::resize_file(f, fs::file_size(f) - 3);
  try {
    run(job("task_arithmetic", 2, {}, "out"));
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_THAT(e.what(), HasSubstr("m1"));
  }
  EXPECT_FALSE(fs::exists(dir_ / "out"));
  for (const auto& name : entries(dir_.path())) EXPECT_FALSE(name.starts_with(".")) << name;
}

TEST_F(EngineTest, PlanNamesTheTensorAndModelThatDisagree) {
  specs_ = default_specs(DType::BF16);
  write_checkpoint(dir_ / "base", specs_, base_value);
  write_checkpoint(dir_ / "m0", specs_, base_value);
  auto expect_plan_error = [&](const std::vector<Spec>& m1, const std::string& tensor, const std::string& what) {
    fs::remove_all(dir_ / "m1");
    write_checkpoint(dir_ / "m1", m1, base_value);
    try {
      run(job("task_arithmetic", 2, {}, "out"));
      FAIL() << "expected a plan error for " << what;
    } catch (const MergeError& e) {
      EXPECT_THAT(e.what(), HasSubstr("'" + tensor + "'"));
      EXPECT_THAT(e.what(), HasSubstr((dir_ / "m1").string()));
      EXPECT_THAT(e.what(), HasSubstr(what));
    }
    EXPECT_FALSE(fs::exists(dir_ / "out"));
  };
  auto missing = specs_;
  missing.erase(missing.begin() + 2);
  expect_plan_error(missing, "layer.0.bias", "missing");
  auto reshaped = specs_;
  reshaped[1].shape = {41, 63};
  expect_plan_error(reshaped, "layer.0.w", "shape");
  auto retyped = specs_;
  retyped[3].dtype = DType::F16;
  expect_plan_error(retyped, "layer.1.w", "dtype");
  auto extra = specs_;
  extra.push_back({"extra.weight", {3}, DType::BF16});
  expect_plan_error(extra, "extra.weight", "not in");
}

TEST_F(EngineTest, StrategyRequirementsAreCheckedBeforeReading) {
  make_inputs(DType::BF16, 2);
  JobConfig no_base = job("task_arithmetic", 2, {}, "out");
  no_base.base.reset();
  EXPECT_THROW(run(no_base), ConfigError);
  EXPECT_THROW(run(job("passthrough", 2, {}, "out")), ConfigError);
  EXPECT_THROW(run(job("task_arithmetic", 2, {list("weights", {1.0})}, "out")), ConfigError);
  EXPECT_THROW(run(job("no_such_strategy", 2, {}, "out")), PluginError);
  EXPECT_FALSE(fs::exists(dir_ / "out"));
}

// ---------------------------------------------------------------------------------------------
// Stored BF16 inputs (ABI 1.2, CFX_PASS_BF16_INPUTS), through tests/plugins/bf16_probe.cc. The
// probe fails the merge on a chunk that breaks the ABI's rules (models/base NULL with BF16
// values, bf16_* NULL with float32 ones, has_base, alignment); its map writes
// (((m_0 + m_1) + ...) - base) in float32 and its reduces sum every input value in double; its
// report counts, per pass (and per tensor for the map), the elements that came as stored BF16
// and those that came as float32. Its passes: a model reduce and a tensor reduce with the flag,
// a tensor reduce without it, and the map with it.

class Bf16InputsTest : public EngineTest {
 protected:
  void SetUp() override {
    EngineTest::SetUp();
    load_test_plugin("bf16_probe");
  }

  // A probe job over base (optional) and models m0..m(n-1), written as float32: the map's
  // results exactly.
  JobConfig probe(int n_models, bool with_base, const std::string& out) {
    JobConfig j = job("bf16_probe", n_models, {}, out);
    if (!with_base) j.base.reset();
    j.out_dtype = DType::F32;
    return j;
  }

  struct Expected {
    std::uint64_t elements = 0;  // of the merged (floating) tensors
    double sum = 0;              // of every input value of those
    double magnitude = 0;        // of their absolute values
  };

  // Expects every floating tensor of `out` to equal, bit for bit, (((m_0 + m_1) + ...) - base)
  // computed here in float32 from the values stored in the inputs; returns what the probe's
  // reduces should have seen.
  Expected expect_exact_output(const fs::path& out, int n_models, bool with_base) {
    const Checkpoint merged = Checkpoint::open(out);
    const Checkpoint base = Checkpoint::open(dir_ / "base");
    std::vector<Checkpoint> models;
    for (int m = 0; m < n_models; ++m) models.push_back(Checkpoint::open(dir_ / ("m" + std::to_string(m))));
    Expected e;
    for (const TensorRef& t : merged.tensors()) {
      if (!dtype_is_mergeable(t.info->dtype)) continue;
      EXPECT_EQ(t.info->dtype, DType::F32) << t.name();
      const TensorView v = merged.view(t);
      const TensorView b = base.view(base.at(t.name()));
      std::vector<TensorView> xs;
      for (const auto& c : models) xs.push_back(c.view(c.at(t.name())));
      std::uint64_t wrong = 0;
      for (std::uint64_t k = 0; k < t.info->numel; ++k) {
        float acc = 0;
        for (const auto& x : xs) {
          acc += static_cast<float>(x.element(k));
          e.sum += x.element(k);
          e.magnitude += std::abs(x.element(k));
        }
        if (with_base) {
          acc -= static_cast<float>(b.element(k));
          e.sum += b.element(k);
          e.magnitude += std::abs(b.element(k));
        }
        const float got = v.as<float>()[k];
        if (std::memcmp(&got, &acc, sizeof got) != 0 && wrong++ == 0)
          ADD_FAILURE() << t.name() << "[" << k << "] = " << got << ", expected " << acc;
      }
      EXPECT_EQ(wrong, 0u) << "wrong elements in " << t.name();
      e.elements += t.info->numel;
    }
    return e;
  }

  // The probe's counts for one pass: elements that came as stored BF16 and as float32.
  static void expect_counts(const boost::json::object& report, const char* pass, std::uint64_t bf16, std::uint64_t f32) {
    SCOPED_TRACE(pass);
    const auto& o = report.at(pass).as_object();
    EXPECT_EQ(conflux_test::count(o, "bf16"), bf16);
    EXPECT_EQ(conflux_test::count(o, "f32"), f32);
  }
  // A reduce pass's sum of every input value, against `e` (summed in another order).
  static void expect_sum(const boost::json::object& report, const char* pass, const Expected& e) {
    const double got = conflux_test::number(report.at(pass).as_object(), "sum");
    EXPECT_NEAR(got, e.sum, 1e-12 * e.magnitude) << pass;
  }
};

// A BF16 checkpoint (base and two models; tensors of several chunks whose sizes are no multiple
// of the chunk size): the map gets pointers to the stored values, with models and base NULL,
// and they are the stored values. Without a base, bf16_base is NULL.
TEST_F(Bf16InputsTest, MapGetsTheStoredBf16Values) {
  make_inputs(DType::BF16, 2);
  for (bool with_base : {true, false}) {
    SCOPED_TRACE(with_base ? "with a base" : "without a base");
    const std::string out = with_base ? "with_base" : "no_base";
    run(probe(2, with_base, out), 2, 1000);
    const Expected e = expect_exact_output(dir_ / out, 2, with_base);
    EXPECT_EQ(e.elements, 131u * 37 + 63 * 41 + 41 + 5 * 7 * 9 + 1 + 0 + 1031);
    const auto r = report(out);
    expect_counts(r, "map", e.elements, 0);
    const auto& tensors = r.at("tensors").as_object();
    for (const Spec& s : specs_) {
      SCOPED_TRACE(s.name);
      EXPECT_EQ(conflux_test::count(tensors.at(s.name).as_object(), "map_bf16"), numel(s.shape));
      EXPECT_EQ(conflux_test::count(tensors.at(s.name).as_object(), "map_f32"), 0u);
    }
  }
}

// Checkpoints of another dtype: the same passes get float32 (bf16_* NULL), with the same results.
TEST_F(Bf16InputsTest, OtherDtypesStillArriveAsFloat32) {
  for (DType t : {DType::F32, DType::F16}) {
    SCOPED_TRACE(std::string(dtype_name(t)));
    make_inputs(t, 2);
    const std::string out = std::string("out_") + std::string(dtype_name(t));
    run(probe(2, true, out), 2, 1000);
    const Expected e = expect_exact_output(dir_ / out, 2, true);
    const auto r = report(out);
    expect_counts(r, "map", 0, e.elements);
    expect_counts(r, "model_reduce", 0, e.elements);
    expect_counts(r, "tensor_reduce_bf16", 0, e.elements);
    expect_counts(r, "tensor_reduce_f32", 0, e.elements);
    expect_sum(r, "model_reduce", e);
    expect_sum(r, "tensor_reduce_bf16", e);
  }
}

// Reduce passes with the flag, of tensor and of model scope, get the stored values too; a reduce
// pass without it still gets float32, in the same job.
TEST_F(Bf16InputsTest, ReducePassesWithTheFlagGetTheStoredValuesToo) {
  make_inputs(DType::BF16, 3);
  for (const unsigned threads : {1u, 2u}) {
    SCOPED_TRACE(threads);
    const std::string out = "out" + std::to_string(threads);
    run(probe(3, true, out), threads, 777);
    const Expected e = expect_exact_output(dir_ / out, 3, true);
    const auto r = report(out);
    expect_counts(r, "model_reduce", e.elements, 0);
    expect_counts(r, "tensor_reduce_bf16", e.elements, 0);
    expect_counts(r, "tensor_reduce_f32", 0, e.elements);
    expect_sum(r, "model_reduce", e);
    expect_sum(r, "tensor_reduce_bf16", e);
    expect_sum(r, "tensor_reduce_f32", e);
  }
}

// safetensors allows a tensor's data at any offset: a BF16 tensor placed after a 1-byte U8 one
// starts at an odd address in the mapping (the header is padded to 8 bytes and the mapping is
// page-aligned). The engine reads its inputs into aligned copies, so such a tensor still comes
// as stored, in every pass, with the same results as an even one.
TEST_F(Bf16InputsTest, OddDataOffsetsStillComeAsStored) {
  const Spec w{"w", {5, 401}, DType::BF16}, u{"u", {1003}, DType::BF16};
  specs_ = {w, u};
  auto bf16_data = [](const Spec& s, int input) {  // input -1: the base
    std::string d;
    for (std::uint64_t j = 0; j < numel(s.shape); ++j) {
      const std::uint16_t bits = f32_to_bf16_bits(input < 0 ? base_value(s, j) : model_value(s, j, input));
      d.append(reinterpret_cast<const char*>(&bits), sizeof bits);
    }
    return d;
  };
  // "mask" and "pad" are 1-byte U8 tensors: [mask][w][pad][u] puts w at odd offset 1 and u at an
  // even one; [w][u][mask][pad] keeps both even.
  auto write = [&](const std::string& name, int input, bool odd) {
    fs::remove_all(dir_ / name);
    fs::create_directories(dir_ / name);
    conflux_test::StBuilder b;
    if (odd) b.add("mask", "U8", {1}, "\x01");
    b.add("w", "BF16", w.shape, bf16_data(w, input));
    if (odd) b.add("pad", "U8", {1}, "\x02");
    b.add("u", "BF16", u.shape, bf16_data(u, input));
    if (!odd) b.add("mask", "U8", {1}, "\x01").add("pad", "U8", {1}, "\x02");
    b.write(dir_ / name / "model.safetensors");
    // The premise: where w and u start in the mapping.
    const Checkpoint c = Checkpoint::open(dir_ / name);
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(c.view(c.at("w")).bytes.data()) % 2, odd ? 1u : 0u) << name;
    EXPECT_EQ(reinterpret_cast<std::uintptr_t>(c.view(c.at("u")).bytes.data()) % 2, 0u) << name;
  };
  struct Case {
    const char* what;
    bool base_odd, m0_odd, m1_odd;
  };
  for (const Case& c : {Case{"one model odd", false, false, true}, Case{"the base odd", true, false, false},
                        Case{"every input odd", true, true, true}}) {
    SCOPED_TRACE(c.what);
    write("base", -1, c.base_odd);
    write("m0", 0, c.m0_odd);
    write("m1", 1, c.m1_odd);
    const std::string out = std::string("out_") + (c.base_odd ? "b" : "") + (c.m0_odd ? "0" : "") + (c.m1_odd ? "1" : "");
    run(probe(2, true, out), 2, 1000);
    const Expected e = expect_exact_output(dir_ / out, 2, true);
    EXPECT_EQ(e.elements, 2005u + 1003u);
    const auto r = report(out);
    const auto& tensors = r.at("tensors").as_object();
    for (const char* name : {"w", "u"}) {
      const auto& counts = tensors.at(name).as_object();
      const std::uint64_t n = std::string(name) == "w" ? 2005u : 1003u;
      EXPECT_EQ(conflux_test::count(counts, "map_bf16"), n) << name;
      EXPECT_EQ(conflux_test::count(counts, "map_f32"), 0u) << name;
    }
    expect_counts(r, "model_reduce", 2005 + 1003, 0);
    expect_counts(r, "tensor_reduce_bf16", 2005 + 1003, 0);
    expect_counts(r, "tensor_reduce_f32", 0, 2005 + 1003);
    expect_sum(r, "model_reduce", e);
    expect_sum(r, "tensor_reduce_bf16", e);
    // The U8 tensors are copied from the base, wherever they sit.
    const Checkpoint merged = Checkpoint::open(dir_ / out);
    EXPECT_EQ(conflux_test::to_string(merged.view(merged.at("mask")).bytes), "\x01");
    EXPECT_EQ(conflux_test::to_string(merged.view(merged.at("pad")).bytes), "\x02");
  }
}

// ---------------------------------------------------------------------------------------------
// Speculative outputs (ABI 1.3, CFX_PASS_SPECULATIVE_OUTPUT), through tests/plugins/speculate.c:
// its speculative output is model 0, its map's model 0 + 1, so the output shows which one the
// host kept. A declaration of a final output is honoured only when every chunk of the pass's
// first execution wrote; otherwise the merge fails naming the tensor, and nothing is published.
// ---------------------------------------------------------------------------------------------

class SpeculativeOutputTest : public EngineTest {
 protected:
  void SetUp() override {
    EngineTest::SetUp();
    load_test_plugin("speculate");
    make_inputs(DType::F32, 1);
  }
  JobConfig probe(const std::string& mode, const std::string& out) {
    JobConfig j = job("speculate_probe", 1, {conflux_test::str("mode", mode)}, out);
    j.out_dtype = DType::F32;
    return j;
  }
  // Every merged tensor of `out` is model 0 plus `offset`, in float32.
  void expect_model0_plus(const std::string& out, float offset) {
    const Checkpoint merged = Checkpoint::open(dir_ / out);
    const Checkpoint m0 = Checkpoint::open(dir_ / "m0");
    std::uint64_t checked = 0;
    for (const TensorRef& t : merged.tensors()) {
      const TensorView v = merged.view(t);
      const TensorView x = m0.view(m0.at(t.name()));
      for (std::uint64_t k = 0; k < t.info->numel; ++k, ++checked)
        ASSERT_EQ(v.as<float>()[k], x.as<float>()[k] + offset) << t.name() << "[" << k << "]";
    }
    EXPECT_GT(checked, 5000u);
  }
};

TEST_F(SpeculativeOutputTest, AFinalOutputWithEveryChunkWrittenSkipsTheMap) {
  for (const unsigned threads : {1u, 2u}) {
    const std::string out = "all_" + std::to_string(threads);
    run(probe("all", out), threads, 1000);
    expect_model0_plus(out, 0.0f);
  }
  // Without a declaration the map's output replaces the speculative one.
  run(probe("never", "never"), 2, 1000);
  expect_model0_plus("never", 1.0f);
  // A host told not to speculate hands out no room: the map writes everything.
  MergeRequest r;
  const JobConfig j = probe("all", "off");
  r.config = &config_;
  r.job = &j;
  r.threads = 2;
  r.chunk_elements = 1000;
  r.speculative_output = false;
  run_job(r, plugins_);
  expect_model0_plus("off", 1.0f);
}

TEST_F(SpeculativeOutputTest, AFinalOutputWithMissingChunksFailsAndPublishesNothing) {
  // embed.weight (131 x 37 = 4847 entries) has 5 chunks of 1000; one thread so the first
  // tensor streamed is the one named.
  conflux_test::expect_error<MergeError>([&] { run(probe("some", "some"), 1, 1000); },
                                         {"speculate_probe", "declared its output of tensor 'embed.weight' final",
                                          "only 1 of its 5 chunks wrote output"});
  EXPECT_FALSE(fs::exists(dir_ / "some"));
  for (const auto& name : entries(dir_.path())) EXPECT_FALSE(name.starts_with(".")) << name;
}

// ABI 1.4: a pass may leave the head of its partials for itself to initialise
// (instance_stats_unzeroed); the host refuses a count it could not honour, before any tensor is
// read, and publishes nothing.
TEST_F(SpeculativeOutputTest, UnzeroedStatisticsOutsideThePartialOrUnalignedAreRefused) {
  auto with_unzeroed = [&](std::int64_t bytes, const std::string& out) {
    JobConfig j = probe("never", out);
    RawParam p;
    p.key = "unzeroed";
    p.kind = RawParam::Kind::integer;
    p.integer = bytes;
    p.number = static_cast<double>(bytes);
    j.params.push_back(p);
    return j;
  };
  conflux_test::expect_error<MergeError>([&] { run(with_unzeroed(8, "u8"), 2, 1000); },
                                         {"speculate_probe", "leaves 8 bytes", "statistics of 64 bytes unzeroed",
                                          "multiple of 16"});
  conflux_test::expect_error<MergeError>([&] { run(with_unzeroed(80, "u80"), 2, 1000); },
                                         {"speculate_probe", "leaves 80 bytes", "at most the size"});
  EXPECT_FALSE(fs::exists(dir_ / "u8"));
  EXPECT_FALSE(fs::exists(dir_ / "u80"));
  // 0 (the default) is the host zeroing everything, as before ABI 1.4.
  run(with_unzeroed(0, "u0"), 2, 1000);
  expect_model0_plus("u0", 1.0f);
}

TEST_F(SpeculativeOutputTest, AFinalOutputOnARepeatedExecutionFails) {
  conflux_test::expect_error<MergeError>([&] { run(probe("repeat", "repeat"), 2, 1000); },
                                         {"speculate_probe", "final", "the pass cannot write output here"});
  EXPECT_FALSE(fs::exists(dir_ / "repeat"));
}

}  // namespace
