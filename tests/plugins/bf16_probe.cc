// bf16_probe: a strategy whose passes ask for stored BF16 inputs (CFX_PASS_BF16_INPUTS, ABI 1.2)
// and check what the host hands them, for engine_test. Its passes, in order:
//   0  model reduce,  CFX_PASS_BF16_INPUTS  } each sums every input value (the models' and the
//   1  tensor reduce, CFX_PASS_BF16_INPUTS  } base's) in double and counts the elements it saw as
//   2  tensor reduce, no flag               } stored BF16 and as float32
//   3  map,           CFX_PASS_BF16_INPUTS: out = (((m_0 + m_1) + ...) - base) in float32
// Every chunk is checked against the ABI's rules (one form or the other, never both; NULL base
// fields exactly when the job has no base; even addresses; BF16 only for BF16 tensors); a chunk
// that breaks one fails the merge with a message saying what. finish() reports, as JSON:
//   {"map": {"bf16": n, "f32": n}, "model_reduce": {"bf16": n, "f32": n, "sum": x},
//    "tensor_reduce_bf16": {...}, "tensor_reduce_f32": {...},
//    "tensors": {"<name>": {"map_bf16": n, "map_f32": n}, ...}}
// where n counts elements (one per position of a chunk, whatever the number of inputs).
#include <conflux/plugin.hpp>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

namespace sdk = conflux::sdk;

namespace {

struct Stats {
  double sum;
  std::uint64_t bf16;
  std::uint64_t f32;
};

std::string number(double v) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

std::string stats_json(const Stats& s) {
  return "{\"bf16\":" + std::to_string(s.bf16) + ",\"f32\":" + std::to_string(s.f32) + ",\"sum\":" + number(s.sum) +
         "}";
}

}  // namespace

struct Bf16Probe {
  static constexpr sdk::Info info{"bf16_probe", "1.0.0", "checks the stored-BF16 inputs the host hands out (test plugin)",
                                  1, 0, CFX_BASE_OPTIONAL};

  explicit Bf16Probe(const sdk::Job& job)
      : job_(job),
        n_tensors_(job.tensors().size()),
        map_bf16_(new std::atomic<std::uint64_t>[n_tensors_ + 1]()),
        map_f32_(new std::atomic<std::uint64_t>[n_tensors_ + 1]()),
        tensor_bf16_(n_tensors_ + 1, Stats{}),
        tensor_f32_(n_tensors_ + 1, Stats{}) {}

  // Throws when the chunk breaks the ABI's rules; returns whether it holds stored BF16 values.
  bool check(const sdk::Chunk& c, const char* pass) const {
    const cfx_chunk& r = *c.raw();
    auto fail = [&](const std::string& what) {
      throw sdk::Error(std::string(pass) + ": tensor '" + c.tensor().name + "' chunk at " + std::to_string(c.begin()) +
                       ": " + what);
    };
    if (r.struct_size < sizeof(cfx_chunk)) fail("struct_size " + std::to_string(r.struct_size) + " is below ABI 1.2's");
    if (c.model_count() != job_.model_count()) fail("model_count differs from the job's");
    if (c.count() == 0 || c.begin() + c.count() > c.tensor().numel) fail("chunk outside the tensor");
    if (c.has_base() != job_.has_base()) fail("has_base() differs from the job's");
    if (c.is_bf16()) {
      if (r.models != nullptr || r.base != nullptr) fail("BF16 values, but models/base are not NULL");
      if (c.tensor().in_precision != 8) fail("BF16 values for a tensor whose input is not BF16");
      if ((c.bf16_base() != nullptr) != job_.has_base())
        fail(job_.has_base() ? "bf16_base is NULL but the job has a base" : "bf16_base is set but the job has no base");
      if (reinterpret_cast<std::uintptr_t>(c.bf16_base()) % 2 != 0) fail("bf16_base is not 2-byte aligned");
      for (std::uint32_t i = 0; i < c.model_count(); ++i) {
        if (c.bf16_models()[i] == nullptr) fail("bf16_models[" + std::to_string(i) + "] is NULL");
        if (reinterpret_cast<std::uintptr_t>(c.bf16_models()[i]) % 2 != 0)
          fail("bf16_models[" + std::to_string(i) + "] is not 2-byte aligned");
      }
      return true;
    }
    if (r.bf16_models != nullptr || r.bf16_base != nullptr) fail("float32 values, but bf16_models/bf16_base are not NULL");
    if (r.models == nullptr) fail("neither models nor bf16_models");
    if ((r.base != nullptr) != job_.has_base())
      fail(job_.has_base() ? "base is NULL but the job has a base" : "base is set but the job has no base");
    for (std::uint32_t i = 0; i < c.model_count(); ++i)
      if (r.models[i] == nullptr) fail("models[" + std::to_string(i) + "] is NULL");
    return false;
  }

