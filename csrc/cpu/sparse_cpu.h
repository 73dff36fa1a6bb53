// Host interface of deltaops._C: the sparse-delta family on CPU tensors.
//
// docs/backend-contract.md gives the semantics and
// python/deltaops/reference/sparse.py is the bit-for-bit specification.
// Tensors arrive contiguous, on the CPU, with supported dtypes (the ops layer
// checks); the functions still check what they rely on.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>

#include <ATen/core/Tensor.h>

namespace deltaops {
namespace cpu {

// Invalid input that the contract says raises ValueError (NaN in topk_mask,
// bad COO indices, inconsistent bitmask, out-of-range arguments). pybind11
// translates std::invalid_argument to ValueError.
struct ValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
// Unsupported dtype; bindings.cpp translates it to TypeError.
struct TypeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

at::Tensor radix_histogram(const at::Tensor& x, int64_t level, int64_t prefix);
at::Tensor threshold_mask(const at::Tensor& x, int64_t threshold_key, int64_t take_equal);
at::Tensor topk_mask(const at::Tensor& x, int64_t k);

at::Tensor philox_uniform_like(const at::Tensor& x, int64_t seed, int64_t stream);
at::Tensor dare(const at::Tensor& delta, double density, int64_t seed, int64_t stream, bool rescale);
// dare written into out (delta's dtype and shape, contiguous; out may be delta itself).
void dare_out_(const at::Tensor& delta, double density, int64_t seed, int64_t stream, bool rescale,
               at::Tensor& out);

// The philox_uniform_like values of flat elements [begin, end) into out[0, end - begin),
// from the kernel table in use (merge_cpu's random drops share dare's draws).
void philox_uniform_block(float* out, int64_t begin, int64_t end, uint64_t seed, uint32_t stream);

// A contiguous empty tensor for a kernel's output; large ones are advised as
// transparent huge pages before the first touch (4 KiB first-touch faults
// otherwise cost about as much as a bandwidth-bound kernel). DELTAOPS_CPU_THP=0
// turns the advice off.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options);

void apply_dense_(at::Tensor& weight, const at::Tensor& delta, double alpha);
void apply_coo_(at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values, double alpha);
void apply_bitmask_(at::Tensor& weight, const at::Tensor& packed_mask, const at::Tensor& values,
                    double alpha);

// Test hook: the philox_uniform_like values of flat elements [first, first + count)
// (reaches counters whose high word is non-zero without a 2^34-element tensor).
at::Tensor philox_uniform_range(int64_t first, int64_t count, int64_t seed, int64_t stream);

// The kernel table in use ("avx512", "avx2" or "baseline").
std::string isa();
// Choose the kernel table: "auto" (the best this CPU runs; the default, or
// DELTAOPS_CPU_ISA when set), "avx512", or "avx2"/"baseline". Returns the one
// in use; ValueError if the CPU cannot run the one asked for.
std::string set_isa(const std::string& name);
// Whether the avx512 table may use AVX512-VBMI2 instructions (the ComPEFT and
// bf16 absmean scans do): where the CPU has them, unless a test turned them off with
// set_vbmi2(false) to run the code written for CPUs without them. Returns
// whether they are in use; ValueError when asked for on a CPU without them.
bool vbmi2_enabled();
bool set_vbmi2(bool enabled);

}  // namespace cpu
}  // namespace deltaops
