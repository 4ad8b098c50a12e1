// passthrough: copies one model, optionally scaled (out = scale * theta). With scale 1 and the
// model's own dtype the output is bit-identical to the input.
#include <conflux/plugin.hpp>

#include "common/inputs.h"

namespace sdk = conflux::sdk;
using conflux::plugins::value;
using conflux::plugins::with_inputs;

namespace {

// In: float32 or stored BF16 inputs (common/inputs.h).
template <class In>
CONFLUX_MULTIVERSION void scale_values(const In* x, std::size_t m, double scale, float* out) {
  for (std::size_t k = 0; k < m; ++k) out[k] = static_cast<float>(scale * static_cast<double>(value(x, k)));
}

}  // namespace

struct Passthrough {
  static constexpr sdk::Info info{"passthrough", "1.0.0", "Copies one model, optionally scaled", 1, 1,
                                  CFX_BASE_UNUSED};
  static inline const sdk::Param params[] = {
      sdk::Param::real("scale", 1.0, "factor applied to every weight"),
  };

  explicit Passthrough(const sdk::Job& job) : scale_(job.number("scale")) {}

  void map(const sdk::Chunk& c, sdk::Span<float> out) {
    with_inputs(c, [&](auto models, auto) { scale_values(models[0], out.size(), scale_, out.data()); });
  }

  double scale_;
};

CONFLUX_PLUGIN(Passthrough, sdk::map_pass<Passthrough, &Passthrough::map>(CFX_PASS_BF16_INPUTS))
