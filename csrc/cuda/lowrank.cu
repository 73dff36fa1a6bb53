// deltaops._C_cuda: the low-rank family (LoRA merge, multi-LoRA shrink and
// expand) on CUDA tensors. python/deltaops/reference/lowrank.py is the
// specification; the final rounding step is deltaops/lowrank.h, the function
// the CPU kernels run, so the CPU tests exercise the GPU's element math.
//
// The fp32 accumulations use explicit fmaf chains (the order differs from the
// CPU's: the spec leaves it free and the tests bound it); the final
// w + scale * acc is a separate multiply and add (nvcc --fmad=false).
//
// Token ids are validated by the Python layer before any launch; here an id
// outside [-1, adapters) is treated as -1 (nothing read, nothing written), so
// a kernel never reads out of bounds.
#include <cmath>

#include "common.cuh"
#include "deltaops/lowrank.h"
#include "lowrank_cuda.cuh"

namespace deltaops {
namespace cuda {
namespace {

// ---- merge ---------------------------------------------------------------------

constexpr int kTile = 64;           // output tile: kTile x kTile elements
constexpr int kRankBlock = 16;      // rank block staged in shared memory
constexpr int kMergeThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each

template <typename W>
__global__ void __launch_bounds__(kMergeThreads)
    lora_merge_kernel(W* __restrict__ weight, const float* __restrict__ left,
                      const float* __restrict__ right, int64_t M, int64_t N, int64_t R,
                      float scale) {
  __shared__ float l_tile[kRankBlock][kTile + 1];  // transposed: [k][row]
  __shared__ float r_tile[kRankBlock][kTile];      // [k][column]
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kTile;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

  for (int64_t k0 = 0; k0 < R; k0 += kRankBlock) {
    for (int e = threadIdx.x; e < kTile * kRankBlock; e += kMergeThreads) {
      const int row = e / kRankBlock, lk = e % kRankBlock;
      const int64_t m = m0 + row, k = k0 + lk;
      l_tile[lk][row] = (m < M && k < R) ? left[m * R + k] : 0.0f;
      const int rk = e / kTile, col = e % kTile;
      const int64_t k2 = k0 + rk, n = n0 + col;
      r_tile[rk][col] = (k2 < R && n < N) ? right[k2 * N + n] : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kRankBlock; ++k) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = l_tile[k][ty + 16 * i];
        b[i] = r_tile[k][tx + 16 * i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty + 16 * i;
    if (m >= M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx + 16 * j;
      if (n < N) weight[m * N + n] = lora_add_round(weight[m * N + n], scale, acc[i][j]);
    }
  }
}

// ---- shrink / expand -------------------------------------------------------------

constexpr int kWarps = 8;             // shrink: one warp per (token, rank row)
constexpr int kExpandThreads = 256;   // expand: one thread per output feature

template <typename X, typename A, typename I>
__global__ void __launch_bounds__(kWarps * 32)
    lora_shrink_kernel(const X* __restrict__ x, const A* __restrict__ a_stack,
                       const I* __restrict__ ids, float* __restrict__ out, int64_t in, int64_t R,
                       int64_t adapters, float scale) {
  const int64_t t = blockIdx.x;
  const int lane = threadIdx.x % 32;
  const int64_t j = static_cast<int64_t>(blockIdx.y) * kWarps + threadIdx.x / 32;
  if (j >= R) return;
  const int64_t adapter = static_cast<int64_t>(ids[t]);
  if (adapter < 0 || adapter >= adapters) {
    if (lane == 0) out[t * R + j] = 0.0f;
    return;
  }
  const A* row = a_stack + (adapter * R + j) * in;
  const X* xr = x + t * in;
  float acc = 0.0f;
  for (int64_t i = lane; i < in; i += 32) acc = fmaf(load_f32(row[i]), load_f32(xr[i]), acc);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_down_sync(0xFFFFFFFFu, acc, offset);
  if (lane == 0) out[t * R + j] = scale * acc;
}

template <typename Y, typename B, typename I>
__global__ void __launch_bounds__(kExpandThreads)
    lora_expand_kernel(Y* __restrict__ y, const float* __restrict__ inter,
                       const B* __restrict__ b_stack, const I* __restrict__ ids, int64_t out,
                       int64_t R, int64_t adapters) {
  extern __shared__ float shared_inter[];
  const int64_t t = blockIdx.x;
  const int64_t adapter = static_cast<int64_t>(ids[t]);
  if (adapter < 0 || adapter >= adapters) return;  // uniform over the block
  for (int64_t j = threadIdx.x; j < R; j += blockDim.x) shared_inter[j] = inter[t * R + j];
  __syncthreads();
  const int64_t o = static_cast<int64_t>(blockIdx.y) * kExpandThreads + threadIdx.x;
  if (o >= out) return;
  const B* row = b_stack + (adapter * out + o) * R;
  float acc = 0.0f;
  for (int64_t j = 0; j < R; ++j) acc = fmaf(load_f32(row[j]), shared_inter[j], acc);
  y[t * out + o] = lora_add_round(y[t * out + o], acc);
}

}  // namespace

// ==================================== host ====================================

void lora_merge_(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                 double scale, bool fan_in_fan_out) {
  check_input(weight, "lora_merge_", "weight");
  TORCH_CHECK(lora_A.is_cuda() && lora_B.is_cuda(),
              "deltaops._C_cuda.lora_merge_: lora_A and lora_B must be CUDA tensors");
  check_same_device(weight, lora_A, "lora_merge_");
  check_same_device(weight, lora_B, "lora_merge_");
  TORCH_CHECK(weight.dim() == 2 && lora_A.dim() == 2 && lora_B.dim() == 2,
              "deltaops._C_cuda.lora_merge_: weight, lora_A and lora_B must be 2-D");
  const int64_t R = lora_A.size(0), in = lora_A.size(1), out = lora_B.size(0);
  TORCH_CHECK(lora_B.size(1) == R, "deltaops._C_cuda.lora_merge_: lora_B has shape ",
              lora_B.sizes(), ", expected (", out, ", ", R, ")");
  const int64_t M = fan_in_fan_out ? in : out, N = fan_in_fan_out ? out : in;
  TORCH_CHECK(weight.size(0) == M && weight.size(1) == N,
              "deltaops._C_cuda.lora_merge_: weight has shape ", weight.sizes(), ", expected (",
              M, ", ", N, ")");
  if (!std::isfinite(scale)) throw ValueError("scale must be finite");
  c10::cuda::CUDAGuard guard(weight.device());
  if (M == 0 || N == 0 || R == 0) return;
  const at::Tensor left = (fan_in_fan_out ? lora_A.t() : lora_B).to(at::kFloat).contiguous();
  const at::Tensor right = (fan_in_fan_out ? lora_B.t() : lora_A).to(at::kFloat).contiguous();
  const dim3 grid(static_cast<unsigned>((N + kTile - 1) / kTile),
                  static_cast<unsigned>((M + kTile - 1) / kTile));
  const float s = static_cast<float>(scale);
  dispatch_float(weight.scalar_type(), "lora_merge_", [&](auto wtag) {
    using W = typename decltype(wtag)::type;
    lora_merge_kernel<W><<<grid, kMergeThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        static_cast<W*>(weight.data_ptr()), left.const_data_ptr<float>(),
        right.const_data_ptr<float>(), M, N, R, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor lora_shrink(const at::Tensor& x, const at::Tensor& lora_a_stack,
                       const at::Tensor& token_lora_ids, double scale) {
  TORCH_CHECK(x.is_cuda() && lora_a_stack.is_cuda() && token_lora_ids.is_cuda(),
              "deltaops._C_cuda.lora_shrink: x, lora_a_stack and token_lora_ids must be CUDA "
              "tensors");
  check_same_device(x, lora_a_stack, "lora_shrink");
  check_same_device(x, token_lora_ids, "lora_shrink");
  TORCH_CHECK(x.dim() == 2 && lora_a_stack.dim() == 3 && token_lora_ids.dim() == 1,
              "deltaops._C_cuda.lora_shrink: expected x [T, in], lora_a_stack [L, r, in], "
              "token_lora_ids [T]");
  const int64_t T = x.size(0), in = x.size(1);
  const int64_t adapters = lora_a_stack.size(0), R = lora_a_stack.size(1);
  TORCH_CHECK(lora_a_stack.size(2) == in && token_lora_ids.size(0) == T,
              "deltaops._C_cuda.lora_shrink: shapes do not match");
  if (!std::isfinite(scale)) throw ValueError("scale must be finite");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::zeros({T, R}, x.options().dtype(at::kFloat));
  if (T == 0 || R == 0) return out;
  const at::Tensor xc = x.contiguous(), ac = lora_a_stack.contiguous();
  const at::Tensor ids = token_lora_ids.contiguous();
  const dim3 grid(static_cast<unsigned>(T), static_cast<unsigned>((R + kWarps - 1) / kWarps));
  const float s = static_cast<float>(scale);
  dispatch_float(x.scalar_type(), "lora_shrink", [&](auto xtag) {
    using X = typename decltype(xtag)::type;
    dispatch_float(ac.scalar_type(), "lora_shrink", [&](auto atag) {
      using A = typename decltype(atag)::type;
      dispatch_index(ids.scalar_type(), "lora_shrink", [&](auto itag) {
        using I = typename decltype(itag)::type;
        lora_shrink_kernel<X, A, I><<<grid, kWarps * 32, 0, at::cuda::getCurrentCUDAStream()>>>(
            static_cast<const X*>(xc.const_data_ptr()), static_cast<const A*>(ac.const_data_ptr()),
            static_cast<const I*>(ids.const_data_ptr()), out.data_ptr<float>(), in, R, adapters,
            s);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
  return out;
}

void lora_expand(at::Tensor& y, const at::Tensor& intermediate, const at::Tensor& lora_b_stack,
                 const at::Tensor& token_lora_ids) {
  check_input(y, "lora_expand", "y");
  TORCH_CHECK(intermediate.is_cuda() && lora_b_stack.is_cuda() && token_lora_ids.is_cuda(),
              "deltaops._C_cuda.lora_expand: intermediate, lora_b_stack and token_lora_ids must "
              "be CUDA tensors");
  check_same_device(y, intermediate, "lora_expand");
  check_same_device(y, lora_b_stack, "lora_expand");
  check_same_device(y, token_lora_ids, "lora_expand");
  TORCH_CHECK(intermediate.scalar_type() == at::kFloat,
              "deltaops._C_cuda.lora_expand: intermediate must be float32");
  TORCH_CHECK(y.dim() == 2 && intermediate.dim() == 2 && lora_b_stack.dim() == 3 &&
                  token_lora_ids.dim() == 1,
              "deltaops._C_cuda.lora_expand: expected y [T, out], intermediate [T, r], "
              "lora_b_stack [L, out, r], token_lora_ids [T]");
  const int64_t T = y.size(0), out = y.size(1);
  const int64_t adapters = lora_b_stack.size(0), R = lora_b_stack.size(2);
  TORCH_CHECK(lora_b_stack.size(1) == out && intermediate.size(0) == T &&
                  intermediate.size(1) == R && token_lora_ids.size(0) == T,
              "deltaops._C_cuda.lora_expand: shapes do not match");
  c10::cuda::CUDAGuard guard(y.device());
  if (T == 0 || out == 0 || R == 0) return;
  const at::Tensor ic = intermediate.contiguous(), bc = lora_b_stack.contiguous();
  const at::Tensor ids = token_lora_ids.contiguous();
  const dim3 grid(static_cast<unsigned>(T),
                  static_cast<unsigned>((out + kExpandThreads - 1) / kExpandThreads));
  const size_t shared = static_cast<size_t>(R) * sizeof(float);
  TORCH_CHECK(shared <= 48 * 1024, "deltaops._C_cuda.lora_expand: rank ", R,
              " exceeds the 12288 the kernel stages in shared memory");
  dispatch_float(y.scalar_type(), "lora_expand", [&](auto ytag) {
    using Y = typename decltype(ytag)::type;
    dispatch_float(bc.scalar_type(), "lora_expand", [&](auto btag) {
      using B = typename decltype(btag)::type;
      dispatch_index(ids.scalar_type(), "lora_expand", [&](auto itag) {
        using I = typename decltype(itag)::type;
        lora_expand_kernel<Y, B, I>
            <<<grid, kExpandThreads, shared, at::cuda::getCurrentCUDAStream()>>>(
                static_cast<Y*>(y.data_ptr()), ic.const_data_ptr<float>(),
                static_cast<const B*>(bc.const_data_ptr()),
                static_cast<const I*>(ids.const_data_ptr()), out, R, adapters);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  });
}

}  // namespace cuda
}  // namespace deltaops
