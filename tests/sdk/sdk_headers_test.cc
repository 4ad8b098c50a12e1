// Runs what abi_c11.c and abi_cxx.cc (as C++17 and C++20) built: the C descriptor, and the C++
// wrapper's descriptor, create/reduce/combine/reduce_done/map/finish/destroy and exception
// mapping, through the C ABI with a minimal host table. Exit 0 when everything holds.
#include <conflux/plugin.hpp>

#include <cstdio>
#include <cstring>
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

int main() {
  check_precision_query();
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
