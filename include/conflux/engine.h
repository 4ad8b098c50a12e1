// The merge engine: plan, then stream (ARCHITECTURE §5).
//
// Plan: open every input checkpoint (validating every shard), check that the models (and the
// base) hold the same tensor names, shapes and dtypes, and lay out the output. Nothing is read
// from the data buffers yet.
//
// Stream: run the strategy's passes over chunks of each floating tensor on oneTBB tasks. A chunk
// is converted to float32 (task vectors against the base when the pass asks), handed to the
// plugin, and for the map pass the float32 result is rounded to the output dtype and written by
// offset. Reductions fold their partials with tbb::parallel_deterministic_reduce (a fixed split
// tree), so results are bit-identical at any thread count. Inputs are read chunk by chunk into
// per-thread copies (pread from the page cache; only the headers are read through the mapping),
// so memory stays at threads x chunk x models, whatever the model size. Non-floating tensors are
// copied from the base (or the first model) unchanged.
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "conflux/checkpoint.h"
#include "conflux/params.h"
#include "conflux/plugin_registry.h"
#include "conflux/writer.h"

namespace conflux {

// A failure while merging that is not a malformed input file (those are conflux::Error):
// a strategy's failure, a cancellation, an inconsistency between inputs.
class MergeError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct PlannedItem {
  std::string name;
  std::vector<std::uint64_t> shape;
  std::uint64_t numel = 0;
  DType in_dtype{};
  DType out_dtype{};
  bool merged = false;                   // floating: goes through the strategy
  const TensorRef* base = nullptr;       // in the base, when the job uses one
  std::vector<const TensorRef*> models;  // one per model
};

class MergePlan {
 public:
  // Opens and cross-checks the inputs. `use_base`: whether the strategy reads the base.
  // Throws conflux::Error (a malformed file) or MergeError (inputs that disagree), naming the
  // tensor and the model.
  static MergePlan open(const std::optional<std::filesystem::path>& base, bool use_base,
                        const std::vector<std::filesystem::path>& models, std::optional<DType> out_dtype);

  MergePlan(MergePlan&&) noexcept = default;

  const std::optional<Checkpoint>& base() const { return base_; }
  const std::vector<Checkpoint>& models() const { return models_; }
  const std::vector<PlannedItem>& items() const { return items_; }
  // The output's tensors, in the order of items().
  std::vector<OutputTensor> output_tensors() const;
  // Bytes of tensor data in all inputs that a full pass reads.
  std::uint64_t input_bytes() const { return input_bytes_; }
  std::uint64_t output_bytes() const { return output_bytes_; }

 private:
  MergePlan() = default;
  std::optional<Checkpoint> base_;
  std::vector<Checkpoint> models_;
  std::vector<PlannedItem> items_;
  std::uint64_t input_bytes_ = 0;
  std::uint64_t output_bytes_ = 0;
};

// Shared with a progress display; updated from worker threads.
struct Progress {
  std::atomic<std::uint64_t> bytes_done{0};   // input bytes consumed so far, over all passes
  std::atomic<std::uint64_t> bytes_total{0};  // estimate (reduce passes may repeat)
  std::atomic<unsigned> pass{0};              // 1-based pass being run
  std::atomic<unsigned> pass_count{0};
};

struct EngineOptions {
  unsigned threads = 0;                    // 0: all cores
  std::uint64_t chunk_elements = 1 << 15;  // elements per chunk (rounded for whole-row passes)
  std::uint64_t seed = 0;
  // Let strategies finish a tensor in its statistics pass where their guess of the statistics
  // holds (CFX_PASS_SPECULATIVE_OUTPUT; the output is the same either way). false: the passes
  // as declared, for tests and comparisons.
  bool speculative_output = true;
  std::string job_name = "merge";
  const std::atomic<bool>* cancel = nullptr;
  Progress* progress = nullptr;
  // Labels of the models for the plugin and messages (default: their paths).
  std::vector<std::string> model_names;
};

struct PassTiming {
  std::string kind;  // "map", "tensor_reduce", "model_reduce"
  double seconds = 0;
};

struct MergeResult {
  std::uint64_t tensors = 0, merged_tensors = 0, copied_tensors = 0;
  std::uint64_t bytes_read = 0;     // tensor bytes read from the inputs, all passes
  std::uint64_t bytes_written = 0;  // tensor bytes written (speculative output included)
  std::uint64_t speculated_tensors = 0;  // finished by their statistics pass (one read)
  std::vector<PassTiming> passes;
  double seconds = 0;
  std::string report;               // the strategy's JSON report, or empty
};

// Runs the strategy over the plan, writing every tensor through `out` (created from
// plan.output_tensors()). Throws MergeError, conflux::Error (I/O) or PluginError.
MergeResult run_merge(const MergePlan& plan, const LoadedPlugin& plugin, const ParamSet& params,
                      CheckpointWriter& out, const EngineOptions& options);

// The I/O floor of a merge, measured through the same path: reads every input byte of the plan
// `input_reads` times (a strategy with a model-scope reduce pass reads its inputs twice; each
// read copies chunks from the page cache as the engine does) and writes the output once
// (the first model's values, converted to the output dtype, staged and written per task as the
// engine does). What a merge costs beyond this is the merge itself.
MergeResult run_floor(const MergePlan& plan, CheckpointWriter& out, const EngineOptions& options,
                      unsigned input_reads = 1);

}  // namespace conflux
