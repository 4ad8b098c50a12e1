// Runs what abi_c11.c and abi_cxx.cc (as C++17 and C++20) built: the C descriptor, and the C++
// wrapper's descriptor, create/reduce/combine/reduce_done/map/finish/destroy and exception
// mapping, through the C ABI with a minimal host table. Exit 0 when everything holds.
#include <conflux/plugin.hpp>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>

extern "C" int sdk_abi_c11_check(void);
extern "C" const cfx_plugin* sdk_abi_cxx_entry_17(const cfx_host* host);
extern "C" const cfx_plugin* sdk_abi_cxx_entry_20(const cfx_host* host);

namespace {

std::string g_failure;
void host_log(cfx_context*, std::int32_t, const char*) {}
void host_fail(cfx_context*, const char* message) { g_failure = message ? message : ""; }

int failures = 0;
void check(bool ok, const char* what, const char* where) {
  if (!ok) {
    std::fprintf(stderr, "sdk_headers_test: %s: %s\n", where, what);
    ++failures;
  }
}

void run(cfx_plugin_entry_fn entry, const char* where) {
  cfx_host host{};
  host.struct_size = sizeof host;
  host.abi_major = CFX_ABI_MAJOR;
  host.abi_minor = CFX_ABI_MINOR;
  host.log = host_log;
  host.fail = host_fail;

  cfx_host other = host;
  other.abi_major = CFX_ABI_MAJOR + 1;
  check(entry(&other) == nullptr, "refuses a host of another ABI major", where);

  const cfx_plugin* p = entry(&host);
  check(p != nullptr, "entry returns a descriptor", where);
  if (!p) return;
  check(p->struct_size == sizeof(cfx_plugin) && p->abi_major == CFX_ABI_MAJOR && p->abi_minor == CFX_ABI_MINOR,
        "descriptor header", where);
  check(std::strcmp(p->id, "tiny_cxx") == 0 && p->min_models == 1 && p->max_models == 4 &&
            p->base == CFX_BASE_OPTIONAL,
        "descriptor info", where);
  check(p->param_count == 6, "param count", where);
  if (p->param_count != 6) return;
  const cfx_param_spec* s = p->params;
  check(s[0].type == CFX_PARAM_FLOAT && (s[0].flags & CFX_PARAM_MIN_EXCLUSIVE) && s[0].default_number == 1.0,
        "param target", where);
  check(s[1].type == CFX_PARAM_INT && s[1].min == 1 && s[1].max == 8, "param iterations", where);
  check(s[2].type == CFX_PARAM_BOOL && s[2].default_number == 1.0, "param enabled", where);
  check(s[3].type == CFX_PARAM_STRING && s[3].choice_count == 2 && std::strcmp(s[3].choices[1], "none") == 0,
        "param mode", where);
  check(s[4].type == CFX_PARAM_FLOAT_LIST && (s[4].flags & CFX_PARAM_PER_MODEL) &&
            (s[4].flags & CFX_PARAM_MAX_EXCLUSIVE),
        "param weights", where);
  check((s[5].flags & CFX_PARAM_REQUIRED) != 0, "param unused", where);
  check(p->pass_count == 2 && p->passes[0].kind == CFX_PASS_TENSOR_REDUCE && p->passes[1].kind == CFX_PASS_MAP &&
            p->passes[1].flags == CFX_PASS_WHOLE_ROWS && p->passes[0].stats_size == sizeof(float),
        "passes", where);
  if (p->pass_count != 2) return;

  // A job of two models, one tensor of 4 elements, parameters at their defaults.
  const double weights[2] = {1, 1};
  cfx_param_value values[6]{};
  for (auto& v : values) v.struct_size = sizeof v;
  values[0].number = 2.0;
  values[1].number = 1;
  values[2].number = 1;
  values[3].string = "max";
  values[4].list = weights;
  values[4].list_length = 2;
  const std::uint64_t shape[1] = {4};
  cfx_tensor tensor{};
  tensor.struct_size = sizeof tensor;
  tensor.rank = 1;
  tensor.name = "w";
  tensor.shape = shape;
  tensor.numel = 4;
  tensor.row_length = 4;
  cfx_job job{};
  job.struct_size = sizeof job;
  job.model_count = 2;
  job.host = &host;
  job.param_count = 6;
  job.params = values;
  job.tensor_count = 1;
  job.tensors = &tensor;

  void* inst = nullptr;
  check(p->create(&job, &inst) == 0 && inst != nullptr, "create", where);
  if (!inst) return;
  check(p->passes[0].instance_stats_size(inst) == sizeof(float), "instance_stats_size", where);

  const float m0[4] = {1, -4, 2, 0.5f};
  const float m1[4] = {0, 1, -3, 0};
  const float* models[2] = {m0, m1};
  cfx_chunk lo{};
  lo.struct_size = sizeof lo;
  lo.model_count = 2;
  lo.tensor = &tensor;
  lo.count = 2;
  lo.models = models;
  const float* models_hi[2] = {m0 + 2, m1 + 2};
  cfx_chunk hi = lo;
  hi.begin = 2;
  hi.models = models_hi;
  alignas(16) float part_lo[4] = {}, part_hi[4] = {};
  check(p->passes[0].reduce(inst, &lo, part_lo) == 0 && p->passes[0].reduce(inst, &hi, part_hi) == 0, "reduce", where);
  check(p->passes[0].combine(inst, &tensor, part_lo, part_hi) == 0 && part_lo[0] == 4.0f, "combine", where);
  std::int32_t repeat = 7;
  check(p->passes[0].reduce_done(inst, &tensor, part_lo, &repeat) == 0 && repeat == 0, "reduce_done", where);
  alignas(16) float out[2] = {};
  check(p->passes[1].map(inst, &lo, out) == 0 && out[0] == 0.5f && out[1] == -2.0f, "map", where);
  check(p->finish(inst) == 0, "finish", where);
  p->destroy(inst);

  // An exception from the strategy's constructor becomes host->fail + non-zero.
  job.model_count = 0;
  g_failure.clear();
  inst = reinterpret_cast<void*>(1);
  check(p->create(&job, &inst) != 0 && inst == nullptr && g_failure == "no models", "exception mapping", where);
}

}  // namespace

