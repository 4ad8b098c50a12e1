/* speculate: a plugin (id speculate_probe) with one tensor reduce pass flagged
   CFX_PASS_SPECULATIVE_OUTPUT (ABI 1.3) and a map, for engine_test's checks of the host's side
   of that contract. The speculative output is model 0's values and the map's is model 0 + 1, so
   the output shows which one the host kept (a real strategy must make them equal). The string
   parameter `mode` picks what the reduce pass does:
     "all"    every chunk of the first execution writes its output (where the host gives room);
              reduce_done declares it final when they all did: the map must not run.
     "some"   only the tensor's first chunk writes; reduce_done declares the output final
              anyway: the host must refuse (not every chunk wrote).
     "repeat" nothing written; the first execution asks for a repeat, the second declares the
              output final: the host must refuse (only a first execution can write output).
     "never"  nothing written, nothing declared: the map writes the output.
   The integer parameter `unzeroed` (default 0) is what the pass's instance_stats_unzeroed (ABI
   1.4) returns, against statistics of 64 bytes (instance_stats_size): engine_test checks that
   the host refuses a value that is not a multiple of 16 or exceeds the size (a valid nonzero one
   would leave the probe's count unzeroed: the probe does not initialise it).
   At least one model, base optional. Raw C ABI. */
#include <conflux/plugin.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum mode { MODE_ALL, MODE_SOME, MODE_REPEAT, MODE_NEVER };

typedef struct instance {
  enum mode mode;
  uint64_t unzeroed;
  int* rounds; /* per tensor: executions of the reduce pass done (reduce_done calls) */
} instance;

static const char* const modes[] = {"all", "some", "repeat", "never"};
static const cfx_param_spec params[] = {
    {
        .struct_size = sizeof(cfx_param_spec),
        .type = CFX_PARAM_STRING,
        .flags = 0,
        .choice_count = 4,
        .name = "mode",
        .doc = "what the speculative pass does: all, some, repeat or never",
        .default_string = "all",
        .choices = modes,
    },
    {
        .struct_size = sizeof(cfx_param_spec),
        .type = CFX_PARAM_INT,
        .flags = CFX_PARAM_HAS_MIN,
        .name = "unzeroed",
        .doc = "what instance_stats_unzeroed returns",
        .default_number = 0,
        .min = 0,
    },
};

static int create(const cfx_job* job, void** out) {
  instance* self = calloc(1, sizeof *self);
  *out = self;
  if (!self) {
    job->host->fail(job->ctx, "speculate_probe: out of memory");
    return 1;
  }
  for (int m = 0; m < 4; ++m)
    if (strcmp(job->params[0].string, modes[m]) == 0) self->mode = (enum mode)m;
  self->unzeroed = (uint64_t)job->params[1].number;
  self->rounds = calloc(job->tensor_count + 1, sizeof *self->rounds);
  if (!self->rounds) { /* a failed create is not destroyed */
    free(self);
    *out = NULL;
    job->host->fail(job->ctx, "speculate_probe: out of memory");
    return 1;
  }
  return 0;
}

static void destroy(void* p) {
  instance* self = p;
  if (!self) return;
  free(self->rounds);
  free(self);
}

/* The statistics: how many output values the chunks wrote. */
static int reduce(void* p, const cfx_chunk* chunk, void* partial) {
  const instance* self = p;
  if (!chunk->out) return 0;
  if (self->mode == MODE_ALL || (self->mode == MODE_SOME && chunk->begin == 0)) {
    memcpy(chunk->out, chunk->models[0], chunk->count * sizeof(float));
    *chunk->out_written = 1;
    *(uint64_t*)partial += chunk->count;
  }
  return 0;
}

static int combine(void* p, const cfx_tensor* tensor, void* into, const void* from) {
  (void)p;
  (void)tensor;
  *(uint64_t*)into += *(const uint64_t*)from;
  return 0;
}

static int reduce_done(void* p, const cfx_tensor* tensor, const void* stats, int32_t* repeat) {
  instance* self = p;
  const int round = self->rounds[tensor->index]++;
  switch (self->mode) {
    case MODE_ALL: /* an empty tensor has no chunk to write: its map runs (writing nothing) */
      *repeat = tensor->numel > 0 && *(const uint64_t*)stats == tensor->numel ? CFX_REDUCE_OUTPUT_FINAL : 0;
      break;
    case MODE_SOME: *repeat = CFX_REDUCE_OUTPUT_FINAL; break;
    case MODE_REPEAT: *repeat = round == 0 ? 1 : CFX_REDUCE_OUTPUT_FINAL; break;
    case MODE_NEVER: *repeat = 0; break;
  }
  return 0;
}

static uint64_t stats_size(void* p) {
  (void)p;
  return 64;
}

static uint64_t stats_unzeroed(void* p) { return ((const instance*)p)->unzeroed; }

static int map(void* p, const cfx_chunk* chunk, float* out) {
  (void)p;
  for (uint64_t k = 0; k < chunk->count; ++k) out[k] = chunk->models[0][k] + 1.0f;
  return 0;
}

static const cfx_pass passes[] = {
    {.struct_size = sizeof(cfx_pass),
     .kind = CFX_PASS_TENSOR_REDUCE,
     .flags = CFX_PASS_SPECULATIVE_OUTPUT,
     .stats_size = 8,
     .reduce = reduce,
     .combine = combine,
     .reduce_done = reduce_done,
     .instance_stats_size = stats_size,
     .instance_stats_unzeroed = stats_unzeroed},
    {.struct_size = sizeof(cfx_pass), .kind = CFX_PASS_MAP, .map = map},
};

static const cfx_plugin descriptor = {
    .struct_size = sizeof(cfx_plugin),
    .abi_major = CFX_ABI_MAJOR,
    .abi_minor = CFX_ABI_MINOR,
    .id = "speculate_probe",
    .version = "1.0.0",
    .description = "Declares speculative outputs final, rightly or not (test plugin)",
    .param_count = 2,
    .pass_count = 2,
    .params = params,
    .passes = passes,
    .min_models = 1,
    .base = CFX_BASE_OPTIONAL,
    .create = create,
    .destroy = destroy,
};

CFX_EXPORT const cfx_plugin* conflux_plugin_entry(const cfx_host* host);
CFX_EXPORT const cfx_plugin* conflux_plugin_entry(const cfx_host* host) {
  (void)host;
  return &descriptor;
}
