#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <numeric>

#include <boost/interprocess/file_mapping.hpp>
#include <boost/interprocess/mapped_region.hpp>

#include "conflux/convert.h"
#include "conflux/safetensors.h"

namespace conflux {

namespace bip = boost::interprocess;

struct SafetensorsFile::Mapping {
  bip::file_mapping file;
  bip::mapped_region region;
};

SafetensorsFile::SafetensorsFile(SafetensorsFile&&) noexcept = default;
SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&&) noexcept = default;
SafetensorsFile::~SafetensorsFile() = default;

SafetensorsFile SafetensorsFile::open(const std::filesystem::path& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0)
    throw Error(Errc::io, path, std::string("cannot open: ") + std::strerror(errno));
  if (!S_ISREG(st.st_mode)) throw Error(Errc::io, path, "not a regular file");

  SafetensorsFile f;
  f.path_ = path;
  f.file_size_ = static_cast<std::uint64_t>(st.st_size);
  // An empty file cannot be mapped; it fails the length check below all the same.
  std::span<const std::byte> bytes;
  if (f.file_size_ > 0) {
    try {
      auto m = std::make_unique<Mapping>();
      m->file = bip::file_mapping(path.c_str(), bip::read_only);
      m->region = bip::mapped_region(m->file, bip::read_only);
      f.map_ = std::move(m);
    } catch (const bip::interprocess_exception& e) {
      throw Error(Errc::io, path, std::string("cannot map: ") + e.what());
    }
    // The engine streams the data with pread (read): a larger readahead window for it.
    ::posix_fadvise(f.map_->file.get_mapping_handle().handle, 0, 0, POSIX_FADV_SEQUENTIAL);
    // The size is re-read from the mapping: the file may have changed since stat().
    f.file_size_ = f.map_->region.get_size();
    f.base_ = static_cast<const std::byte*>(f.map_->region.get_address());
    bytes = {f.base_, f.file_size_};
  }
  f.layout_ = parse_safetensors(bytes, path);
  f.by_name_.resize(f.layout_.tensors.size());
  std::iota(f.by_name_.begin(), f.by_name_.end(), std::size_t{0});
  std::sort(f.by_name_.begin(), f.by_name_.end(), [&](std::size_t a, std::size_t b) {
    return f.layout_.tensors[a].name < f.layout_.tensors[b].name;
  });
  return f;
}

const TensorInfo* SafetensorsFile::find(std::string_view name) const {
  auto it = std::lower_bound(by_name_.begin(), by_name_.end(), name, [&](std::size_t i, std::string_view n) {
    return layout_.tensors[i].name < n;
  });
  if (it == by_name_.end() || layout_.tensors[*it].name != name) return nullptr;
  return &layout_.tensors[*it];
}

const TensorInfo& SafetensorsFile::at(std::string_view name) const {
  if (const TensorInfo* t = find(name)) return *t;
  throw Error(Errc::not_found, path_, "no such tensor in this file", std::string(name));
}

TensorView SafetensorsFile::view(const TensorInfo& t) const {
  if (t.end > file_size_ - layout_.data_offset())
    throw std::out_of_range("tensor '" + t.name + "' does not belong to " + path_.string());
  return TensorView{&t, {base_ + layout_.data_offset() + t.begin, t.nbytes()}};
}

std::span<const std::byte> SafetensorsFile::header_bytes() const {
  return {base_ + 8, layout_.header_size};
}

void SafetensorsFile::read(std::uint64_t begin, std::uint64_t end, std::byte* dst) const {
  if (begin >= end) return;
  if (!map_ || end > file_size_ - layout_.data_offset())
    throw std::out_of_range("read past the data of " + path_.string());
  const int fd = map_->file.get_mapping_handle().handle;
  std::uint64_t at = layout_.data_offset() + begin;
  const std::uint64_t stop = layout_.data_offset() + end;
  while (at < stop) {
    const ssize_t n = ::pread(fd, dst, static_cast<std::size_t>(stop - at), static_cast<off_t>(at));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw Error(Errc::io, path_, std::string("cannot read: ") + std::strerror(errno));
    if (n == 0) throw Error(Errc::io, path_, "cannot read: the file was truncated during the merge");
    at += static_cast<std::uint64_t>(n);
    dst += n;
  }
}

double TensorView::element(std::size_t i) const {
  switch (info->dtype) {
    case DType::F32: return as<float>()[i];
    case DType::F64: return as<double>()[i];
    case DType::BF16: return bf16_bits_to_f32(as<std::uint16_t>()[i]);
    case DType::F16: return f16_bits_to_f32(as<std::uint16_t>()[i]);
    default:
      throw std::invalid_argument("tensor '" + info->name + "' has dtype " +
                                  std::string(dtype_name(info->dtype)) + ", not a floating dtype");
  }
}

}  // namespace conflux
