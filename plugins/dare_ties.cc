// dare_ties: DARE (Yu et al. 2023, arXiv 2311.03099) then the TIES sign election; mergekit's
// "dare_ties". Each entry of each task vector d_i = theta_i - theta_base is dropped with
// probability 1 - density (the host's counter-based random stream of (seed, tensor, model i)),
// the survivors are divided by density (rescale); with W_i = w_i d_i' the elected sign is
// s = sign(sum_i W_i) (a zero sum counts as +) and
//   out = base + lambda * sum_i [sign W_i == s] W_i / (normalize ? sum_i [sign W_i == s] w_i : 1)
// (0 where that divisor is 0). Defaults as mergekit: density 1 (nothing dropped), normalize
// false, rescale true. The definition in full: common/drop_merge.h, common/sign_election.h.
// Computed per entry in float32 for a BF16 output (with a fallback to double where terms cancel),
// else in double (the arithmetic: drop_merge.h).
#include "common/drop_merge.h"

namespace dm = conflux::plugins::drop_merge;
namespace sdk = conflux::sdk;

namespace {

struct Traits {
  static constexpr sdk::Info info{"dare_ties", "1.1.0",
                                  "DARE: randomly drop task-vector entries (keep density, rescale), then the TIES "
                                  "sign election",
                                  1, 0, CFX_BASE_REQUIRED};
  static inline const sdk::Param params[] = {
      sdk::Param::real("density", 1.0, "fraction of each task vector's entries kept (1 keeps all)").above(0).max(1),
      sdk::Param::per_model("weights", 1.0, "weight of each model's task vector"),
      sdk::Param::real("lambda", 1.0, "scale of the merged task vector"),
      sdk::Param::boolean("normalize", false, "divide by the sum of the agreeing models' weights"),
      sdk::Param::boolean("rescale", true, "divide the kept entries by density"),
  };
  static constexpr dm::Drop drop = dm::Drop::dare;
  static constexpr bool ties = true;
};

using DareTies = dm::DropMerge<Traits>;

}  // namespace

// Raw values (no CFX_PASS_TASK_VECTORS): the kernels form x - base themselves, as the host would,
// from BF16 tensors as stored (CFX_PASS_BF16_INPUTS).
CONFLUX_PLUGIN(DareTies, sdk::map_pass<DareTies, &DareTies::map>(CFX_PASS_BF16_INPUTS))
