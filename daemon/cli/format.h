// Small text helpers shared by the CLI's subcommands.
#pragma once

#include <cstdint>
#include <cstdio>
#include <string>

namespace conflux::cli {

// "1.23 GB", "512 B": SI units, as disk sizes are quoted.
inline std::string human_bytes(std::uint64_t n) {
  static constexpr const char* kUnits[] = {"B", "kB", "MB", "GB", "TB", "PB"};
  double v = static_cast<double>(n);
  int u = 0;
  while (v >= 1000 && u < 5) v /= 1000, ++u;
  char buf[32];
  if (u == 0) std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(n));
  else std::snprintf(buf, sizeof buf, "%.2f %s", v, kUnits[u]);
  return buf;
}

}  // namespace conflux::cli
