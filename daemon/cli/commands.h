// Subcommands of the `conflux` tool. Each takes the arguments after its name and returns the
// process exit code: 0 ok, 1 failed (or invalid input), 2 usage or configuration error.
#pragma once

namespace conflux::cli {

inline constexpr int kExitOk = 0;
inline constexpr int kExitFailed = 1;
inline constexpr int kExitUsage = 2;

int cmd_inspect(int argc, char** argv);
int cmd_merge(int argc, char** argv);
int cmd_plugins(int argc, char** argv);
int cmd_status(int argc, char** argv);
int cmd_run(int argc, char** argv);
int cmd_cancel(int argc, char** argv);
int cmd_reload(int argc, char** argv);

}  // namespace conflux::cli
