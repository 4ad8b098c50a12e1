// della: DELLA's MAGPRUNE (Deep et al. 2024, arXiv 2406.11617) then the TIES sign election;
// mergekit's "della". Within each row of each task vector d_i = theta_i - theta_base the entries
// are ranked by magnitude (ties: lower index first) and kept with probabilities rising linearly
// from density - epsilon (smallest) to density + epsilon (largest), drawn from the host's
// counter-based random stream of (seed, tensor, model i); survivors are divided by their keep
// probability (rescale). Then, with W_i = w_i d_i' and s = sign(sum_i W_i) (zero counts as +),
//   out = base + lambda * sum_i [sign W_i == s] W_i / (normalize ? sum_i [sign W_i == s] w_i : 1)
// Defaults as mergekit: density 1 (prunes nothing), epsilon 0.15, normalize true, rescale true.
// density - epsilon must be > 0 and density + epsilon <= 1 (else the job is refused).
// The definition in full: common/drop_merge.h, common/sign_election.h.
// Computed per entry in double (the arithmetic: drop_merge.h).
#include "common/drop_merge.h"

namespace dm = conflux::plugins::drop_merge;
namespace sdk = conflux::sdk;

namespace {

struct Traits {
  static constexpr sdk::Info info{"della", "1.0.0",
                                  "DELLA: drop task-vector entries with magnitude-ranked probabilities (MAGPRUNE), "
                                  "then the TIES sign election",
                                  1, 0, CFX_BASE_REQUIRED};
  static inline const sdk::Param params[] = {
      sdk::Param::real("density", 1.0, "mean keep probability of each row's entries (1 prunes nothing)")
          .above(0)
          .max(1),
      sdk::Param::real("epsilon", 0.15, "keep probabilities span density -/+ epsilon by magnitude rank").min(0),
      sdk::Param::per_model("weights", 1.0, "weight of each model's task vector"),
      sdk::Param::real("lambda", 1.0, "scale of the merged task vector"),
      sdk::Param::boolean("normalize", true, "divide by the sum of the agreeing models' weights"),
      sdk::Param::boolean("rescale", true, "divide the kept entries by their keep probability"),
  };
  static constexpr dm::Drop drop = dm::Drop::della;
  static constexpr bool ties = true;
};

using Della = dm::DropMerge<Traits>;

}  // namespace

// Raw values (no CFX_PASS_TASK_VECTORS): the kernels form x - base themselves, as the host would,
// from BF16 tensors as stored (CFX_PASS_BF16_INPUTS).
CONFLUX_PLUGIN(Della, sdk::map_pass<Della, &Della::map>(CFX_PASS_WHOLE_ROWS | CFX_PASS_BF16_INPUTS))
