// ties: TIES-Merging (Yadav et al. 2023, "Resolving Interference When Merging Models"), as
// mergekit's "ties": trim, elect sign, disjoint merge.
//   d_i = theta_i - theta_base (float32, as the host computes it), W_i = w_i * d_i
//   1. trim: per tensor keep the k = floor(density_i * n) entries of d_i with the largest |d_i|
//      (exact: among equal magnitudes the lower flat index wins; see common/topk.h), zero the rest
//   2. elect: s = sign(sum_i W_i) per entry, a zero sum counting as +
//   3. disjoint merge: sum_i [sign W_i == s] W_i, divided by sum_i [sign W_i == s] w_i when
//      normalize (0 where that divisor is 0; an entry with W_i == 0 never counts)
//   out = theta_base + lambda * merged         (common/trim_merge.h, common/sign_election.h)
// density = 1 is the election without trimming (the selection pass is then skipped).
// Arithmetic: double per entry; for a BF16 output of up to 4 models with nonnegative weights,
// float32, and the entries float32 cannot settle within 1 ulp again in double
// (common/trim_merge.h). Since 1.1.0 (that float32 path: BF16 outputs may differ from 1.0.0 by
// 1 ulp in rare entries; BF16 inputs read as stored).
// Differences from mergekit: ties at the trim boundary keep the lowest indices (torch's sort
// leaves that order unspecified); density may give k = 0 (keeps nothing; mergekit asserts);
// a zero divisor gives 0 also when agreeing weights of mixed signs cancel (mergekit divides by 1).
#include <conflux/plugin.hpp>

#include "common/trim_merge.h"

namespace sdk = conflux::sdk;

namespace {

struct TiesVariant {
  static constexpr bool kGamma = false;
  static constexpr bool kElect = true;
  static constexpr sdk::Info info{"ties", "1.1.0",
                                  "TIES-Merging: trim each task vector to its largest magnitudes, elect the "
                                  "sign per entry, average the agreeing entries",
                                  1, 0, CFX_BASE_REQUIRED};
  static inline const sdk::Param params[] = {
      sdk::Param::per_model("density", 1.0, "fraction of each task vector's entries kept per tensor (largest |d|)")
          .above(0)
          .max(1),
      sdk::Param::per_model("weights", 1.0, "weight of each model's task vector"),
      sdk::Param::real("lambda", 1.0, "scale of the merged task vector"),
      sdk::Param::boolean("normalize", true, "divide by the sum of the weights that agree with the elected sign"),
  };
};

}  // namespace

using Ties = conflux::plugins::TrimMerge<TiesVariant>;
CONFLUX_TRIM_MERGE_PLUGIN(Ties)
