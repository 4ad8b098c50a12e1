// conflux-bench: merge throughput against the I/O floor, measured in one run.
//
// Generates (once) a base and N agents with conflux-synth, warms the page cache, then measures,
// each in a fresh child process (so peak RSS is per measurement):
//   - the floor: every input byte read once (twice for two-pass strategies) and the output
//     written once, through the engine's own reads, chunking and writer;
//   - each strategy's merge at all threads and at one thread.
// Measurements are interleaved in rounds (--repeat) so that drift in the machine's state touches
// floors and merges alike. Prints seconds (best of the rounds), GB/s of bytes read + written, the
// reads (bytes read over the bytes of the base and the models: 2.00 for a strategy that reads
// every input twice), the ratio to the best floor of the same kind and thread count, peak RSS
// and, for strategies held to a floor of fewer reads than they make, the ratio to the floor of
// their own reads ("own floor").
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <boost/program_options.hpp>

#include "conflux/engine.h"
#include "conflux/log.h"
#include "conflux/merge.h"
#include "conflux/publish.h"

namespace fs = std::filesystem;
namespace po = boost::program_options;
using namespace conflux;

namespace {

RawParam param(const std::string& key, double v) {
  RawParam p;
  p.key = key;
  p.kind = RawParam::Kind::floating;
  p.number = v;
  return p;
}
RawParam text(const std::string& key, const std::string& v) {
  RawParam p;
  p.key = key;
  p.kind = RawParam::Kind::string;
  p.string = v;
  return p;
}

struct Case {
  std::string label;
  std::string strategy;
  std::vector<RawParam> params;
  unsigned input_reads = 1;  // of the floor it is compared with
  unsigned max_models = 0;   // 0: all agents
  // Reads of its inputs the strategy makes (per-tensor statistics before any output: 2), when
  // more than input_reads: it is also compared with the floor of that many reads.
  unsigned own_reads = 0;
};

std::vector<Case> all_cases() {
  return {
      {"task_arithmetic", "task_arithmetic", {}, 1, 0},
      {"linear", "linear", {}, 1, 0},
      {"ram", "ram", {param("r", 0.0)}, 1, 0},
      {"ram+", "ram", {param("r", 0.1), param("alpha", 2.0), text("scope", "model")}, 2, 0},
      {"imm", "imm", {}, 1, 1},
      {"ties", "ties", {param("density", 0.2)}, 1, 0},
      {"dare_linear", "dare_linear", {param("density", 0.2)}, 1, 0},
      {"dare_ties", "dare_ties", {param("density", 0.2)}, 1, 0},
      {"breadcrumbs", "breadcrumbs", {param("density", 0.2)}, 1, 0, 2},
      {"breadcrumbs_ties", "breadcrumbs_ties", {param("density", 0.2)}, 1, 0, 2},
      {"della", "della", {param("density", 0.2)}, 1, 0},
      {"della_linear", "della_linear", {param("density", 0.2)}, 1, 0},
      {"slerp", "slerp", {param("t", 0.5)}, 1, 1, 2},  // base + one model: exactly two checkpoints
      {"model_stock", "model_stock", {}, 1, 0, 2},
  };
}

struct Measurement {
  double seconds = 0;
  std::uint64_t bytes_read = 0, bytes_written = 0, peak_rss = 0;
  bool ok = false;
  std::string error;
};

// Runs `body` in a child process and returns what it measured.
template <class F>
Measurement in_child(F body) {
  int fds[2];
  if (::pipe(fds) != 0) return {0, 0, 0, 0, false, "pipe failed"};
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::close(fds[0]);
    std::string out;
    log_configure(LogStyle::plain, LogLevel::warning);  // strategies' reports would drown the table
    try {
      Measurement m = body();
      out = "ok " + std::to_string(m.seconds) + " " + std::to_string(m.bytes_read) + " " +
            std::to_string(m.bytes_written) + " " + std::to_string(peak_rss_bytes());
    } catch (const std::exception& e) {
      out = std::string("error ") + e.what();
    }
    if (::write(fds[1], out.data(), out.size()) < 0) _exit(2);
    _exit(0);
  }
  ::close(fds[1]);
  std::string text;
  char buf[4096];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof buf)) > 0;) text.append(buf, static_cast<std::size_t>(n));
  ::close(fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  Measurement m;
  std::istringstream in(text);
  std::string word;
  in >> word;
  if (word == "ok") {
    in >> m.seconds >> m.bytes_read >> m.bytes_written >> m.peak_rss;
    m.ok = true;
  } else {
    std::getline(in, m.error);
    if (m.error.empty()) m.error = "child failed (status " + std::to_string(status) + ")";
  }
  return m;
}

fs::path kOut;  // the output directory of every measurement, removed between runs

Measurement measure(const std::function<Measurement()>& once) {
  // The previous run's output (a model's worth of dirty pages) must reach the disk before the
  // next run starts, or its writeback is measured as part of the next one.
  ::sync();
  Measurement m = in_child(once);
  std::error_code ec;
  fs::remove_all(kOut, ec);
  return m;
}

