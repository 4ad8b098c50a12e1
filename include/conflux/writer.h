// Writing Hugging Face checkpoints (safetensors shards + index).
//
// The writer plans the whole output before any data exists: it assigns tensors to shards in the
// order given, starting a new shard when the next tensor would push the current one past
// `shard_size` (a tensor larger than the limit gets a shard of its own), orders each shard's
// tensors by descending element size (stable) so every tensor is aligned to its element size,
// pads each header with spaces to a multiple of 8 and creates each shard at its full size with the
// space reserved (so a full disk is reported up front, not as a fault in the middle of a merge).
// Data is then written by offset with write_at() from any number of threads, in any order.
// finish() fsyncs the shards, writes model.safetensors.index.json when there is more than one
// shard, and fsyncs the directory.
//
// Names: one shard is "model.safetensors"; n > 1 shards are "model-00001-of-0000n.safetensors".
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include "conflux/dtype.h"
#include "conflux/safetensors.h"

namespace conflux {

struct OutputTensor {
  std::string name;
  DType dtype{};
  std::vector<std::uint64_t> shape;
};

struct WriterOptions {
  std::uint64_t shard_size = 5'000'000'000;  // largest shard's data bytes
  // Extra __metadata__ entries; {"format": "pt"} is always present first.
  Metadata metadata;
};

struct PlannedTensor {
  std::size_t shard = 0;
  std::uint64_t begin = 0;   // relative to the shard's data buffer
  std::uint64_t nbytes = 0;
};

struct PlannedShard {
  std::string file_name;
  std::uint64_t header_size = 0;  // N, a multiple of 8
  std::uint64_t data_size = 0;
  std::uint64_t file_size() const { return 8 + header_size + data_size; }
};

class CheckpointWriter {
 public:
  // Plans the layout and creates the shard files (headers written, data space reserved) in `dir`,
  // which must exist. Throws Error (invalid_argument for duplicate/empty names or a non-floating
  // dtype's size overflow; io for create/fallocate failures, naming the file).
  CheckpointWriter(std::filesystem::path dir, std::vector<OutputTensor> tensors,
                   WriterOptions options = {});
  CheckpointWriter(const CheckpointWriter&) = delete;
  CheckpointWriter& operator=(const CheckpointWriter&) = delete;
  ~CheckpointWriter();  // closes files; does not remove them

  const std::vector<OutputTensor>& tensors() const { return tensors_; }
  const std::vector<PlannedTensor>& plan() const { return plan_; }
  const std::vector<PlannedShard>& shards() const { return shards_; }
  std::uint64_t data_bytes() const { return data_bytes_; }

  // Writes `bytes` at byte `offset` inside tensor `index` (index into tensors()).
  // Thread-safe. Throws Error(invalid_argument) when the range leaves the tensor, Error(io) naming
  // the file on a failed write (e.g. disk full).
  void write_at(std::size_t index, std::uint64_t offset, std::span<const std::byte> bytes);

  // fsyncs every shard, writes the index (when sharded) and fsyncs the directory. Throws Error(io).
  void finish();

 private:
  void create_shards(const std::vector<std::vector<std::size_t>>& members, const Metadata& metadata);

  std::filesystem::path dir_;
  std::vector<OutputTensor> tensors_;
  std::vector<PlannedTensor> plan_;
  std::vector<PlannedShard> shards_;
  std::vector<int> fds_;
  std::uint64_t data_bytes_ = 0;
  bool finished_ = false;
};

// Parses a byte size such as "5GB", "500MB", "1.5GiB", "1000000" (bytes). SI units are powers of
// 1000, IEC units (KiB, MiB, GiB, TiB) powers of 1024. Throws std::invalid_argument.
std::uint64_t parse_byte_size(std::string_view text);

}  // namespace conflux
