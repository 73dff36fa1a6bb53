// Host interface of the low-bit delta family in deltaops._C (CPU tensors).
//
// python/deltaops/reference/quant.py is the bit-for-bit specification (codes,
// scales, zero points, packed bytes, applied weights). Tensors arrive
// contiguous from the ops layer; every function checks what it relies on
// and raises ValueError/TypeError before writing anything.
#pragma once
#include <cstdint>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace deltaops {
namespace cpu {

// codes (uint8, each < 2^bits) -> ceil(numel * bits / 8) bytes, LSB first.
at::Tensor pack_bits(const at::Tensor& codes, int64_t bits);
// inverse; byte count and zero padding bits validated.
at::Tensor unpack_bits(const at::Tensor& packed, int64_t bits, int64_t numel);

// BitDelta: (packed sign bits, fp32 scales (1, 1) or (rows, 1)).
std::tuple<at::Tensor, at::Tensor> quantize_sign(const at::Tensor& x, bool per_row);
// BitNet b1.58 absmean: (packed 2-bit codes q + 1, fp32 scale (1, 1)).
std::tuple<at::Tensor, at::Tensor> quantize_ternary_absmean(const at::Tensor& x);

// ComPEFT's packed 2-bit codes of finite x given the kept mask (bool, x's numel):
// sign(x) + 1 where kept, 1 elsewhere (reference: compeft_pack).
at::Tensor compeft_pack(const at::Tensor& x, const at::Tensor& keep);
// ComPEFT in one call: (packed codes of the top k magnitudes, ties to the lowest
// flat index: sign(x) + 1 where kept, 1 elsewhere; fp64 moments [sum x, sum x^2, h],
// each term through at most h additions) (reference: compeft_quantize).
std::tuple<at::Tensor, at::Tensor> compeft_quantize(const at::Tensor& x, int64_t k);
// Uniform groups along the last dim: (packed codes, fp32 scales (rows, G), uint8 zeros (rows, G)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_uniform(const at::Tensor& x, int64_t bits,
                                                                int64_t group_size, bool symmetric);
// In place weight += alpha * dq (fp32, no FMA, one rounding); bits == 1: sign, else (q - z) * s.
void apply_quantized_(at::Tensor& weight, const at::Tensor& packed, const at::Tensor& scales,
                      const at::Tensor& zeros, int64_t bits, int64_t group_size, double alpha);
// y[b] = x[b] @ (W + delta[indices[b]])^T with fp32 accumulation, no dense delta.
at::Tensor delta_bmm(const at::Tensor& x, const at::Tensor& base_weight, const at::Tensor& packed,
                     const at::Tensor& scales, const at::Tensor& zeros, int64_t bits,
                     int64_t group_size, const at::Tensor& indices);

}  // namespace cpu
}  // namespace deltaops
