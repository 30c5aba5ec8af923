#include "index_factory.h"

#include <stdexcept>

#include "cluster_index.h"
#include "dci_index.h"

namespace ice {

std::string index_unavailable_reason(const std::string& name) {
  if (name == kIndexCluster || name == kIndexDci) return {};
  return "unknown index \"" + name + "\"";
}

std::unique_ptr<KeyIndex> make_key_index(const std::string& name, const AttentionParams& params) {
  if (name == kIndexCluster) {
    ClusterIndexParams p;
    p.clusters = params.clusters;
    p.kmeans_iters = params.kmeans_iters;
    p.scan_fraction = params.scan_fraction;
    p.scan_min = params.scan_min > 0 ? params.scan_min : params.top_k;  // (each block brings its budget)
    return std::make_unique<ClusterIndex>(p);
  }
  // The contract's index parameters describe the cluster index; DCI keeps the defaults
  // measured for it (dci_index.h) and reads only top_k and the seed from the call.
  if (name == kIndexDci) return std::make_unique<DciIndex>(DciParams());
  throw std::invalid_argument(index_unavailable_reason(name));
}

}  // namespace ice
