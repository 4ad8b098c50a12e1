/* fails: a valid plugin whose map always fails: it calls host->fail("deliberate failure") and
   returns 1, so the host must stop the merge and report the message. Raw C ABI. */
#include <conflux/plugin.h>

#include <stdlib.h>

typedef struct instance {
  const cfx_host* host;
  cfx_context* ctx;
} instance;

static int create(const cfx_job* job, void** out) {
  instance* self = malloc(sizeof *self);
  *out = self;
  if (!self) return 1;
  self->host = job->host;
  self->ctx = job->ctx;
  return 0;
}

static void destroy(void* self) { free(self); }

static int map(void* p, const cfx_chunk* chunk, float* out) {
  const instance* self = p;
  (void)chunk;
  (void)out;
  self->host->fail(self->ctx, "deliberate failure");
  return 1;
}

static const cfx_pass passes[] = {{.struct_size = sizeof(cfx_pass), .kind = CFX_PASS_MAP, .map = map}};

static const cfx_plugin descriptor = {
    .struct_size = sizeof(cfx_plugin),
    .abi_major = CFX_ABI_MAJOR,
    .abi_minor = CFX_ABI_MINOR,
    .id = "fails",
    .version = "1.0.0",
    .description = "Fails in every map call (test plugin)",
    .pass_count = 1,
    .passes = passes,
    .min_models = 1,
    .base = CFX_BASE_UNUSED,
    .create = create,
    .destroy = destroy,
};

CFX_EXPORT const cfx_plugin* conflux_plugin_entry(const cfx_host* host);
CFX_EXPORT const cfx_plugin* conflux_plugin_entry(const cfx_host* host) {
  (void)host;
  return &descriptor;
}
