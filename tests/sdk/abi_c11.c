/* conflux/plugin.h compiled as strict C11 (-Wall -Wextra -Wpedantic -Werror), its layout pinned
   (abi_layout.h), and a descriptor built with its types, checked at run time by sdk_abi_check. */
#include <conflux/plugin.h>

#include "abi_layout.h"

int sdk_abi_c11_check(void);

static int create(const cfx_job* job, void** instance) {
  *instance = 0;
  return job->model_count == 0;
}
static void destroy(void* instance) { (void)instance; }
static int map(void* instance, const cfx_chunk* chunk, float* out) {
  uint64_t k;
  (void)instance;
  for (k = 0; k < chunk->count; ++k) out[k] = chunk->models[0][k];
  return 0;
}

static const char* const kChoices[] = {"a", "b"};
static const cfx_param_spec kParams[] = {
    {.struct_size = sizeof(cfx_param_spec), .type = CFX_PARAM_STRING, .choice_count = 2, .name = "mode",
     .doc = "a string with choices", .default_string = "a", .choices = kChoices},
    {.struct_size = sizeof(cfx_param_spec), .type = CFX_PARAM_FLOAT,
     .flags = CFX_PARAM_HAS_MIN | CFX_PARAM_HAS_MAX | CFX_PARAM_MAX_EXCLUSIVE, .name = "x", .doc = "in [0, 1)",
     .default_number = 0.5, .min = 0.0, .max = 1.0}};
static const cfx_pass kPasses[] = {{.struct_size = sizeof(cfx_pass), .kind = CFX_PASS_MAP, .map = map}};
static const cfx_plugin kPlugin = {.struct_size = sizeof(cfx_plugin), .abi_major = CFX_ABI_MAJOR,
                                   .abi_minor = CFX_ABI_MINOR, .id = "abi_c11", .version = "1.0.0",
                                   .description = "C11 header check", .param_count = 2, .pass_count = 1,
                                   .params = kParams, .passes = kPasses, .min_models = 1,
                                   .base = CFX_BASE_OPTIONAL, .create = create, .destroy = destroy};

static const cfx_plugin* entry(const cfx_host* host) { return host ? &kPlugin : 0; }

/* Returns 0 when everything holds. */
int sdk_abi_c11_check(void) {
  cfx_plugin_entry_fn fn = entry;
  cfx_host host = {0};
  const cfx_plugin* p;
  const float m0[3] = {1.0f, 2.0f, 3.0f};
  const float* models[1];
  float out[3] = {0};
  cfx_tensor tensor = {0};
  cfx_chunk chunk = {0};
  cfx_job job = {0};
  void* instance = 0;

  host.struct_size = (uint32_t)offsetof(cfx_host, axpy); /* a host older than axpy */
  host.abi_major = CFX_ABI_MAJOR;
  if (!CFX_HOST_HAS(&host, random_uniform) || CFX_HOST_HAS(&host, axpy) || CFX_HOST_HAS(&host, dot)) return 1;
  host.struct_size = sizeof host;
  if (!CFX_HOST_HAS(&host, dot)) return 2;

  p = fn(&host);
  if (!p || p->abi_major != CFX_ABI_MAJOR || p->pass_count != 1 || p->passes[0].kind != CFX_PASS_MAP) return 3;
  job.struct_size = sizeof job;
  job.model_count = 1;
  job.host = &host;
  if (p->create(&job, &instance) != 0) return 4;
  models[0] = m0;
  tensor.struct_size = sizeof tensor;
  tensor.numel = 3;
  chunk.struct_size = sizeof chunk;
  chunk.model_count = 1;
  chunk.tensor = &tensor;
  chunk.count = 3;
  chunk.models = models;
  if (p->passes[0].map(instance, &chunk, out) != 0) return 5;
  p->destroy(instance);
  return out[0] == 1.0f && out[1] == 2.0f && out[2] == 3.0f ? 0 : 6;
}
