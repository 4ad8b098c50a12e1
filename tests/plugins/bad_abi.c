/* A test plugin built for a future ABI major: the host must refuse it by name. Raw C ABI. */
#include <conflux/plugin.h>

static int create(const cfx_job* job, void** instance) {
  (void)job;
  *instance = 0;
  return 0;
}
static void destroy(void* instance) { (void)instance; }
static int map(void* instance, const cfx_chunk* chunk, float* out) {
  (void)instance;
  (void)chunk;
  (void)out;
  return 0;
}

static const cfx_pass passes[1] = {{sizeof(cfx_pass), CFX_PASS_MAP, 0, 0, 0, 0, 0, 0, map, 0, 0, 0}};

static const cfx_plugin descriptor = {
    sizeof(cfx_plugin), CFX_ABI_MAJOR + 1, 0, "bad_abi", "1.0.0", "built for the next ABI major",
    0, 1, 0, passes, 1, 0, CFX_BASE_UNUSED, 0, create, 0, destroy};

CFX_EXPORT const cfx_plugin* conflux_plugin_entry(const cfx_host* host);
CFX_EXPORT const cfx_plugin* conflux_plugin_entry(const cfx_host* host) {
  (void)host;
  return &descriptor;
}
