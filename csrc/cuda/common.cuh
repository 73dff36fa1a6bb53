// Shared helpers of the CUDA kernels: input checks, dtype dispatch, launch
// sizing and 16-byte vector loads. The per-element math is NOT here: kernels
// call csrc/include/deltaops/{bits,philox,sparse}.h, the same functions the
// CPU extension runs, so the CPU tests exercise the arithmetic of the GPU.
#pragma once
#include <algorithm>
#include <cstdint>
#include <string>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>

#include "deltaops/bits.h"
#include "deltaops/philox.h"
#include "deltaops/sparse.h"
#include "sparse_cuda.cuh"

namespace deltaops {
namespace cuda {

// ---- host side ------------------------------------------------------------------

inline void check_input(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), "deltaops._C_cuda.", op, ": ", name, " must be a CUDA tensor, got ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), "deltaops._C_cuda.", op, ": ", name, " must be contiguous");
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(a.device() == b.device(), "deltaops._C_cuda.", op,
              ": all tensors must be on one device, got ", a.device(), " and ", b.device());
}

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<storage type>{}) for float32 / bfloat16 / float16.
template <typename F>
void dispatch_float(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::ScalarType::Float: f(Tag<float>{}); break;
    case at::ScalarType::BFloat16: f(Tag<bf16_t>{}); break;
    case at::ScalarType::Half: f(Tag<fp16_t>{}); break;
    default:
      TORCH_CHECK(false, "deltaops._C_cuda.", op, ": unsupported dtype ", st,
                  "; expected float32, bfloat16 or float16");
  }
}

template <typename F>
void dispatch_index(at::ScalarType st, const char* op, F&& f) {
  switch (st) {
    case at::ScalarType::Int: f(Tag<int32_t>{}); break;
    case at::ScalarType::Long: f(Tag<int64_t>{}); break;
    default:
      TORCH_CHECK(false, "deltaops._C_cuda.", op, ": unsupported index dtype ", st,
                  "; expected int32 or int64");
  }
}

inline bool is_aligned(const void* p, size_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Grid for a grid-stride loop over `work` items of `threads`-thread blocks:
// enough blocks to fill the device `blocks_per_sm` deep, never more than needed.
inline unsigned grid_for(int64_t work, int threads, int blocks_per_sm = 8) {
  const int64_t needed = (work + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(sm_count()) * blocks_per_sm;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min(needed, cap)));
}

// ---- device side ----------------------------------------------------------------

// A thread's additions to a block's shared-memory histogram chunk [first_bin,
// first_bin + chunk_bins): runs of equal bins (neighbouring elements often share
// one, e.g. the zero deltas of unchanged weights) go in with one shared atomic
// each. Bins outside the chunk are ignored. Call flush() once at the end.
struct RunLengthHistogram {
  uint32_t* hist;
  uint32_t first_bin, chunk_bins;
  uint32_t run_bin = 0, run_count = 0;

  __device__ __forceinline__ void add(uint32_t bin) {
    const uint32_t local = bin - first_bin;  // wraps when below
    if (local >= chunk_bins) return;
    if (run_count != 0 && local == run_bin) {
      ++run_count;
      return;
    }
    flush();
    run_bin = local;
    run_count = 1;
  }
  __device__ __forceinline__ void flush() {
    if (run_count != 0) atomicAdd(&hist[run_bin], run_count);
    run_count = 0;
  }
};

__device__ __forceinline__ int64_t global_thread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_threads() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x;
}

// N elements of storage type T, aligned for one vector access (at most 16 B).
template <typename T, int N>
struct alignas(sizeof(T) * N >= 16 ? 16 : sizeof(T) * N) Pack {
  T v[N];
};

// Loads / stores of a Pack as 16-, 8- or 4-byte words (LDG.128 for 8 x 16-bit).
// `ro` loads go through the read-only path; use them for inputs only.
template <typename T, int N, bool ro = true>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  constexpr int kBytes = static_cast<int>(sizeof(T)) * N;
  static_assert(kBytes % 16 == 0 || kBytes == 8 || kBytes == 4, "unsupported pack size");
  Pack<T, N> out;
  if constexpr (kBytes % 16 == 0) {
    const uint4* src = reinterpret_cast<const uint4*>(p);
    uint4* dst = reinterpret_cast<uint4*>(&out);
#pragma unroll
    for (int w = 0; w < kBytes / 16; ++w) dst[w] = ro ? __ldg(src + w) : src[w];
  } else if constexpr (kBytes == 8) {
    const uint2* src = reinterpret_cast<const uint2*>(p);
    *reinterpret_cast<uint2*>(&out) = ro ? __ldg(src) : *src;
  } else {
    const unsigned* src = reinterpret_cast<const unsigned*>(p);
    *reinterpret_cast<unsigned*>(&out) = ro ? __ldg(src) : *src;
  }
  return out;
}

template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& in) {
  constexpr int kBytes = static_cast<int>(sizeof(T)) * N;
  static_assert(kBytes % 16 == 0 || kBytes == 8 || kBytes == 4, "unsupported pack size");
  if constexpr (kBytes % 16 == 0) {
    uint4* dst = reinterpret_cast<uint4*>(p);
    const uint4* src = reinterpret_cast<const uint4*>(&in);
#pragma unroll
    for (int w = 0; w < kBytes / 16; ++w) dst[w] = src[w];
  } else if constexpr (kBytes == 8) {
    *reinterpret_cast<uint2*>(p) = *reinterpret_cast<const uint2*>(&in);
  } else {
    *reinterpret_cast<unsigned*>(p) = *reinterpret_cast<const unsigned*>(&in);
  }
}

template <typename T, int N>
inline bool pack_aligned(const void* p) {
  return is_aligned(p, alignof(Pack<T, N>));
}

}  // namespace cuda
}  // namespace deltaops
