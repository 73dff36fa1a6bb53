// Host-side argument checks of the fused merge entry points, shared by the CPU
// kernel (csrc/cpu/merge_cpu.cpp) and the CUDA host code (csrc/cuda/merge.cu).
// They return what is wrong instead of throwing, since each side throws its own
// ValueError type (which the bindings turn into Python's ValueError).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace deltaops {
namespace merge_args {

// The first problem with merge_sign_elect's per-model options, or "" if none:
// at least one model, one weight, density and gamma per model, thresholds empty
// or 4 ints per model, sign_method "sum" or "count", seed in [0, 2**63).
inline std::string options_error(size_t nmodels, size_t nweights, size_t ndensities, size_t ngammas,
                                 size_t nthresholds, const std::string& sign_method, int64_t seed) {
  if (nmodels == 0) return "models must hold at least one tensor";
  if (nweights != nmodels || ndensities != nmodels || ngammas != nmodels)
    return "merge_sign_elect: one weight, density and gamma per model";
  if (nthresholds != 0 && nthresholds != 4 * nmodels)
    return "merge_sign_elect: thresholds must hold 4 ints per model";
  if (sign_method != "sum" && sign_method != "count")
    return "sign_method must be 'sum' or 'count'; got '" + sign_method + "'";
  if (seed < 0) return "seed must be in [0, 2**63)";
  return "";
}

constexpr const char* kPartialOverlap = "out partially overlaps an input; it may only be an input itself";

// Whether out's bytes [out, out + out_bytes) overlap an input's without being that
// input (same start, same dtype): the kernels read each element's inputs before
// writing it, so out may be an input, but not a shifted view of one.
inline bool partial_overlap(const void* out, size_t out_bytes, const void* input, size_t input_bytes,
                            bool same_dtype) {
  const auto* o = static_cast<const char*>(out);
  const auto* p = static_cast<const char*>(input);
  const bool disjoint = o + out_bytes <= p || p + input_bytes <= o;
  return !disjoint && !(p == o && same_dtype);
}

}  // namespace merge_args
}  // namespace deltaops
