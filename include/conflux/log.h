// Logging: one event per line on stderr, with a level. Thread-safe.
//
// Styles: plain ("warning: ...") for the command-line tool; timestamped
// ("2026-11-25T01:02:03Z warning: ...") for a daemon on a terminal; and journal style, where each
// line starts with the syslog priority in angle brackets ("<4>...") so that systemd-journald
// records the level of lines a service writes to stderr (and adds its own timestamps).
#pragma once

#include <string_view>

namespace conflux {

enum class LogLevel { debug = 0, info = 1, warning = 2, error = 3 };

enum class LogStyle { plain, timestamped, journal };

void log_configure(LogStyle style, LogLevel min_level);
void log_line(LogLevel level, std::string_view message);

inline void log_debug(std::string_view m) { log_line(LogLevel::debug, m); }
inline void log_info(std::string_view m) { log_line(LogLevel::info, m); }
inline void log_warning(std::string_view m) { log_line(LogLevel::warning, m); }
inline void log_error(std::string_view m) { log_line(LogLevel::error, m); }

}  // namespace conflux
