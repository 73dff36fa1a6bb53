// Host interface of deltaops._C_cuda: the sparse-delta family on CUDA tensors.
//
// Declarations only, so that csrc/bindings_cuda.cpp (compiled by the host
// compiler) can include it. docs/backend-contract.md gives the semantics and
// python/deltaops/reference/sparse.py is the bit-for-bit specification.
#pragma once
#include <cstdint>
#include <stdexcept>

#include <ATen/core/Tensor.h>

namespace deltaops {
namespace cuda {

// Thrown for invalid input that the contract says raises ValueError (NaN in
// topk_mask, bad COO indices, inconsistent bitmask). bindings_cuda.cpp turns
// it into pybind11::value_error; other failures are c10::Error (RuntimeError).
struct ValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

at::Tensor radix_histogram(const at::Tensor& x, int64_t level, int64_t prefix);
at::Tensor threshold_mask(const at::Tensor& x, int64_t threshold_key, int64_t take_equal);
at::Tensor topk_mask(const at::Tensor& x, int64_t k);

at::Tensor philox_uniform_like(const at::Tensor& x, int64_t seed, int64_t stream);
at::Tensor dare(const at::Tensor& delta, double density, int64_t seed, int64_t stream,
                bool rescale);
// dare written into out (delta's dtype, shape and device; out may be delta itself).
void dare_out_(const at::Tensor& delta, double density, int64_t seed, int64_t stream, bool rescale,
               at::Tensor& out);

void apply_dense_(at::Tensor& weight, const at::Tensor& delta, double alpha);
void apply_coo_(at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values,
                double alpha);
void apply_bitmask_(at::Tensor& weight, const at::Tensor& packed_mask, const at::Tensor& values,
                    double alpha);

}  // namespace cuda
}  // namespace deltaops
