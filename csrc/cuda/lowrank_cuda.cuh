// Host interface of the low-rank family in deltaops._C_cuda (declarations only,
// so that csrc/bindings_cuda.cpp, compiled by the host compiler, can include
// it). python/deltaops/reference/lowrank.py is the specification; the final
// per-element step is csrc/include/deltaops/lowrank.h, shared with the CPU.
#pragma once
#include <cstdint>

#include <ATen/core/Tensor.h>

namespace deltaops {
namespace cuda {

// In place weight += scale * lora_B @ lora_A (PEFT layouts; weight [out, in],
// or [in, out] with fan_in_fan_out). 64 x 64 output tiles, fp32 FMA
// accumulation over rank blocks staged in shared memory, one rounding.
void lora_merge_(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                 double scale, bool fan_in_fan_out);

// fp32 [T, r]: scale * lora_a_stack[id_t] @ x[t]; zero rows for id -1.
at::Tensor lora_shrink(const at::Tensor& x, const at::Tensor& lora_a_stack,
                       const at::Tensor& token_lora_ids, double scale);

// In place y[t] = round(y[t] + lora_b_stack[id_t] @ intermediate[t]) for id_t >= 0.
void lora_expand(at::Tensor& y, const at::Tensor& intermediate, const at::Tensor& lora_b_stack,
                 const at::Tensor& token_lora_ids);

}  // namespace cuda
}  // namespace deltaops
