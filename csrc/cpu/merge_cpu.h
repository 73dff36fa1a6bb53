// Host interface of the fused merge kernels (deltaops._C): the sign-elect /
// task-arithmetic family of deltaops.merge_tensors on CPU tensors.
//
// python/deltaops/reference/merge.py is the bit-for-bit specification; see
// merge_cpu.cpp for the passes and the places where exactness is given up
// (norm rescales).
#pragma once
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>

namespace deltaops {
namespace cpu {

// merge_tensors(base, models, method, ...) for method in task_arithmetic,
// ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties, della,
// della_linear, with the per-model options already resolved by the Python layer:
//   weights, densities, gammas: one value per model; for della and
//     della_linear `gammas` holds the epsilons (della has no gamma), and
//     0 < density - epsilon, density + epsilon < 1 is required where
//     0 < density < 1 (ValueError otherwise); della takes no thresholds and
//     base must have at least one dimension (ranks run along dim 1);
//   rescale: "" (none), "l1", "l2", "linf" or "density";
//   sign_method: "sum" or "count";
//   thresholds: empty, or 4 ints per model: keep_key, keep_take, drop_key,
//     drop_take; keep_key < 0 means "no threshold for this model" (select
//     from its density); take < 0 means every key equal to the threshold;
//     drop_key < 0 means no drop threshold;
//   out_dtype: "float32", "bfloat16" or "float16".
at::Tensor merge_sign_elect(const at::Tensor& base, const std::vector<at::Tensor>& models,
                            const std::string& method, const std::vector<double>& weights,
                            const std::vector<double>& densities, const std::vector<double>& gammas,
                            double lambda, bool normalize, const std::string& rescale,
                            const std::string& sign_method, int64_t seed,
                            const std::vector<int64_t>& thresholds, const std::string& out_dtype);

// merge_sign_elect into `out` (a contiguous float32/bfloat16/float16 CPU tensor of
// base's shape; its dtype is the output dtype). out may be base or one of the
// models (each element is written after its inputs are read), but must not
// partially overlap any of them. Nothing is written before every check passed.
void merge_sign_elect_out_(const at::Tensor& base, const std::vector<at::Tensor>& models,
                           const std::string& method, const std::vector<double>& weights,
                           const std::vector<double>& densities, const std::vector<double>& gammas,
                           double lambda, bool normalize, const std::string& rescale,
                           const std::string& sign_method, int64_t seed,
                           const std::vector<int64_t>& thresholds, at::Tensor& out);

// merge_tensors(base, models, "linear"): sum_i fma(fp32(m_i), w_i, .) in model order,
// divided by torch's fp32 sum of the weights when normalize (the Python layer
// rejects a zero sum), rounded once to out_dtype. The base is not used.
at::Tensor merge_linear(const std::vector<at::Tensor>& models, const std::vector<double>& weights,
                        bool normalize, const std::string& out_dtype);

// merge_linear into `out` (as merge_sign_elect_out_: out may be one of the models).
void merge_linear_out_(const std::vector<at::Tensor>& models, const std::vector<double>& weights,
                       bool normalize, at::Tensor& out);

// Radix histogram (as radix_histogram of an fp32 tensor) of the magnitude keys
// of fp32(model) - fp32(base), computed on the fly (no delta is stored).
at::Tensor merge_delta_histogram(const at::Tensor& base, const at::Tensor& model, int64_t level,
                                 int64_t prefix);

// (threshold_key, take_equal) of the top-k of fp32(model) - fp32(base) for
// each k (take_equal = -1: every equal key); ValueError on NaN.
std::vector<std::tuple<int64_t, int64_t>> merge_delta_topk(const at::Tensor& base,
                                                           const at::Tensor& model,
                                                           const std::vector<int64_t>& ks);

}  // namespace cpu
}  // namespace deltaops
