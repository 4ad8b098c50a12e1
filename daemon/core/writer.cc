#include "conflux/writer.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <numeric>
#include <set>

#include <boost/json.hpp>

namespace conflux {

namespace fs = std::filesystem;
namespace json = boost::json;

namespace {

std::string errno_text(int err) { return std::strerror(err); }

void write_all(int fd, const fs::path& file, std::uint64_t offset, const std::byte* data, std::size_t size) {
  while (size > 0) {
    const ssize_t n = ::pwrite(fd, data, size, static_cast<off_t>(offset));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw Error(Errc::io, file, "write failed at byte " + std::to_string(offset) + ": " + errno_text(errno));
    }
    data += n;
    size -= static_cast<std::size_t>(n);
    offset += static_cast<std::uint64_t>(n);
  }
}

void sync_fd(int fd, const fs::path& file) {
  if (::fsync(fd) != 0) throw Error(Errc::io, file, "fsync failed: " + errno_text(errno));
}

void sync_dir(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw Error(Errc::io, dir, "cannot open directory to fsync: " + errno_text(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) throw Error(Errc::io, dir, "fsync failed: " + errno_text(err));
}

std::uint64_t tensor_bytes(const OutputTensor& t) {
  std::uint64_t n = 1;
  for (std::uint64_t d : t.shape)
    if (__builtin_mul_overflow(n, d, &n))
      throw Error(Errc::invalid_argument, {}, "shape product overflows 64 bits", t.name);
  std::uint64_t bits;
  if (__builtin_mul_overflow(n, static_cast<std::uint64_t>(dtype_bits(t.dtype)), &bits))
    throw Error(Errc::invalid_argument, {}, "byte size overflows 64 bits", t.name);
  if (bits % 8 != 0)
    throw Error(Errc::invalid_argument, {}, "size is not a whole number of bytes", t.name);
  return bits / 8;
}

std::string shard_name(std::size_t i, std::size_t count) {
  if (count == 1) return "model.safetensors";
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", i + 1, count);
  return buf;
}

// The header JSON of one shard, padded with spaces to a multiple of 8 so the data buffer (and,
// with the descending-size order, every tensor) is aligned.
std::string shard_header(const std::vector<std::size_t>& members, const std::vector<OutputTensor>& tensors,
                         const std::vector<PlannedTensor>& plan, const Metadata& metadata) {
  std::string s = "{\"__metadata__\":{\"format\":\"pt\"";
  std::set<std::string_view> seen{"format"};
  for (const auto& [k, v] : metadata) {
    if (!seen.insert(k).second) continue;
    s += ',';
    s += json::serialize(json::string(k));
    s += ':';
    s += json::serialize(json::string(v));
  }
  s += '}';
  for (std::size_t i : members) {
    const OutputTensor& t = tensors[i];
    s += ',';
    s += json::serialize(json::string(t.name));
    s += ":{\"dtype\":\"";
    s += dtype_name(t.dtype);
    s += "\",\"shape\":[";
    for (std::size_t d = 0; d < t.shape.size(); ++d) {
      if (d) s += ',';
      s += std::to_string(t.shape[d]);
    }
    s += "],\"data_offsets\":[";
    s += std::to_string(plan[i].begin) + "," + std::to_string(plan[i].begin + plan[i].nbytes) + "]}";
  }
  s += '}';
  s.append((8 - s.size() % 8) % 8, ' ');
  return s;
}

}  // namespace

CheckpointWriter::CheckpointWriter(fs::path dir, std::vector<OutputTensor> tensors, WriterOptions options)
    : dir_(std::move(dir)), tensors_(std::move(tensors)) {
  if (options.shard_size == 0) throw Error(Errc::invalid_argument, dir_, "shard_size must be positive");
  std::set<std::string_view> names;
  for (const OutputTensor& t : tensors_) {
    if (t.name.empty()) throw Error(Errc::invalid_argument, dir_, "empty tensor name");
    if (!names.insert(t.name).second)
      throw Error(Errc::invalid_argument, dir_, "tensor name appears twice in the output", t.name);
  }

  // Assign tensors to shards in the given order, greedily by the byte limit.
  plan_.resize(tensors_.size());
  std::vector<std::vector<std::size_t>> members(1);
  std::uint64_t current = 0;
  for (std::size_t i = 0; i < tensors_.size(); ++i) {
    const std::uint64_t n = tensor_bytes(tensors_[i]);
    if (!members.back().empty() && (current + n > options.shard_size || current + n < current)) {
      members.emplace_back();
      current = 0;
    }
    members.back().push_back(i);
    plan_[i] = PlannedTensor{members.size() - 1, 0, n};
    current += n;
    data_bytes_ += n;
  }

  shards_.resize(members.size());
  for (std::size_t s = 0; s < members.size(); ++s) {
    auto& m = members[s];
    std::stable_sort(m.begin(), m.end(), [&](std::size_t a, std::size_t b) {
      return dtype_bits(tensors_[a].dtype) > dtype_bits(tensors_[b].dtype);
    });
    std::uint64_t offset = 0;
    for (std::size_t i : m) {
      plan_[i].begin = offset;
      offset += plan_[i].nbytes;
    }
    shards_[s].file_name = shard_name(s, members.size());
    shards_[s].data_size = offset;
  }

  fds_.assign(shards_.size(), -1);
  try {
    create_shards(members, options.metadata);
  } catch (...) {
    for (int& fd : fds_)
      if (fd >= 0) ::close(fd), fd = -1;
    throw;
  }
}

void CheckpointWriter::create_shards(const std::vector<std::vector<std::size_t>>& members,
                                     const Metadata& metadata) {
  for (std::size_t s = 0; s < shards_.size(); ++s) {
    const std::string header = shard_header(members[s], tensors_, plan_, metadata);
    shards_[s].header_size = header.size();
    const fs::path file = dir_ / shards_[s].file_name;
    const int fd = ::open(file.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
    if (fd < 0) throw Error(Errc::io, file, "cannot create: " + errno_text(errno));
    fds_[s] = fd;
    // Reserve the space now so a full disk fails here, with a clear message, and not later.
    const auto size = static_cast<off_t>(shards_[s].file_size());
    if (int rc = ::posix_fallocate(fd, 0, size); rc != 0) {
      if (rc != EOPNOTSUPP && rc != EINVAL)
        throw Error(Errc::io, file,
                    "cannot reserve " + std::to_string(shards_[s].file_size()) + " bytes: " + errno_text(rc));
      if (::ftruncate(fd, size) != 0)
        throw Error(Errc::io, file, "cannot size the file: " + errno_text(errno));
    }
    std::byte prefix[8];
    std::uint64_t n = shards_[s].header_size;
    for (auto& b : prefix) b = static_cast<std::byte>(n & 0xff), n >>= 8;
    write_all(fd, file, 0, prefix, 8);
    write_all(fd, file, 8, reinterpret_cast<const std::byte*>(header.data()), header.size());
  }
}

CheckpointWriter::~CheckpointWriter() {
  for (int fd : fds_)
    if (fd >= 0) ::close(fd);
}

void CheckpointWriter::write_at(std::size_t index, std::uint64_t offset, std::span<const std::byte> bytes) {
  if (index >= tensors_.size())
    throw Error(Errc::invalid_argument, dir_, "tensor index " + std::to_string(index) + " out of range");
  const PlannedTensor& p = plan_[index];
  if (offset > p.nbytes || bytes.size() > p.nbytes - offset)
    throw Error(Errc::invalid_argument, dir_ / shards_[p.shard].file_name,
                "write of " + std::to_string(bytes.size()) + " bytes at offset " + std::to_string(offset) +
                    " leaves the tensor's " + std::to_string(p.nbytes) + " bytes",
                tensors_[index].name);
  const PlannedShard& s = shards_[p.shard];
  write_all(fds_[p.shard], dir_ / s.file_name, 8 + s.header_size + p.begin + offset, bytes.data(), bytes.size());
}

void CheckpointWriter::finish() {
  if (finished_) return;
  for (std::size_t s = 0; s < shards_.size(); ++s) {
    const fs::path file = dir_ / shards_[s].file_name;
    sync_fd(fds_[s], file);
    if (::close(fds_[s]) != 0) throw Error(Errc::io, file, "close failed: " + errno_text(errno));
    fds_[s] = -1;
  }
  if (shards_.size() > 1) {
    std::vector<std::size_t> order(tensors_.size());
    std::iota(order.begin(), order.end(), std::size_t{0});
    std::sort(order.begin(), order.end(),
              [&](std::size_t a, std::size_t b) { return tensors_[a].name < tensors_[b].name; });
    std::string text = "{\n  \"metadata\": {\n    \"total_size\": " + std::to_string(data_bytes_) +
                       "\n  },\n  \"weight_map\": {";
    for (std::size_t k = 0; k < order.size(); ++k) {
      const std::size_t i = order[k];
      text += k ? ",\n    " : "\n    ";
      text += json::serialize(json::string(tensors_[i].name));
      text += ": \"" + shards_[plan_[i].shard].file_name + "\"";
    }
    text += "\n  }\n}\n";
    const fs::path file = dir_ / "model.safetensors.index.json";
    const int fd = ::open(file.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0644);
    if (fd < 0) throw Error(Errc::io, file, "cannot create: " + errno_text(errno));
    try {
      write_all(fd, file, 0, reinterpret_cast<const std::byte*>(text.data()), text.size());
      sync_fd(fd, file);
    } catch (...) {
      ::close(fd);
      throw;
    }
    ::close(fd);
  }
  sync_dir(dir_);
  finished_ = true;
}

std::uint64_t parse_byte_size(std::string_view text) {
  auto bad = [&](const char* why) {
    return std::invalid_argument("invalid byte size \"" + std::string(text) + "\": " + why);
  };
  std::size_t i = 0;
  std::uint64_t whole = 0;
  std::size_t digits = 0;
  while (i < text.size() && text[i] >= '0' && text[i] <= '9') {
    if (__builtin_mul_overflow(whole, 10u, &whole) ||
        __builtin_add_overflow(whole, static_cast<std::uint64_t>(text[i] - '0'), &whole))
      throw bad("too large");
    ++i, ++digits;
  }
  double fraction = 0, scale = 0.1;
  if (i < text.size() && text[i] == '.') {
    ++i;
    while (i < text.size() && text[i] >= '0' && text[i] <= '9') {
      fraction += (text[i] - '0') * scale;
      scale /= 10;
      ++i, ++digits;
    }
  }
  if (digits == 0) throw bad("expected a number such as 5GB or 500MB");
  while (i < text.size() && text[i] == ' ') ++i;
  std::string unit;
  for (; i < text.size(); ++i) unit += static_cast<char>(std::tolower(static_cast<unsigned char>(text[i])));
  static const std::pair<std::string_view, std::uint64_t> kUnits[] = {
      {"", 1},          {"b", 1},
      {"kb", 1000},     {"mb", 1000'000},          {"gb", 1000'000'000},      {"tb", 1000'000'000'000},
      {"kib", 1ull << 10}, {"mib", 1ull << 20}, {"gib", 1ull << 30}, {"tib", 1ull << 40},
      {"k", 1000},      {"m", 1000'000},           {"g", 1000'000'000},       {"t", 1000'000'000'000},
  };
  for (const auto& [name, factor] : kUnits) {
    if (unit != name) continue;
    std::uint64_t bytes;
    if (__builtin_mul_overflow(whole, factor, &bytes)) throw bad("too large");
    const double extra = std::round(fraction * static_cast<double>(factor));
    if (__builtin_add_overflow(bytes, static_cast<std::uint64_t>(extra), &bytes)) throw bad("too large");
    return bytes;
  }
  throw bad("unknown unit (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)");
}

}  // namespace conflux
