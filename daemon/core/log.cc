#include "conflux/log.h"

#include <unistd.h>

#include <atomic>
#include <ctime>
#include <string>

namespace conflux {
namespace {

std::atomic<LogStyle> g_style{LogStyle::plain};
std::atomic<LogLevel> g_min{LogLevel::info};

}  // namespace

void log_configure(LogStyle style, LogLevel min_level) {
  g_style = style;
  g_min = min_level;
}

void log_line(LogLevel level, std::string_view message) {
  if (level < g_min.load()) return;
  static constexpr const char* kPlain[] = {"debug: ", "", "warning: ", "error: "};
  static constexpr const char* kNamed[] = {"debug: ", "info: ", "warning: ", "error: "};
  static constexpr const char* kJournal[] = {"<7>", "<6>", "<4>", "<3>"};
  const int i = static_cast<int>(level);
  std::string line;
  switch (g_style.load()) {
    case LogStyle::journal: line = kJournal[i]; break;
    case LogStyle::plain: line = kPlain[i]; break;
    case LogStyle::timestamped: {
      const std::time_t t = std::time(nullptr);
      std::tm tm{};
      ::gmtime_r(&t, &tm);
      char buf[32];
      std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ ", &tm);
      line = std::string(buf) + kNamed[i];
      break;
    }
  }
  // One event, one line: a message must not forge further lines.
  for (char c : message) line += (c == '\n' || c == '\r') ? ' ' : c;
  line += '\n';
  // A single write() keeps concurrent lines whole.
  const char* p = line.data();
  std::size_t left = line.size();
  while (left > 0) {
    const ssize_t n = ::write(STDERR_FILENO, p, left);
    if (n <= 0) break;
    p += n;
    left -= static_cast<std::size_t>(n);
  }
}

}  // namespace conflux