std::string mib(std::uint64_t b) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.0f MiB", static_cast<double>(b) / (1 << 20));
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  std::string dir, preset, cases_text, bin_dir, out_dir;
  unsigned agents = 3, threads = 0, repeat = 3, layers = 0;
  std::uint64_t chunk = 0;
  po::options_description opts("usage: conflux-bench --dir DIR [options]\n\noptions");
  opts.add_options()("help,h", "show this help")("dir", po::value(&dir), "work directory (checkpoints are generated here once)")(
      "preset", po::value(&preset)->default_value("qwen2.5-0.5b"), "conflux-synth preset")(
      "layers", po::value(&layers), "override the preset's layer count")(
      "agents", po::value(&agents)->default_value(3), "number of agents")(
      "cases", po::value(&cases_text)->default_value("task_arithmetic"),
      "comma-separated strategies to measure, or 'all' (those whose plugin is installed)")(
      "threads", po::value(&threads)->default_value(0), "threads for the all-thread runs (0: all cores)")(
      "repeat", po::value(&repeat)->default_value(3), "runs per measurement (the best is kept)")(
      "chunk-elements", po::value(&chunk)->default_value(0), "engine chunk size (0: default)")(
      "out-dir", po::value(&out_dir),
      "where outputs are written (default: DIR); a tmpfs such as /dev/shm takes the disk's speed out of the figures")(
      "single-thread", "also measure every case at one thread");
  po::variables_map vm;
  try {
    po::store(po::parse_command_line(argc, argv, opts), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    std::fprintf(stderr, "conflux-bench: %s\n", e.what());
    return 2;
  }
  if (vm.count("help") || dir.empty()) {
    std::cout << opts << "\n";
    return dir.empty() ? 2 : 0;
  }
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  const fs::path work = fs::absolute(dir);
  const fs::path self_dir = fs::read_symlink("/proc/self/exe").parent_path();
  const fs::path data = work / (preset + (layers ? "-L" + std::to_string(layers) : "") + "-a" + std::to_string(agents));
  if (!fs::exists(data / ("agent-" + std::to_string(agents)) / "config.json")) {
    std::printf("generating %s ...\n", data.c_str());
    std::fflush(stdout);
    fs::remove_all(data);
    std::string cmd = (self_dir / "conflux-synth").string() + " --out '" + data.string() + "' --preset " + preset +
                      " --agents " + std::to_string(agents) + " --shard-size 2GB";
    if (layers) cmd += " --layers " + std::to_string(layers);
    if (std::system(cmd.c_str()) != 0) {
      std::fprintf(stderr, "conflux-bench: generating the checkpoints failed\n");
      return 1;
    }
  }

  PluginRegistry plugins;
  plugins.load_dirs(PluginRegistry::search_path({}));
  std::vector<Case> cases;
  for (const Case& c : all_cases()) {
    const bool wanted = cases_text == "all" || ("," + cases_text + ",").find("," + c.label + ",") != std::string::npos;
    if (!wanted) continue;
    try {
      plugins.get(c.strategy);
      cases.push_back(c);
    } catch (const PluginError&) {
      if (cases_text != "all") std::printf("skipping %s: no '%s' plugin\n", c.label.c_str(), c.strategy.c_str());
    }
  }

  Config config;
  config.file = work / "bench.toml";
  auto make_job = [&](const Case& c, const fs::path& out) {
    JobConfig j;
    j.name = "bench";
    j.strategy = c.strategy;
    j.base = data / "base";
    const unsigned n = c.max_models ? std::min(c.max_models, agents) : agents;
    for (unsigned i = 1; i <= n; ++i) j.models.push_back(data / ("agent-" + std::to_string(i)));
    j.output = out;
    j.out_dtype = DType::BF16;
    j.params = c.params;
    return j;
  };
  const fs::path out = (out_dir.empty() ? work : fs::absolute(out_dir)) / "conflux-bench-out";
  kOut = out;
  auto floor_run = [&](unsigned n_models, unsigned reads, unsigned t) {
    return [=, &data]() {
      const auto t0 = std::chrono::steady_clock::now();
      std::vector<fs::path> models;
      for (unsigned i = 1; i <= n_models; ++i) models.push_back(data / ("agent-" + std::to_string(i)));
      const MergePlan plan = MergePlan::open(data / "base", true, models, DType::BF16);
      PartialDir partial(out);
      CheckpointWriter w(partial.path(), plan.output_tensors(), {5'000'000'000, {}});
      EngineOptions o;  // the default chunking: --chunk-elements tunes merges, not the floor
      o.threads = t;
      const MergeResult r = run_floor(plan, w, o, reads);
      w.finish();
      partial.publish(true);
      Measurement m;
      m.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      m.bytes_read = r.bytes_read;
      m.bytes_written = r.bytes_written;
      return m;
    };
  };
  auto merge_run = [&](const Case& c, unsigned t) {
    return [=, &config, &plugins]() {
      const JobConfig j = make_job(c, out);
      MergeRequest req;
      req.config = &config;
      req.job = &j;
      req.threads = t;
      req.force = true;
      req.chunk_elements = chunk;
      const MergeOutcome o = run_job(req, plugins);
      Measurement m;
      m.seconds = o.total_seconds;
      m.bytes_read = o.result.bytes_read;
      m.bytes_written = o.result.bytes_written;
      return m;
    };
  };

  // Warm the page cache: the targets are for a warm cache.
  in_child(floor_run(agents, 1, threads));

  const Checkpoint base = Checkpoint::open(data / "base");
  std::printf("\nConflux benchmark: base + %u agents, %s shapes%s, BF16, %.1fM parameters per model\n", agents,
              preset.c_str(), layers ? (" (" + std::to_string(layers) + " layers)").c_str() : "",
              static_cast<double>(base.data_bytes()) / 2e6);
  std::printf("threads %u, best of %u interleaved rounds, each measurement in its own process, output in %s\n\n", threads, repeat,
              out.parent_path().c_str());
  // reads: the bytes the run read over the bytes of the base and the models (how many times it
  // read them; 0.75 for a merge of 3 models that does not read the base, as linear).
  // own floor: for a strategy that must read its inputs more often than its floor does, the
  // ratio to the floor of as many reads (its I/O alone takes that floor's time).
  std::printf("%-20s %7s %9s %8s %6s %12s %10s %10s\n", "case", "threads", "seconds", "GB/s", "reads", "ratio/floor",
              "peak RSS", "own floor");
  const double model_bytes = static_cast<double>(base.data_bytes());
  auto row = [model_bytes](const std::string& label, unsigned t, unsigned models, const Measurement& m,
                           double floor_s, double own_floor_s) {
    if (!m.ok) {
      std::printf("%-20s %7u  failed: %s\n", label.c_str(), t, m.error.c_str());
      return;
    }
    const double gbps = static_cast<double>(m.bytes_read + m.bytes_written) / m.seconds / 1e9;
    const double reads = static_cast<double>(m.bytes_read) / (model_bytes * (models + 1));
    char own[32] = "";
    if (own_floor_s > 0) std::snprintf(own, sizeof own, "%.2f", m.seconds / own_floor_s);
    std::printf("%-20s %7u %9.3f %8.2f %6.2f %12.2f %10s %10s\n", label.c_str(), t, m.seconds, gbps, reads,
                floor_s > 0 ? m.seconds / floor_s : 0.0, mib(m.peak_rss).c_str(), own);
    std::fflush(stdout);
  };

  // Every measurement (floors and merges) runs once per round, interleaved, so that drift in the
  // machine's state (page cache, tmpfs, other load) touches floors and merges alike; each keeps
  // its best run, and ratios use the best floor of the same kind.
  struct Slot {
    std::string label;
    unsigned threads = 0;
    std::string floor_key;  // the floor a merge is compared with; empty for a floor itself
    std::string own_key;    // the floor of the strategy's own reads, if that is another one
    unsigned models = 0;
    std::function<Measurement()> run;
    Measurement best;
  };
  std::vector<Slot> slots;
  std::map<std::string, std::size_t> floor_slot;  // "<models>x<reads>@<threads>" -> slot
  std::vector<unsigned> thread_counts{threads};
  if (vm.count("single-thread") && threads != 1) thread_counts.push_back(1);
  for (unsigned t : thread_counts)
    for (const Case& c : cases) {
      const unsigned n = c.max_models ? std::min(c.max_models, agents) : agents;
      auto floor_key = [&](unsigned reads) {
        const std::string key = std::to_string(n) + "x" + std::to_string(reads) + "@" + std::to_string(t);
        if (!floor_slot.count(key)) {
          floor_slot[key] = slots.size();
          slots.push_back({"floor (" + std::to_string(n) + "m, " + std::to_string(reads) + " read" +
                               (reads > 1 ? "s" : "") + ")",
                           t, "", "", n, floor_run(n, reads, t), {}});
        }
        return key;
      };
      const std::string key = floor_key(c.input_reads);
      const std::string own = c.own_reads > c.input_reads ? floor_key(c.own_reads) : "";
      slots.push_back({c.label, t, key, own, n, merge_run(c, t), {}});
    }
  for (unsigned round = 1; round <= repeat; ++round) {
    std::fprintf(stderr, "round %u/%u ...\n", round, repeat);
    for (Slot& s : slots) {
      if (round > 1 && !s.best.ok) continue;  // failed: reported below
      const Measurement m = measure(s.run);
      if (!m.ok) {
        s.best = m;
        continue;
      }
      const std::uint64_t rss = std::max(s.best.peak_rss, m.peak_rss);
      if (!s.best.ok || m.seconds < s.best.seconds) s.best = m;
      s.best.peak_rss = rss;
    }
  }
  for (unsigned t : thread_counts)
    for (const Slot& s : slots) {
      if (s.threads != t) continue;
      const Slot& f = s.floor_key.empty() ? s : slots[floor_slot[s.floor_key]];
      double own = 0;
      if (!s.own_key.empty() && slots[floor_slot[s.own_key]].best.ok) own = slots[floor_slot[s.own_key]].best.seconds;
      row(s.label, t, s.models, s.best, f.best.ok ? f.best.seconds : 0.0, own);
    }
  fs::remove_all(out);
  return 0;
}
