// Host-side threshold selection of the fused merge, shared by the CPU kernel
// (csrc/cpu/merge_cpu.cpp) and the CUDA kernel's host code (csrc/cuda/merge.cu):
// from a model's level-0 histogram of delta keys (key >> 16, 32768 bins) and its
// level-1 histograms (key & 0xFFFF inside one level-0 bucket, 65536 bins), the
// (threshold key, take_equal) of each top-k, as python/deltaops/reference/merge.py's
// topk_thresholds and the sparse family's topk_mask define it: keep every key above
// the threshold, plus the first take_equal keys equal to it in flat order.
#pragma once
#include <algorithm>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <utility>
#include <vector>

namespace deltaops {
namespace merge_select {

constexpr uint64_t kKeyNone = uint64_t(1) << 32;  // a threshold no key reaches

struct Thr {
  uint64_t key = kKeyNone;  // keep key > key ...
  int64_t take = 0;         // ... plus the first `take` equal (-1: all)
};

// The bucket holding the k-th largest key (k >= 1) and the count above it.
inline std::pair<int64_t, int64_t> locate(const std::vector<int64_t>& hist, int64_t k) {
  int64_t above = 0;
  for (int64_t b = static_cast<int64_t>(hist.size()) - 1; b >= 0; --b) {
    if (above + hist[b] >= k) return {b, above};
    above += hist[b];
  }
  throw std::logic_error("deltaops: internal error: k exceeds the histogram total");
}

// One Thr per k of ks for a tensor of n keys; level1(bucket) returns the level-1
// histogram of a level-0 bucket (computed once per bucket that some k needs).
template <typename Level1>
std::vector<Thr> thresholds_from(const std::vector<int64_t>& level0, int64_t n,
                                 const std::vector<int64_t>& ks, Level1&& level1) {
  std::map<int64_t, std::vector<int64_t>> fine;
  std::vector<Thr> out;
  for (int64_t k : ks) {
    Thr t;
    if (k <= 0) {
      t = Thr{kKeyNone, 0};
    } else if (k >= n) {
      t = Thr{0, -1};
    } else {
      const auto [bucket, above] = locate(level0, k);
      auto it = fine.find(bucket);
      if (it == fine.end()) it = fine.emplace(bucket, level1(bucket)).first;
      const auto [low, above_low] = locate(it->second, k - above);
      const int64_t take = k - above - above_low;
      t = Thr{(static_cast<uint64_t>(bucket) << 16) | static_cast<uint64_t>(low),
              take >= it->second[low] ? -1 : take};
    }
    out.push_back(t);
  }
  return out;
}

// mergekit's magnitude k: int(density * n), at least one element for density > 0.
inline int64_t magnitude_k(double density, int64_t n) {
  if (density >= 1) return n;
  if (density <= 0 || n == 0) return 0;
  return std::max<int64_t>(1, static_cast<int64_t>(density * static_cast<double>(n)));
}

inline Thr thr_from(int64_t key, int64_t take) { return Thr{static_cast<uint64_t>(key), take}; }

}  // namespace merge_select
}  // namespace deltaops
