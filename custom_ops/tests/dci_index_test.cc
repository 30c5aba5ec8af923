// Standalone tests of the inner-product → L2 transform and the Prioritized DCI index
// (no ONNX Runtime). The oracle is a brute-force double-precision top-k.
//
//   g++ -std=c++17 -O2 -Wall -Wextra -Icustom_ops/src -Icustom_ops/tests
//       custom_ops/tests/dci_index_test.cc custom_ops/src/dci_index.cc -pthread -o /tmp/dci_index_test
//   /tmp/dci_index_test        (exit status 0 = all passed; prints measured recalls)
#include <cmath>
#include <cstdio>
#include <functional>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "clustered_data.h"
#include "dci_index.h"
#include "ip_to_l2.h"

namespace {

using ice::DciIndex;
using ice::DciParams;
using ice::testing::Clustered;
using ice::testing::exact_dot;
using ice::testing::exact_top_k;
using ice::testing::make_clustered;

int g_failures = 0;

#define CHECK(cond, ...)                                              \
  do {                                                                \
    if (!(cond)) {                                                    \
      ++g_failures;                                                   \
      std::printf("  FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);   \
      std::printf(__VA_ARGS__);                                       \
      std::printf("\n");                                              \
    }                                                                 \
  } while (0)

struct Results {
  int64_t k = 0;
  std::vector<int64_t> ids;
  std::vector<int32_t> found;
  std::vector<float> scores;
  bool operator==(const Results& o) const { return ids == o.ids && found == o.found; }
};

Results search(const DciIndex& index, const float* queries, int64_t count, int64_t k,
               const int64_t* last_key = nullptr) {
  Results r;
  r.k = k;
  r.ids.assign(count * k, -7);  // the index must overwrite every entry
  r.found.assign(count, -7);
  r.scores.assign(count * k, NAN);
  index.search({queries, count, k, last_key}, {r.ids.data(), r.found.data(), r.scores.data()});
  return r;
}

// Every row: `found` ids, then -1s; ids distinct, allowed, within last_key, ordered by
// decreasing exact q·k, each with its q·k as the score; found == min(k, keys the query may see).
void check_rows(const Clustered& data, const float* queries, int64_t count, const Results& r,
                const int64_t* last_key, const uint8_t* allowed, const char* what) {
  int bad = 0;
  for (int64_t q = 0; q < count && bad < 5; ++q) {
    const int64_t limit = last_key ? last_key[q] : INT64_MAX;
    int64_t visible = 0;
    for (int64_t j = 0; j < data.n && j <= limit; ++j) visible += !allowed || allowed[j];
    const int64_t* row = &r.ids[q * r.k];
    const int64_t found = r.found[q];
    bool ok = found == std::min(r.k, visible);
    std::set<int64_t> distinct;
    double previous = INFINITY;
    for (int64_t i = 0; i < r.k; ++i) {
      if (i >= found) {
        ok &= row[i] == -1;
        continue;
      }
      const int64_t id = row[i];
      ok &= id >= 0 && id < data.n && id <= limit && (!allowed || allowed[id]) && distinct.insert(id).second;
      if (!ok) break;
      const double score = exact_dot(queries + q * data.dim, &data.keys[id * data.dim], data.dim);
      ok &= score <= previous + 1e-4 * (1 + std::fabs(score));
      ok &= std::fabs(r.scores[q * r.k + i] - score) <= 1e-4 * (1 + std::fabs(score));
      previous = score;
    }
    if (!ok) {
      ++bad;
      CHECK(ok, "%s: query %lld: bad row (found %lld, visible %lld)", what, (long long)q, (long long)found,
            (long long)visible);
    }
  }
}

double mean_recall(const Clustered& data, const float* queries, int64_t count, const Results& r,
                   const int64_t* last_key = nullptr, const uint8_t* allowed = nullptr) {
  double sum = 0;
  for (int64_t q = 0; q < count; ++q) {
    const auto truth = exact_top_k(data.keys.data(), data.n, data.dim, queries + q * data.dim, r.k,
                                   last_key ? last_key[q] : INT64_MAX, allowed);
    sum += ice::testing::recall(&r.ids[q * r.k], r.found[q], truth);
  }
  return sum / count;
}

// ---------------------------------------------------------------------------------

void test_transform() {
  std::mt19937_64 rng(1);
  std::normal_distribution<float> normal;
  const int64_t dim = 13, n = 50;
  std::vector<float> keys(n * dim), q(dim);
  for (float& x : keys) x = normal(rng);
  for (float& x : q) x = normal(rng);
  const float c2 = ice::ip_to_l2::max_squared_norm(keys.data(), n, dim, nullptr);
  std::vector<float> qt(dim + 1), kt(dim + 1);
  ice::ip_to_l2::transform_query(q.data(), dim, qt.data());
  const double qnorm = std::sqrt(exact_dot(q.data(), q.data(), dim));
  for (int64_t j = 0; j < n; ++j) {
    ice::ip_to_l2::transform_key(&keys[j * dim], dim, c2, kt.data());
    CHECK(std::fabs(exact_dot(kt.data(), kt.data(), dim + 1) - c2) < 1e-4 * c2, "key %lld norm", (long long)j);
    double dist2 = 0;
    for (int64_t i = 0; i <= dim; ++i) dist2 += (double(qt[i]) - kt[i]) * (double(qt[i]) - kt[i]);
    const double expected = 1 + c2 - 2 * exact_dot(q.data(), &keys[j * dim], dim) / qnorm;
    CHECK(std::fabs(dist2 - expected) < 1e-4 * (1 + c2), "key %lld: %f vs %f", (long long)j, dist2, expected);
  }
  // The masked-out longest key must not set c.
  std::vector<uint8_t> allowed(n, 1);
  int64_t longest = 0;
  for (int64_t j = 1; j < n; ++j)
    if (exact_dot(&keys[j * dim], &keys[j * dim], dim) > exact_dot(&keys[longest * dim], &keys[longest * dim], dim))
      longest = j;
  allowed[longest] = 0;
  CHECK(ice::ip_to_l2::max_squared_norm(keys.data(), n, dim, allowed.data()) < c2, "mask ignored by c");
  std::vector<float> zero(dim, 0.f);
  ice::ip_to_l2::transform_query(zero.data(), dim, qt.data());
  CHECK(exact_dot(qt.data(), qt.data(), dim + 1) == 0, "zero query");
}

// Recall of the exact top-k at the defaults. Thresholds sit a few points under what
// these (fixed-seed) data give — measured 1K: 0.97/1.00, 4K: 0.99/1.00, 16K: 0.96/1.00
// (k = 10/32) — so a regression in construction or search trips them.
void test_recall_defaults() {
  struct Case { int64_t n, k; double floor; };
  for (const Case c : {Case{1024, 10, 0.92}, Case{1024, 32, 0.97}, Case{4096, 10, 0.95}, Case{4096, 32, 0.97},
                       Case{16384, 10, 0.92}, Case{16384, 32, 0.97}}) {
    const Clustered data = make_clustered(c.n, 64, 200, 42);
    DciIndex index;
    index.build({data.keys.data(), data.n, data.dim, nullptr}, 7);
    CHECK(index.size() == c.n && index.num_levels() == 3, "n %lld", (long long)c.n);
    const Results r = search(index, data.query.data(), data.queries, c.k);
    check_rows(data, data.query.data(), data.queries, r, nullptr, nullptr, "defaults");
    const double rec = mean_recall(data, data.query.data(), data.queries, r);
    std::printf("  recall n=%-5lld k=%-2lld %.4f (floor %.2f)\n", (long long)c.n, (long long)c.k, rec, c.floor);
    CHECK(rec >= c.floor, "n=%lld k=%lld recall %.4f < %.2f", (long long)c.n, (long long)c.k, rec, c.floor);
  }
}

// The DCI walk proper (every cell walked, as the original), and wide fields of view.
void test_recall_variants() {
  const Clustered data = make_clustered(4096, 64, 200, 43);
  struct Variant { const char* name; DciParams params; double floor; };
  DciParams walked;
  walked.exhaustive_cell_size = 0;
  DciParams wide;
  wide.query_field_of_view = 40;
  // A single cell: pure prioritized DCI over all keys, scoring 10% of them. Measured
  // 0.30 — a random 10% would give 0.10: the projections help, but weakly, since the
  // transform puts every key at about the same distance from a query.
  DciParams one_level;
  one_level.levels = 1;
  one_level.exhaustive_cell_size = 0;
  one_level.prop_to_retrieve = 0.1f;
  DciParams by_nearest;  // the original rule
  by_nearest.parent = DciParams::Parent::nearest;
  DciParams by_query;
  by_query.parent = DciParams::Parent::query;
  DciParams budget;  // per level, no new cell once 150 keys are scored
  budget.max_candidates = 150;
  for (const Variant& v : {Variant{"walked", walked, 0.78}, Variant{"fov 40", wide, 0.99}, Variant{"budget", budget, 0.93},
                           Variant{"1 level", one_level, 0.25}, Variant{"nearest", by_nearest, 0.95},
                           Variant{"query", by_query, 0.95}}) {
    DciIndex index(v.params);
    index.build({data.keys.data(), data.n, data.dim, nullptr}, 7);
    const Results r = search(index, data.query.data(), data.queries, 10);
    check_rows(data, data.query.data(), data.queries, r, nullptr, nullptr, v.name);
    const double rec = mean_recall(data, data.query.data(), data.queries, r);
    std::printf("  recall %-9s n=4096 k=10 %.4f (floor %.2f)\n", v.name, rec, v.floor);
    CHECK(rec >= v.floor, "%s: recall %.4f < %.2f", v.name, rec, v.floor);
  }
}

// With a field of view covering every key, the hierarchy is searched whole: exact.
void test_exhaustive_is_exact() {
  const Clustered data = make_clustered(2000, 24, 50, 44);
  DciParams p;
  p.query_field_of_view = 2000;
  p.exhaustive_cell_size = 1 << 30;
  DciIndex index(p);
  index.build({data.keys.data(), data.n, data.dim, nullptr}, 3);
  const Results r = search(index, data.query.data(), data.queries, 16);
  for (int64_t q = 0; q < data.queries; ++q) {
    const auto truth = exact_top_k(data.keys.data(), data.n, data.dim, &data.query[q * data.dim], 16);
    CHECK(std::equal(truth.begin(), truth.end(), &r.ids[q * 16]), "query %lld differs from brute force", (long long)q);
  }
  // The exact-scan path (rows scored one by one) ranks exactly like the descent
  // (rows scored in blocks): same float scores, same ties.
  p.exact_scan_below = 1 << 30;
  DciIndex scanning(p);
  scanning.build({data.keys.data(), data.n, data.dim, nullptr}, 3);
  CHECK(search(scanning, data.query.data(), data.queries, 16) == r, "exact scan and descent disagree");
}

// Causal: query i may see keys <= last_key[i]; never anything later.
void test_last_key() {
  const Clustered data = make_clustered(4096, 64, 300, 45);
  std::vector<int64_t> last_key(data.queries);
  std::mt19937_64 rng(5);
  for (int64_t q = 0; q < data.queries; ++q)  // spread over the sequence, a few tiny prefixes
    last_key[q] = q < 20 ? q - 1 : static_cast<int64_t>(rng() % data.n);
  for (int exhaustive : {1 << 30, 0}) {
    DciParams p;
    p.exhaustive_cell_size = exhaustive;
    if (!exhaustive) p.exact_scan_below = 0;  // tiny prefixes through the descent too
    DciIndex index(p);
    index.build({data.keys.data(), data.n, data.dim, nullptr}, 9);
    for (int64_t k : {1, 10, 32}) {
      const Results r = search(index, data.query.data(), data.queries, k, last_key.data());
      check_rows(data, data.query.data(), data.queries, r, last_key.data(), nullptr, "last_key");
      const double rec = mean_recall(data, data.query.data(), data.queries, r, last_key.data());
      std::printf("  causal recall %s k=%-2lld %.4f\n", exhaustive ? "scanned" : "walked ", (long long)k, rec);
      // k = 1 means a field of view of 1 (a greedy descent): invariants only.
      if (k > 1) CHECK(rec >= (exhaustive ? 0.94 : 0.85), "causal recall %.4f", rec);
    }
  }
}

// Key padding: removed keys are never indexed, whatever the query.
void test_allowed_mask() {
  const Clustered data = make_clustered(3000, 32, 200, 46);
  std::vector<uint8_t> allowed(data.n);
  std::mt19937_64 rng(6);
  for (auto& a : allowed) a = rng() % 10 < 7;
  DciIndex index;
  index.build({data.keys.data(), data.n, data.dim, allowed.data()}, 1);
  CHECK(index.size() == std::count(allowed.begin(), allowed.end(), 1), "size %lld", (long long)index.size());
  std::vector<int64_t> last_key(data.queries);
  for (int64_t q = 0; q < data.queries; ++q) last_key[q] = q * 15;
  for (const int64_t* lk : {static_cast<const int64_t*>(nullptr), static_cast<const int64_t*>(last_key.data())}) {
    const Results r = search(index, data.query.data(), data.queries, 10, lk);
    check_rows(data, data.query.data(), data.queries, r, lk, allowed.data(), "allowed");
    const double rec = mean_recall(data, data.query.data(), data.queries, r, lk, allowed.data());
    std::printf("  masked recall (%s) %.4f\n", lk ? "causal" : "non-causal", rec);
    CHECK(rec >= 0.9, "masked recall %.4f", rec);
  }
  // Nothing allowed: every row empty.
  std::vector<uint8_t> none(data.n, 0);
  DciIndex empty;
  empty.build({data.keys.data(), data.n, data.dim, none.data()}, 1);
  const Results r = search(empty, data.query.data(), 5, 4);
  CHECK(std::all_of(r.found.begin(), r.found.end(), [](int32_t f) { return f == 0; }), "found in empty index");
  CHECK(std::all_of(r.ids.begin(), r.ids.end(), [](int64_t id) { return id == -1; }), "ids in empty index");
}

// Same seed => same results: across builds, and across threads searching one index.
void test_determinism() {
  const Clustered data = make_clustered(4096, 64, 400, 47);
  std::vector<int64_t> last_key(data.queries);
  for (int64_t q = 0; q < data.queries; ++q) last_key[q] = q * 10;
  for (int variant = 0; variant < 3; ++variant) {
    DciParams p;
    if (variant == 1) p.exhaustive_cell_size = 0;
    if (variant == 2) p.parent = DciParams::Parent::nearest;
    DciIndex a(p), b(p), c(p);
    a.build({data.keys.data(), data.n, data.dim, nullptr}, 11);
    b.build({data.keys.data(), data.n, data.dim, nullptr}, 11);
    c.build({data.keys.data(), data.n, data.dim, nullptr}, 12);
    const Results ra = search(a, data.query.data(), data.queries, 10, last_key.data());
    CHECK(ra == search(b, data.query.data(), data.queries, 10, last_key.data()), "rebuild differs");
    CHECK(ra == search(a, data.query.data(), data.queries, 10, last_key.data()), "repeat search differs");
    // Another seed builds another index (other projections, levels and parents).
    const Results rc = search(c, data.query.data(), data.queries, 10);
    CHECK(!(search(a, data.query.data(), data.queries, 10) == rc), "seed has no effect");

    // Two threads, each a half (and in small blocks), against one thread.
    Results threaded;
    threaded.k = 10;
    threaded.ids.assign(data.queries * 10, -7);
    threaded.found.assign(data.queries, -7);
    threaded.scores.assign(data.queries * 10, NAN);
    auto run = [&](int64_t begin, int64_t end, int64_t block) {
      for (int64_t q = begin; q < end; q += block) {
        const int64_t count = std::min(block, end - q);
        a.search({&data.query[q * data.dim], count, 10, &last_key[q]}, {&threaded.ids[q * 10], &threaded.found[q], &threaded.scores[q * 10]});
      }
    };
    std::thread t1(run, 0, data.queries / 2, 7), t2(run, data.queries / 2, data.queries, 64);
    t1.join();
    t2.join();
    CHECK(ra == threaded, "threads differ (variant %d)", variant);
  }
}

// Degenerate shapes: tiny n, n < k, one level, odd dims, duplicate keys, zero queries.
void test_edge_cases() {
  for (int64_t n : {0, 1, 2, 5, 37}) {
    for (int levels : {1, 3, 5}) {
      const Clustered data = make_clustered(std::max<int64_t>(n, 1), 5, 6, 48 + n);
      DciParams p;
      p.levels = levels;
      DciIndex index(p);
      index.build({data.keys.data(), n, data.dim, nullptr}, 2);
      CHECK(index.size() == n, "size");
      for (int64_t k : {1, 8, 64}) {
        const Results r = search(index, data.query.data(), data.queries, k);
        check_rows(data.n == n ? data : Clustered{n, data.dim, data.queries, data.keys, data.query},
                   data.query.data(), data.queries, r, nullptr, nullptr, "edge");
      }
    }
  }
  // All keys equal: any k keys are a right answer; they must be distinct and, tied,
  // listed by increasing key index.
  const int64_t n = 300, dim = 8;
  std::vector<float> keys(n * dim, 0.5f), q(2 * dim, 1.f);
  std::fill(q.begin() + dim, q.end(), 0.f);  // the second query is zero
  DciIndex index;
  index.build({keys.data(), n, dim, nullptr}, 0);
  const Results r = search(index, q.data(), 2, 5);
  for (int64_t row = 0; row < 2; ++row) {
    CHECK(r.found[row] == 5, "ties: found %d", r.found[row]);
    for (int64_t i = 1; i < 5; ++i) CHECK(r.ids[row * 5 + i - 1] < r.ids[row * 5 + i], "ties not by index");
  }
  // NaN input neither crashes nor breaks the row invariants.
  std::vector<float> nan_keys = keys;
  nan_keys[17 * dim] = NAN;
  DciIndex nan_index;
  nan_index.build({nan_keys.data(), n, dim, nullptr}, 0);
  const Results rn = search(nan_index, q.data(), 2, 5);
  CHECK(rn.found[0] == 5 && rn.found[1] == 5, "NaN key: found %d %d", rn.found[0], rn.found[1]);
}

void test_bad_params() {
  auto throws = [](std::function<void()> f) {
    try {
      f();
    } catch (const std::invalid_argument&) {
      return true;
    }
    return false;
  };
  DciParams p;
  p.levels = 0;
  CHECK(throws([&] { DciIndex index(p); }), "levels 0 accepted");
  p = DciParams();
  p.simple_indices = 300;
  CHECK(throws([&] { DciIndex index(p); }), "simple_indices 300 accepted");
  p = DciParams();
  p.prop_to_retrieve = 1.5f;
  CHECK(throws([&] { DciIndex index(p); }), "prop_to_retrieve 1.5 accepted");
  CHECK(throws([] { DciIndex().build({nullptr, 10, 4, nullptr}, 0); }), "null keys accepted");
  // k = 0 leaves nothing to write but the counts.
  const Clustered data = make_clustered(100, 8, 3, 49);
  DciIndex index;
  index.build({data.keys.data(), data.n, data.dim, nullptr}, 0);
  std::vector<int32_t> found(3, -7);
  index.search({data.query.data(), 3, 0, nullptr}, {nullptr, found.data()});
  CHECK(found == std::vector<int32_t>(3, 0), "k = 0");
}

}  // namespace

int main() {
  const std::pair<const char*, void (*)()> tests[] = {
      {"transform", test_transform},          {"recall_defaults", test_recall_defaults},
      {"recall_variants", test_recall_variants}, {"exhaustive_is_exact", test_exhaustive_is_exact},
      {"last_key", test_last_key},            {"allowed_mask", test_allowed_mask},
      {"determinism", test_determinism},      {"edge_cases", test_edge_cases},
      {"bad_params", test_bad_params},
  };
  for (const auto& [name, run] : tests) {
    const int before = g_failures;
    std::printf("%s\n", name);
    run();
    std::printf("  %s\n", g_failures == before ? "ok" : "FAILED");
  }
  std::printf("%s\n", g_failures ? "FAILURES" : "all passed");
  return g_failures ? 1 : 0;
}
