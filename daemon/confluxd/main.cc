// confluxd --config FILE [--foreground]: the merge daemon. It stays in the foreground (as a
// systemd Type=notify service does); logs go to stderr, one event per line with its level.
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <iostream>

#include <boost/asio/io_context.hpp>
#include <boost/program_options.hpp>

#include "conflux/config.h"
#include "conflux/log.h"
#include "daemon.h"

namespace po = boost::program_options;

int main(int argc, char** argv) {
  po::options_description opts(
      "usage: confluxd --config FILE [--foreground] [--log-level LEVEL]\n\n"
      "Watches the checkpoint directories of the configuration's jobs and merges each time an input\n"
      "checkpoint lands complete, publishing versions under each job's output directory. Control it\n"
      "with `conflux status|run|cancel|reload`; SIGHUP reloads the configuration, SIGTERM stops\n"
      "(a running merge is cancelled and its partial output removed).\n\noptions");
  std::string config_file, level = "info";
  opts.add_options()("config,c", po::value(&config_file), "configuration file (TOML)")(
      "foreground,f", "stay in the foreground (always the case; for service managers)")(
      "log-level", po::value(&level)->default_value("info"), "debug | info | warning | error")("help,h", "show this help")(
      "version", "print the version");
  po::variables_map vm;
  try {
    po::store(po::parse_command_line(argc, argv, opts), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    std::fprintf(stderr, "confluxd: %s (try 'confluxd --help')\n", e.what());
    return 2;
  }
  if (vm.count("help")) {
    std::cout << opts << "\n";
    return 0;
  }
  if (vm.count("version")) {
    std::printf("confluxd %s\n", CONFLUX_VERSION);
    return 0;
  }
  if (config_file.empty()) {
    std::fprintf(stderr, "confluxd: --config FILE is required\n");
    return 2;
  }
  const conflux::LogLevel min = level == "debug"     ? conflux::LogLevel::debug
                                : level == "warning" ? conflux::LogLevel::warning
                                : level == "error"   ? conflux::LogLevel::error
                                                     : conflux::LogLevel::info;
  // Under systemd, stderr goes to the journal: mark each line's priority the way it reads them.
  conflux::log_configure(std::getenv("JOURNAL_STREAM") ? conflux::LogStyle::journal : conflux::LogStyle::timestamped, min);

  // Strategies load only from the configured directories (and the installed ones); the
  // environment of whoever started the daemon does not add any, and workers inherit this.
  if (const char* p = std::getenv("CONFLUX_PLUGIN_PATH"); p && *p) {
    conflux::log_warning(std::string("ignoring CONFLUX_PLUGIN_PATH=") + p + ": confluxd loads plugins only from [daemon].plugin_dirs");
    ::unsetenv("CONFLUX_PLUGIN_PATH");
  }
  // Over a file-size limit, a write fails with EFBIG (reported) instead of killing the daemon.
  std::signal(SIGXFSZ, SIG_IGN);
  conflux::Config config;
  try {
    config = conflux::load_config(config_file);
  } catch (const conflux::ConfigError& e) {
    conflux::log_error(std::string("invalid configuration, not starting: ") + e.what());
    return 2;
  }
  try {
    boost::asio::io_context io;
    conflux::daemon::Daemon daemon(io, std::filesystem::absolute(config_file), std::move(config));
    daemon.start();
    io.run();
  } catch (const std::exception& e) {
    conflux::log_error(std::string("confluxd: ") + e.what());
    return 1;
  }
  return 0;
}
