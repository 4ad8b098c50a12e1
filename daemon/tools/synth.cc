// conflux-synth: writes synthetic Hugging Face checkpoints shaped like a small decoder-only LLM:
// a base model and, optionally, agents whose task vectors are sparse the way RL task vectors are.
//
// Agent i changes entry j of a tensor when u(seed, tensor, j, i) < density, independently per
// agent, and every agent changes the entries of a shared pool (u(seed, tensor, j) < shared), so
// overlap is controlled. Changes are large enough to survive rounding to the output dtype.
// Every value is a pure function of (seed, tensor name, element index, model): the output does
// not depend on chunking or threads.
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include <boost/program_options.hpp>

#include "conflux/convert.h"
#include "conflux/writer.h"

namespace fs = std::filesystem;
namespace po = boost::program_options;
using namespace conflux;

namespace {

struct ModelShape {
  const char* name;
  std::uint64_t hidden, intermediate, layers, vocab, heads, kv_heads;
};

constexpr ModelShape kPresets[] = {
    // Odd sizes on purpose: no tensor is a multiple of a vector width or chunk size.
    {"tiny", 72, 200, 2, 1003, 4, 2},
    {"small", 256, 704, 4, 8011, 8, 2},
    {"qwen2.5-0.5b", 896, 4864, 24, 151936, 14, 2},
};

std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

std::uint64_t name_hash(const std::string& s) {
  std::uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

// Uniform in [0, 1) from a counter.
double uniform(std::uint64_t key, std::uint64_t index, std::uint64_t stream) {
  return static_cast<double>(mix(key ^ mix(index ^ mix(stream))) >> 11) * 0x1.0p-53;
}

std::vector<OutputTensor> tensors_of(const ModelShape& m, DType dtype) {
  const std::uint64_t head_dim = m.hidden / m.heads, kv = head_dim * m.kv_heads;
  std::vector<OutputTensor> t;
  t.push_back({"model.embed_tokens.weight", dtype, {m.vocab, m.hidden}});
  for (std::uint64_t l = 0; l < m.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    t.push_back({p + "input_layernorm.weight", dtype, {m.hidden}});
    t.push_back({p + "self_attn.q_proj.weight", dtype, {m.hidden, m.hidden}});
    t.push_back({p + "self_attn.q_proj.bias", dtype, {m.hidden}});
    t.push_back({p + "self_attn.k_proj.weight", dtype, {kv, m.hidden}});
    t.push_back({p + "self_attn.k_proj.bias", dtype, {kv}});
    t.push_back({p + "self_attn.v_proj.weight", dtype, {kv, m.hidden}});
    t.push_back({p + "self_attn.v_proj.bias", dtype, {kv}});
    t.push_back({p + "self_attn.o_proj.weight", dtype, {m.hidden, m.hidden}});
    t.push_back({p + "post_attention_layernorm.weight", dtype, {m.hidden}});
    t.push_back({p + "mlp.gate_proj.weight", dtype, {m.intermediate, m.hidden}});
    t.push_back({p + "mlp.up_proj.weight", dtype, {m.intermediate, m.hidden}});
    t.push_back({p + "mlp.down_proj.weight", dtype, {m.hidden, m.intermediate}});
  }
  t.push_back({"model.norm.weight", dtype, {m.hidden}});
  return t;
}

struct Recipe {
  std::uint64_t seed = 0;        // the base's values
  std::uint64_t agent_seed = 0;  // the agents' changes (another value: a later round of the same agents)
  int agent = -1;  // -1: the base
  double density = 0.05, shared = 0.01, scale = 0.01;
};

// Value of element j of a tensor for the recipe's model.
float value(const Recipe& r, std::uint64_t key, std::uint64_t agent_key, bool is_norm, std::uint64_t j) {
  const double u = uniform(key, j, 0);
  double base = is_norm ? 1.0 + 0.1 * (u - 0.5) : 0.04 * (u - 0.5);
  if (r.agent < 0) return static_cast<float>(base);
  const bool active = uniform(agent_key, j, 1) < r.shared ||
                      uniform(agent_key, j, 2 + static_cast<std::uint64_t>(r.agent)) < r.density;
  if (!active) return static_cast<float>(base);
  const double v = uniform(agent_key, j, 1000 + static_cast<std::uint64_t>(r.agent));
  // Magnitude in [0.25, 1] x scale, either sign: far above a bf16 ulp of the base values.
  const double delta = (v < 0.5 ? -1.0 : 1.0) * (0.25 + 1.5 * std::abs(v - 0.5)) * r.scale;
  return static_cast<float>(base + delta);
}

void write_model(const fs::path& dir, const ModelShape& shape, DType dtype, const Recipe& r,
                 std::uint64_t shard_size, unsigned threads) {
  fs::create_directories(dir);
  const auto tensors = tensors_of(shape, dtype);
  CheckpointWriter w(dir, tensors, WriterOptions{shard_size, {{"generator", "conflux-synth"}}});
  constexpr std::uint64_t kChunk = 1 << 16;
  const std::uint64_t esize = static_cast<std::uint64_t>(dtype_bits(dtype) / 8);
  // Work items: (tensor, chunk); threads take them round-robin.
  std::vector<std::pair<std::size_t, std::uint64_t>> items;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    std::uint64_t n = 1;
    for (auto d : tensors[i].shape) n *= d;
    for (std::uint64_t b = 0; b < n; b += kChunk) items.emplace_back(i, b);
  }
  auto worker = [&](unsigned id) {
    std::vector<float> f(kChunk);
    std::vector<std::byte> out(kChunk * esize);
    for (std::size_t k = id; k < items.size(); k += threads) {
      const auto [i, begin] = items[k];
      const OutputTensor& t = tensors[i];
      std::uint64_t n = 1;
      for (auto d : t.shape) n *= d;
      const std::uint64_t count = std::min(kChunk, n - begin);
      const std::uint64_t key = mix(r.seed) ^ name_hash(t.name);
      const std::uint64_t agent_key = mix(r.agent_seed) ^ name_hash(t.name);
      const bool is_norm = t.name.find("norm") != std::string::npos;
      for (std::uint64_t j = 0; j < count; ++j) f[j] = value(r, key, agent_key, is_norm, begin + j);
      from_f32(dtype, f.data(), out.data(), count);
      w.write_at(i, begin * esize, {out.data(), count * esize});
    }
  };
  std::vector<std::thread> pool;
  for (unsigned id = 0; id < threads; ++id) pool.emplace_back(worker, id);
  for (auto& th : pool) th.join();
  w.finish();

  const char* torch_dtype = dtype == DType::BF16 ? "bfloat16" : dtype == DType::F16 ? "float16" : "float32";
  std::ofstream(dir / "config.json")
      << "{\n  \"architectures\": [\"Qwen2ForCausalLM\"],\n  \"model_type\": \"qwen2\",\n"
      << "  \"hidden_size\": " << shape.hidden << ",\n  \"intermediate_size\": " << shape.intermediate
      << ",\n  \"num_hidden_layers\": " << shape.layers << ",\n  \"num_attention_heads\": " << shape.heads
      << ",\n  \"num_key_value_heads\": " << shape.kv_heads << ",\n  \"vocab_size\": " << shape.vocab
      << ",\n  \"tie_word_embeddings\": true,\n  \"torch_dtype\": \"" << torch_dtype << "\"\n}\n";
  std::ofstream(dir / "generation_config.json") << "{\n  \"bos_token_id\": 1,\n  \"eos_token_id\": 2\n}\n";
  std::ofstream(dir / "tokenizer_config.json") << "{\n  \"model_max_length\": 4096\n}\n";
}

}  // namespace

