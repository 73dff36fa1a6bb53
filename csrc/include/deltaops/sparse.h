// Per-element arithmetic of the sparse-delta family, shared by the CPU and
// CUDA kernels. python/deltaops/reference/sparse.py is the specification.
#pragma once
#include <cstdint>

#include "deltaops/bits.h"
#include "deltaops/hd.h"
#include "deltaops/philox.h"

namespace deltaops {

// weight + alpha * delta with two fp32 roundings (product, then sum) and no
// fused multiply-add, then one rounding to the weight's dtype. Kernels are
// built with contraction off (-ffp-contract=off, __fmul_rn/__fadd_rn), so
// every backend rounds at exactly these points.
DELTAOPS_HD float apply_element(float weight, float delta, float alpha) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(weight, __fmul_rn(alpha, delta));
#else
  const float scaled = alpha * delta;
  return weight + scaled;
#endif
}

// DARE (Yu et al. 2024, "Language Models are Super Mario"): keep with
// probability `density`, divide the kept values by it (fp32 division,
// correctly rounded).
DELTAOPS_HD float dare_element(float delta, bool keep, float density, bool rescale) {
  if (!keep) return 0.0f;
#if defined(__CUDA_ARCH__)
  return rescale ? __fdiv_rn(delta, density) : delta;
#else
  return rescale ? delta / density : delta;
#endif
}

}  // namespace deltaops
