// The thread pool as the kernels see it (ORT's intra-op pool behind it, see
// ort_binding.cc).
#pragma once

#include <cstdint>
#include <functional>

namespace ice {

// Runs body(0..n-1), possibly in parallel. Callers make every task's result
// independent of which thread runs it.
using ParallelFor = std::function<void(int64_t n, const std::function<void(int64_t)>& body)>;

// body(0..n-1) through `parallel`, or in order on this thread when it is null.
inline void run_tasks(const ParallelFor* parallel, int64_t n, const std::function<void(int64_t)>& body) {
  if (parallel) {
    (*parallel)(n, body);
  } else {
    for (int64_t i = 0; i < n; ++i) body(i);
  }
}

}  // namespace ice
