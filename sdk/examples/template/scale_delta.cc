// example_scale_delta: a template Conflux strategy plugin.
//
//   out = base + factor * mean_i(theta_i - base)
//
// It asks the host for task vectors (CFX_PASS_TASK_VECTORS: the chunk's models hold
// theta_i - base) and writes a delta (CFX_PASS_OUTPUT_DELTA: the host adds the base and rounds to
// the output dtype), so the strategy itself only ever sees and writes differences.
//
// To write your own strategy: rename the struct and the id, declare your parameters, and
// replace map(). See conflux/plugin.h for the full contract (threading, determinism, errors) and
// conflux/plugin.hpp for reduce passes.
#include <conflux/plugin.hpp>

#include <algorithm>

namespace sdk = conflux::sdk;

struct ScaleDelta {
  // id (the job's `strategy`), version, description, min models, max models (0: no limit), base.
  static constexpr sdk::Info info{"example_scale_delta", "1.0.0",
                                  "Base plus a scaled mean of the models' task vectors (SDK template)",
                                  1, 0, CFX_BASE_REQUIRED};

  // The parameter schema: the host validates [job.params] against it and fills in defaults
  // before create(), so the constructor can read values without checking them again.
  static inline const sdk::Param params[] = {
      sdk::Param::real("factor", 0.5, "scale of the mean task vector").min(0.0),
  };

  // Called once per job. Throwing sdk::Error rejects the job with that message.
  explicit ScaleDelta(const sdk::Job& job)
      : host_(job.host()),
        weight_(static_cast<float>(job.number("factor") / job.model_count())) {}

  // Called concurrently for chunks of every floating tensor: use only the chunk and members that
  // are read-only after construction. c.model(i) is theta_i - base here (task vectors).
  void map(const sdk::Chunk& c, sdk::Span<float> out) {
    std::fill(out.begin(), out.end(), 0.0f);
    // The host's vectorised helpers (Highway) are available through its function table:
    // out += (factor / N) * d_i, summed in model order, so the result never depends on threads.
    for (std::uint32_t i = 0; i < c.model_count(); ++i)
      host_->axpy(weight_, c.model(i).data(), out.data(), out.size());
  }

  const cfx_host* host_;
  float weight_;  // factor / model count
};

// Exports the entry point. Passes run in order; the last one must be a map pass.
CONFLUX_PLUGIN(ScaleDelta,
               sdk::map_pass<ScaleDelta, &ScaleDelta::map>(CFX_PASS_TASK_VECTORS | CFX_PASS_OUTPUT_DELTA))