// sdk::float32_suffices: only a BF16 output, and only when the host (ABI >= 1.1) says so.
void check_precision_query() {
  cfx_tensor t{};
  t.struct_size = sizeof t;
  for (const std::uint32_t bits : {8u, 11u, 24u, 53u, 0u}) {
    t.out_precision = bits;
    check(conflux::sdk::float32_suffices(t) == (bits == 8), "float32_suffices by output precision", "C++");
  }
  t.out_precision = 8;
  t.struct_size = offsetof(cfx_tensor, in_precision);  // a 1.0 host's tensor ends before the fields
  check(!conflux::sdk::float32_suffices(t), "float32_suffices on an ABI 1.0 tensor", "C++");
}

// ABI 1.2: sdk::bf16_to_float, and sdk::Chunk telling stored BF16 values from float32 ones.
void check_bf16() {
  using conflux::sdk::bf16_to_float;
  auto bits = [](float f) {
    std::uint32_t b;
    std::memcpy(&b, &f, sizeof b);
    return b;
  };
  check(bf16_to_float(0x3F80) == 1.0f, "bf16_to_float(0x3F80) == 1", "C++");
  check(bf16_to_float(0xC000) == -2.0f, "bf16_to_float(0xC000) == -2", "C++");
  check(bf16_to_float(0x3F81) == 1.0078125f, "bf16_to_float(0x3F81) == 1 + 2^-7", "C++");
  check(bf16_to_float(0x4049) == 3.140625f, "bf16_to_float(0x4049) == 3.140625", "C++");
  check(bits(bf16_to_float(0x0000)) == 0 && bits(bf16_to_float(0x8000)) == 0x80000000u, "signed zeros", "C++");
  check(bf16_to_float(0x0001) == 0x1p-133f, "smallest subnormal (0x0001) == 2^-133", "C++");
  check(bf16_to_float(0x8040) == -0x1p-127f, "subnormal 0x8040 == -2^-127", "C++");
  check(bf16_to_float(0x0080) == 0x1p-126f, "smallest normal (0x0080) == 2^-126", "C++");
  check(bf16_to_float(0x7F7F) == 0x1.FEp127f, "largest finite (0x7F7F)", "C++");
  check(bf16_to_float(0x7F80) == std::numeric_limits<float>::infinity(), "+inf (0x7F80)", "C++");
  check(bf16_to_float(0xFF80) == -std::numeric_limits<float>::infinity(), "-inf (0xFF80)", "C++");
  check(std::isnan(bf16_to_float(0x7FC0)) && std::isnan(bf16_to_float(0xFFC1)) && std::isnan(bf16_to_float(0x7F81)),
        "NaN patterns are NaN", "C++");
  bool exact = true;  // every pattern, NaN payloads included: the high half of the float
  for (std::uint32_t p = 0; p <= 0xFFFF; ++p) exact = exact && bits(bf16_to_float(static_cast<std::uint16_t>(p))) == p << 16;
  check(exact, "bf16_to_float(p) has the bits p << 16 for every p", "C++");

  const std::uint64_t shape[1] = {3};
  cfx_tensor tensor{};
  tensor.struct_size = sizeof tensor;
  tensor.rank = 1;
  tensor.name = "w";
  tensor.shape = shape;
  tensor.numel = 3;
  tensor.row_length = 3;
  const float f0[3] = {1, 2, 3}, fb[3] = {-1, -2, -3};
  const float* fmodels[1] = {f0};
  const std::uint16_t b0[3] = {0x3F80, 0xC000, 0x7F80}, bb[3] = {0, 0x8000, 0x0001};
  const std::uint16_t* bmodels[1] = {b0};
  // Non-null garbage where a 1.1 host's chunk ends: never read.
  const auto* garbage_models = reinterpret_cast<const std::uint16_t* const*>(static_cast<std::uintptr_t>(0x10));
  const auto* garbage_base = reinterpret_cast<const std::uint16_t*>(static_cast<std::uintptr_t>(0x20));

  cfx_chunk old{};  // an ABI 1.1 host's chunk: float32 values, no bf16 fields
  old.struct_size = offsetof(cfx_chunk, bf16_models);
  old.model_count = 1;
  old.tensor = &tensor;
  old.count = 3;
  old.models = fmodels;
  old.base = fb;
  old.bf16_models = garbage_models;
  old.bf16_base = garbage_base;
  const conflux::sdk::Chunk c_old(&old);
  check(!c_old.is_bf16() && c_old.bf16_models() == nullptr && c_old.bf16_base() == nullptr,
        "a 1.1-size chunk is float32 whatever follows it", "C++");
  check(c_old.has_base() && c_old.base().size() == 3 && c_old.model(0)[2] == 3.0f, "a 1.1-size chunk's values", "C++");
  old.base = nullptr;
  check(!c_old.has_base() && c_old.base().empty(), "a 1.1-size chunk without a base", "C++");

  cfx_chunk f32 = old;  // a 1.2 host's float32 chunk
  f32.struct_size = sizeof f32;
  f32.base = fb;
  f32.bf16_models = nullptr;
  f32.bf16_base = nullptr;
  const conflux::sdk::Chunk c_f32(&f32);
  check(!c_f32.is_bf16() && c_f32.bf16_models() == nullptr && c_f32.bf16_base() == nullptr && c_f32.has_base(),
        "a 1.2 float32 chunk", "C++");

  cfx_chunk bf = f32;  // a 1.2 host's stored-BF16 chunk
  bf.models = nullptr;
  bf.base = nullptr;
  bf.bf16_models = bmodels;
  bf.bf16_base = bb;
  const conflux::sdk::Chunk c_bf(&bf);
  check(c_bf.is_bf16() && c_bf.bf16_models() == bmodels && c_bf.bf16_base() == bb, "a 1.2 BF16 chunk", "C++");
  check(c_bf.has_base() && c_bf.base().empty() && c_bf.models() == nullptr, "a 1.2 BF16 chunk's base", "C++");
  check(bf16_to_float(c_bf.bf16_models()[0][1]) == -2.0f && bits(bf16_to_float(c_bf.bf16_base()[1])) == 0x80000000u,
        "a 1.2 BF16 chunk's values", "C++");
  bf.bf16_base = nullptr;
  check(c_bf.is_bf16() && !c_bf.has_base() && c_bf.bf16_base() == nullptr, "a 1.2 BF16 chunk without a base", "C++");
}

int main() {
  check_precision_query();
  check_bf16();
  const int c = sdk_abi_c11_check();
  if (c != 0) {
    std::fprintf(stderr, "sdk_headers_test: C11 check failed at step %d\n", c);
    ++failures;
  }
  run(sdk_abi_cxx_entry_17, "C++17");
  run(sdk_abi_cxx_entry_20, "C++20");
  if (failures == 0) std::printf("sdk_headers_test: C11, C++17 and C++20 builds of the SDK headers work\n");
  return failures == 0 ? 0 : 1;
}
