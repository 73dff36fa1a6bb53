// Applying deltas in place on CUDA: dense, COO (sorted flat indices) and
// bitmask (packed uint8 mask + values in flat order of the set bits).
//
// The sparse forms are validated on the device before anything is written: a
// reduction kernel records the first offending position (or the popcount and
// the padding check), the host reads it back and raises ValueError.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <limits>
#include <string>

#include "common.cuh"

namespace deltaops {
namespace cuda {
namespace {

constexpr int kThreads = 256;

// ---- apply_dense_ ----------------------------------------------------------------

constexpr int kDenseItems = 8;  // 16 bytes of a 16-bit weight; 32 of an fp32 one

template <typename W, typename D>
__global__ void __launch_bounds__(kThreads)
    apply_dense_kernel(W* __restrict__ weight, const D* __restrict__ delta, int64_t n, bool vec_ok,
                       float alpha) {
  const int64_t groups = (n + kDenseItems - 1) / kDenseItems;
  for (int64_t g = global_thread(); g < groups; g += grid_threads()) {
    const int64_t i = g * kDenseItems;
    if (vec_ok && i + kDenseItems <= n) {
      Pack<W, kDenseItems> w = load_pack<W, kDenseItems, false>(weight + i);
      const Pack<D, kDenseItems> d = load_pack<D, kDenseItems>(delta + i);
#pragma unroll
      for (int j = 0; j < kDenseItems; ++j)
        w.v[j] = store_from_f32<W>(apply_element(load_f32(w.v[j]), load_f32(d.v[j]), alpha));
      store_pack(weight + i, w);
    } else {
      for (int64_t e = i; e < n && e < i + kDenseItems; ++e)
        weight[e] = store_from_f32<W>(apply_element(load_f32(weight[e]), load_f32(delta[e]), alpha));
    }
  }
}

// ---- apply_coo_ ------------------------------------------------------------------

constexpr unsigned long long kNone = std::numeric_limits<unsigned long long>::max();

struct MinOp {
  __device__ __forceinline__ unsigned long long operator()(unsigned long long a,
                                                           unsigned long long b) const {
    return b < a ? b : a;
  }
};

// first[0]: lowest position whose index is outside [0, numel);
// first[1]: lowest position p > 0 with indices[p - 1] >= indices[p].
template <typename I>
__global__ void __launch_bounds__(kThreads)
    coo_validate_kernel(const I* __restrict__ indices, int64_t m, int64_t numel,
                        unsigned long long* __restrict__ first) {
  unsigned long long bad_range = kNone, bad_order = kNone;
  for (int64_t p = global_thread(); p < m; p += grid_threads()) {
    const int64_t index = static_cast<int64_t>(indices[p]);
    if ((index < 0 || index >= numel) && bad_range == kNone) bad_range = p;
    if (p > 0 && bad_order == kNone && static_cast<int64_t>(indices[p - 1]) >= index)
      bad_order = p;
  }
  using Reduce = cub::BlockReduce<unsigned long long, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  const unsigned long long block_range = Reduce(temp).Reduce(bad_range, MinOp{});
  __syncthreads();
  const unsigned long long block_order = Reduce(temp).Reduce(bad_order, MinOp{});
  if (threadIdx.x == 0) {
    if (block_range != kNone) atomicMin(first, block_range);
    if (block_order != kNone) atomicMin(first + 1, block_order);
  }
}

template <typename W, typename V, typename I>
__global__ void __launch_bounds__(kThreads)
    apply_coo_kernel(W* __restrict__ weight, const I* __restrict__ indices,
                     const V* __restrict__ values, int64_t m, float alpha) {
  for (int64_t p = global_thread(); p < m; p += grid_threads()) {
    W* w = weight + static_cast<int64_t>(indices[p]);
    *w = store_from_f32<W>(apply_element(load_f32(*w), load_f32(values[p]), alpha));
  }
}

// ---- apply_bitmask_ ------------------------------------------------------------------
//
// The mask is read as 32-bit words (32 elements each, little-endian, so bit b
// of word q is element 32 q + b). A tile is kRounds rounds of kThreads
// consecutive words; in each round a block scan of the per-word popcounts
// gives every thread the position of its first value.

constexpr int kRounds = 4;
constexpr int64_t kTileWords = int64_t{kThreads} * kRounds;

__device__ __forceinline__ uint32_t load_word(const uint8_t* __restrict__ packed, int64_t nbytes,
                                              int64_t q, bool aligned) {
  const int64_t first = q * 4;
  if (aligned && first + 4 <= nbytes) return __ldg(reinterpret_cast<const unsigned*>(packed + first));
  uint32_t word = 0;
  for (int b = 0; b < 4 && first + b < nbytes; ++b)
    word |= static_cast<uint32_t>(packed[first + b]) << (8 * b);
  return word;
}

// counts[t] = set bits of tile t; status[0] += all set bits; status[1] = 1
// when a padding bit of the last byte is set.
__global__ void __launch_bounds__(kThreads)
    bitmask_count_kernel(const uint8_t* __restrict__ packed, int64_t nbytes, int64_t numel,
                         bool aligned, int64_t tiles, int32_t* __restrict__ counts,
                         unsigned long long* __restrict__ status) {
  using Reduce = cub::BlockReduce<int, kThreads>;
  __shared__ typename Reduce::TempStorage temp;
  const int64_t words = (nbytes + 3) / 4;
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    const int used = static_cast<int>(numel % 8);
    if (used != 0 && (packed[nbytes - 1] >> used) != 0) status[1] = 1;
  }
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    int c = 0;
#pragma unroll
    for (int r = 0; r < kRounds; ++r) {
      const int64_t q = t * kTileWords + r * kThreads + threadIdx.x;
      if (q < words) c += __popc(load_word(packed, nbytes, q, aligned));
    }
    const int total = Reduce(temp).Sum(c);
    if (threadIdx.x == 0) {
      counts[t] = total;
      atomicAdd(status, static_cast<unsigned long long>(total));
    }
    __syncthreads();  // temp is reused by the next tile
  }
}

template <typename W, typename V>
__global__ void __launch_bounds__(kThreads)
    apply_bitmask_kernel(W* __restrict__ weight, const uint8_t* __restrict__ packed,
                         int64_t nbytes, bool aligned, const V* __restrict__ values,
                         const int64_t* __restrict__ inclusive_counts, int64_t tiles,
                         float alpha) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage temp;
  const int64_t words = (nbytes + 3) / 4;
  for (int64_t t = blockIdx.x; t < tiles; t += gridDim.x) {
    int64_t running = t > 0 ? inclusive_counts[t - 1] : 0;
#pragma unroll 1
    for (int r = 0; r < kRounds; ++r) {
      const int64_t q = t * kTileWords + r * kThreads + threadIdx.x;
      uint32_t word = q < words ? load_word(packed, nbytes, q, aligned) : 0u;
      int before = 0, round_total = 0;
      Scan(temp).ExclusiveSum(__popc(word), before, round_total);
      int64_t v = running + before;
      while (word != 0) {
        const int bit = __ffs(word) - 1;
        word &= word - 1;
        W* w = weight + q * 32 + bit;
        *w = store_from_f32<W>(apply_element(load_f32(*w), load_f32(values[v++]), alpha));
      }
      running += round_total;
      __syncthreads();  // temp is reused by the next round
    }
  }
}

}  // namespace

