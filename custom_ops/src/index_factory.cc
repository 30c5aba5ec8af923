#include "index_factory.h"

#include <stdexcept>

#include "cluster_index.h"

#if defined(__has_include)
#if __has_include("dci_index.h")
#include "dci_index.h"
#define ICE_HAVE_DCI_INDEX 1
#endif
#endif

namespace ice {

std::string index_unavailable_reason(const std::string& name) {
  if (name == kIndexCluster) return {};
#ifdef ICE_HAVE_DCI_INDEX
  if (name == kIndexDci) return {};
#else
  if (name == kIndexDci) return "index \"dci\" (Prioritized DCI) is not built into this library yet";
#endif
  return "unknown index \"" + name + "\"";
}

std::unique_ptr<KeyIndex> make_key_index(const std::string& name, const AttentionParams& params) {
  if (name == kIndexCluster) {
    ClusterIndexParams p;
    p.clusters = params.clusters;
    p.kmeans_iters = params.kmeans_iters;
    p.scan_fraction = params.scan_fraction;
    p.scan_min = params.effective_scan_min();
    return std::make_unique<ClusterIndex>(p);
  }
#ifdef ICE_HAVE_DCI_INDEX
  // DCI runs with its own defaults (dci_index.h); no DCI attribute is exposed yet.
  if (name == kIndexDci) return std::make_unique<DciIndex>(DciParams());
#endif
  throw std::invalid_argument(index_unavailable_reason(name));
}

}  // namespace ice
