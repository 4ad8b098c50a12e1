/* Plugins with an invalid schema, one per BAD_SCHEMA_CASE (raw C ABI):
     1 default_range:  parameter 'alpha' defaults to 2 but its range is [0, 1]
     2 dup_param:      parameter 'alpha' declared twice
     3 last_not_map:   the last pass is a tensor reduce
     4 no_combine:     a reduce pass without combine */
#include <conflux/plugin.h>

#ifndef BAD_SCHEMA_CASE
#error "define BAD_SCHEMA_CASE"
#endif

/* Not every case uses every callback. */
#if defined(__GNUC__) || defined(__clang__)
#define MAYBE_UNUSED __attribute__((unused))
#else
#define MAYBE_UNUSED
#endif

static int create(const cfx_job* job, void** instance) {
  (void)job;
  *instance = 0;
  return 0;
}
static void destroy(void* instance) { (void)instance; }
MAYBE_UNUSED static int map(void* instance, const cfx_chunk* chunk, float* out) {
  (void)instance;
  (void)chunk;
  (void)out;
  return 0;
}
MAYBE_UNUSED static int reduce(void* instance, const cfx_chunk* chunk, void* partial) {
  (void)instance;
  (void)chunk;
  (void)partial;
  return 0;
}
MAYBE_UNUSED static int combine(void* instance, const cfx_tensor* tensor, void* into, const void* from) {
  (void)instance;
  (void)tensor;
  (void)into;
  (void)from;
  return 0;
}
MAYBE_UNUSED static int reduce_done(void* instance, const cfx_tensor* tensor, const void* stats, int32_t* repeat) {
  (void)instance;
  (void)tensor;
  (void)stats;
  *repeat = 0;
  return 0;
}

#define PARAM(name, def, flags, lo, hi) \
  {sizeof(cfx_param_spec), CFX_PARAM_FLOAT, (flags), 0, (name), "a parameter", (def), 0, (lo), (hi), 0}
#define MAP_PASS {sizeof(cfx_pass), CFX_PASS_MAP, 0, 0, 0, 0, 0, 0, map, 0, 0, 0}
#define REDUCE_PASS(c) {sizeof(cfx_pass), CFX_PASS_TENSOR_REDUCE, 0, 0, 8, reduce, (c), reduce_done, 0, 0, 0, 0}

#if BAD_SCHEMA_CASE == 1
#define ID "bad_default_range"
static const cfx_param_spec params[] = {PARAM("alpha", 2.0, CFX_PARAM_HAS_MIN | CFX_PARAM_HAS_MAX, 0.0, 1.0)};
static const cfx_pass passes[] = {MAP_PASS};
#elif BAD_SCHEMA_CASE == 2
#define ID "bad_dup_param"
static const cfx_param_spec params[] = {PARAM("alpha", 0.5, 0, 0.0, 0.0), PARAM("alpha", 0.5, 0, 0.0, 0.0)};
static const cfx_pass passes[] = {MAP_PASS};
#elif BAD_SCHEMA_CASE == 3
#define ID "bad_last_not_map"
static const cfx_param_spec params[] = {PARAM("alpha", 0.5, 0, 0.0, 0.0)};
static const cfx_pass passes[] = {MAP_PASS, REDUCE_PASS(combine)};
#elif BAD_SCHEMA_CASE == 4
#define ID "bad_no_combine"
static const cfx_param_spec params[] = {PARAM("alpha", 0.5, 0, 0.0, 0.0)};
static const cfx_pass passes[] = {REDUCE_PASS(0), MAP_PASS};
#else
#error "unknown BAD_SCHEMA_CASE"
#endif

static const cfx_plugin descriptor = {sizeof(cfx_plugin),
                                      CFX_ABI_MAJOR,
                                      CFX_ABI_MINOR,
                                      ID,
                                      "1.0.0",
                                      "an invalid schema (test plugin)",
                                      (uint32_t)(sizeof params / sizeof params[0]),
                                      (uint32_t)(sizeof passes / sizeof passes[0]),
                                      params,
                                      passes,
                                      1,
                                      0,
                                      CFX_BASE_UNUSED,
                                      0,
                                      create,
                                      0,
                                      destroy};

CFX_EXPORT const cfx_plugin* conflux_plugin_entry(const cfx_host* host);
CFX_EXPORT const cfx_plugin* conflux_plugin_entry(const cfx_host* host) {
  (void)host;
  return &descriptor;
}
