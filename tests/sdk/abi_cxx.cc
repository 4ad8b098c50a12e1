// conflux/plugin.h and conflux/plugin.hpp compiled as C++17 and as C++20 (this file is built
// twice, with CFX_TEST_STD=17 and 20, and the project's warnings as errors), instantiating every
// template of the wrapper: a strategy with a reduce pass and a map pass, every parameter builder,
// and the CONFLUX_PLUGIN entry point. The entry point is renamed per standard so both objects link
// into one test executable (sdk_headers_test), which drives them through the C ABI.
#include <conflux/plugin.h>
#include <conflux/plugin.hpp>

#include <string>

#include "abi_layout.h"

#if !defined(CFX_TEST_STD)
#error "define CFX_TEST_STD (17 or 20)"
#elif CFX_TEST_STD == 17
static_assert(__cplusplus >= 201703L && __cplusplus < 202002L, "expected C++17");
#elif CFX_TEST_STD == 20
static_assert(__cplusplus >= 202002L, "expected C++20");
#endif

// CONFLUX_PLUGIN's expansion names conflux_plugin_entry; rescanning replaces it with this.
#define CFX_TEST_CAT2(a, b) a##b
#define CFX_TEST_CAT(a, b) CFX_TEST_CAT2(a, b)
#define conflux_plugin_entry CFX_TEST_CAT(sdk_abi_cxx_entry_, CFX_TEST_STD)

namespace sdk = conflux::sdk;

namespace {

// out = model 0 scaled so the models' overall max |value| becomes `target` (a reduce then a map).
struct Tiny {
  static constexpr sdk::Info info{"tiny_cxx", "1.0.0", "wrapper instantiation check", 1, 4, CFX_BASE_OPTIONAL};
  static inline const char* const kModes[] = {"max", "none"};
  static inline const sdk::Param params[] = {
      sdk::Param::real("target", 1.0, "largest magnitude after scaling").above(0.0),
      sdk::Param::integer("iterations", 1, "passes of nothing in particular").min(1).max(8),
      sdk::Param::boolean("enabled", true, "scale at all"),
      sdk::Param::string("mode", "max", "how to measure").one_of(kModes),
      sdk::Param::per_model("weights", 1.0, "per-model weights").min(0.0).below(10.0),
      sdk::Param::real("unused", 0.0, "a required parameter").required(),
  };

  explicit Tiny(const sdk::Job& job)
      : target_(static_cast<float>(job.number("target"))),
        enabled_(job.flag("enabled")),
        mode_(job.string("mode")),
        weights_(job.list("weights").size()) {
    if (job.model_count() == 0) throw sdk::Error("no models");
  }

  std::size_t stats_count(std::uint32_t pass) const { return pass == 0 ? 1 : 0; }

  void reduce(const sdk::Chunk& c, sdk::Span<float> partial) {
    for (std::uint32_t i = 0; i < c.model_count(); ++i)
      for (float v : c.model(i)) {
        const float a = v < 0 ? -v : v;
        if (a > partial[0]) partial[0] = a;
      }
  }
  void combine(const cfx_tensor*, sdk::Span<float> into, sdk::Span<const float> from) {
    if (from[0] > into[0]) into[0] = from[0];
  }
  bool done(const cfx_tensor*, sdk::Span<const float> stats) {
    scale_ = stats[0] > 0 ? target_ / stats[0] : 1.0f;
    return false;
  }
  void map(const sdk::Chunk& c, sdk::Span<float> out) {
    const sdk::Span<const float> x = c.model(0);
    for (std::size_t k = 0; k < out.size(); ++k) out[k] = enabled_ && mode_ == "max" ? scale_ * x[k] : x[k];
  }
  void finish() {}

  float target_;
  bool enabled_;
  std::string mode_;
  std::size_t weights_;
  float scale_ = 1.0f;
};

}  // namespace

CONFLUX_PLUGIN(Tiny,
               sdk::reduce_pass<Tiny, float, 0, &Tiny::reduce, &Tiny::combine, &Tiny::done>(CFX_PASS_TENSOR_REDUCE),
               sdk::map_pass<Tiny, &Tiny::map>(CFX_PASS_WHOLE_ROWS))
