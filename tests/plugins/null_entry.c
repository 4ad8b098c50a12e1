/* A plugin whose entry point refuses the host (returns NULL), as plugin.h allows, after logging
   why with ctx == NULL. */
#include <conflux/plugin.h>

CFX_EXPORT const cfx_plugin* conflux_plugin_entry(const cfx_host* host);
CFX_EXPORT const cfx_plugin* conflux_plugin_entry(const cfx_host* host) {
  if (host) host->log(0, CFX_LOG_INFO, "null_entry: refusing this host on purpose (test plugin)");
  return 0;
}
