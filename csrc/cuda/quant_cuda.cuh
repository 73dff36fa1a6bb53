// Host interface of the low-bit delta family in deltaops._C_cuda (declarations
// only, for csrc/bindings_cuda.cpp). Semantics: python/deltaops/reference/quant.py;
// per-element math: csrc/include/deltaops/quant.h (shared with the CPU kernels).
#pragma once
#include <cstdint>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace deltaops {
namespace cuda {

at::Tensor pack_bits(const at::Tensor& codes, int64_t bits);
at::Tensor unpack_bits(const at::Tensor& packed, int64_t bits, int64_t numel);
// ComPEFT's packed 2-bit codes: sign(x) + 1 where keep, 1 elsewhere.
at::Tensor compeft_pack(const at::Tensor& x, const at::Tensor& keep);
// ComPEFT's codes for the top k magnitudes and fp64 moments [sum x, sum x^2, h]
// (reference: compeft_quantize).
std::tuple<at::Tensor, at::Tensor> compeft_quantize(const at::Tensor& x, int64_t k);
std::tuple<at::Tensor, at::Tensor> quantize_sign(const at::Tensor& x, bool per_row);
std::tuple<at::Tensor, at::Tensor> quantize_ternary_absmean(const at::Tensor& x);
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_uniform(const at::Tensor& x, int64_t bits,
                                                                int64_t group_size, bool symmetric);
void apply_quantized_(at::Tensor& weight, const at::Tensor& packed, const at::Tensor& scales,
                      const at::Tensor& zeros, int64_t bits, int64_t group_size, double alpha);
at::Tensor delta_bmm(const at::Tensor& x, const at::Tensor& base_weight, const at::Tensor& packed,
                     const at::Tensor& scales, const at::Tensor& zeros, int64_t bits,
                     int64_t group_size, const at::Tensor& indices);

}  // namespace cuda
}  // namespace deltaops
