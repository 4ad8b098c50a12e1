// conflux: the command-line tool. Dispatches to one subcommand per file (cmd_*.cc).
#include <cstdio>
#include <cstring>
#include <exception>
#include <string_view>

#include "commands.h"

namespace {

struct Command {
  const char* name;
  const char* summary;
  int (*run)(int, char**);
};

constexpr Command kCommands[] = {
    {"merge", "run one merge job of a configuration file, then exit", conflux::cli::cmd_merge},
    {"plugins", "list the strategy plugins found and their parameters", conflux::cli::cmd_plugins},
    {"inspect", "validate a .safetensors file or checkpoint directory and list its tensors",
     conflux::cli::cmd_inspect},
    {"status", "show the jobs of a running confluxd", conflux::cli::cmd_status},
    {"run", "ask confluxd to run a job now", conflux::cli::cmd_run},
    {"cancel", "ask confluxd to cancel a job's running merge", conflux::cli::cmd_cancel},
    {"reload", "ask confluxd to reload its configuration", conflux::cli::cmd_reload},
};

void usage(std::FILE* out) {
  std::fprintf(out,
               "usage: conflux <command> [options]\n\n"
               "Conflux %s: streaming model merging.\n\ncommands:\n",
               CONFLUX_VERSION);
  for (const Command& c : kCommands) std::fprintf(out, "  %-10s %s\n", c.name, c.summary);
  std::fprintf(out, "\nRun 'conflux <command> --help' for a command's options.\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    usage(stderr);
    return conflux::cli::kExitUsage;
  }
  const std::string_view name = argv[1];
  if (name == "--help" || name == "-h" || name == "help") {
    usage(stdout);
    return conflux::cli::kExitOk;
  }
  if (name == "--version") {
    std::printf("conflux %s\n", CONFLUX_VERSION);
    return conflux::cli::kExitOk;
  }
  for (const Command& c : kCommands) {
    if (name != c.name) continue;
    try {
      return c.run(argc - 1, argv + 1);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "conflux %s: %s\n", c.name, e.what());
      return conflux::cli::kExitFailed;
    }
  }
  std::fprintf(stderr, "conflux: unknown command '%s' (try 'conflux --help')\n", argv[1]);
  return conflux::cli::kExitUsage;
}
