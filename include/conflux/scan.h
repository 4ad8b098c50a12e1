// Finding the checkpoints a daemon job should merge (ARCHITECTURE §7).
//
// A job input (a `models` entry or the `base`) is either a checkpoint directory (it holds
// weights: model.safetensors, model.safetensors.index.json or another *.safetensors) or a run
// directory whose subdirectories are checkpoints (checkpoint-100, iter_3, ...). The newest
// checkpoint of a run is the last in natural order (checkpoint-900 < checkpoint-1200); names
// starting with "." or "tmp-", and partial directories, are never checkpoints.
//
// A checkpoint is complete when its index (if any) parses, every shard exists and validates,
// and the ready marker (if configured) exists. Whether it has stopped changing (the `settle`
// rule) is the caller's business: it compares fingerprints over time.
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace conflux {

// Natural order: digit runs compare as numbers ("iter_9" < "iter_10"), the rest bytewise.
bool natural_less(std::string_view a, std::string_view b);

// Names that are never checkpoints: ".*", "tmp-*", partial directories.
bool is_ignored_name(std::string_view name);

// Whether `dir` holds checkpoint weights (or a pickle checkpoint, which then fails as
// incomplete with a clear reason).
bool holds_weights(const std::filesystem::path& dir);

// The candidate checkpoints of an input, newest first: [input] when it holds weights, else its
// subdirectories that hold weights, in reverse natural order. Empty when there are none (or the
// path does not exist).
std::vector<std::filesystem::path> candidate_checkpoints(const std::filesystem::path& input);

// What a checkpoint looks like on disk now: every regular, non-hidden file with its size and
// modification time. Equal fingerprints taken `settle` apart mean the writer has stopped.
struct FileStamp {
  std::string name;
  std::uint64_t size = 0;
  std::int64_t mtime_ns = 0;
  bool operator==(const FileStamp&) const = default;
};
struct Fingerprint {
  std::vector<FileStamp> files;  // sorted by name
  bool operator==(const Fingerprint&) const = default;
  std::int64_t newest_mtime_ns() const;
};
Fingerprint fingerprint(const std::filesystem::path& checkpoint);

// Completeness (see above); on failure `reason` names the file and the rule.
struct Completeness {
  bool complete = false;
  std::string reason;
};
Completeness check_complete(const std::filesystem::path& checkpoint, const std::string& ready_marker);

}  // namespace conflux
