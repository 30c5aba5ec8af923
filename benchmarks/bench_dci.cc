// DCI index vs brute-force top-k on clustered data: recall, time per query, keys scored.
//
// Build and run (single thread, no ONNX Runtime needed):
//   g++ -std=c++17 -O3 -Wall -Wextra -Icustom_ops/src -Icustom_ops/tests
//       benchmarks/bench_dci.cc custom_ops/src/dci_index.cc custom_ops/src/dci_search.cc -o /tmp/bench_dci
//   /tmp/bench_dci [n=1024,4096,16384] [k=10] [queries=1000] [causal=0] [field_of_view=0] ...
// Every DciParams field can be set by name (see parse_args); values may be comma lists
// for n and k. Prints one line per (n, k).
#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "clustered_data.h"
#include "dci_index.h"

namespace {

// CPU time of this thread: the machine is shared, so wall time would count other jobs.
double cpu_seconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

std::vector<int64_t> parse_list(const std::string& text) {
  std::vector<int64_t> values;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) values.push_back(std::stoll(item));
  return values;
}

// Brute force with the same 8-lane dot product as the index, over padded rows.
struct BruteForce {
  int64_t n, dim, stride;
  std::vector<float> rows, scores;
  BruteForce(const float* keys, int64_t n_, int64_t dim_)
      : n(n_), dim(dim_), stride((dim_ + 7) / 8 * 8), rows(n_ * stride, 0.f), scores(n_) {
    for (int64_t j = 0; j < n; ++j) std::copy_n(keys + j * dim, dim, &rows[j * stride]);
  }
  // Top k among keys 0..last_key (a causal prefix), best first; fewer if fewer keys.
  int64_t search(const float* q_in, int64_t k, int64_t* ids, int64_t last_key) {
    const int64_t visible = std::min(n, last_key + 1);
    std::vector<float>& q = query_;
    q.assign(stride, 0.f);
    std::copy_n(q_in, dim, q.begin());
    for (int64_t j = 0; j < visible; ++j) {
      const float* r = &rows[j * stride];
      float acc[8] = {};
      for (int64_t i = 0; i < stride; i += 8)
        for (int l = 0; l < 8; ++l) acc[l] += q[i + l] * r[i + l];
      scores[j] = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    }
    // Top k through a min-heap whose root is the threshold to beat.
    heap_.clear();
    for (int64_t j = 0; j < visible; ++j) {
      if (static_cast<int64_t>(heap_.size()) < k) {
        heap_.push_back({scores[j], j});
        std::push_heap(heap_.begin(), heap_.end(), std::greater<>());
      } else if (scores[j] > heap_.front().first) {
        std::pop_heap(heap_.begin(), heap_.end(), std::greater<>());
        heap_.back() = {scores[j], j};
        std::push_heap(heap_.begin(), heap_.end(), std::greater<>());
      }
    }
    std::sort_heap(heap_.begin(), heap_.end(), std::greater<>());
    for (size_t i = 0; i < heap_.size(); ++i) ids[i] = heap_[i].second;
    return static_cast<int64_t>(heap_.size());
  }
  std::vector<float> query_;
  std::vector<std::pair<float, int64_t>> heap_;
};

}  // namespace

int main(int argc, char** argv) {
  std::vector<int64_t> sizes{1024, 4096, 16384}, ks{10};
  int64_t queries = 1000, dim = 64;
  int repeat = 1;  // searches timed per (n, k), for profiling the search alone
  bool causal = false;  // query q sees keys 0 .. q·n/queries (queries spread over the sequence)
  ice::DciParams params;
  for (int a = 1; a < argc; ++a) {
    const std::string arg = argv[a];
    const auto eq = arg.find('=');
    const std::string key = arg.substr(0, eq), value = eq == std::string::npos ? "" : arg.substr(eq + 1);
    if (key == "n") sizes = parse_list(value);
    else if (key == "k") ks = parse_list(value);
    else if (key == "queries") queries = std::stoll(value);
    else if (key == "dim") dim = std::stoll(value);
    else if (key == "repeat") repeat = std::stoi(value);
    else if (key == "causal") causal = std::stoi(value) != 0;
    else if (key == "levels") params.levels = std::stoi(value);
    else if (key == "composite") params.composite_indices = std::stoi(value);
    else if (key == "simple") params.simple_indices = std::stoi(value);
    else if (key == "construction_fov") params.construction_field_of_view = std::stoi(value);
    else if (key == "field_of_view") params.query_field_of_view = std::stoi(value);
    else if (key == "prop_to_retrieve") params.prop_to_retrieve = std::stof(value);
    else if (key == "prop_to_visit") params.prop_to_visit = std::stof(value);
    else if (key == "max_candidates") params.max_candidates = std::stoi(value);
    else if (key == "parent") params.parent = static_cast<ice::DciParams::Parent>(std::stoi(value));
    else if (key == "exhaustive_cell_size") params.exhaustive_cell_size = std::stoi(value);
    else {
      std::fprintf(stderr, "unknown argument %s\n", arg.c_str());
      return 2;
    }
  }
  std::printf("%6s %3s %8s %9s %11s %11s %8s %9s %8s %8s\n", "n", "k", "recall", "rec<0.5", "dci_ns/q",
              "brute_ns/q", "speedup", "scored/q", "ns/key", "build_ms");
  for (int64_t n : sizes) {
    const auto data = ice::testing::make_clustered(n, dim, queries, 42);
    ice::DciIndex index(params);
    double start = cpu_seconds();
    index.build({data.keys.data(), n, dim, nullptr}, 7);
    const double build_s = cpu_seconds() - start;
    BruteForce brute(data.keys.data(), n, dim);
    for (int64_t k : ks) {
      std::vector<int64_t> ids(queries * k), exact(queries * k);
      std::vector<int32_t> found(queries);
      std::vector<float> scores(queries * k);
      std::vector<int64_t> last_key(queries, n - 1), exact_found(queries);
      if (causal)
        for (int64_t q = 0; q < queries; ++q) last_key[q] = (q + 1) * n / queries - 1;
      start = cpu_seconds();
      for (int r = 0; r < repeat; ++r)
        index.search({data.query.data(), queries, k, causal ? last_key.data() : nullptr}, {ids.data(), found.data(), scores.data()});
      const double dci_s = (cpu_seconds() - start) / repeat;
      const int64_t scored = ice::DciIndex::last_search_scored();
      start = cpu_seconds();
      for (int64_t q = 0; q < queries; ++q)
        exact_found[q] = brute.search(&data.query[q * dim], k, &exact[q * k], last_key[q]);
      const double brute_s = cpu_seconds() - start;
      double sum = 0, poor = 0;  // poor: share of queries that miss most of their top k
      for (int64_t q = 0; q < queries; ++q) {
        const std::vector<int64_t> truth(&exact[q * k], &exact[q * k] + exact_found[q]);
        const double r = ice::testing::recall(&ids[q * k], found[q], truth);
        sum += r;
        poor += r < 0.5;
      }
      std::printf("%6lld %3lld %8.4f %9.3f %11.0f %11.0f %8.2f %9.1f %8.2f %8.1f\n", (long long)n, (long long)k,
                  sum / queries, poor / queries, 1e9 * dci_s / queries, 1e9 * brute_s / queries, brute_s / dci_s,
                  double(scored) / queries, 1e9 * dci_s / scored, 1e3 * build_s);
    }
  }
  return 0;
}
