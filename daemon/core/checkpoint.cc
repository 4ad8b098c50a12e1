#include "conflux/checkpoint.h"

#include <algorithm>
#include <fstream>
#include <map>
#include <numeric>
#include <set>
#include <sstream>

#include <boost/json.hpp>

namespace conflux {

namespace fs = std::filesystem;
namespace json = boost::json;

namespace {

bool is_pickle_name(const std::string& name) {
  auto ends_with = [&](std::string_view s) { return name.size() >= s.size() && name.ends_with(s); };
  return ends_with(".bin") || ends_with(".bin.index.json") || ends_with(".pt") || ends_with(".pth") ||
         ends_with(".ckpt");
}

[[noreturn]] void refuse_pickle(const fs::path& file) {
  throw Error(Errc::pickle_checkpoint, file,
              "pickle checkpoints are not read (unpickling can run arbitrary code); convert it to "
              "safetensors first (load it with torch in a trusted environment and save it with "
              "safetensors' save_file / save_pretrained(safe_serialization=True))");
}

std::string read_text(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw Error(Errc::io, file, "cannot open for reading");
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) throw Error(Errc::io, file, "read failed");
  return std::move(ss).str();
}

// A shard name from an index must name a file beside the index, nothing else.
bool is_plain_file_name(const std::string& name) {
  return !name.empty() && name != "." && name != ".." && name.find('/') == std::string::npos &&
         name.find('\0') == std::string::npos;
}

}  // namespace

std::vector<std::pair<std::string, std::string>> parse_index(std::string_view text, const fs::path& index) {
  json::error_code ec;
  json::value doc = json::parse(text, ec);
  if (ec) throw Error(Errc::invalid_index, index, "not valid JSON: " + ec.message());
  if (!doc.is_object()) throw Error(Errc::invalid_index, index, "the index is not a JSON object");
  const json::object& root = doc.get_object();
  if (const json::value* meta = root.if_contains("metadata"); meta && !meta->is_object() && !meta->is_null())
    throw Error(Errc::invalid_index, index, "\"metadata\" is not an object");
  const json::value* map = root.if_contains("weight_map");
  if (!map) throw Error(Errc::invalid_index, index, "missing \"weight_map\"");
  if (!map->is_object()) throw Error(Errc::invalid_index, index, "\"weight_map\" is not an object");
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& [key, value] : map->get_object()) {
    std::string tensor(key);
    if (!value.is_string())
      throw Error(Errc::invalid_index, index, "weight_map value is not a file name string", tensor);
    std::string shard(value.get_string());
    if (!is_plain_file_name(shard))
      throw Error(Errc::invalid_index, index,
                  "weight_map names shard \"" + shard + "\", which is not a plain file name in the "
                  "checkpoint directory", tensor);
    out.emplace_back(std::move(tensor), std::move(shard));
  }
  return out;
}

// The shard count in a Hugging Face shard name ("model-00001-of-00003.safetensors": 3), or 0 when
// the name is not one.
unsigned long shard_total(const std::string& name) {
  const std::string suffix = ".safetensors";
  const std::size_t of = name.rfind("-of-");
  if (of == std::string::npos || !name.ends_with(suffix)) return 0;
  const std::string total = name.substr(of + 4, name.size() - suffix.size() - of - 4);
  const std::size_t dash = name.rfind('-', of == 0 ? 0 : of - 1);
  const std::string part = dash == std::string::npos || dash >= of ? "" : name.substr(dash + 1, of - dash - 1);
  auto digits = [](const std::string& t) {
    return !t.empty() && t.size() <= 9 && std::all_of(t.begin(), t.end(), [](char ch) { return ch >= '0' && ch <= '9'; });
  };
  return digits(total) && digits(part) ? std::stoul(total) : 0;
}

fs::path locate_weights(const fs::path& dir) {
  std::error_code ec;
  if (!fs::exists(dir, ec)) throw Error(Errc::not_found, dir, "no such file or directory");
  if (!fs::is_directory(dir, ec)) throw Error(Errc::no_checkpoint, dir, "not a directory");
  if (fs::is_regular_file(dir / kSingleFileName, ec)) return dir / kSingleFileName;
  if (fs::is_regular_file(dir / kIndexFileName, ec)) return dir / kIndexFileName;

  std::vector<fs::path> weights, pickles;
  fs::directory_iterator it(dir, ec);
  if (ec) throw Error(Errc::io, dir, "cannot list directory: " + ec.message());
  for (const fs::directory_entry& e : it) {
    const std::string name = e.path().filename().string();
    if (name.starts_with(".") || !e.is_regular_file(ec)) continue;
    if (name.ends_with(".safetensors")) weights.push_back(e.path());
    else if (is_pickle_name(name)) pickles.push_back(e.path());
  }
  if (weights.size() == 1) {
    // One shard of several without the index (which writers save last): still being written.
    const std::string name = weights.front().filename().string();
    if (const unsigned long total = shard_total(name); total > 1)
      throw Error(Errc::no_checkpoint, dir,
                  "only " + name + " is here, one of " + std::to_string(total) + " shards, and no " +
                      std::string(kIndexFileName) + ": the checkpoint is incomplete");
    return weights.front();
  }
  if (weights.size() > 1)
    throw Error(Errc::no_checkpoint, dir,
                std::to_string(weights.size()) + " .safetensors files but no " +
                    std::string(kIndexFileName) + " saying how they form one model");
  if (!pickles.empty()) {
    std::sort(pickles.begin(), pickles.end());
    refuse_pickle(pickles.front());
  }
  throw Error(Errc::no_checkpoint, dir,
              "no model.safetensors, no " + std::string(kIndexFileName) + " and no other .safetensors file");
}