int main(int argc, char** argv) {
  po::options_description opts(
      "usage: conflux-synth --out DIR [options]\n\n"
      "Writes synthetic checkpoints: DIR/base and, with --agents N, DIR/agent-1 .. DIR/agent-N.\n\noptions");
  std::string out, preset, dtype_text, shard_text;
  Recipe r;
  int agents = 0;
  unsigned threads = 0;
  opts.add_options()("help,h", "show this help")("out", po::value(&out), "output directory")(
      "preset", po::value(&preset)->default_value("tiny"), "tiny | small | qwen2.5-0.5b")(
      "layers", po::value<std::uint64_t>(), "override the preset's layer count")(
      "dtype", po::value(&dtype_text)->default_value("bf16"), "bf16 | f16 | f32")(
      "agents", po::value(&agents)->default_value(0), "number of agent checkpoints")(
      "density", po::value(&r.density)->default_value(0.05), "fraction of entries each agent changes")(
      "shared", po::value(&r.shared)->default_value(0.01), "fraction of entries every agent changes")(
      "scale", po::value(&r.scale)->default_value(0.01), "magnitude of the changes")(
      "seed", po::value(&r.seed)->default_value(0), "random seed")(
      "agent-seed", po::value<std::uint64_t>(), "seed of the agents' changes (default: --seed); another value gives a later round over the same base")(
      "shard-size", po::value(&shard_text)->default_value("5GB"), "largest shard")(
      "threads", po::value(&threads)->default_value(0), "worker threads (0: all cores)");
  po::variables_map vm;
  try {
    po::store(po::parse_command_line(argc, argv, opts), vm);
    po::notify(vm);
  } catch (const po::error& e) {
    std::fprintf(stderr, "conflux-synth: %s\n", e.what());
    return 2;
  }
  if (vm.count("help")) {
    std::cout << opts << "\n";
    return 0;
  }
  if (out.empty()) {
    std::fprintf(stderr, "conflux-synth: --out is required\n");
    return 2;
  }
  const ModelShape* shape = nullptr;
  for (const auto& p : kPresets)
    if (preset == p.name) shape = &p;
  if (!shape) {
    std::fprintf(stderr, "conflux-synth: unknown --preset '%s' (tiny, small, qwen2.5-0.5b)\n", preset.c_str());
    return 2;
  }
  ModelShape m = *shape;
  if (vm.count("layers")) m.layers = vm["layers"].as<std::uint64_t>();
  DType dtype;
  if (dtype_text == "bf16") dtype = DType::BF16;
  else if (dtype_text == "f16") dtype = DType::F16;
  else if (dtype_text == "f32") dtype = DType::F32;
  else {
    std::fprintf(stderr, "conflux-synth: --dtype must be bf16, f16 or f32, not '%s'\n", dtype_text.c_str());
    return 2;
  }
  if (agents < 0 || r.density < 0 || r.density > 1 || r.shared < 0 || r.shared > 1) {
    std::fprintf(stderr, "conflux-synth: --agents must be >= 0 and --density/--shared in [0, 1]\n");
    return 2;
  }
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  r.agent_seed = vm.count("agent-seed") ? vm["agent-seed"].as<std::uint64_t>() : r.seed;
  try {
    const std::uint64_t shard_size = parse_byte_size(shard_text);
    write_model(fs::path(out) / "base", m, dtype, Recipe{r.seed, r.agent_seed, -1, r.density, r.shared, r.scale},
                shard_size, threads);
    for (int i = 0; i < agents; ++i)
      write_model(fs::path(out) / ("agent-" + std::to_string(i + 1)), m, dtype,
                  Recipe{r.seed, r.agent_seed, i, r.density, r.shared, r.scale}, shard_size, threads);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "conflux-synth: %s\n", e.what());
    return 1;
  }
  return 0;
}
