// CUDA kernels of the low-bit delta family: pack/unpack, exact-mean sign and
// absmean quantizers, uniform groups, fused dequantize-apply, delta_bmm.
//
// Per-element math comes from csrc/include/deltaops/quant.h (the functions the
// CPU kernels run, so the CPU tests exercise it); python/deltaops/reference/quant.py
// is the specification. Built with --fmad=false; divisions and products go
// through div_rn / mul_rn (__fdiv_rn / __fmul_rn on the device).
//
// Host wrappers validate every argument with torch ops on the device before a
// kernel writes (a synchronizing .item() per check: these are not hot paths).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <string>
#include <vector>

#include "common.cuh"
#include "deltaops/quant.h"
#include "quant_cuda.cuh"
#include "sparse_cuda.cuh"

namespace deltaops {
namespace cuda {
namespace {

using namespace deltaops::quant;

constexpr int kThreads = 256;
enum Source { kFromCodes = 0, kFromSign = 1, kFromGroups = 2 };

void check_bits(int64_t bits, bool uniform_only) {
  const bool ok = uniform_only ? (bits == 2 || bits == 3 || bits == 4 || bits == 8)
                               : (bits == 1 || bits == 2 || bits == 3 || bits == 4 || bits == 8);
  if (!ok)
    throw ValueError(std::string("bits must be one of ") + (uniform_only ? "2, 3, 4, 8" : "1, 2, 3, 4, 8") +
                     "; got " + std::to_string(bits));
}

std::pair<int64_t, int64_t> rows_cols(const at::Tensor& t) {
  if (t.dim() == 0) throw ValueError("x must have at least one dimension (the input dimension is the last)");
  const int64_t cols = t.size(-1);
  return {cols ? t.numel() / cols : 0, cols};
}

void check_finite(const at::Tensor& x) {
  const at::Tensor bad = at::logical_not(at::isfinite(x.reshape(-1)));
  if (bad.any().item<bool>()) {
    const int64_t first = bad.nonzero()[0][0].item<int64_t>();
    throw ValueError("x contains NaN or inf (first at flat index " + std::to_string(first) +
                     "); low-bit quantizers need finite values");
  }
}

void validate_stream(const at::Tensor& packed, int64_t bits, int64_t numel) {
  const int64_t expected = packed_nbytes(numel, static_cast<int>(bits));
  if (packed.numel() != expected)
    throw ValueError("packed has " + std::to_string(packed.numel()) + " bytes; " + std::to_string(numel) +
                     " codes of " + std::to_string(bits) + " bits need " + std::to_string(expected));
  const int used = static_cast<int>((numel * bits) % 8);
  if (used && (packed.reshape(-1)[expected - 1].item<int64_t>() >> used))
    throw ValueError("padding bits of the last byte of packed must be zero");
}

// ---- kernels ------------------------------------------------------------------------------

// One thread per unit of eight codes: `bits` whole bytes.
template <typename T, int BITS, int SOURCE>
__global__ void encode_kernel(const void* __restrict__ src, const float* __restrict__ scales,
                              const uint8_t* __restrict__ zeros, uint8_t* __restrict__ out,
                              int64_t n, int64_t nbytes, int64_t cols, int64_t group_size,
                              int64_t groups, bool row_scales, float maxq) {
  const int64_t units = (n + 7) / 8;
  for (int64_t u = global_thread(); u < units; u += grid_threads()) {
    uint8_t c[8];
#pragma unroll
    for (int s = 0; s < 8; ++s) {
      const int64_t i = u * 8 + s;
      uint32_t code = 0;
      if (i < n) {
        if constexpr (SOURCE == kFromCodes) {
          code = static_cast<const uint8_t*>(src)[i];
        } else if constexpr (SOURCE == kFromSign) {
          code = sign_code(load_f32(static_cast<const T*>(src)[i]));
        } else {
          const int64_t row = i / cols, g = (i - row * cols) / group_size;
          const int64_t k = (row_scales ? row * groups : 0) + g;
          code = uniform_code(load_f32(static_cast<const T*>(src)[i]), scales[k],
                              static_cast<float>(zeros[k]), maxq);
        }
      }
      c[s] = static_cast<uint8_t>(code);
    }
    const uint64_t word = pack8(c, BITS);
#pragma unroll
    for (int b = 0; b < BITS; ++b) {
      const int64_t at = u * BITS + b;
      if (at < nbytes) out[at] = static_cast<uint8_t>(word >> (8 * b));
    }
  }
}

__global__ void unpack_kernel(const uint8_t* __restrict__ packed, uint8_t* __restrict__ out, int64_t n,
                              int64_t nbytes, int bits) {
  for (int64_t i = global_thread(); i < n; i += grid_threads())
    out[i] = static_cast<uint8_t>(read_code(packed, nbytes, i, bits));
}

// Exponent bins of |x| (quant.h's abs_bin_add): shared-memory bins per block
// for one tensor-wide set, global atomics per row otherwise. Integer sums: no order.
template <typename T>
__global__ void abs_bins_kernel(const T* __restrict__ x, int64_t n, int64_t cols, bool per_row,
                                unsigned long long* __restrict__ bins) {
  __shared__ unsigned long long local[kExponentBins];
  for (int b = threadIdx.x; b < kExponentBins; b += blockDim.x) local[b] = 0;
  __syncthreads();
  for (int64_t i = global_thread(); i < n; i += grid_threads()) {
    const uint32_t u = f32_bits(load_f32(x[i])) & 0x7FFFFFFFu;
    const uint32_t e = u >> 23;
    const unsigned long long m = (u & 0x7FFFFFu) | (e ? 0x800000u : 0u);
    if (per_row)
      atomicAdd(bins + (i / cols) * kExponentBins + e, m);
    else
      atomicAdd(local + e, m);
  }
  __syncthreads();
  if (!per_row)
    for (int b = threadIdx.x; b < kExponentBins; b += blockDim.x)
      if (local[b]) atomicAdd(bins + b, local[b]);
}

// One block per group: min / max on order-preserving integer keys, max |x|.
template <typename T>
__global__ void group_params_kernel(const T* __restrict__ x, float* __restrict__ scales,
                                    uint8_t* __restrict__ zeros, int* __restrict__ overflow,
                                    int64_t cols, int64_t group_size, int64_t groups, int bits,
                                    bool symmetric) {
  __shared__ uint32_t lo_s[kThreads], hi_s[kThreads], amax_s[kThreads];
  const int64_t gid = blockIdx.x, row = gid / groups, g = gid - row * groups;
  const int64_t begin = row * cols + g * group_size;
  const int64_t end = row * cols + (cols < (g + 1) * group_size ? cols : (g + 1) * group_size);
  uint32_t lo = 0xFFFFFFFFu, hi = 0u, amax = 0u;
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    const uint32_t u = f32_bits(load_f32(x[i]));
    const uint32_t key = (u >> 31) ? ~u : (u | 0x80000000u);
    lo = key < lo ? key : lo;
    hi = key > hi ? key : hi;
    amax = (u & 0x7FFFFFFFu) > amax ? (u & 0x7FFFFFFFu) : amax;
  }
  lo_s[threadIdx.x] = lo;
  hi_s[threadIdx.x] = hi;
  amax_s[threadIdx.x] = amax;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      lo_s[threadIdx.x] = min(lo_s[threadIdx.x], lo_s[threadIdx.x + stride]);
      hi_s[threadIdx.x] = max(hi_s[threadIdx.x], hi_s[threadIdx.x + stride]);
      amax_s[threadIdx.x] = max(amax_s[threadIdx.x], amax_s[threadIdx.x + stride]);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    auto from_key = [](uint32_t key) { return f32_from_bits((key >> 31) ? (key & 0x7FFFFFFFu) : ~key); };
    float s, z;
    uniform_params(from_key(lo_s[0]), from_key(hi_s[0]), f32_from_bits(amax_s[0]), bits, symmetric, &s, &z);
    if (!((f32_bits(s) & 0x7FFFFFFFu) < 0x7F800000u)) *overflow = 1;
    scales[gid] = s;
    zeros[gid] = static_cast<uint8_t>(z);
  }
}

__device__ __forceinline__ float dequant_at(const uint8_t* packed, int64_t nbytes, const float* scales,
                                            const uint8_t* zeros, int64_t i, int64_t cols,
                                            int64_t group_size, int64_t groups, bool row_scales,
                                            int bits) {
  const uint32_t code = read_code(packed, nbytes, i, bits);
  const int64_t row = i / cols, g = (i - row * cols) / group_size;
  const int64_t k = (row_scales ? row * groups : 0) + g;
  return bits == 1 ? dequant_sign(code, scales[k])
                   : dequant_uniform(code, static_cast<int32_t>(zeros[k]), scales[k]);
}

template <typename T>
__global__ void apply_kernel(T* __restrict__ w, const uint8_t* __restrict__ packed, int64_t nbytes,
                             const float* __restrict__ scales, const uint8_t* __restrict__ zeros,
                             int64_t n, int64_t cols, int64_t group_size, int64_t groups,
                             bool row_scales, int bits, float alpha) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) {
    const float dq = dequant_at(packed, nbytes, scales, zeros, i, cols, group_size, groups,
                                row_scales, bits);
    w[i] = store_from_f32<T>(apply_element(load_f32(w[i]), dq, alpha));
  }
}

