#include "contract.h"

#include <cmath>

namespace ice {

std::string validate(const AttentionParams& p) {
  if (std::isnan(p.scale) || std::isinf(p.scale))
    return std::string("attribute '") + attr::kScale + "' must be finite";
  if (!(p.softcap >= 0.0f) || std::isinf(p.softcap))
    return std::string("attribute '") + attr::kSoftcap + "' must be finite and >= 0 (0 = none)";
  if (p.sliding_window < 0)
    return std::string("attribute '") + attr::kSlidingWindow + "' must be >= 0 (0 = none), got " +
           std::to_string(p.sliding_window);
  if (p.empty_rows != kEmptyRowsMean && p.empty_rows != kEmptyRowsZero)
    return std::string("attribute '") + attr::kEmptyRows + "' must be \"" + kEmptyRowsMean + "\" or \"" +
           kEmptyRowsZero + "\", got \"" + p.empty_rows + "\"";
  if (p.top_k < 1) return std::string("attribute '") + attr::kTopK + "' must be >= 1, got " + std::to_string(p.top_k);
  if (p.exact_below < 0)
    return std::string("attribute '") + attr::kExactBelow + "' must be >= 0, got " + std::to_string(p.exact_below);
  if (p.index != kIndexCluster && p.index != kIndexDci)
    return std::string("attribute '") + attr::kIndex + "' must be \"" + kIndexCluster + "\" or \"" + kIndexDci +
           "\", got \"" + p.index + "\"";
  if (p.clusters < 0 || p.clusters > AttentionParams::kMaxClusters)
    return std::string("attribute '") + attr::kClusters + "' must be in [0, " +
           std::to_string(AttentionParams::kMaxClusters) + "] (0 = automatic)";
  if (p.kmeans_iters < 0 || p.kmeans_iters > 100)
    return std::string("attribute '") + attr::kKmeansIters + "' must be in [0, 100]";
  if (!(p.scan_fraction >= 0.0f && p.scan_fraction <= 1.0f))
    return std::string("attribute '") + attr::kScanFraction + "' must be in [0, 1]";
  if (p.scan_min < 0) return std::string("attribute '") + attr::kScanMin + "' must be >= 0 (0 = top_k)";
  if (p.tail_clusters < 0 || p.tail_clusters > AttentionParams::kMaxTailClusters)
    return std::string("attribute '") + attr::kTailClusters + "' must be in [0, " +
           std::to_string(AttentionParams::kMaxTailClusters) + "] (0 = the index's clusters)";
  if (p.sinks < 0) return std::string("attribute '") + attr::kSinks + "' must be >= 0";
  if (p.window < 0) return std::string("attribute '") + attr::kWindow + "' must be >= 0";
  if (p.probe_rows < 0 || p.probe_rows > AttentionParams::kMaxProbeRows)
    return std::string("attribute '") + attr::kProbeRows + "' must be in [0, " +
           std::to_string(AttentionParams::kMaxProbeRows) + "]";
  if (!(p.max_error >= 0.0f) || std::isinf(p.max_error))
    return std::string("attribute '") + attr::kMaxError + "' must be finite and >= 0";
  return {};
}

}  // namespace ice
