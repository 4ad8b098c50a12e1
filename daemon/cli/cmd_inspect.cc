// conflux inspect PATH [--json]: validate a file or checkpoint directory and list its tensors.
#include <cstdio>
#include <iostream>
#include <string>

#include <boost/json.hpp>
#include <boost/program_options.hpp>

#include "commands.h"
#include "conflux/checkpoint.h"
#include "format.h"

namespace conflux::cli {

namespace po = boost::program_options;
namespace json = boost::json;

namespace {

std::string shape_text(const std::vector<std::uint64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

json::value to_json(const Checkpoint& c) {
  json::object root;
  root["path"] = c.path().string();
  root["valid"] = true;
  json::array shards;
  for (const SafetensorsFile& f : c.shards()) {
    json::object s;
    s["file"] = f.path().filename().string();
    s["size"] = f.file_size();
    s["header_size"] = f.layout().header_size;
    json::object meta;
    for (const auto& [k, v] : f.metadata()) meta[k] = v;
    s["metadata"] = std::move(meta);
    shards.push_back(std::move(s));
  }
  root["shards"] = std::move(shards);
  json::array tensors;
  for (const TensorRef& t : c.tensors()) {
    json::object o;
    o["name"] = t.name();
    o["dtype"] = dtype_name(t.info->dtype);
    json::array shape;
    for (std::uint64_t d : t.info->shape) shape.push_back(d);
    o["shape"] = std::move(shape);
    o["shard"] = c.shards()[t.shard].path().filename().string();
    o["data_offsets"] = json::array{t.info->begin, t.info->end};
    tensors.push_back(std::move(o));
  }
  root["tensors"] = std::move(tensors);
  root["tensor_count"] = c.size();
  root["data_bytes"] = c.data_bytes();
  return root;
}

void print_table(const Checkpoint& c) {
  std::size_t width = 4;
  for (const TensorRef& t : c.tensors()) width = std::max(width, t.name().size());
  const bool sharded = c.shards().size() > 1;
  std::printf("%s: valid, %zu tensors, %zu shard%s, %s of tensor data\n", c.path().c_str(), c.size(),
              c.shards().size(), sharded ? "s" : "", human_bytes(c.data_bytes()).c_str());
  std::printf("  %-*s  %-7s  %s\n", static_cast<int>(width), "name", "dtype", sharded ? "shape  (shard)" : "shape");
  for (const TensorRef& t : c.tensors()) {
    std::string shape = shape_text(t.info->shape);
    if (sharded) shape += "  (" + c.shards()[t.shard].path().filename().string() + ")";
    std::printf("  %-*s  %-7s  %s\n", static_cast<int>(width), t.name().c_str(),
                std::string(dtype_name(t.info->dtype)).c_str(), shape.c_str());
  }
}

}  // namespace

int cmd_inspect(int argc, char** argv) {
  po::options_description visible("usage: conflux inspect PATH [--json]\n\n"
                                  "Validates a .safetensors file or a checkpoint directory (model.safetensors,\n"
                                  "or shards with model.safetensors.index.json) and lists its tensors.\n"
                                  "Exit 0 when valid, 1 when not (one line on stderr names the file, the\n"
                                  "rule broken and the tensor), 2 on a usage error.\n\noptions");
  visible.add_options()("json", "print a JSON document instead of a table")("help,h", "show this help");
  po::options_description all;
  all.add(visible).add_options()("path", po::value<std::string>(), "file or directory");
  po::positional_options_description pos;
  pos.add("path", 1);
  po::variables_map vm;
  try {
    po::store(po::command_line_parser(argc, argv).options(all).positional(pos).run(), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    std::fprintf(stderr, "conflux inspect: %s (try 'conflux inspect --help')\n", e.what());
    return kExitUsage;
  }
  if (vm.count("help")) {
    std::cout << visible << "\n";
    return kExitOk;
  }
  if (!vm.count("path")) {
    std::fprintf(stderr, "conflux inspect: missing PATH (try 'conflux inspect --help')\n");
    return kExitUsage;
  }
  const bool as_json = vm.count("json") > 0;
  const std::string path = vm["path"].as<std::string>();
  try {
    const Checkpoint c = Checkpoint::open(path);
    if (as_json) std::cout << json::serialize(to_json(c)) << "\n";
    else print_table(c);
    return kExitOk;
  } catch (const Error& e) {
    std::fprintf(stderr, "conflux inspect: %s\n", e.what());
    if (as_json) {
      json::object o{{"path", path}, {"valid", false}, {"error", errc_name(e.code())},
                     {"file", e.file().string()}, {"message", e.what()}};
      if (!e.tensor().empty()) o["tensor"] = e.tensor();
      std::cout << json::serialize(o) << "\n";
    }
    return kExitFailed;
  }
}

}  // namespace conflux::cli
