/* crash: a valid plugin (id crash_on_purpose) whose map kills the process on purpose, for the
   daemon's crash-isolation tests: the merge worker dies, the daemon must not. The string
   parameter `mode` chooses how: "segv" (default) writes through a NULL pointer (SIGSEGV),
   "abort" calls abort() (SIGABRT). One model, base unused. Raw C ABI. */
#include <conflux/plugin.h>

#include <stdlib.h>
#include <string.h>

typedef struct instance {
  int abort_mode;
} instance;

static const char* const modes[] = {"segv", "abort"};

static const cfx_param_spec params[] = {{
    .struct_size = sizeof(cfx_param_spec),
    .type = CFX_PARAM_STRING,
    .flags = 0,
    .choice_count = 2,
    .name = "mode",
    .doc = "how to crash: segv (NULL dereference) or abort (abort())",
    .default_string = "segv",
    .choices = modes,
}};

static int create(const cfx_job* job, void** out) {
  instance* self = malloc(sizeof *self);
  *out = self;
  if (!self) {
    job->host->fail(job->ctx, "crash_on_purpose: out of memory");
    return 1;
  }
  self->abort_mode = strcmp(job->params[0].string, "abort") == 0;
  return 0;
}

static void destroy(void* self) { free(self); }

/* Read through a volatile pointer so the compiler cannot prove the NULL and drop the access. */
static float* volatile null_target = NULL;

static int map(void* p, const cfx_chunk* chunk, float* out) {
  const instance* self = p;
  (void)out;
  if (self->abort_mode) abort();
  *null_target = chunk->models[0][0]; /* SIGSEGV */
  return 0;
}

static const cfx_pass passes[] = {{.struct_size = sizeof(cfx_pass), .kind = CFX_PASS_MAP, .map = map}};

static const cfx_plugin descriptor = {
    .struct_size = sizeof(cfx_plugin),
    .abi_major = CFX_ABI_MAJOR,
    .abi_minor = CFX_ABI_MINOR,
    .id = "crash_on_purpose",
    .version = "1.0.0",
    .description = "Crashes in its first map call: SIGSEGV or abort() (test plugin)",
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
