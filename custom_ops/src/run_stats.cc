#include "run_stats.h"

#include <atomic>

namespace ice::run_stats {
namespace {

// The counters, in the order the C interface reads them.
enum Counter : int64_t {
  kExactCalls,
  kKnnCalls,
  kExactHeads,    // (batch, query-head) pairs attended exactly, in either kind of call
  kKnnHeads,      // pairs attended through the index
  kGuardedHeads,  // pairs of kNN calls the guard sent to exact attention
  kKnnRows,       // query rows attended through the index
  kKeysScored,    // keys the index gave those rows, summed
  kKeysScoredMax, // most keys the index gave one row
  kKeysVisible,   // keys those rows may see, summed
  kCounterCount,
};

constexpr const char* kNames[kCounterCount] = {
    "exact_calls", "knn_calls", "exact_heads", "knn_heads", "guarded_heads",
    "knn_rows",    "keys_scored", "keys_scored_max", "keys_visible",
};

std::atomic<int64_t> counters[kCounterCount];

void add(Counter c, int64_t n) { counters[c].fetch_add(n, std::memory_order_relaxed); }

void raise_to(Counter c, int64_t n) {
  int64_t seen = counters[c].load(std::memory_order_relaxed);
  while (n > seen && !counters[c].compare_exchange_weak(seen, n, std::memory_order_relaxed)) {
  }
}

// The innermost tally alive on this thread, or nullptr.
thread_local RowTally* current = nullptr;

}  // namespace

void count_exact_call(const AttentionShape& shape) {
  add(kExactCalls, 1);
  add(kExactHeads, shape.batch * shape.q_heads);
}

void count_knn_call(const AttentionShape& shape, int64_t guarded_heads) {
  add(kKnnCalls, 1);
  add(kExactHeads, guarded_heads);
  add(kGuardedHeads, guarded_heads);
  add(kKnnHeads, shape.batch * shape.q_heads - guarded_heads);
}

RowTally::RowTally() : outer_(current) { current = this; }

RowTally::~RowTally() {
  current = outer_;
  if (rows_ == 0) return;
  add(kKnnRows, rows_);
  add(kKeysScored, scored_);
  add(kKeysVisible, visible_);
  raise_to(kKeysScoredMax, scored_max_);
}

void note_knn_row(int64_t keys_scored, int64_t keys_visible) {
  RowTally* tally = current;
  if (tally == nullptr) return;
  ++tally->rows_;
  tally->scored_ += keys_scored;
  tally->visible_ += keys_visible;
  if (keys_scored > tally->scored_max_) tally->scored_max_ = keys_scored;
}

}  // namespace ice::run_stats

using ice::run_stats::counters;

int64_t IceOnnxStatsCount() { return ice::run_stats::kCounterCount; }

const char* IceOnnxStatsName(int64_t i) {
  return i >= 0 && i < ice::run_stats::kCounterCount ? ice::run_stats::kNames[i] : nullptr;
}

int64_t IceOnnxStatsRead(int64_t* values, int64_t capacity) {
  if (values == nullptr || capacity <= 0) return 0;
  const int64_t n = capacity < ice::run_stats::kCounterCount ? capacity : ice::run_stats::kCounterCount;
  for (int64_t i = 0; i < n; ++i) values[i] = counters[i].load(std::memory_order_relaxed);
  return n;
}

void IceOnnxStatsReset() {
  for (auto& counter : counters) counter.store(0, std::memory_order_relaxed);
}
