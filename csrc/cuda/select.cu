// Magnitude selection on CUDA: radix histograms, threshold masks and the
// top-k mask built from them (python/deltaops/selection.py, in C++).
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <string>
#include <vector>

#include "common.cuh"

namespace deltaops {
namespace cuda {
namespace {

// ---- radix_histogram ------------------------------------------------------------
//
// Each block keeps a shared-memory histogram of `chunk_bins` bins (the bins
// [blockIdx.y * chunk_bins, +chunk_bins) of the level), counts a grid-stride
// share of the elements into it with shared atomics, and flushes the non-zero
// bins to the int64 output with global atomics. Runs of equal bins inside a
// thread (zeros in a sparse delta) are added with one atomic.

constexpr int kHistThreads = 1024;
constexpr int kHistItems = 8;  // one 16-byte load of 16-bit elements, two of fp32

template <typename T>
__global__ void __launch_bounds__(kHistThreads)
    radix_histogram_kernel(const T* __restrict__ x, int64_t n, bool vec_ok, int shift,
                           uint32_t bin_mask, bool filter, uint32_t prefix, uint32_t chunk_bins,
                           unsigned long long* __restrict__ out) {
  extern __shared__ uint32_t hist[];
  const uint32_t first_bin = blockIdx.y * chunk_bins;
  for (uint32_t b = threadIdx.x; b < chunk_bins; b += blockDim.x) hist[b] = 0;
  __syncthreads();

  RunLengthHistogram runs{hist, first_bin, chunk_bins};
  auto count = [&](T v) {
    const uint32_t key = magnitude_key(v);
    if (filter && (key >> 16) != prefix) return;
    runs.add((key >> shift) & bin_mask);
  };

  const int64_t stride = grid_threads();
  const int64_t groups = vec_ok ? n / kHistItems : 0;
  for (int64_t g = global_thread(); g < groups; g += stride) {
    const Pack<T, kHistItems> p = load_pack<T, kHistItems>(x + g * kHistItems);
#pragma unroll
    for (int j = 0; j < kHistItems; ++j) count(p.v[j]);
  }
  for (int64_t i = groups * kHistItems + global_thread(); i < n; i += stride) count(x[i]);
  runs.flush();
  __syncthreads();

  for (uint32_t b = threadIdx.x; b < chunk_bins; b += blockDim.x) {
    const uint32_t c = hist[b];
    if (c != 0) atomicAdd(out + first_bin + b, static_cast<unsigned long long>(c));
  }
}

// ---- threshold_mask ---------------------------------------------------------------
//
// The flat order is cut into tiles of kTile elements; thread j of a tile owns
// kTileItems consecutive elements (one or two 16-byte loads). When the equal
// keys must be ranked, a first pass counts them per tile, at::cumsum turns the
// counts into tile offsets, and the mask pass ranks inside the tile with a
// block-wide exclusive scan.

constexpr int kTileThreads = 256;
constexpr int kTileItems = 8;
constexpr int64_t kTile = kTileThreads * kTileItems;

enum EqualMode : int { kTakeNone = 0, kTakeAll = 1, kTakeRanked = 2 };

template <typename T>
__device__ __forceinline__ int load_keys(const T* __restrict__ x, int64_t n, int64_t base,
                                         bool vec_ok, uint32_t (&keys)[kTileItems]) {
  if (vec_ok && base + kTileItems <= n) {
    const Pack<T, kTileItems> p = load_pack<T, kTileItems>(x + base);
#pragma unroll
    for (int j = 0; j < kTileItems; ++j) keys[j] = magnitude_key(p.v[j]);
    return kTileItems;
  }
  const int valid = base >= n ? 0 : n - base >= kTileItems ? kTileItems : static_cast<int>(n - base);
#pragma unroll
  for (int j = 0; j < kTileItems; ++j) keys[j] = j < valid ? magnitude_key(x[base + j]) : 0u;
  return valid;
}

template <typename T>
__global__ void __launch_bounds__(kTileThreads)
    equal_count_kernel(const T* __restrict__ x, int64_t n, bool vec_ok, uint32_t threshold,
                       int64_t tiles, int32_t* __restrict__ counts) {
  using Reduce = cub::BlockReduce<int, kTileThreads>;
  __shared__ typename Reduce::TempStorage temp;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    uint32_t keys[kTileItems];
    const int valid = load_keys(x, n, t * kTile + threadIdx.x * kTileItems, vec_ok, keys);
    int c = 0;
#pragma unroll
    for (int j = 0; j < kTileItems; ++j) c += (j < valid && keys[j] == threshold) ? 1 : 0;
    const int total = Reduce(temp).Sum(c);
    if (threadIdx.x == 0) counts[t] = total;
    __syncthreads();  // temp is reused by the next tile
  }
}

template <typename T>
__global__ void __launch_bounds__(kTileThreads)
    threshold_mask_kernel(const T* __restrict__ x, int64_t n, bool vec_ok, uint32_t threshold,
                          int mode, int64_t take_equal,
                          const int64_t* __restrict__ inclusive_counts, int64_t tiles,
                          bool out_vec_ok, bool* __restrict__ out) {
  using Scan = cub::BlockScan<int, kTileThreads>;
  __shared__ typename Scan::TempStorage temp;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int64_t base = t * kTile + threadIdx.x * kTileItems;
    uint32_t keys[kTileItems];
    const int valid = load_keys(x, n, base, vec_ok, keys);

    int64_t rank = 0;  // rank among equal keys of this thread's first equal element
    if (mode == kTakeRanked) {  // uniform over the block
      int c = 0;
#pragma unroll
      for (int j = 0; j < kTileItems; ++j) c += (j < valid && keys[j] == threshold) ? 1 : 0;
      int before = 0;
      Scan(temp).ExclusiveSum(c, before);
      rank = (t > 0 ? inclusive_counts[t - 1] : 0) + before;
      __syncthreads();  // temp is reused by the next tile
    }

    uint32_t bytes[2] = {0u, 0u};
#pragma unroll
    for (int j = 0; j < kTileItems; ++j) {
      bool keep = keys[j] > threshold;
      if (keys[j] == threshold) {
        keep = mode == kTakeAll || (mode == kTakeRanked && rank < take_equal);
        ++rank;
      }
      if (j < valid && keep) bytes[j / 4] |= 1u << (8 * (j % 4));
    }
    if (out_vec_ok && valid == kTileItems) {
      *reinterpret_cast<uint2*>(out + base) = make_uint2(bytes[0], bytes[1]);
    } else {
      for (int j = 0; j < valid; ++j) out[base + j] = ((bytes[j / 4] >> (8 * (j % 4))) & 1u) != 0;
    }
  }
}

// ---- host ----------------------------------------------------------------------------

constexpr int64_t kBins16 = 1 << 15;
constexpr int64_t kBinsLevel0 = 1 << 15;
constexpr int64_t kBinsLevel1 = 1 << 16;

uint32_t nan_key_floor(at::ScalarType st) {
  switch (st) {
    case at::ScalarType::Float: return 0x7F800001u;
    case at::ScalarType::BFloat16: return 0x7F81u;
    default: return 0x7C01u;  // float16
  }
}

std::vector<int64_t> to_host(const at::Tensor& histogram) {
  const at::Tensor h = histogram.to(at::kCPU).contiguous();
  const int64_t* p = h.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + h.numel());
}

