// Host interface of the fused merge on CUDA tensors (deltaops._C_cuda): the
// sign-elect / task-arithmetic family of deltaops.merge_tensors.
//
// Declarations only, so that csrc/bindings_cuda.cpp (compiled by the host
// compiler) can include it. Same arguments and semantics as the CPU kernel
// (csrc/cpu/merge_cpu.h); python/deltaops/reference/merge.py is the
// specification.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>

#include "sparse_cuda.cuh"  // ValueError

namespace deltaops {
namespace cuda {

// Wrong dtypes (bindings_cuda.cpp turns it into pybind11::type_error).
struct TypeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// merge_tensors(base, models, method, ...) for method in task_arithmetic,
// ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties; per-model
// options resolved by the Python layer (see csrc/cpu/merge_cpu.h).
at::Tensor merge_sign_elect(const at::Tensor& base, const std::vector<at::Tensor>& models,
                            const std::string& method, const std::vector<double>& weights,
                            const std::vector<double>& densities, const std::vector<double>& gammas,
                            double lambda, bool normalize, const std::string& rescale,
                            const std::string& sign_method, int64_t seed,
                            const std::vector<int64_t>& thresholds, const std::string& out_dtype);

// merge_sign_elect into `out` (base's shape and device, contiguous; its dtype is
// the output dtype); out may be base or a model but not partially overlap one.
void merge_sign_elect_out_(const at::Tensor& base, const std::vector<at::Tensor>& models,
                           const std::string& method, const std::vector<double>& weights,
                           const std::vector<double>& densities, const std::vector<double>& gammas,
                           double lambda, bool normalize, const std::string& rescale,
                           const std::string& sign_method, int64_t seed,
                           const std::vector<int64_t>& thresholds, at::Tensor& out);

// merge_tensors(models, "linear"): sum_i fma(fp32(m_i), w_i, .) in model order,
// divided by torch's fp32 sum of the weights when normalize, one rounding
// (csrc/cpu/merge_cpu.h); the _out_ form writes `out`, which may be a model.
at::Tensor merge_linear(const std::vector<at::Tensor>& models, const std::vector<double>& weights,
                        bool normalize, const std::string& out_dtype);
void merge_linear_out_(const std::vector<at::Tensor>& models, const std::vector<double>& weights,
                       bool normalize, at::Tensor& out);

// Radix histogram of the magnitude keys of fp32(model) - fp32(base), formed
// on the fly (no delta is stored).
at::Tensor merge_delta_histogram(const at::Tensor& base, const at::Tensor& model, int64_t level,
                                 int64_t prefix);

// (threshold_key, take_equal) of the top-k of fp32(model) - fp32(base) for
// each k (take_equal = -1: every equal key); ValueError on NaN.
std::vector<std::tuple<int64_t, int64_t>> merge_delta_topk(const at::Tensor& base,
                                                           const at::Tensor& model,
                                                           const std::vector<int64_t>& ks);

}  // namespace cuda
}  // namespace deltaops
