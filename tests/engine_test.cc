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

}  // namespace