// delta_bmm, tiled: a block computes a kBmmTile x kBmmTile tile of y[b] (rows of
// x[b] by rows of W), 16 x 16 threads of kBmmSub x kBmmSub outputs each. Per
// step of kBmmK columns, the block stages x's tile and the merged weight's tile
// W + dq (decoded once per block, never stored globally) in shared memory.
// Every output is the fp32 sum over k in increasing order of x * (w + dq), one
// rounding per multiply and per add, as the one-thread-per-output loop it
// replaces: the result does not depend on the tiling.
constexpr int kBmmTile = 64, kBmmK = 16, kBmmSub = 4;
constexpr int kBmmThreads = (kBmmTile / kBmmSub) * (kBmmTile / kBmmSub);

template <typename TX, typename TW>
__global__ void __launch_bounds__(kBmmThreads)
    delta_bmm_kernel(const TX* __restrict__ x, const TW* __restrict__ w,
                     const uint8_t* __restrict__ packed, int64_t nbytes,
                     const float* __restrict__ scales, const uint8_t* __restrict__ zeros,
                     const int64_t* __restrict__ indices, float* __restrict__ y, int64_t m,
                     int64_t n, int64_t k, int64_t group_size, int64_t groups, int64_t r, int bits) {
  // k-major tiles; the +1 column spreads a thread's rows over the banks
  __shared__ float x_tile[kBmmK][kBmmTile + 1];
  __shared__ float w_tile[kBmmK][kBmmTile + 1];
  const int64_t b = blockIdx.z;
  const int64_t row0 = int64_t{blockIdx.y} * kBmmTile, col0 = int64_t{blockIdx.x} * kBmmTile;
  const int tx = threadIdx.x % (kBmmTile / kBmmSub), ty = threadIdx.x / (kBmmTile / kBmmSub);
  const int64_t t = indices[b];
  const uint8_t* stream = packed + t * nbytes;
  const float* s_t = scales + t * r * groups;
  const uint8_t* z_t = bits > 1 ? zeros + t * r * groups : zeros;
  float acc[kBmmSub][kBmmSub];
#pragma unroll
  for (int i = 0; i < kBmmSub; ++i)
#pragma unroll
    for (int j = 0; j < kBmmSub; ++j) acc[i][j] = 0.0f;
  for (int64_t k0 = 0; k0 < k; k0 += kBmmK) {
    // consecutive threads read consecutive columns of x and W (coalesced)
    for (int e = threadIdx.x; e < kBmmTile * kBmmK; e += kBmmThreads) {
      const int rr = e / kBmmK, kk = e % kBmmK;
      const int64_t c = k0 + kk, xr = row0 + rr, wr = col0 + rr;
      x_tile[kk][rr] = xr < m && c < k ? load_f32(x[(b * m + xr) * k + c]) : 0.0f;
      float merged = 0.0f;
      if (wr < n && c < k) {
        // dequant_at with the row and column known: no 64-bit division (k < 2^31)
        const int64_t i = wr * k + c;
        const uint32_t code = read_code(stream, nbytes, i, bits);
        const int64_t g = (r > 1 ? wr * groups : 0) +
                          static_cast<int32_t>(c) / static_cast<int32_t>(group_size);
        const float dq = bits == 1 ? dequant_sign(code, s_t[g])
                                   : dequant_uniform(code, static_cast<int32_t>(z_t[g]), s_t[g]);
        merged = __fadd_rn(load_f32(w[i]), dq);
      }
      w_tile[kk][rr] = merged;
    }
    __syncthreads();
    const int steps = static_cast<int>(k - k0 < kBmmK ? k - k0 : kBmmK);  // no padded terms
    for (int kk = 0; kk < steps; ++kk) {
      float xv[kBmmSub], wv[kBmmSub];
#pragma unroll
      for (int i = 0; i < kBmmSub; ++i) xv[i] = x_tile[kk][ty * kBmmSub + i];
#pragma unroll
      for (int j = 0; j < kBmmSub; ++j) wv[j] = w_tile[kk][tx * kBmmSub + j];
#pragma unroll
      for (int i = 0; i < kBmmSub; ++i)
#pragma unroll
        for (int j = 0; j < kBmmSub; ++j) acc[i][j] = __fadd_rn(acc[i][j], __fmul_rn(xv[i], wv[j]));
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kBmmSub; ++i) {
    const int64_t row = row0 + ty * kBmmSub + i;
#pragma unroll
    for (int j = 0; j < kBmmSub; ++j) {
      const int64_t col = col0 + tx * kBmmSub + j;
      if (row < m && col < n) y[(b * m + row) * n + col] = acc[i][j];
    }
  }
}

template <typename T, int SOURCE>
at::Tensor encode(const at::Tensor& src, int64_t n, int bits, const at::Tensor& scales,
                  const at::Tensor& zeros, int64_t cols, int64_t group_size, int64_t groups,
                  bool row_scales, float maxq) {
  const int64_t nbytes = packed_nbytes(n, bits);
  at::Tensor out = at::empty({nbytes}, src.options().dtype(at::kByte));
  if (n == 0) return out;
  const float* s = scales.defined() ? scales.data_ptr<float>() : nullptr;
  const uint8_t* z = zeros.defined() ? zeros.data_ptr<uint8_t>() : nullptr;
  const unsigned grid = grid_for((n + 7) / 8, kThreads);
  auto stream = at::cuda::getCurrentCUDAStream();
  auto launch = [&](auto bits_tag) {
    constexpr int B = decltype(bits_tag)::value;
    encode_kernel<T, B, SOURCE><<<grid, kThreads, 0, stream>>>(
        src.data_ptr(), s, z, out.data_ptr<uint8_t>(), n, nbytes, cols, group_size, groups, row_scales, maxq);
  };
  switch (bits) {
    case 1: launch(std::integral_constant<int, 1>{}); break;
    case 2: launch(std::integral_constant<int, 2>{}); break;
    case 3: launch(std::integral_constant<int, 3>{}); break;
    case 4: launch(std::integral_constant<int, 4>{}); break;
    default: launch(std::integral_constant<int, 8>{}); break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// Exact mean |x| per row or per tensor (host finishes with quant.h's abs_mean_from_bins).
template <typename T>
std::vector<float> abs_means(const at::Tensor& x, int64_t rows, int64_t cols, bool per_row) {
  const int64_t nrows = per_row ? rows : 1, n = x.numel();
  at::Tensor bins = at::zeros({nrows * kExponentBins}, x.options().dtype(at::kLong));
  if (n) {
    abs_bins_kernel<T><<<grid_for(n, kThreads), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        static_cast<const T*>(x.data_ptr()), n, cols ? cols : 1, per_row,
        reinterpret_cast<unsigned long long*>(bins.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const at::Tensor host = bins.cpu();
  const uint64_t* h = reinterpret_cast<const uint64_t*>(host.data_ptr<int64_t>());
  std::vector<float> means(nrows);
  for (int64_t r = 0; r < nrows; ++r)
    means[r] = abs_mean_from_bins(h + r * kExponentBins, per_row ? cols : n);
  return means;
}

template <typename F>
void dispatch(const at::Tensor& t, const char* op, F&& f) {
  dispatch_float(t.scalar_type(), op, [&](auto tag) { f(typename decltype(tag)::type{}); });
}

}  // namespace

// ---- host entry points ---------------------------------------------------------------------------

at::Tensor pack_bits(const at::Tensor& codes, int64_t bits) {
  check_input(codes, "pack_bits", "codes");
  check_bits(bits, false);
  TORCH_CHECK(codes.scalar_type() == at::kByte, "deltaops._C_cuda.pack_bits: codes must be uint8");
  const c10::cuda::CUDAGuard guard(codes.device());
  if (codes.numel() && codes.max().item<int64_t>() >= (int64_t(1) << bits))
    throw ValueError("codes do not fit in " + std::to_string(bits) + " bits");
  return encode<uint8_t, kFromCodes>(codes, codes.numel(), static_cast<int>(bits), at::Tensor(),
                         at::Tensor(), 1, 1, 1, false, 0.0f);
}

at::Tensor compeft_pack(const at::Tensor& x, const at::Tensor& keep) {
  check_input(x, "compeft_pack", "x");
  check_input(keep, "compeft_pack", "keep");
  if (keep.scalar_type() != at::kBool || keep.numel() != x.numel())
    throw ValueError("keep must be a bool tensor of x's " + std::to_string(x.numel()) + " elements");
  const c10::cuda::CUDAGuard guard(x.device());
  // Composed (no kernel of its own yet): int8 sign(x) + 1 where kept, 1 elsewhere, then packed.
  at::Tensor codes = at::sign(x.reshape(-1)).to(at::kChar).mul_(keep.reshape(-1)).add_(1);
  return pack_bits(codes.view(at::kByte), 2);
}

std::tuple<at::Tensor, at::Tensor> compeft_quantize(const at::Tensor& x, int64_t k) {
  check_input(x, "compeft_quantize", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  check_finite(x);
  // Composed: the top-k kernel, compeft_pack, and torch's fp64 sums as in
  // reference.quant.fp64_moments: rows of a power of two >= sqrt(n) elements, then
  // the row sums, so h = width + rows whatever order torch adds in.
  const at::Tensor flat = x.reshape(-1).to(at::kDouble);
  const int64_t n = flat.numel();
  int64_t width = 1;
  while (width * width < n) width *= 2;
  const int64_t rows = (n + width - 1) / width;
  const at::Tensor table = at::constant_pad_nd(flat, {0, rows * width - n}).view({rows, width});
  const at::Tensor moments = at::stack({table.sum(1).sum(), table.mul(table).sum(1).sum(),
                                        at::scalar_tensor(static_cast<double>(width + rows), flat.options())});
  return {compeft_pack(x, topk_mask(x, k)), moments};
}

at::Tensor unpack_bits(const at::Tensor& packed, int64_t bits, int64_t numel) {
  check_input(packed, "unpack_bits", "packed");
  check_bits(bits, false);
  if (numel < 0) throw ValueError("numel must be non-negative");
  const c10::cuda::CUDAGuard guard(packed.device());
  validate_stream(packed, bits, numel);
  at::Tensor out = at::empty({numel}, packed.options());
  if (numel) {
    unpack_kernel<<<grid_for(numel, kThreads), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        packed.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), numel, packed.numel(), static_cast<int>(bits));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_sign(const at::Tensor& x, bool per_row) {
  check_input(x, "quantize_sign", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [rows, cols] = rows_cols(x);
  check_finite(x);
  at::Tensor packed, scales;
  dispatch(x, "quantize_sign", [&](auto tag) {
    using T = decltype(tag);
    const std::vector<float> means = abs_means<T>(x, rows, cols, per_row);
    scales = at::tensor(means, x.options().dtype(at::kFloat)).reshape({per_row ? rows : 1, 1});
    packed = encode<T, kFromSign>(x, x.numel(), 1, at::Tensor(), at::Tensor(), 1, 1, 1, false, 1.0f);
  });
  return {packed, scales};
}

std::tuple<at::Tensor, at::Tensor> quantize_ternary_absmean(const at::Tensor& x) {
  check_input(x, "quantize_ternary_absmean", "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [rows, cols] = rows_cols(x);
  check_finite(x);
  at::Tensor packed, scale;
  dispatch(x, "quantize_ternary_absmean", [&](auto tag) {
    using T = decltype(tag);
    const float mean = abs_means<T>(x, rows, cols, false)[0];
    const float s = mean > kAbsmeanEps ? mean : kAbsmeanEps;
    scale = at::full({1, 1}, s, x.options().dtype(at::kFloat));
    const at::Tensor zero = at::full({1, 1}, static_cast<int64_t>(kTernaryZero), x.options().dtype(at::kByte));
    packed = encode<T, kFromGroups>(x, x.numel(), 2, scale, zero, cols ? cols : 1, cols ? cols : 1, 1,
                       false, 2.0f);
  });
  return {packed, scale};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_uniform(const at::Tensor& x, int64_t bits,
                                                                int64_t group_size, bool symmetric) {
  check_input(x, "quantize_uniform", "x");
  check_bits(bits, true);
  if (group_size <= 0) throw ValueError("group_size must be positive, got " + std::to_string(group_size));
  const c10::cuda::CUDAGuard guard(x.device());
  const auto [rows, cols] = rows_cols(x);
  check_finite(x);
  const int64_t groups = cols ? (cols + group_size - 1) / group_size : 0;
  at::Tensor scales = at::zeros({rows, groups}, x.options().dtype(at::kFloat));
  at::Tensor zeros = at::zeros({rows, groups}, x.options().dtype(at::kByte));
  at::Tensor packed;
  dispatch(x, "quantize_uniform", [&](auto tag) {
    using T = decltype(tag);
    if (rows * groups) {
      at::Tensor overflow = at::zeros({1}, x.options().dtype(at::kInt));
      group_params_kernel<T><<<static_cast<unsigned>(rows * groups), kThreads, 0,
                               at::cuda::getCurrentCUDAStream()>>>(
          static_cast<const T*>(x.data_ptr()), scales.data_ptr<float>(), zeros.data_ptr<uint8_t>(),
          overflow.data_ptr<int>(), cols, group_size, groups, static_cast<int>(bits), symmetric);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (overflow.item<int>()) throw ValueError("x: the value range of a quantization group overflows fp32");
    }
    packed = encode<T, kFromGroups>(x, x.numel(), static_cast<int>(bits), scales, zeros, cols ? cols : 1,
                       group_size, groups, true, static_cast<float>((1 << bits) - 1));
  });
  return {packed, scales, zeros};
}

namespace {

std::pair<int64_t, int64_t> validate_params(int64_t rows, int64_t cols, const at::Tensor& packed,
                                            const at::Tensor& scales, const at::Tensor& zeros,
                                            int64_t bits, int64_t group_size) {
  check_bits(bits, false);
  if (group_size <= 0) throw ValueError("group_size must be positive");
  TORCH_CHECK(packed.scalar_type() == at::kByte && scales.scalar_type() == at::kFloat,
              "deltaops._C_cuda: packed must be uint8 and scales float32");
  validate_stream(packed, bits, rows * cols);
  const int64_t groups = cols ? (cols + group_size - 1) / group_size : 0;
  if (scales.dim() != 2 || scales.size(1) != groups || (scales.size(0) != 1 && scales.size(0) != rows))
    throw ValueError("scales has shape " + c10::str(scales.sizes()) + "; expected (1, " +
                     std::to_string(groups) + ") or (" + std::to_string(rows) + ", " + std::to_string(groups) + ")");
  if (scales.numel() && !at::isfinite(scales).all().item<bool>()) throw ValueError("scales contain NaN or inf");
  if (bits > 1) {
    TORCH_CHECK(zeros.scalar_type() == at::kByte, "deltaops._C_cuda: zeros must be uint8");
    if (!zeros.sizes().equals(scales.sizes()))
      throw ValueError("zeros has shape " + c10::str(zeros.sizes()) + ", expected scales' shape");
    if (zeros.numel() && zeros.max().item<int64_t>() >= (int64_t(1) << bits))
      throw ValueError("zeros must be below 2**" + std::to_string(bits));
  }
  return {scales.size(0), groups};
}

}  // namespace

void apply_quantized_(at::Tensor& weight, const at::Tensor& packed, const at::Tensor& scales,
                      const at::Tensor& zeros, int64_t bits, int64_t group_size, double alpha) {
  check_input(weight, "apply_quantized_", "weight");
  check_input(packed, "apply_quantized_", "packed");
  check_input(scales, "apply_quantized_", "scales");
  check_same_device(weight, packed, "apply_quantized_");
  const c10::cuda::CUDAGuard guard(weight.device());
  const auto [rows, cols] = rows_cols(weight);
  const auto [r, groups] = validate_params(rows, cols, packed, scales, zeros, bits, group_size);
  const int64_t n = weight.numel();
  if (n == 0) return;
  const uint8_t* z = bits > 1 ? zeros.data_ptr<uint8_t>() : nullptr;
  dispatch(weight, "apply_quantized_", [&](auto tag) {
    using T = decltype(tag);
    apply_kernel<T><<<grid_for(n, kThreads), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        static_cast<T*>(weight.data_ptr()), packed.data_ptr<uint8_t>(), packed.numel(),
        scales.data_ptr<float>(), z, n, cols, group_size, groups, r > 1, static_cast<int>(bits),
        static_cast<float>(alpha));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor delta_bmm(const at::Tensor& x, const at::Tensor& base_weight, const at::Tensor& packed,
                     const at::Tensor& scales, const at::Tensor& zeros, int64_t bits,
                     int64_t group_size, const at::Tensor& indices) {
  check_input(x, "delta_bmm", "x");
  check_input(base_weight, "delta_bmm", "base_weight");
  check_input(packed, "delta_bmm", "packed");
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(x.dim() == 3 && base_weight.dim() == 2 && base_weight.size(1) == x.size(2),
              "deltaops._C_cuda.delta_bmm: x must be (B, M, K) and base_weight (N, K)");
  const int64_t batch = x.size(0), m = x.size(1), k = x.size(2), n = base_weight.size(0);
  const int64_t t_count = packed.size(0);
  for (int64_t t = 0; t < t_count; ++t)
    validate_params(n, k, packed[t], scales[t], bits > 1 ? zeros[t] : zeros, bits, group_size);
  const at::Tensor idx = indices.to(at::kLong).contiguous();
  if (idx.numel() && (idx.min().item<int64_t>() < 0 || idx.max().item<int64_t>() >= t_count))
    throw ValueError("indices must be in [0, " + std::to_string(t_count) + ")");
  at::Tensor y = at::empty({batch, m, n}, x.options().dtype(at::kFloat));
  if (y.numel() == 0) return y.to(x.scalar_type());
  if (batch > 65535 || (m + kBmmTile - 1) / kBmmTile > 65535 || k >= (int64_t(1) << 31))
    throw ValueError("delta_bmm: at most 65535 batches, 65535 * 64 rows per batch and 2^31 - 1 "
                     "input features on CUDA");
  const int64_t groups = (k + group_size - 1) / group_size;
  const at::Tensor pc = packed.contiguous(), sc = scales.contiguous();
  const at::Tensor zc = bits > 1 ? zeros.contiguous() : sc;
  dispatch(x, "delta_bmm", [&](auto xtag) {
    using TX = decltype(xtag);
    dispatch(base_weight, "delta_bmm", [&](auto wtag) {
      using TW = decltype(wtag);
      const dim3 grid(static_cast<unsigned>((n + kBmmTile - 1) / kBmmTile),
                      static_cast<unsigned>((m + kBmmTile - 1) / kBmmTile),
                      static_cast<unsigned>(batch));
      delta_bmm_kernel<TX, TW><<<grid, kBmmThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
          static_cast<const TX*>(x.data_ptr()), static_cast<const TW*>(base_weight.data_ptr()),
          pc.data_ptr<uint8_t>(), pc.size(1), sc.data_ptr<float>(),
          bits > 1 ? zc.data_ptr<uint8_t>() : nullptr, idx.data_ptr<int64_t>(), y.data_ptr<float>(),
          m, n, k, std::min(group_size, k), groups, sc.size(1), static_cast<int>(bits));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return y.to(x.scalar_type());
}

}  // namespace cuda
}  // namespace deltaops
