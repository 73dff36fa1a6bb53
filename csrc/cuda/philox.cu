// Philox uniforms and DARE drop-and-rescale on CUDA. Each thread draws one
// Philox4x32-10 block (deltaops/philox.h) per 4 consecutive elements, the
// grouping of the keying itself, so no word is computed twice.
#include <string>

#include "common.cuh"

namespace deltaops {
namespace cuda {
namespace {

constexpr int kThreads = 256;

__global__ void __launch_bounds__(kThreads)
    philox_uniform_kernel(float* __restrict__ out, int64_t n, bool vec_ok, uint64_t seed,
                          uint32_t stream) {
  const int64_t blocks = (n + 3) / 4;
  for (int64_t b = global_thread(); b < blocks; b += grid_threads()) {
    const Philox4 r = philox_block(seed, stream, static_cast<uint64_t>(b));
    const int64_t i = b * 4;
    if (vec_ok && i + 4 <= n) {
      *reinterpret_cast<float4*>(out + i) =
          make_float4(uniform_from_word(r.v[0]), uniform_from_word(r.v[1]),
                      uniform_from_word(r.v[2]), uniform_from_word(r.v[3]));
    } else {
      for (int j = 0; j < 4 && i + j < n; ++j) out[i + j] = uniform_from_word(r.v[j]);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    dare_kernel(const T* __restrict__ delta, T* __restrict__ out, int64_t n, bool vec_ok,
                float density, uint64_t seed, uint32_t stream, bool rescale) {
  const int64_t blocks = (n + 3) / 4;
  for (int64_t b = global_thread(); b < blocks; b += grid_threads()) {
    const Philox4 r = philox_block(seed, stream, static_cast<uint64_t>(b));
    const int64_t i = b * 4;
    if (vec_ok && i + 4 <= n) {
      const Pack<T, 4> d = load_pack<T, 4>(delta + i);
      Pack<T, 4> o;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const bool keep = keep_from_word(r.v[j], density);
        o.v[j] = store_from_f32<T>(dare_element(load_f32(d.v[j]), keep, density, rescale));
      }
      store_pack(out + i, o);
    } else {
      for (int j = 0; j < 4 && i + j < n; ++j) {
        const bool keep = keep_from_word(r.v[j], density);
        out[i + j] = store_from_f32<T>(dare_element(load_f32(delta[i + j]), keep, density, rescale));
      }
    }
  }
}

}  // namespace

at::Tensor philox_uniform_like(const at::Tensor& x, int64_t seed, int64_t stream) {
  TORCH_CHECK(x.is_cuda(), "deltaops._C_cuda.philox_uniform_like: x must be a CUDA tensor, got ",
              x.device());
  if (seed < 0) throw ValueError("seed must be in [0, 2**63), got " + std::to_string(seed));
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  const int64_t n = x.numel();
  if (n == 0) return out;
  float* data = out.data_ptr<float>();
  philox_uniform_kernel<<<grid_for((n + 3) / 4, kThreads), kThreads, 0,
                          at::cuda::getCurrentCUDAStream()>>>(
      data, n, is_aligned(data, 16), static_cast<uint64_t>(seed), static_cast<uint32_t>(stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void dare_out_(const at::Tensor& delta, double density, int64_t seed, int64_t stream, bool rescale,
               at::Tensor& out) {
  check_input(delta, "dare", "delta");
  check_input(out, "dare", "out");
  if (out.scalar_type() != delta.scalar_type()) throw ValueError("out must have delta's dtype");
  if (!out.sizes().equals(delta.sizes())) throw ValueError("out must have delta's shape");
  if (out.device() != delta.device()) throw ValueError("out must be on delta's device");
  if (seed < 0) throw ValueError("seed must be in [0, 2**63), got " + std::to_string(seed));
  c10::cuda::CUDAGuard guard(delta.device());
  const int64_t n = delta.numel();
  if (n == 0) return;
  const float density32 = static_cast<float>(density);  // fp32(density), nearest-even
  dispatch_float(delta.scalar_type(), "dare", [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* in = static_cast<const T*>(delta.const_data_ptr());
    T* o = static_cast<T*>(out.data_ptr());
    const bool vec_ok = pack_aligned<T, 4>(in) && pack_aligned<T, 4>(o);
    dare_kernel<T><<<grid_for((n + 3) / 4, kThreads), kThreads, 0,
                     at::cuda::getCurrentCUDAStream()>>>(in, o, n, vec_ok, density32,
                                                          static_cast<uint64_t>(seed),
                                                          static_cast<uint32_t>(stream), rescale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor dare(const at::Tensor& delta, double density, int64_t seed, int64_t stream,
                bool rescale) {
  check_input(delta, "dare", "delta");
  at::Tensor out = at::empty_like(delta, at::MemoryFormat::Contiguous);
  dare_out_(delta, density, seed, stream, rescale, out);
  return out;
}

}  // namespace cuda
}  // namespace deltaops