  // Input value (model i, or the base for i == model_count) at position k of the chunk.
  static float value(const sdk::Chunk& c, bool bf16, std::uint32_t i, std::size_t k) {
    if (bf16) return sdk::bf16_to_float(i == c.model_count() ? c.bf16_base()[k] : c.bf16_models()[i][k]);
    return i == c.model_count() ? c.base()[k] : c.model(i)[k];
  }

  void reduce(const sdk::Chunk& c, sdk::Span<Stats> partial) {
    const bool bf16 = check(c, "reduce");
    const std::uint32_t inputs = c.model_count() + (c.has_base() ? 1 : 0);
    double sum = 0;
    for (std::size_t k = 0; k < c.count(); ++k)
      for (std::uint32_t i = 0; i < inputs; ++i) sum += value(c, bf16, i, k);
    partial[0].sum += sum;
    (bf16 ? partial[0].bf16 : partial[0].f32) += c.count();
  }
  void combine(const cfx_tensor*, sdk::Span<Stats> into, sdk::Span<const Stats> from) {
    into[0].sum += from[0].sum;
    into[0].bf16 += from[0].bf16;
    into[0].f32 += from[0].f32;
  }
  bool done_model(const cfx_tensor*, sdk::Span<const Stats> stats) {
    model_ = stats[0];
    return false;
  }
  bool done_tensor_bf16(const cfx_tensor* t, sdk::Span<const Stats> stats) {
    tensor_bf16_[t->index] = stats[0];
    return false;
  }
  bool done_tensor_f32(const cfx_tensor* t, sdk::Span<const Stats> stats) {
    tensor_f32_[t->index] = stats[0];
    return false;
  }

  void map(const sdk::Chunk& c, sdk::Span<float> out) {
    const bool bf16 = check(c, "map");
    const std::uint32_t n = c.model_count();
    for (std::size_t k = 0; k < c.count(); ++k) {
      float acc = 0;
      for (std::uint32_t i = 0; i < n; ++i) acc += value(c, bf16, i, k);
      if (c.has_base()) acc -= value(c, bf16, n, k);
      out[k] = acc;
    }
    (bf16 ? map_bf16_ : map_f32_)[c.tensor().index] += c.count();
  }

  void finish() {
    Stats tb{}, tf{};
    std::uint64_t mb = 0, mf = 0;
    std::string tensors;
    for (std::size_t k = 0; k < n_tensors_; ++k) {
      combine(nullptr, {&tb, 1}, {&tensor_bf16_[k], 1});
      combine(nullptr, {&tf, 1}, {&tensor_f32_[k], 1});
      mb += map_bf16_[k];
      mf += map_f32_[k];
      if (k) tensors += ",";
      tensors += sdk::json_quote(job_.tensors()[k].name) + ":{\"map_bf16\":" + std::to_string(map_bf16_[k].load()) +
                 ",\"map_f32\":" + std::to_string(map_f32_[k].load()) + "}";
    }
    job_.report("{\"map\":{\"bf16\":" + std::to_string(mb) + ",\"f32\":" + std::to_string(mf) +
                "},\"model_reduce\":" + stats_json(model_) + ",\"tensor_reduce_bf16\":" + stats_json(tb) +
                ",\"tensor_reduce_f32\":" + stats_json(tf) + ",\"tensors\":{" + tensors + "}}");
  }

 private:
  const sdk::Job& job_;
  std::size_t n_tensors_;
  std::unique_ptr<std::atomic<std::uint64_t>[]> map_bf16_, map_f32_;  // per tensor, elements
  Stats model_{};
  std::vector<Stats> tensor_bf16_, tensor_f32_;  // per tensor (each written by its own reduce_done)
};

CONFLUX_PLUGIN(Bf16Probe,
               (sdk::reduce_pass<Bf16Probe, Stats, 0, &Bf16Probe::reduce, &Bf16Probe::combine, &Bf16Probe::done_model>(
                   CFX_PASS_MODEL_REDUCE, CFX_PASS_BF16_INPUTS)),
               (sdk::reduce_pass<Bf16Probe, Stats, 1, &Bf16Probe::reduce, &Bf16Probe::combine,
                                 &Bf16Probe::done_tensor_bf16>(CFX_PASS_TENSOR_REDUCE, CFX_PASS_BF16_INPUTS)),
               (sdk::reduce_pass<Bf16Probe, Stats, 2, &Bf16Probe::reduce, &Bf16Probe::combine,
                                 &Bf16Probe::done_tensor_f32>(CFX_PASS_TENSOR_REDUCE)),
               sdk::map_pass<Bf16Probe, &Bf16Probe::map>(CFX_PASS_BF16_INPUTS))
