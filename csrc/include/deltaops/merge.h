// Per-element arithmetic of the fused merge (deltaops::merge_sign_elect), shared
// by the CPU kernel (csrc/cpu/merge_cpu.cpp) and the CUDA kernel
// (csrc/cuda/merge.cu); triton_kernels/merge.py mirrors it. The specification
// is python/deltaops/reference/merge.py (task_arithmetic_family, elect_signs).
//
// Rounding points are the reference's: every product, sum and quotient is one
// fp32 rounding (no FMA: -ffp-contract=off on the host, --fmad=false and the
// __f*_rn intrinsics on the device), and the selects below are integer code,
// so both builds give the same bits.
#pragma once
#include <cstdint>

#include "deltaops/bits.h"
#include "deltaops/hd.h"

// Host: plain `inline`, not DELTAOPS_HD's always_inline: with always_inline GCC
// schedules the CPU kernel's merge_pass differently (same results, other code);
// plain `inline` leaves csrc/cpu/merge_cpu.cpp's object code as it was before
// these helpers moved here. They are inlined either way.
#if defined(__CUDACC__)
#define DELTAOPS_MERGE_HD __host__ __device__ __forceinline__
#else
#define DELTAOPS_MERGE_HD inline
#endif

namespace deltaops {

// Magnitude key of an fp32 delta: the bit pattern of |d| (orders like |d|;
// NaN keys lie above 0x7F800000).
DELTAOPS_MERGE_HD uint32_t delta_key(float d) { return f32_bits(d) & 0x7FFFFFFFu; }

// sign(x) as torch computes it for non-NaN x (+1, -1, 0; 0 for NaN); written
// as a difference of compares so that it vectorizes.
DELTAOPS_MERGE_HD float sign_of(float x) {
  return static_cast<float>(x > 0.0f) - static_cast<float>(x < 0.0f);
}

// 1.0f where sign(x) == elected (elected = +-1), else 0.0f: x nonzero with the
// sign bit of elected (zeros never agree). Integer ops only (the compiler does
// not if-convert float compares here).
DELTAOPS_MERGE_HD float agrees(float x, float elected) {
  const uint32_t ux = f32_bits(x), ue = f32_bits(elected);
  const uint32_t nonzero = static_cast<uint32_t>((ux & 0x7FFFFFFFu) != 0u);
  const uint32_t same = static_cast<uint32_t>(((ux ^ ue) >> 31) == 0u);
  return f32_from_bits((0u - (nonzero & same)) & 0x3F800000u);
}

// d, or 1.0f where d == +-0 (integer select: vectorizes). The consensus
// divisor: elements where no model agrees divide by 1.
DELTAOPS_MERGE_HD float nonzero_or_one(float d) {
  const uint32_t u = f32_bits(d);
  const uint32_t zero = 0u - static_cast<uint32_t>((u & 0x7FFFFFFFu) == 0u);
  return f32_from_bits((u & ~zero) | (0x3F800000u & zero));
}

// mergekit's `delta * mask`: the kept delta, +-0 where dropped (inf * 0 is NaN,
// as in the reference). `keep` is 0 or 1 (bool, or the CPU kernel's uint8 masks).
template <typename Keep>
DELTAOPS_MERGE_HD float masked_delta(float d, Keep keep) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(d, static_cast<float>(keep));
#else
  return d * static_cast<float>(keep);
#endif
}

// The density rescale (DARE / DELLA papers): kept values divided by the keep
// probability p (correctly rounded), +0 where dropped. The CPU kernel's
// sparsify_block writes this expression in its loop rather than calling it:
// GCC vectorizes that loop differently through the call (same results).
template <typename Keep>
DELTAOPS_MERGE_HD float density_rescaled_delta(float d, Keep keep, float p) {
#if defined(__CUDA_ARCH__)
  return keep ? __fdiv_rn(d, p) : 0.0f;
#else
  return keep ? d / p : 0.0f;
#endif
}

}  // namespace deltaops
