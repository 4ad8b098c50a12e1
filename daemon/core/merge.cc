#include "conflux/merge.h"

#include <sys/resource.h>
#include <sys/stat.h>

#include <chrono>
#include <ctime>
#include <fstream>
#include <thread>

#include <boost/json.hpp>
#include <openssl/evp.h>

#include "conflux/log.h"
#include "conflux/params.h"
#include "conflux/publish.h"

namespace conflux {

namespace fs = std::filesystem;
namespace json = boost::json;

namespace {

std::string sha256_hex(std::span<const std::byte> bytes) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (EVP_Digest(bytes.data(), bytes.size(), digest, &len, EVP_sha256(), nullptr) != 1) return "";
  static constexpr char kHex[] = "0123456789abcdef";
  std::string s;
  for (unsigned i = 0; i < len; ++i) s += kHex[digest[i] >> 4], s += kHex[digest[i] & 15];
  return s;
}

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  ::gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

json::object describe_input(const std::string& role, const Checkpoint& c) {
  json::object o{{"role", role}, {"path", fs::absolute(c.path()).string()}};
  json::array files;
  for (const SafetensorsFile& f : c.shards()) {
    struct stat st {};
    ::stat(f.path().c_str(), &st);
    files.push_back(json::object{{"name", f.path().filename().string()},
                                 {"size", f.file_size()},
                                 {"mtime_ns", static_cast<std::int64_t>(st.st_mtim.tv_sec) * 1'000'000'000 + st.st_mtim.tv_nsec},
                                 {"header_sha256", sha256_hex(f.header_bytes())}});
  }
  o["files"] = std::move(files);
  o["tensors"] = c.size();
  return o;
}

void write_manifest(const fs::path& dir, const MergeRequest& req, const LoadedPlugin& plugin, const ParamSet& params,
                    const MergePlan& plan, const MergeResult& r, unsigned threads, double plan_s) {
  const JobConfig& job = *req.job;
  json::object m;
  m["conflux_version"] = CONFLUX_VERSION;
  m["created"] = utc_now();
  m["job"] = job.name;
  m["config"] = fs::absolute(req.config->file).string();
  m["strategy"] = json::object{{"id", plugin.id()}, {"version", plugin.desc.version}, {"plugin", plugin.file.string()}};
  m["params"] = params.to_json(plugin);
  m["seed"] = job.seed;
  m["out_dtype"] = job.out_dtype ? json::value(dtype_name(*job.out_dtype)) : json::value(nullptr);
  m["shard_size"] = job.shard_size;
  m["threads"] = threads;
  json::array inputs;
  if (plan.base()) inputs.push_back(describe_input("base", *plan.base()));
  for (const Checkpoint& c : plan.models()) inputs.push_back(describe_input("model", c));
  m["inputs"] = std::move(inputs);
  m["output"] = json::object{{"tensors", r.tensors},
                             {"merged_tensors", r.merged_tensors},
                             {"copied_tensors", r.copied_tensors},
                             {"bytes", r.bytes_written}};
  json::array passes;
  for (const auto& p : r.passes) passes.push_back(json::object{{"kind", p.kind}, {"seconds", p.seconds}});
  m["timings"] = json::object{{"plan_seconds", plan_s}, {"merge_seconds", r.seconds}, {"passes", std::move(passes)}};
  if (!r.report.empty()) m["report"] = json::parse(r.report);
  const fs::path file = dir / "conflux-manifest.json";
  std::ofstream out(file, std::ios::binary | std::ios::trunc);
  out << json::serialize(m) << "\n";
  out.close();
  if (!out) throw Error(Errc::io, file, "cannot write the manifest");
}

unsigned resolve_threads(const MergeRequest& req) {
  if (req.threads && *req.threads > 0) return *req.threads;
  if (req.job->threads > 0) return req.job->threads;
  return req.config->daemon.threads;  // 0: all cores
}

}  // namespace

std::uint64_t peak_rss_bytes() {
  struct rusage ru {};
  ::getrusage(RUSAGE_SELF, &ru);
  return static_cast<std::uint64_t>(ru.ru_maxrss) * 1024;
}

MergeOutcome run_job(const MergeRequest& req, const PluginRegistry& plugins) {
  const auto t0 = std::chrono::steady_clock::now();
  const JobConfig& job = *req.job;
  const LoadedPlugin& plugin = [&]() -> const LoadedPlugin& {
    try {
      return plugins.get(job.strategy);
    } catch (const PluginError& e) {
      throw PluginError(req.config->file.string() + (job.line > 0 ? ":" + std::to_string(job.line) : std::string()) +
                        ": job '" + job.name + "': key 'strategy': " + e.what());
    }
  }();
  const ParamSet params = ParamSet::bind(plugin, job, req.config->file);
  MergeOutcome outcome;
  outcome.output = req.output ? *req.output : job.output;
  std::error_code ec;
  if (fs::exists(fs::symlink_status(outcome.output, ec)) && !req.force)
    throw ConfigError(outcome.output.string() + ": the output already exists; pass --force to replace it");

  const bool use_base = plugin.desc.base != CFX_BASE_UNUSED;
  const MergePlan plan = MergePlan::open(job.base, use_base, job.models, job.out_dtype);
  outcome.plan_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  PartialDir partial(outcome.output);
  WriterOptions wopt;
  wopt.shard_size = job.shard_size;
  wopt.metadata = {{"conflux_strategy", plugin.id()}, {"conflux_version", CONFLUX_VERSION}};
  CheckpointWriter writer(partial.path(), plan.output_tensors(), wopt);

  EngineOptions eopt;
  eopt.threads = resolve_threads(req);
  if (req.chunk_elements) eopt.chunk_elements = req.chunk_elements;
  eopt.speculative_output = req.speculative_output;
  eopt.seed = job.seed;
  eopt.job_name = job.name;
  eopt.cancel = req.cancel;
  eopt.progress = req.progress;
  outcome.result = run_merge(plan, plugin, params, writer, eopt);
  writer.finish();

  // Config and tokenizer files come from the base, else from the first model.
  const fs::path aux = job.base ? *job.base : job.models.front();
  std::optional<DType> dtype = job.out_dtype;
  if (!dtype)
    for (const auto& item : plan.items())
      if (item.merged) {
        dtype = item.out_dtype;
        break;
      }
  copy_auxiliary_files(aux, partial.path(), dtype);
  const unsigned threads_used = eopt.threads ? eopt.threads : std::max(1u, std::thread::hardware_concurrency());
  write_manifest(partial.path(), req, plugin, params, plan, outcome.result, threads_used, outcome.plan_seconds);
  partial.publish(req.force);
  outcome.total_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return outcome;
}

}  // namespace conflux