int64_t sum_from(const std::vector<int64_t>& h, size_t first) {
  int64_t s = 0;
  for (size_t b = first; b < h.size(); ++b) s += h[b];
  return s;
}

// selection.locate: the bin holding the k-th largest key (1-based k) and the
// number of keys in the bins above it.
std::pair<int64_t, int64_t> locate(const std::vector<int64_t>& h, int64_t k) {
  int64_t above = 0;
  for (int64_t b = static_cast<int64_t>(h.size()) - 1; b >= 0; --b) {
    if (above + h[b] >= k) return {b, above};
    above += h[b];
  }
  TORCH_CHECK(false, "deltaops._C_cuda.topk_mask: histogram holds ", above, " keys, fewer than k=",
              k);
  return {0, 0};
}

}  // namespace

at::Tensor radix_histogram(const at::Tensor& x, int64_t level, int64_t prefix) {
  check_input(x, "radix_histogram", "x");
  const bool fp32 = x.scalar_type() == at::kFloat;
  int64_t bins;
  int shift;
  uint32_t bin_mask;
  bool filter = false;
  if (!fp32) {
    if (level != 0)
      throw ValueError("16-bit inputs have one radix level, got level=" + std::to_string(level));
    bins = kBins16, shift = 0, bin_mask = 0x7FFFu;
  } else if (level == 0) {
    bins = kBinsLevel0, shift = 16, bin_mask = 0x7FFFu;
  } else if (level == 1) {
    bins = kBinsLevel1, shift = 0, bin_mask = 0xFFFFu, filter = true;
  } else {
    throw ValueError("fp32 inputs have radix levels 0 and 1, got level=" + std::to_string(level));
  }

  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::zeros({bins}, x.options().dtype(at::kLong));
  const int64_t n = x.numel();
  // fp32 keys have a 15-bit high half: another prefix selects nothing.
  if (n == 0 || (filter && (prefix < 0 || prefix > 0x7FFF))) return out;

  // Bins per block: the whole level when shared memory allows (32768 x 4 B =
  // 128 KiB fits sm_80/sm_90), else a power-of-two chunk per blockIdx.y.
  const size_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  uint32_t chunk = static_cast<uint32_t>(std::min<int64_t>(bins, 32768));
  while (chunk > 1024 && chunk * sizeof(uint32_t) > optin) chunk /= 2;
  const size_t smem = chunk * sizeof(uint32_t);
  const unsigned chunks = static_cast<unsigned>(bins / chunk);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  dispatch_float(x.scalar_type(), "radix_histogram", [&](auto tag) {
    using T = typename decltype(tag)::type;
    auto kernel = radix_histogram_kernel<T>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
    int per_sm = 0;
    C10_CUDA_CHECK(
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kHistThreads, smem));
    const T* data = static_cast<const T*>(x.const_data_ptr());
    const bool vec_ok = pack_aligned<T, kHistItems>(data);
    const dim3 grid(grid_for((n + kHistItems - 1) / kHistItems, kHistThreads, std::max(per_sm, 1)),
                    chunks);
    kernel<<<grid, kHistThreads, smem, stream>>>(
        data, n, vec_ok, shift, bin_mask, filter, static_cast<uint32_t>(prefix), chunk,
        reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor threshold_mask(const at::Tensor& x, int64_t threshold_key, int64_t take_equal) {
  check_input(x, "threshold_mask", "x");
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.numel();
  // Keys lie in [0, 2^31): a threshold outside that range decides every element.
  if (threshold_key < 0) return at::ones(x.sizes(), x.options().dtype(at::kBool));
  if (threshold_key > 0x7FFFFFFF || n == 0)
    return at::zeros(x.sizes(), x.options().dtype(at::kBool));

  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kBool));
  const int mode = take_equal <= 0 ? kTakeNone : take_equal >= n ? kTakeAll : kTakeRanked;
  const int64_t tiles = (n + kTile - 1) / kTile;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(tiles, int64_t{sm_count()} * 8));
  const uint32_t threshold = static_cast<uint32_t>(threshold_key);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  bool* mask = out.data_ptr<bool>();
  const bool out_vec_ok = is_aligned(mask, 8);

  dispatch_float(x.scalar_type(), "threshold_mask", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* data = static_cast<const T*>(x.const_data_ptr());
    const bool vec_ok = pack_aligned<T, kTileItems>(data);
    at::Tensor offsets;
    if (mode == kTakeRanked) {
      at::Tensor counts = at::empty({tiles}, x.options().dtype(at::kInt));
      equal_count_kernel<T><<<grid, kTileThreads, 0, stream>>>(data, n, vec_ok, threshold, tiles,
                                                              counts.data_ptr<int32_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      offsets = at::cumsum(counts, 0, at::kLong);
    }
    threshold_mask_kernel<T><<<grid, kTileThreads, 0, stream>>>(
        data, n, vec_ok, threshold, mode, take_equal,
        mode == kTakeRanked ? offsets.data_ptr<int64_t>() : nullptr, tiles, out_vec_ok, mask);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor topk_mask(const at::Tensor& x, int64_t k) {
  check_input(x, "topk_mask", "x");
  const int64_t n = x.numel();
  if (k < 0 || k > n)
    throw ValueError("k must be in [0, " + std::to_string(n) + "], got " + std::to_string(k));
  c10::cuda::CUDAGuard guard(x.device());
  if (n == 0) return at::zeros(x.sizes(), x.options().dtype(at::kBool));

  const at::ScalarType st = x.scalar_type();
  const bool fp32 = st == at::kFloat;
  const std::vector<int64_t> level0 = to_host(radix_histogram(x, 0, 0));
  int64_t cached_prefix = -1;
  std::vector<int64_t> cached_level1;
  auto level1_of = [&](int64_t prefix) -> const std::vector<int64_t>& {
    if (prefix != cached_prefix) {
      cached_level1 = to_host(radix_histogram(x, 1, prefix));
      cached_prefix = prefix;
    }
    return cached_level1;
  };

  // selection.has_nan
  const uint32_t nan_floor = nan_key_floor(st);
  bool nan = false;
  if (!fp32) {
    nan = sum_from(level0, nan_floor) > 0;
  } else {
    // bucket 0x7F80 holds +inf (low bits 0) and NaNs (low bits != 0)
    nan = sum_from(level0, (nan_floor >> 16) + 1) > 0 ||
          (level0[nan_floor >> 16] > 0 && sum_from(level1_of(nan_floor >> 16), 1) > 0);
  }
  if (nan) throw ValueError("topk_mask: x contains NaN; magnitudes of NaN have no order");
  if (k == 0) return at::zeros(x.sizes(), x.options().dtype(at::kBool));
  if (k == n) return at::ones(x.sizes(), x.options().dtype(at::kBool));

  // selection.threshold_from_histograms
  const auto [bucket, above] = locate(level0, k);
  int64_t threshold = bucket, take_equal = k - above;
  if (fp32) {
    const auto [low, above_low] = locate(level1_of(bucket), k - above);
    threshold = (bucket << 16) | low;
    take_equal = k - above - above_low;
  }
  return threshold_mask(x, threshold, take_equal);
}

}  // namespace cuda
}  // namespace deltaops
