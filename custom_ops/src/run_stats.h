// What the kernel did, observable from outside: per call which path ran, per
// (batch, query-head) whether it ran kNN or the guard sent it to exact attention,
// and per query row attended through an index how many keys that index handed to
// attention. Tests assert on these instead of guessing the path from outputs;
// benchmarks and the tuner report them.
//
// The counters are process-wide and thread-safe (relaxed atomics: a reader wants
// totals after the runs it measures, not an order between threads). They are read
// and reset through the exported C functions at the bottom, which a caller reaches
// by dlopen of the same library file ONNX Runtime loaded (the same handle, so the
// same counters). Sessions running concurrently add into the same counters.
#pragma once

#include <cstdint>

#include "attention_problem.h"

namespace ice::run_stats {

// A call that ran exact attention for every head.
void count_exact_call(const AttentionShape& shape);

// A call that took the kNN path; `guarded_heads` of its batch x query-head pairs
// were sent to exact attention by the accuracy guard.
void count_knn_call(const AttentionShape& shape, int64_t guarded_heads);

// Collects the rows the current thread attends through an index while it lives,
// and adds them to the counters once, when it ends. Rows noted with no tally
// alive (the guard's probe rows) are not counted: they are not the call's output.
class RowTally {
 public:
  RowTally();
  ~RowTally();
  RowTally(const RowTally&) = delete;
  RowTally& operator=(const RowTally&) = delete;

 private:
  friend void note_knn_row(int64_t keys_scored, int64_t keys_visible);
  RowTally* outer_;
  int64_t rows_ = 0, scored_ = 0, scored_max_ = 0, visible_ = 0;
};

// One query row attended through the index: the keys the index gave attention
// (every key a cluster scan scored; the neighbours another index returned) and
// the keys the row may see at all (positions up to its last visible key).
void note_knn_row(int64_t keys_scored, int64_t keys_visible);

}  // namespace ice::run_stats

// The C interface (unmangled, exported). Counters are int64 in a fixed order;
// their names make the list self-describing, so a reader needs no struct layout.
extern "C" {
// How many counters there are.
__attribute__((visibility("default"))) int64_t IceOnnxStatsCount();
// The name of counter `i` (0 <= i < IceOnnxStatsCount()), or nullptr.
__attribute__((visibility("default"))) const char* IceOnnxStatsName(int64_t i);
// Copies the first min(capacity, count) counters to `values`; returns how many.
__attribute__((visibility("default"))) int64_t IceOnnxStatsRead(int64_t* values, int64_t capacity);
// Sets every counter to zero.
__attribute__((visibility("default"))) void IceOnnxStatsReset();
}
