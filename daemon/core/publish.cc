#include "conflux/publish.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <stdio.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>

#include <boost/json.hpp>

#include "conflux/checkpoint.h"
#include "conflux/error.h"
#include "conflux/log.h"

namespace conflux {

namespace fs = std::filesystem;

namespace {

constexpr std::string_view kPartialTag = ".partial-";

std::string random_suffix() {
  std::random_device rd;
  char buf[32];
  std::snprintf(buf, sizeof buf, "%d-%08x", static_cast<int>(::getpid()), rd());
  return buf;
}

bool is_weight_or_pickle(const std::string& name) {
  static constexpr std::string_view kSkip[] = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf",
                                               ".safetensors.index.json", ".bin.index.json", ".msgpack", ".h5"};
  for (std::string_view s : kSkip)
    if (name.ends_with(s)) return true;
  return name == "conflux-manifest.json";
}

}  // namespace

std::string torch_dtype_name(DType t) {
  switch (t) {
    case DType::BF16: return "bfloat16";
    case DType::F16: return "float16";
    case DType::F32: return "float32";
    case DType::F64: return "float64";
    default: return "";
  }
}

bool is_partial_dir_name(const std::string& name) {
  return name.starts_with(".") && name.find(kPartialTag) != std::string::npos;
}

void fsync_path(const fs::path& p) {
  const int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error(Errc::io, p, std::string("cannot open to fsync: ") + std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  if (rc != 0) throw Error(Errc::io, p, std::string("fsync failed: ") + std::strerror(err));
}

PartialDir::PartialDir(fs::path target) : target_(std::move(target)) {
  if (target_.filename().empty()) target_ = target_.parent_path();
  const fs::path parent = target_.has_parent_path() ? target_.parent_path() : fs::path(".");
  std::error_code ec;
  fs::create_directories(parent, ec);
  if (ec) throw Error(Errc::io, parent, "cannot create the output's parent directory: " + ec.message());
  path_ = parent / ("." + target_.filename().string() + std::string(kPartialTag) + random_suffix());
  if (::mkdir(path_.c_str(), 0755) != 0)
    throw Error(Errc::io, path_, std::string("cannot create the partial output directory: ") + std::strerror(errno));
}

PartialDir::~PartialDir() {
  if (published_) return;
  std::error_code ec;
  fs::remove_all(path_, ec);
  if (ec) log_warning("could not remove partial output " + path_.string() + ": " + ec.message());
}

void PartialDir::publish(bool replace) {
  for (const auto& e : fs::directory_iterator(path_))
    if (e.is_regular_file()) fsync_path(e.path());
  fsync_path(path_);
  const fs::path parent = path_.parent_path();
  std::error_code ec;
  const bool exists = fs::exists(fs::symlink_status(target_, ec));
  if (!exists) {
    if (::rename(path_.c_str(), target_.c_str()) != 0)
      throw Error(Errc::io, target_, std::string("cannot publish the merged checkpoint: ") + std::strerror(errno));
  } else {
    if (!replace) throw Error(Errc::io, target_, "already exists (use --force to replace it)");
    if (::renameat2(AT_FDCWD, path_.c_str(), AT_FDCWD, target_.c_str(), RENAME_EXCHANGE) == 0) {
      // path_ now holds the previous output.
      published_ = true;
      fs::remove_all(path_, ec);
      if (ec) log_warning("published, but could not remove the previous output now at " + path_.string());
      fsync_path(parent);
      return;
    }
    const fs::path old = parent / ("." + target_.filename().string() + ".old-" + random_suffix());
    if (::rename(target_.c_str(), old.c_str()) != 0)
      throw Error(Errc::io, target_, std::string("cannot move the previous output aside: ") + std::strerror(errno));
    if (::rename(path_.c_str(), target_.c_str()) != 0) {
      const int err = errno;
      ::rename(old.c_str(), target_.c_str());
      throw Error(Errc::io, target_, std::string("cannot publish the merged checkpoint: ") + std::strerror(err));
    }
    fs::remove_all(old, ec);
  }
  published_ = true;
  fsync_path(parent);
}

void copy_auxiliary_files(const fs::path& from, const fs::path& to, std::optional<DType> dtype) {
  std::error_code ec;
  if (!fs::is_directory(from, ec)) return;
  for (const auto& e : fs::directory_iterator(from)) {
    const std::string name = e.path().filename().string();
    if (name.starts_with(".") || !e.is_regular_file(ec) || is_weight_or_pickle(name)) continue;
    const fs::path dst = to / name;
    if (name == "config.json" && dtype && !torch_dtype_name(*dtype).empty()) {
      std::ifstream in(e.path(), std::ios::binary);
      std::stringstream ss;
      ss << in.rdbuf();
      boost::json::error_code jec;
      boost::json::value v = boost::json::parse(ss.str(), jec);
      if (!jec && v.is_object()) {
        auto& o = v.as_object();
        o["torch_dtype"] = torch_dtype_name(*dtype);
        if (o.contains("dtype")) o["dtype"] = torch_dtype_name(*dtype);
        std::ofstream out(dst, std::ios::binary | std::ios::trunc);
        out << boost::json::serialize(v) << "\n";
        if (!out) throw Error(Errc::io, dst, "cannot write");
        continue;
      }
      log_warning(e.path().string() + " is not a JSON object; copied unchanged");
    }
    fs::copy_file(e.path(), dst, fs::copy_options::overwrite_existing, ec);
    if (ec) throw Error(Errc::io, dst, "cannot copy " + e.path().string() + ": " + ec.message());
  }
}

}  // namespace conflux
