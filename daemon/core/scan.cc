#include "conflux/scan.h"

#include <sys/stat.h>

#include <algorithm>
#include <cctype>

#include "conflux/checkpoint.h"
#include "conflux/publish.h"

namespace conflux {

namespace fs = std::filesystem;

bool natural_less(std::string_view a, std::string_view b) {
  std::size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    const bool da = std::isdigit(static_cast<unsigned char>(a[i])), db = std::isdigit(static_cast<unsigned char>(b[j]));
    if (da && db) {
      // Compare digit runs as numbers: skip leading zeros, then longer is larger, then bytewise.
      std::size_t ei = i, ej = j;
      while (ei < a.size() && std::isdigit(static_cast<unsigned char>(a[ei]))) ++ei;
      while (ej < b.size() && std::isdigit(static_cast<unsigned char>(b[ej]))) ++ej;
      std::size_t si = i, sj = j;
      while (si + 1 < ei && a[si] == '0') ++si;
      while (sj + 1 < ej && b[sj] == '0') ++sj;
      if (ei - si != ej - sj) return ei - si < ej - sj;
      const int c = a.substr(si, ei - si).compare(b.substr(sj, ej - sj));
      if (c != 0) return c < 0;
      if (ei - i != ej - j) return ei - i < ej - j;  // "007" after "7": a stable tie-break
      i = ei, j = ej;
    } else {
      if (a[i] != b[j]) return static_cast<unsigned char>(a[i]) < static_cast<unsigned char>(b[j]);
      ++i, ++j;
    }
  }
  return a.size() - i < b.size() - j;
}

bool is_ignored_name(std::string_view name) {
  return name.empty() || name.starts_with(".") || name.starts_with("tmp-") || name.starts_with("tmp_") ||
         is_partial_dir_name(std::string(name));
}

bool holds_weights(const fs::path& dir) {
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.starts_with(".")) continue;
    if (name.ends_with(".safetensors") || name == kIndexFileName || name.ends_with(".bin") ||
        name.ends_with(".bin.index.json"))
      return true;
  }
  return false;
}

std::vector<fs::path> candidate_checkpoints(const fs::path& input) {
  std::error_code ec;
  if (!fs::is_directory(input, ec)) return {};
  if (holds_weights(input)) return {input};
  std::vector<fs::path> out;
  for (const auto& e : fs::directory_iterator(input, ec)) {
    const std::string name = e.path().filename().string();
    if (is_ignored_name(name) || !e.is_directory(ec)) continue;
    if (holds_weights(e.path())) out.push_back(e.path());
  }
  std::sort(out.begin(), out.end(), [](const fs::path& a, const fs::path& b) {
    return natural_less(b.filename().string(), a.filename().string());
  });
  return out;
}

std::int64_t Fingerprint::newest_mtime_ns() const {
  std::int64_t m = 0;
  for (const auto& f : files) m = std::max(m, f.mtime_ns);
  return m;
}

Fingerprint fingerprint(const fs::path& checkpoint) {
  Fingerprint fp;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(checkpoint, ec)) {
    const std::string name = e.path().filename().string();
    struct stat st {};
    if (name.starts_with(".") || ::stat(e.path().c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
    fp.files.push_back({name, static_cast<std::uint64_t>(st.st_size),
                        static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec});
  }
  std::sort(fp.files.begin(), fp.files.end(), [](const FileStamp& a, const FileStamp& b) { return a.name < b.name; });
  return fp;
}

Completeness check_complete(const fs::path& checkpoint, const std::string& ready_marker) {
  std::error_code ec;
  if (!ready_marker.empty() && !fs::exists(checkpoint / ready_marker, ec))
    return {false, (checkpoint / ready_marker).string() + ": ready marker not there yet"};
  try {
    Checkpoint::open(checkpoint);  // parses the index and validates every shard
    return {true, {}};
  } catch (const std::exception& e) {
    return {false, e.what()};
  }
}

}  // namespace conflux
