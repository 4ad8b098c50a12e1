// The example configurations in configs/ stay valid: each parses, and each job's strategy exists
// and accepts its parameters and model count.
#include <filesystem>

#include <gtest/gtest.h>

#include "conflux/config.h"
#include "conflux/params.h"
#include "conflux/plugin_registry.h"

namespace {

namespace fs = std::filesystem;

TEST(ExampleConfigs, ParseAndBindAgainstTheBuiltInPlugins) {
  conflux::PluginRegistry plugins;
  plugins.load_dirs({CONFLUX_PLUGIN_DIR});
  int files = 0;
  for (const auto& e : fs::directory_iterator(fs::path(CONFLUX_SOURCE_DIR) / "configs")) {
    if (e.path().extension() != ".toml") continue;
    SCOPED_TRACE(e.path().string());
    ++files;
    const conflux::Config c = conflux::load_config(e.path());
    EXPECT_FALSE(c.jobs.empty());
    for (const auto& job : c.jobs) {
      SCOPED_TRACE(job.name);
      const conflux::LoadedPlugin* plugin = nullptr;
      ASSERT_NO_THROW(plugin = &plugins.get(job.strategy));
      EXPECT_NO_THROW(conflux::ParamSet::bind(*plugin, job, c.file));
    }
  }
  EXPECT_GE(files, 4);
}

}  // namespace
