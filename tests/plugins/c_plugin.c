/* c_plugin: a valid strategy written in plain C11 against conflux/plugin.h alone (no C++
   wrapper), proving the C ABI is usable from C. One map pass copying model 0, scaled by the
   parameter `scale` (default 1). */
#include <conflux/plugin.h>

#include <stdlib.h>

typedef struct instance {
  float scale;
} instance;

static const cfx_param_spec params[] = {{
    .struct_size = sizeof(cfx_param_spec),
    .type = CFX_PARAM_FLOAT,
    .flags = 0,
    .name = "scale",
    .doc = "factor applied to model 0",
    .default_number = 1.0,
}};

static int create(const cfx_job* job, void** out) {
  instance* self = malloc(sizeof *self);
  *out = self;
  if (!self) {
    job->host->fail(job->ctx, "c_plugin: out of memory");
    return 1;
  }
  self->scale = (float)job->params[0].number;
  return 0;
}

static void destroy(void* self) { free(self); }

static int map(void* self, const cfx_chunk* chunk, float* out) {
  const float scale = ((const instance*)self)->scale;
  const float* x = chunk->models[0];
  for (uint64_t k = 0; k < chunk->count; ++k) out[k] = scale * x[k];
  return 0;
}

static const cfx_pass passes[] = {{
    .struct_size = sizeof(cfx_pass),
    .kind = CFX_PASS_MAP,
    .map = map,
}};

static const cfx_plugin descriptor = {
    .struct_size = sizeof(cfx_plugin),
    .abi_major = CFX_ABI_MAJOR,
    .abi_minor = CFX_ABI_MINOR,
    .id = "c_plugin",
    .version = "1.0.0",
    .description = "Copies model 0 (a plugin written in C11)",
    .param_count = 1,
    .pass_count = 1,
    .params = params,
    .passes = passes,
    .min_models = 1,
    .max_models = 0,
    .base = CFX_BASE_UNUSED,
    .create = create,
    .finish = 0,
    .destroy = destroy,
};

CFX_EXPORT const cfx_plugin* conflux_plugin_entry(const cfx_host* host);
CFX_EXPORT const cfx_plugin* conflux_plugin_entry(const cfx_host* host) {
  if (!host || host->abi_major != CFX_ABI_MAJOR) return NULL;
  return &descriptor;
}
