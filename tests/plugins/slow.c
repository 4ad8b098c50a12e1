/* slow: a valid plugin (id slow_copy) that copies model 0 but sleeps `sleep_ms` milliseconds
   (default 2) in every map call, so a merge of a few MB takes seconds: long enough for a test to
   truncate an input or kill the worker mid-run. One model, base unused. Raw C ABI. */
#define _POSIX_C_SOURCE 200809L
#include <conflux/plugin.h>

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct instance {
  long sleep_ns;
} instance;

static const cfx_param_spec params[] = {{
    .struct_size = sizeof(cfx_param_spec),
    .type = CFX_PARAM_INT,
    .flags = CFX_PARAM_HAS_MIN | CFX_PARAM_HAS_MAX,
    .name = "sleep_ms",
    .doc = "milliseconds to sleep per chunk",
    .default_number = 2,
    .min = 0,
    .max = 1000,
}};

static int create(const cfx_job* job, void** out) {
  instance* self = malloc(sizeof *self);
  *out = self;
  if (!self) {
    job->host->fail(job->ctx, "slow_copy: out of memory");
    return 1;
  }
  self->sleep_ns = (long)job->params[0].number * 1000000L;
  return 0;
}

static void destroy(void* self) { free(self); }

static int map(void* p, const cfx_chunk* chunk, float* out) {
  const instance* self = p;
  if (self->sleep_ns > 0) {
    struct timespec t = {.tv_sec = self->sleep_ns / 1000000000L, .tv_nsec = self->sleep_ns % 1000000000L};
    while (nanosleep(&t, &t) != 0 && errno == EINTR) {
    }
  }
  memcpy(out, chunk->models[0], chunk->count * sizeof(float));
  return 0;
}

static const cfx_pass passes[] = {{.struct_size = sizeof(cfx_pass), .kind = CFX_PASS_MAP, .map = map}};

static const cfx_plugin descriptor = {
    .struct_size = sizeof(cfx_plugin),
    .abi_major = CFX_ABI_MAJOR,
    .abi_minor = CFX_ABI_MINOR,
    .id = "slow_copy",
    .version = "1.0.0",
    .description = "Copies model 0, sleeping in every map call (test plugin)",
    .param_count = 1,
    .pass_count = 1,
    .params = params,
    .passes = passes,
    .min_models = 1,
    .max_models = 1,
    .base = CFX_BASE_UNUSED,
    .create = create,
    .destroy = destroy,
};

CFX_EXPORT const cfx_plugin* conflux_plugin_entry(const cfx_host* host);
CFX_EXPORT const cfx_plugin* conflux_plugin_entry(const cfx_host* host) {
  (void)host;
  return &descriptor;
}
