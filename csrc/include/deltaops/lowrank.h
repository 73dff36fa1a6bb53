// Element math of the low-rank family, shared by the CPU and CUDA kernels:
// the final step of a LoRA merge / unmerge / expand, once the fp32
// accumulation of the low-rank product is done.
//
// python/deltaops/reference/lowrank.py is the specification:
//   w_new = round(fp32(w) + fp32(scale) * acc)   (merge, unmerge with -scale)
//   y_new = round(fp32(y) + acc)                  (expand)
// one fp32 multiply, one fp32 add (never fused: the CPU build has
// -ffp-contract=off, nvcc --fmad=false), one rounding (nearest, ties to even,
// bits.h) to the storage type.
#pragma once

#include "deltaops/bits.h"
#include "deltaops/hd.h"

namespace deltaops {

template <typename T>
DELTAOPS_HD T lora_add_round(T w, float scale, float acc) {
  const float scaled = scale * acc;
  return store_from_f32<T>(load_f32(w) + scaled);
}

template <typename T>
DELTAOPS_HD T lora_add_round(T w, float acc) {
  return store_from_f32<T>(load_f32(w) + acc);
}

}  // namespace deltaops
