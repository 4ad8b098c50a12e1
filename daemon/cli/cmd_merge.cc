// conflux merge JOB.toml [--job NAME] [--output DIR] [--threads N] [--force]
#include <csignal>
#include <cstdio>
#include <iostream>

#include <boost/program_options.hpp>

#include "commands.h"
#include "conflux/merge.h"
#include "conflux/plugin_registry.h"
#include "format.h"
#include "progress.h"

namespace conflux::cli {

namespace po = boost::program_options;

namespace {

std::atomic<bool> g_cancel{false};

extern "C" void on_interrupt(int) { g_cancel.store(true); }

}  // namespace

int cmd_merge(int argc, char** argv) {
  po::options_description visible(
      "usage: conflux merge JOB.toml [--job NAME] [--output DIR] [--threads N] [--force]\n\n"
      "Runs one merge job of a configuration file and exits. The merged checkpoint is built in a\n"
      "hidden partial directory beside the output and renamed into place when complete.\n"
      "Exit 0 on success, 1 when the merge fails, 2 on a usage or configuration error.\n\noptions");
  std::string config_file, job_name, output;
  int threads = 0, progress_fd = -1;
  std::uint64_t chunk = 0;
  visible.add_options()("job", po::value(&job_name), "the [[job]] to run (needed when the file has several)")(
      "output", po::value(&output), "write here instead of the job's output")(
      "threads", po::value(&threads), "worker threads (default: the job's, else all cores)")(
      "force", "replace an existing output")("quiet,q", "no progress display")(
      "chunk-elements", po::value(&chunk), "elements per chunk (tuning)")("help,h", "show this help");
  po::options_description all;
  all.add(visible).add_options()("config", po::value(&config_file))(
      "progress-fd", po::value(&progress_fd), "write \"progress <percent>\" lines to this descriptor (confluxd)");
  po::positional_options_description pos;
  pos.add("config", 1);
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(argc, argv).options(all).positional(pos).run(), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    std::fprintf(stderr, "conflux merge: %s (try 'conflux merge --help')\n", e.what());
    return kExitUsage;
  }
  if (vm.count("help")) {
    std::cout << visible << "\n";
    return kExitOk;
  }
  if (config_file.empty()) {
    std::fprintf(stderr, "conflux merge: missing JOB.toml (try 'conflux merge --help')\n");
    return kExitUsage;
  }
  if (threads < 0 || threads > 4096) {
    std::fprintf(stderr, "conflux merge: --threads must be 1 to 4096 (0: the default), not %d\n", threads);
    return kExitUsage;
  }

  PluginRegistry plugins;
  Config config;
  const JobConfig* job = nullptr;
  try {
    config = load_config(config_file);
    if (config.jobs.empty()) throw ConfigError(config_file + ": no [[job]] table");
    if (!job_name.empty()) {
      job = &config.job(job_name);
    } else if (config.jobs.size() == 1) {
      job = &config.jobs.front();
    } else {
      std::string names;
      for (const auto& j : config.jobs) names += (names.empty() ? "" : ", ") + j.name;
      throw ConfigError(config_file + ": the file has " + std::to_string(config.jobs.size()) +
                        " jobs; choose one with --job (" + names + ")");
    }
  } catch (const ConfigError& e) {
    std::fprintf(stderr, "conflux merge: %s\n", e.what());
    return kExitUsage;
  }
  plugins.load_dirs(PluginRegistry::search_path(config.daemon.plugin_dirs));

  MergeRequest req;
  req.config = &config;
  req.job = job;
  if (!output.empty()) req.output = output;
  if (threads > 0) req.threads = static_cast<unsigned>(threads);
  req.force = vm.count("force") > 0;
  req.chunk_elements = chunk;
  Progress progress;
  req.progress = &progress;
  req.cancel = &g_cancel;
  std::signal(SIGINT, on_interrupt);
  std::signal(SIGTERM, on_interrupt);
  // Past a file-size limit a write then fails with EFBIG, a clear error, instead of killing us.
  std::signal(SIGXFSZ, SIG_IGN);

  MergeOutcome outcome;
  try {
    ProgressDisplay display(progress, vm.count("quiet") == 0, progress_fd);
    outcome = run_job(req, plugins);
  } catch (const ConfigError& e) {
    std::fprintf(stderr, "conflux merge: %s\n", e.what());
    return kExitUsage;
  } catch (const PluginError& e) {
    std::fprintf(stderr, "conflux merge: %s\n", e.what());
    return kExitUsage;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "conflux merge: job '%s' failed: %s\n", job->name.c_str(), e.what());
    return kExitFailed;
  }
  const MergeResult& r = outcome.result;
  const double gbps = outcome.total_seconds > 0
                          ? static_cast<double>(r.bytes_read + r.bytes_written) / outcome.total_seconds / 1e9
                          : 0;
  std::printf("merged job '%s' with %s: %llu tensors (%llu merged, %llu copied)\n", job->name.c_str(),
              job->strategy.c_str(), static_cast<unsigned long long>(r.tensors),
              static_cast<unsigned long long>(r.merged_tensors), static_cast<unsigned long long>(r.copied_tensors));
  std::printf("  read %s, wrote %s in %.2f s (plan %.2f s): %.2f GB/s; peak RSS %s\n", human_bytes(r.bytes_read).c_str(),
              human_bytes(r.bytes_written).c_str(), outcome.total_seconds, outcome.plan_seconds, gbps,
              human_bytes(peak_rss_bytes()).c_str());
  std::printf("  output: %s\n", outcome.output.c_str());
  return kExitOk;
}

}  // namespace conflux::cli