// ---- host ----------------------------------------------------------------------------

void apply_dense_(at::Tensor& weight, const at::Tensor& delta, double alpha) {
  check_input(weight, "apply_dense_", "weight");
  check_input(delta, "apply_dense_", "delta");
  check_same_device(weight, delta, "apply_dense_");
  TORCH_CHECK(weight.numel() == delta.numel(), "deltaops._C_cuda.apply_dense_: weight has ",
              weight.numel(), " elements but delta has ", delta.numel());
  c10::cuda::CUDAGuard guard(weight.device());
  const int64_t n = weight.numel();
  if (n == 0) return;
  const float alpha32 = static_cast<float>(alpha);
  dispatch_float(weight.scalar_type(), "apply_dense_", [&](auto wtag) {
    using W = typename decltype(wtag)::type;
    dispatch_float(delta.scalar_type(), "apply_dense_", [&](auto dtag) {
      using D = typename decltype(dtag)::type;
      W* w = static_cast<W*>(weight.data_ptr());
      const D* d = static_cast<const D*>(delta.const_data_ptr());
      const bool vec_ok = pack_aligned<W, kDenseItems>(w) && pack_aligned<D, kDenseItems>(d);
      apply_dense_kernel<W, D><<<grid_for((n + kDenseItems - 1) / kDenseItems, kThreads),
                                 kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(w, d, n, vec_ok,
                                                                                  alpha32);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void apply_coo_(at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values,
                double alpha) {
  check_input(weight, "apply_coo_", "weight");
  check_input(indices, "apply_coo_", "indices");
  check_input(values, "apply_coo_", "values");
  check_same_device(weight, indices, "apply_coo_");
  check_same_device(weight, values, "apply_coo_");
  const int64_t m = indices.numel();
  TORCH_CHECK(values.numel() == m, "deltaops._C_cuda.apply_coo_: ", m, " indices but ",
              values.numel(), " values");
  c10::cuda::CUDAGuard guard(weight.device());
  if (m == 0) return;
  const int64_t numel = weight.numel();
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const unsigned grid = grid_for(m, kThreads);

  // Validate before writing anything.
  at::Tensor first = at::full({2}, -1, indices.options().dtype(at::kLong));  // -1 == kNone
  auto* first_ptr = reinterpret_cast<unsigned long long*>(first.data_ptr<int64_t>());
  dispatch_index(indices.scalar_type(), "apply_coo_", [&](auto itag) {
    using I = typename decltype(itag)::type;
    coo_validate_kernel<I><<<grid, kThreads, 0, stream>>>(
        static_cast<const I*>(indices.const_data_ptr()), m, numel, first_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const at::Tensor found = first.to(at::kCPU);
  const int64_t bad_range = found.data_ptr<int64_t>()[0];  // -1: none
  const int64_t bad_order = found.data_ptr<int64_t>()[1];
  auto index_at = [&](int64_t p) {
    return std::to_string(indices.reshape({-1})[p].item<int64_t>());
  };
  if (bad_range >= 0 && (bad_order < 0 || bad_range <= bad_order)) {
    throw ValueError("apply_coo_: indices[" + std::to_string(bad_range) + "] = " +
                     index_at(bad_range) + " is out of range for a weight of " +
                     std::to_string(numel) + " elements (valid: [0, " + std::to_string(numel) +
                     "))");
  }
  if (bad_order >= 0) {
    throw ValueError("apply_coo_: indices must be strictly increasing, but indices[" +
                     std::to_string(bad_order - 1) + "] = " + index_at(bad_order - 1) +
                     " >= indices[" + std::to_string(bad_order) + "] = " + index_at(bad_order));
  }

  const float alpha32 = static_cast<float>(alpha);
  dispatch_float(weight.scalar_type(), "apply_coo_", [&](auto wtag) {
    using W = typename decltype(wtag)::type;
    dispatch_float(values.scalar_type(), "apply_coo_", [&](auto vtag) {
      using V = typename decltype(vtag)::type;
      dispatch_index(indices.scalar_type(), "apply_coo_", [&](auto itag) {
        using I = typename decltype(itag)::type;
        apply_coo_kernel<W, V, I><<<grid, kThreads, 0, stream>>>(
            static_cast<W*>(weight.data_ptr()), static_cast<const I*>(indices.const_data_ptr()),
            static_cast<const V*>(values.const_data_ptr()), m, alpha32);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

void apply_bitmask_(at::Tensor& weight, const at::Tensor& packed_mask, const at::Tensor& values,
                    double alpha) {
  check_input(weight, "apply_bitmask_", "weight");
  check_input(packed_mask, "apply_bitmask_", "packed_mask");
  check_input(values, "apply_bitmask_", "values");
  check_same_device(weight, packed_mask, "apply_bitmask_");
  check_same_device(weight, values, "apply_bitmask_");
  TORCH_CHECK(packed_mask.scalar_type() == at::kByte,
              "deltaops._C_cuda.apply_bitmask_: packed_mask must be uint8, got ",
              packed_mask.scalar_type());
  const int64_t numel = weight.numel();
  const int64_t nbytes = packed_mask.numel();
  if (nbytes != (numel + 7) / 8) {
    throw ValueError("apply_bitmask_: a weight of " + std::to_string(numel) + " elements needs " +
                     std::to_string((numel + 7) / 8) + " mask bytes, got " +
                     std::to_string(nbytes));
  }
  c10::cuda::CUDAGuard guard(weight.device());
  if (numel == 0) {
    if (values.numel() != 0)
      throw ValueError("apply_bitmask_: the mask has 0 set bits but values has " +
                       std::to_string(values.numel()) + " elements");
    return;
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const uint8_t* packed = packed_mask.const_data_ptr<uint8_t>();
  const bool aligned = is_aligned(packed, 4);
  const int64_t words = (nbytes + 3) / 4;
  const int64_t tiles = (words + kTileWords - 1) / kTileWords;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(tiles, int64_t{sm_count()} * 8));

  // Validate before writing anything: popcount and padding bits.
  at::Tensor counts = at::empty({tiles}, weight.options().dtype(at::kInt));
  at::Tensor status = at::zeros({2}, weight.options().dtype(at::kLong));
  bitmask_count_kernel<<<grid, kThreads, 0, stream>>>(
      packed, nbytes, numel, aligned, tiles, counts.data_ptr<int32_t>(),
      reinterpret_cast<unsigned long long*>(status.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor found = status.to(at::kCPU);
  const int64_t set_bits = found.data_ptr<int64_t>()[0];
  if (found.data_ptr<int64_t>()[1] != 0) {
    throw ValueError("apply_bitmask_: padding bits must be zero, but the mask covers " +
                     std::to_string(numel) + " elements and bits " + std::to_string(numel % 8) +
                     "..7 of its last byte (byte " + std::to_string(nbytes - 1) +
                     ") are not all zero");
  }
  if (set_bits != values.numel()) {
    throw ValueError("apply_bitmask_: the mask has " + std::to_string(set_bits) +
                     " set bits but values has " + std::to_string(values.numel()) +
                     " elements");
  }
  if (set_bits == 0) return;

  const at::Tensor offsets = at::cumsum(counts, 0, at::kLong);
  const float alpha32 = static_cast<float>(alpha);
  dispatch_float(weight.scalar_type(), "apply_bitmask_", [&](auto wtag) {
    using W = typename decltype(wtag)::type;
    dispatch_float(values.scalar_type(), "apply_bitmask_", [&](auto vtag) {
      using V = typename decltype(vtag)::type;
      apply_bitmask_kernel<W, V><<<grid, kThreads, 0, stream>>>(
          static_cast<W*>(weight.data_ptr()), packed, nbytes, aligned,
          static_cast<const V*>(values.const_data_ptr()), offsets.const_data_ptr<int64_t>(),
          tiles, alpha32);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace cuda
}  // namespace deltaops
