// A valid plugin built twice (dup_a.so and dup_b.so) into one directory: the same id from two
// files must make that id an error naming both.
#include <conflux/plugin.hpp>

namespace sdk = conflux::sdk;

struct Dup {
  static constexpr sdk::Info info{"dup_id", "1.0.0", DUP_DESCRIPTION, 1, 1, CFX_BASE_UNUSED};
  explicit Dup(const sdk::Job&) {}
  void map(const sdk::Chunk& c, sdk::Span<float> out) {
    for (std::size_t k = 0; k < out.size(); ++k) out[k] = c.model(0)[k];
  }
};

CONFLUX_PLUGIN(Dup, sdk::map_pass<Dup, &Dup::map>())
