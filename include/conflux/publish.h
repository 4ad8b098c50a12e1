// Publishing a merged checkpoint: it is built in a hidden partial directory beside its target
// and appears under the target name in one rename, complete and fsynced, or not at all.
#pragma once

#include <filesystem>
#include <optional>
#include <string>

#include "conflux/dtype.h"

namespace conflux {

// A hidden directory ".<target name>.partial-<pid>-<random>" beside `target`, removed on
// destruction unless published.
class PartialDir {
 public:
  // Creates the parent of `target` if needed, then the partial directory. Throws Error(io).
  explicit PartialDir(std::filesystem::path target);
  PartialDir(const PartialDir&) = delete;
  PartialDir& operator=(const PartialDir&) = delete;
  ~PartialDir();

  const std::filesystem::path& path() const { return path_; }
  const std::filesystem::path& target() const { return target_; }

  // fsyncs the partial directory, then renames it to the target. An existing target is
  // replaced only when `replace` is set: the two are exchanged atomically (renameat2
  // RENAME_EXCHANGE) and the old one removed; without that support, the old one is moved aside
  // first. Throws Error(io).
  void publish(bool replace);

 private:
  std::filesystem::path target_;
  std::filesystem::path path_;
  bool published_ = false;
};

// Whether `name` is a partial directory left by PartialDir (used to clean up after a crash).
bool is_partial_dir_name(const std::string& name);

// Copies the non-weight files of checkpoint directory `from` (config.json, generation config,
// tokenizer files, README, ...: every regular, non-hidden file except safetensors weights, the
// index, pickles and a previous conflux-manifest.json) into `to`. In config.json, "torch_dtype"
// (and "dtype" when present) is set to `dtype`'s torch name when given. Throws Error(io).
void copy_auxiliary_files(const std::filesystem::path& from, const std::filesystem::path& to,
                          std::optional<DType> dtype);

// "bfloat16", "float16", "float32", "float64" (empty for other dtypes).
std::string torch_dtype_name(DType t);

// fsync a file or directory by path. Throws Error(io).
void fsync_path(const std::filesystem::path& p);

}  // namespace conflux
