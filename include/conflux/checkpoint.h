// Hugging Face checkpoint directories.
//
// A checkpoint is one of, in the order transformers looks for them:
//   1. <dir>/model.safetensors
//   2. <dir>/model.safetensors.index.json naming shards in the same directory:
//        {"metadata": {"total_size": N, ...}, "weight_map": {"<tensor>": "<shard file>", ...}}
//   3. exactly one other *.safetensors file in <dir> (e.g. consolidated.safetensors)
// or a single .safetensors file given by path. Pickle checkpoints (pytorch_model*.bin, *.pt, *.pth)
// are refused with a message saying how to convert them; they are never opened.
//
// Opening validates every shard completely and checks the index against them: each weight_map
// entry is in its named shard, no tensor is in two shards, no shard tensor is missing from the map,
// and shard names are plain file names (no path separators, no "..").
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "conflux/safetensors.h"

namespace conflux {

inline constexpr std::string_view kSingleFileName = "model.safetensors";
inline constexpr std::string_view kIndexFileName = "model.safetensors.index.json";

struct TensorRef {
  std::size_t shard = 0;            // index into Checkpoint::shards()
  const TensorInfo* info = nullptr; // owned by that shard
  const std::string& name() const { return info->name; }
};

class Checkpoint {
 public:
  // `path` is a checkpoint directory or a single .safetensors file. Throws Error.
  static Checkpoint open(const std::filesystem::path& path);

  Checkpoint(Checkpoint&&) noexcept = default;
  Checkpoint& operator=(Checkpoint&&) noexcept = default;

  // The directory (or, for a single file, the file itself).
  const std::filesystem::path& path() const { return path_; }
  bool has_index() const { return has_index_; }
  const std::vector<SafetensorsFile>& shards() const { return shards_; }

  // Every tensor, in storage order (shard by shard, by offset): the order that reads sequentially.
  const std::vector<TensorRef>& tensors() const { return tensors_; }
  std::size_t size() const { return tensors_.size(); }
  // Sum of all tensors' bytes.
  std::uint64_t data_bytes() const { return data_bytes_; }

  // nullptr when absent.
  const TensorRef* find(std::string_view name) const;
  // Throws Error(not_found) naming the checkpoint and tensor when absent.
  const TensorRef& at(std::string_view name) const;
  TensorView view(const TensorRef& t) const { return shards_[t.shard].view(*t.info); }

 private:
  Checkpoint() = default;
  void index_tensors();

  std::filesystem::path path_;
  bool has_index_ = false;
  std::vector<SafetensorsFile> shards_;
  std::vector<TensorRef> tensors_;
  std::vector<std::size_t> by_name_;  // indices into tensors_ sorted by name
  std::uint64_t data_bytes_ = 0;
};

// Parses the text of a model.safetensors.index.json: its weight_map as (tensor, shard file) pairs
// in file order. `file` labels errors. Throws Error(invalid_index).
std::vector<std::pair<std::string, std::string>> parse_index(std::string_view text,
                                                             const std::filesystem::path& file);

// Finds the weights of a checkpoint directory without opening them: the index file, or the single
// weights file. Throws Error(no_checkpoint / pickle_checkpoint / not_found).
std::filesystem::path locate_weights(const std::filesystem::path& dir);

}  // namespace conflux
