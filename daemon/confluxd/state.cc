#include "state.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include <boost/json.hpp>

#include "conflux/error.h"
#include "conflux/log.h"
#include "conflux/publish.h"

namespace conflux::daemon {

namespace fs = std::filesystem;
namespace json = boost::json;

StateStore::StateStore(fs::path dir) : dir_(std::move(dir)) {}

void StateStore::load() {
  const fs::path file = dir_ / "state.json";
  std::ifstream in(file, std::ios::binary);
  if (!in) return;
  std::stringstream ss;
  ss << in.rdbuf();
  try {
    const json::object root = json::parse(ss.str()).as_object();
    for (const auto& [name, v] : root.at("jobs").as_object()) {
      const json::object& o = v.as_object();
      JobRecord r;
      r.runs = o.at("runs").to_number<std::uint64_t>();
      r.finished_inputs = std::string(o.at("finished_inputs").as_string());
      r.running_inputs = std::string(o.at("running_inputs").as_string());
      r.last_ok = o.at("last_ok").as_bool();
      r.last_error = std::string(o.at("last_error").as_string());
      r.last_output = std::string(o.at("last_output").as_string());
      r.last_finished = o.at("last_finished").to_number<std::int64_t>();
      r.last_seconds = o.at("last_seconds").to_number<double>();
      for (const auto& p : o.at("published").as_array()) r.published.emplace_back(p.as_string());
      jobs_[std::string(name)] = std::move(r);
    }
  } catch (const std::exception& e) {
    const fs::path aside = dir_ / ("state.json.corrupt-" + std::to_string(::time(nullptr)));
    std::error_code ec;
    fs::rename(file, aside, ec);
    log_warning("state file " + file.string() + " is unreadable (" + e.what() + "); moved to " + aside.string() +
                ", starting with an empty state");
    jobs_.clear();
  }
}

void StateStore::save() const {
  json::object jobs;
  for (const auto& [name, r] : jobs_) {
    json::array published;
    for (const auto& p : r.published) published.push_back(json::string(p));
    jobs[name] = json::object{{"runs", r.runs},
                              {"finished_inputs", r.finished_inputs},
                              {"running_inputs", r.running_inputs},
                              {"last_ok", r.last_ok},
                              {"last_error", r.last_error},
                              {"last_output", r.last_output},
                              {"last_finished", r.last_finished},
                              {"last_seconds", r.last_seconds},
                              {"published", std::move(published)}};
  }
  const std::string text = json::serialize(json::object{{"version", 1}, {"jobs", std::move(jobs)}}) + "\n";
  const fs::path tmp = dir_ / ".state.json.tmp";
  const int fd = ::open(tmp.c_str(), O_CREAT | O_TRUNC | O_WRONLY | O_CLOEXEC, 0600);
  if (fd < 0) throw Error(Errc::io, tmp, std::string("cannot write the daemon state: ") + std::strerror(errno));
  const char* p = text.data();
  std::size_t left = text.size();
  while (left > 0) {
    const ssize_t n = ::write(fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = errno;
      ::close(fd);
      throw Error(Errc::io, tmp, std::string("cannot write the daemon state: ") + std::strerror(err));
    }
    p += n;
    left -= static_cast<std::size_t>(n);
  }
  ::fsync(fd);
  ::close(fd);
  if (::rename(tmp.c_str(), (dir_ / "state.json").c_str()) != 0)
    throw Error(Errc::io, dir_ / "state.json", std::string("cannot replace the daemon state: ") + std::strerror(errno));
  fsync_path(dir_);
}

}  // namespace conflux::daemon
