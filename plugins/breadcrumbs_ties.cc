// breadcrumbs_ties: Model Breadcrumbs trimming with the TIES sign election, as mergekit's
// "breadcrumbs_ties" (sparsification "magnitude_outliers", consensus "sum").
//   Trim as breadcrumbs (see breadcrumbs.cc): per tensor of n entries, model i keeps the
//   entries ranked (|d_i| descending, flat index ascending) in [a_i, a_i + k_i), with
//   k_i = floor(density_i * n), a_i = min(floor(gamma_i * n), n - k_i).
//   Merge as ties (see ties.cc): W_i = w_i * t_i, s = sign(sum_i W_i) (zero counts as +),
//   merged = sum_i [sign W_i == s] W_i / (normalize ? sum_i [sign W_i == s] w_i : 1), 0 where
//   that divisor is 0;  out = theta_base + lambda * merged.
// gamma = 0 is ties; density = 1 is the election without trimming.
// Arithmetic: double per entry; for a BF16 output of up to 4 models with nonnegative weights,
// float32, and the entries float32 cannot settle within 1 ulp again in double
// (common/trim_merge.h). Since 1.1.0 (that float32 path: BF16 outputs may differ from 1.0.0 by
// 1 ulp in rare entries; BF16 inputs read as stored).
#include <conflux/plugin.hpp>

#include "common/trim_merge.h"

namespace sdk = conflux::sdk;

namespace {

struct BreadcrumbsTiesVariant {
  static constexpr bool kGamma = true;
  static constexpr bool kElect = true;
  static constexpr sdk::Info info{"breadcrumbs_ties", "1.1.0",
                                  "Model Breadcrumbs trimming (top outliers and smallest entries dropped per "
                                  "tensor) with the TIES sign election",
                                  1, 0, CFX_BASE_REQUIRED};
  static inline const sdk::Param params[] = {
      sdk::Param::per_model("density", 1.0, "fraction of each task vector's entries kept per tensor").above(0).max(1),
      sdk::Param::per_model("gamma", 0.01, "fraction of largest-magnitude entries removed per tensor").min(0).below(1),
      sdk::Param::per_model("weights", 1.0, "weight of each model's task vector"),
      sdk::Param::real("lambda", 1.0, "scale of the merged task vector"),
      sdk::Param::boolean("normalize", true, "divide by the sum of the weights that agree with the elected sign"),
  };
};

}  // namespace

using BreadcrumbsTies = conflux::plugins::TrimMerge<BreadcrumbsTiesVariant>;
CONFLUX_TRIM_MERGE_PLUGIN(BreadcrumbsTies)
