/* A shared object that is not a Conflux plugin: it exports no conflux_plugin_entry. */
#include <conflux/plugin.h>

CFX_EXPORT int some_other_function(int x);
CFX_EXPORT int some_other_function(int x) { return x + 1; }
