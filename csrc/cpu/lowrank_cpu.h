// Host interface of the low-rank family in deltaops._C (CPU tensors).
//
// python/deltaops/reference/lowrank.py is the specification (layouts,
// rounding points, error bound). Validation happens before any write; invalid
// input throws ValueError / TypeError (sparse_cpu.h), which the bindings
// translate to Python's ValueError / TypeError.
#pragma once
#include <cstdint>

#include <ATen/core/Tensor.h>

namespace deltaops {
namespace cpu {

// In place weight += scale * lora_B @ lora_A (PEFT layouts: A [r, in],
// B [out, r]; weight [out, in], or [in, out] with fan_in_fan_out). fp32
// accumulation in registers (one sequential fused multiply-add chain over k
// per element, so results do not depend on the tiling or the thread count),
// then round(fp32(w) + fp32(scale) * acc) once. Scratch: fp32 copies of the
// two factors only (r * (out + in) floats), nothing of the weight's size.
// weight must be contiguous; A and B may have any strides and float dtype.
void lora_merge_(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                 double scale, bool fan_in_fan_out);

// fp32 [T, r]: scale * lora_a_stack[id_t] @ x[t], zero rows for id_t == -1.
at::Tensor lora_shrink(const at::Tensor& x, const at::Tensor& lora_a_stack,
                       const at::Tensor& token_lora_ids, double scale);

// In place y[t] = round(fp32(y[t]) + lora_b_stack[id_t] @ intermediate[t]) for
// id_t >= 0; rows of id_t == -1 are not written. y must be contiguous.
void lora_expand(at::Tensor& y, const at::Tensor& intermediate, const at::Tensor& lora_b_stack,
                 const at::Tensor& token_lora_ids);

}  // namespace cpu
}  // namespace deltaops