Checkpoint Checkpoint::open(const fs::path& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw Error(Errc::not_found, path, "no such file or directory");
  Checkpoint c;
  c.path_ = path;
  fs::path weights = path;
  if (fs::is_directory(path, ec)) {
    weights = locate_weights(path);
  } else if (is_pickle_name(path.filename().string())) {
    refuse_pickle(path);
  }

  if (weights.filename() == kIndexFileName) {
    c.has_index_ = true;
    const fs::path dir = weights.parent_path();
    const auto weight_map = parse_index(read_text(weights), weights);
    std::map<std::string, std::size_t> shard_of_name;  // shard file -> index into shards_
    std::set<std::string> shard_names;
    for (const auto& [tensor, shard] : weight_map) shard_names.insert(shard);
    for (const std::string& shard : shard_names) {
      const fs::path file = dir / shard;
      if (!fs::is_regular_file(file, ec)) {
        auto user = std::find_if(weight_map.begin(), weight_map.end(),
                                 [&](const auto& e) { return e.second == shard; });
        throw Error(Errc::not_found, file, "shard named by the index does not exist", user->first);
      }
      shard_of_name.emplace(shard, c.shards_.size());
      c.shards_.push_back(SafetensorsFile::open(file));
    }
    // The index and the shards must describe the same set of tensors, each in one place.
    std::map<std::string_view, std::size_t> mapped;
    for (const auto& [tensor, shard] : weight_map) {
      const std::size_t s = shard_of_name.at(shard);
      if (!c.shards_[s].find(tensor))
        throw Error(Errc::index_mismatch, weights,
                    "the index places it in " + shard + ", which does not contain it", tensor);
      mapped.emplace(tensor, s);
    }
    std::map<std::string_view, std::size_t> found;
    for (std::size_t s = 0; s < c.shards_.size(); ++s) {
      for (const TensorInfo& t : c.shards_[s].tensors()) {
        auto [it, fresh] = found.emplace(t.name, s);
        if (!fresh)
          throw Error(Errc::index_mismatch, weights,
                      "present in both " + c.shards_[it->second].path().filename().string() + " and " +
                          c.shards_[s].path().filename().string(),
                      t.name);
        auto m = mapped.find(t.name);
        if (m == mapped.end())
          throw Error(Errc::index_mismatch, weights,
                      "present in " + c.shards_[s].path().filename().string() + " but missing from the index",
                      t.name);
      }
    }
  } else {
    if (fs::is_directory(path, ec)) c.path_ = path;
    c.shards_.push_back(SafetensorsFile::open(weights));
  }
  c.index_tensors();
  return c;
}

void Checkpoint::index_tensors() {
  tensors_.clear();
  data_bytes_ = 0;
  for (std::size_t s = 0; s < shards_.size(); ++s)
    for (const TensorInfo& t : shards_[s].tensors()) {
      tensors_.push_back(TensorRef{s, &t});
      data_bytes_ += t.nbytes();
    }
  by_name_.resize(tensors_.size());
  std::iota(by_name_.begin(), by_name_.end(), std::size_t{0});
  std::sort(by_name_.begin(), by_name_.end(),
            [&](std::size_t a, std::size_t b) { return tensors_[a].name() < tensors_[b].name(); });
}

const TensorRef* Checkpoint::find(std::string_view name) const {
  auto it = std::lower_bound(by_name_.begin(), by_name_.end(), name,
                             [&](std::size_t i, std::string_view n) { return tensors_[i].name() < n; });
  if (it == by_name_.end() || tensors_[*it].name() != name) return nullptr;
  return &tensors_[*it];
}

const TensorRef& Checkpoint::at(std::string_view name) const {
  if (const TensorRef* t = find(name)) return *t;
  throw Error(Errc::not_found, path_, "no such tensor in this checkpoint", std::string(name));
}

}  // namespace conflux
