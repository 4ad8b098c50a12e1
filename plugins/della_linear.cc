// della_linear: DELLA's MAGPRUNE (Deep et al. 2024, arXiv 2406.11617) then task arithmetic;
// mergekit's "della_linear". Within each row of each task vector d_i = theta_i - theta_base the
// entries are ranked by magnitude (ties: lower index first) and kept with probabilities rising
// linearly from density - epsilon (smallest) to density + epsilon (largest), drawn from the
// host's counter-based random stream of (seed, tensor, model i); survivors are divided by their
// keep probability (rescale). Then
//   out = base + lambda * sum_i w_i d_i' / (normalize ? sum_i w_i : 1)
// Defaults as mergekit: density 1 (prunes nothing), epsilon 0.15, normalize false, rescale true.
// density - epsilon must be > 0 and density + epsilon <= 1 (else the job is refused).
// The definition in full: common/drop_merge.h.
// Computed per entry in double (the arithmetic: drop_merge.h).
#include "common/drop_merge.h"

namespace dm = conflux::plugins::drop_merge;
namespace sdk = conflux::sdk;

namespace {

struct Traits {
  static constexpr sdk::Info info{"della_linear", "1.0.0",
                                  "DELLA: drop task-vector entries with magnitude-ranked probabilities (MAGPRUNE), "
                                  "then task arithmetic",
                                  1, 0, CFX_BASE_REQUIRED};
  static inline const sdk::Param params[] = {
      sdk::Param::real("density", 1.0, "mean keep probability of each row's entries (1 prunes nothing)")
          .above(0)
          .max(1),
      sdk::Param::real("epsilon", 0.15, "keep probabilities span density -/+ epsilon by magnitude rank").min(0),
      sdk::Param::per_model("weights", 1.0, "weight of each model's task vector"),
      sdk::Param::real("lambda", 1.0, "scale of the merged task vector"),
      sdk::Param::boolean("normalize", false, "divide by the sum of the weights"),
      sdk::Param::boolean("rescale", true, "divide the kept entries by their keep probability"),
  };
  static constexpr dm::Drop drop = dm::Drop::della;
  static constexpr bool ties = false;
};

using DellaLinear = dm::DropMerge<Traits>;

}  // namespace

// Raw values (no CFX_PASS_TASK_VECTORS): the kernels form x - base themselves, as the host would,
// from BF16 tensors as stored (CFX_PASS_BF16_INPUTS).
CONFLUX_PLUGIN(DellaLinear, sdk::map_pass<DellaLinear, &DellaLinear::map>(CFX_PASS_WHOLE_ROWS | CFX_PASS_BF16_INPUTS))
