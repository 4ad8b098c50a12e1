// One merge job end to end: resolve the strategy, bind its parameters, plan, stream into a
// partial directory, copy the base's config and tokenizer files, write conflux-manifest.json,
// publish. What `conflux merge` runs, and what the daemon's worker runs.
#pragma once

#include <atomic>
#include <filesystem>
#include <optional>
#include <string>

#include "conflux/config.h"
#include "conflux/engine.h"
#include "conflux/plugin_registry.h"

namespace conflux {

struct MergeRequest {
  const Config* config = nullptr;
  const JobConfig* job = nullptr;
  std::optional<std::filesystem::path> output;  // overrides job->output
  std::optional<unsigned> threads;              // overrides job->threads / [daemon].threads
  bool force = false;                           // replace an existing output
  std::uint64_t chunk_elements = 0;             // 0: the engine's default
  bool speculative_output = true;               // see EngineOptions
  Progress* progress = nullptr;
  const std::atomic<bool>* cancel = nullptr;
};

struct MergeOutcome {
  std::filesystem::path output;
  MergeResult result;
  double plan_seconds = 0;
  double total_seconds = 0;
};

// Errors before any tensor data is read (unknown strategy, bad parameters, wrong model count,
// existing output without force) are ConfigError or PluginError; later ones are Error or
// MergeError. On any failure nothing is published and the partial directory is removed.
MergeOutcome run_job(const MergeRequest& request, const PluginRegistry& plugins);

// Peak resident set size of this process in bytes (what /usr/bin/time -v reports).
std::uint64_t peak_rss_bytes();

}  // namespace conflux
