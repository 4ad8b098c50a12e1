// breadcrumbs: Model Breadcrumbs (Davari & Belilovsky 2023), as mergekit's "breadcrumbs"
// (sparsification "magnitude_outliers", no sign election): per tensor, drop each task vector's
// largest outliers and its smallest entries, then task arithmetic of what remains.
//   d_i = theta_i - theta_base (float32, as the host computes it); per tensor of n entries
//   k_i = floor(density_i * n) entries remain, a_i = floor(gamma_i * n) are removed at the top
//   (when a_i + k_i > n, a_i = n - k_i: as mergekit, fewer top entries are removed, so
//   density = 1 keeps everything whatever gamma); the entries ranked (|d_i| descending, flat
//   index ascending) in positions [a_i, a_i + k_i) are kept, the rest zeroed. Exact: among
//   equal magnitudes the lower flat index ranks first (common/topk.h).
//   out = theta_base + lambda * sum_i w_i t_i / (normalize ? sum_i w_i : 1)   (t_i: trimmed d_i)
// gamma = 0, density = 1 is task arithmetic (for bf16/f16 inputs bit for bit: their float32 task
// vectors are exact). Differences from mergekit: ties at either boundary keep the lowest
// indices (torch's sort order among equal values is unspecified); floor(gamma * n) = 0 removes
// no top entry (mergekit's slice [n_bot:-0] then keeps nothing at all).
// Arithmetic: double per entry; for a BF16 output of up to 4 models, float32, and the entries
// float32 cannot settle within 1 ulp again in double (common/trim_merge.h). Since 1.1.0 (that
// float32 path: BF16 outputs may differ from 1.0.0 by 1 ulp in rare entries; BF16 inputs read
// as stored).
#include <conflux/plugin.hpp>

#include "common/trim_merge.h"

namespace sdk = conflux::sdk;

namespace {

struct BreadcrumbsVariant {
  static constexpr bool kGamma = true;
  static constexpr bool kElect = false;
  static constexpr sdk::Info info{"breadcrumbs", "1.1.0",
                                  "Model Breadcrumbs: drop each task vector's top outliers and smallest entries per "
                                  "tensor, then task arithmetic",
                                  1, 0, CFX_BASE_REQUIRED};
  static inline const sdk::Param params[] = {
      sdk::Param::per_model("density", 1.0, "fraction of each task vector's entries kept per tensor").above(0).max(1),
      sdk::Param::per_model("gamma", 0.01, "fraction of largest-magnitude entries removed per tensor").min(0).below(1),
      sdk::Param::per_model("weights", 1.0, "weight of each model's task vector"),
      sdk::Param::real("lambda", 1.0, "scale of the merged task vector"),
      sdk::Param::boolean("normalize", false, "divide by the sum of the weights"),
  };
};

}  // namespace

using Breadcrumbs = conflux::plugins::TrimMerge<BreadcrumbsVariant>;
CONFLUX_TRIM_MERGE_PLUGIN(Breadcrumbs)
