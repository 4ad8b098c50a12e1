// Scaffolding shared by the strategy test suites (engine_test, strategies_*_test): synthetic
// checkpoints from (name, shape, dtype) specs, a counter-based random stream, ulps, RawParam
// builders, report helpers and a fixture that loads the plugins and runs a job. Include after
// test_util.h.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <initializer_list>
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

namespace conflux_test {

// ---------------------------------------------------------------------------------------------
// Synthetic checkpoints
// ---------------------------------------------------------------------------------------------

struct Spec {
  std::string name;
  std::vector<std::uint64_t> shape;
  conflux::DType dtype = conflux::DType::BF16;
};

inline std::uint64_t numel(const std::vector<std::uint64_t>& shape) {
  std::uint64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

inline constexpr const char* kBf16ConfigJson = R"({"model_type": "test", "torch_dtype": "bfloat16"})";

// Writes a checkpoint whose element j of tensor i is value(i, j) rounded to the dtype
// (non-floating tensors get a byte pattern), then `config_json` as config.json.
template <class F>
  requires std::invocable<F&, std::size_t, std::uint64_t>
void write_checkpoint(const fs::path& dir, const std::vector<Spec>& specs, F value,
                      std::uint64_t shard_size = 1 << 30, const char* config_json = kBf16ConfigJson) {
  using namespace conflux;
  fs::create_directories(dir);
  std::vector<OutputTensor> tensors;
  for (const auto& s : specs) tensors.push_back({s.name, s.dtype, s.shape});
  CheckpointWriter w(dir, tensors, {shard_size, {}});
  for (std::size_t i = 0; i < specs.size(); ++i) {
    const Spec& s = specs[i];
    const std::uint64_t n = numel(s.shape);
    const std::size_t esize = static_cast<std::size_t>(dtype_bits(s.dtype) / 8);
    std::vector<std::byte> bytes(n * esize);
    if (dtype_is_mergeable(s.dtype)) {
      std::vector<float> f(n);
      for (std::uint64_t j = 0; j < n; ++j) f[j] = value(i, j);
      from_f32(s.dtype, f.data(), bytes.data(), n);
    } else {
      for (std::uint64_t j = 0; j < bytes.size(); ++j) bytes[j] = static_cast<std::byte>((j * 37 + i) & 0xff);
    }
    w.write_at(i, 0, bytes);
  }
  w.finish();
  std::ofstream(dir / "config.json") << config_json;
}

inline std::uint64_t mix64(std::uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// A uniform double in [0, 1) that depends only on (a, b, c).
inline double rnd(std::uint64_t a, std::uint64_t b, std::uint64_t c) {
  return static_cast<double>(mix64(mix64(mix64(a) ^ b) ^ c) >> 11) * 0x1p-53;
}

// FNV-1a of a name: the same scenario with every standard library.
inline std::uint64_t name_id(const std::string& name) {
  std::uint64_t h = 0xCBF29CE484222325ull;
  for (const char ch : name) h = (h ^ static_cast<unsigned char>(ch)) * 0x100000001B3ull;
  return h;
}

// ---------------------------------------------------------------------------------------------
// References
// ---------------------------------------------------------------------------------------------

inline double ulp(conflux::DType t, double ref) {
  using conflux::DType;
  int e = 0;
  std::frexp(ref, &e);  // ref = f * 2^e, f in [0.5, 1): the leading bit is 2^(e-1)
  switch (t) {
    case DType::BF16: return std::ldexp(1.0, std::max(e - 1, -126) - 7);
    case DType::F16: return std::ldexp(1.0, std::max(e - 1, -14) - 10);
    case DType::F32: return std::ldexp(1.0, std::max(e - 1, -126) - 23);
    default: return std::ldexp(1.0, std::max(e - 1, -1022) - 52);
  }
}

// The inputs as the host hands them to a plugin: base values and float32 task vectors.
struct TensorInputs {
  std::string name;
  std::vector<double> base;
  std::vector<std::vector<float>> d;  // d[i][k] = float(theta_i) - float(theta_base)
};

inline std::vector<TensorInputs> read_inputs(const fs::path& base_dir, const std::vector<fs::path>& model_dirs) {
  using namespace conflux;
  const Checkpoint base = Checkpoint::open(base_dir);
  std::vector<Checkpoint> models;
  for (const auto& m : model_dirs) models.push_back(Checkpoint::open(m));
  std::vector<TensorInputs> out;
  for (const TensorRef& t : base.tensors()) {
    if (!dtype_is_mergeable(t.info->dtype)) continue;
    TensorInputs in;
    in.name = t.name();
    const TensorView b = base.view(t);
    const std::size_t n = static_cast<std::size_t>(t.info->numel);
    in.base.resize(n);
    for (std::size_t k = 0; k < n; ++k) in.base[k] = b.element(k);
    for (const Checkpoint& c : models) {
      const TensorView v = c.view(c.at(t.name()));
      std::vector<float> d(n);
      for (std::size_t k = 0; k < n; ++k)
        d[k] = static_cast<float>(v.element(k)) - static_cast<float>(in.base[k]);  // float32 subtraction
      in.d.push_back(std::move(d));
    }
    out.push_back(std::move(in));
  }
  return out;
}

// Elements of one output tensor, widened to double.
inline std::vector<double> elements_of(const fs::path& dir, const std::string& name) {
  using namespace conflux;
  const Checkpoint c = Checkpoint::open(dir);
  const TensorRef& t = c.at(name);
  const TensorView v = c.view(t);
  std::vector<double> x(static_cast<std::size_t>(t.info->numel));
  for (std::size_t k = 0; k < x.size(); ++k) x[k] = v.element(k);
  return x;
}

inline ::testing::AssertionResult near_rel(double got, double want, double rel = 1e-12) {
  if (want == 0 ? got == 0 : std::fabs(got - want) <= rel * std::fabs(want)) return ::testing::AssertionSuccess();
  char buf[160];
  std::snprintf(buf, sizeof buf, "got %.17g, expected %.17g (relative tolerance %g)", got, want, rel);
  return ::testing::AssertionFailure() << buf;
}

inline double number(const boost::json::object& o, const char* key) { return o.at(key).to_number<double>(); }
inline std::uint64_t count(const boost::json::object& o, const char* key) {
  return o.at(key).to_number<std::uint64_t>();
}

// ---------------------------------------------------------------------------------------------
// Jobs
// ---------------------------------------------------------------------------------------------

inline conflux::RawParam num(const std::string& key, double v) {
  conflux::RawParam p;
  p.key = key;
  p.kind = conflux::RawParam::Kind::floating;
  p.number = v;
  return p;
}
inline conflux::RawParam flag(const std::string& key, bool v) {
  conflux::RawParam p;
  p.key = key;
  p.kind = conflux::RawParam::Kind::boolean;
  p.number = v ? 1 : 0;
  return p;
}
inline conflux::RawParam list(const std::string& key, std::vector<double> v) {
  conflux::RawParam p;
  p.key = key;
  p.kind = conflux::RawParam::Kind::array;
  p.list = std::move(v);
  return p;
}
inline conflux::RawParam str(const std::string& key, const std::string& v) {
  conflux::RawParam p;
  p.key = key;
  p.kind = conflux::RawParam::Kind::string;
  p.string = v;
  return p;
}

inline std::vector<std::string> entries(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

template <class E, class F>
void expect_error(F&& f, std::initializer_list<std::string> parts) {
  try {
    f();
    ADD_FAILURE() << "expected an error mentioning " << *parts.begin();
  } catch (const E& e) {
    for (const auto& part : parts) EXPECT_THAT(e.what(), ::testing::HasSubstr(part));
  } catch (const std::exception& e) {
    ADD_FAILURE() << "wrong exception type: " << e.what();
  }
}

// A temporary directory, the plugins of CONFLUX_PLUGIN_DIR and a config; runs jobs.
class StrategyFixture : public ::testing::Test {
 protected:
  void SetUp() override {
    plugins_.load_dirs({CONFLUX_PLUGIN_DIR});
    ASSERT_TRUE(plugins_.problems().empty()) << plugins_.problems().front().message;
    config_.file = dir_.path() / "job.toml";
  }

  conflux::MergeOutcome run(const conflux::JobConfig& j, unsigned threads = 2, std::uint64_t chunk = 1000,
                            bool force = false, const std::atomic<bool>* cancel = nullptr) {
    conflux::MergeRequest r;
    r.config = &config_;
    r.job = &j;
    r.threads = threads;
    r.chunk_elements = chunk;
    r.force = force;
    r.cancel = cancel;
    return run_job(r, plugins_);
  }

  boost::json::object report(const std::string& out) const {
    const auto manifest =
        boost::json::parse(read_file(dir_ / out / "conflux-manifest.json")).as_object();
    return manifest.at("report").as_object();
  }

  TempDir dir_;
  conflux::PluginRegistry plugins_;
  conflux::Config config_;
};

}  // namespace conflux_test
