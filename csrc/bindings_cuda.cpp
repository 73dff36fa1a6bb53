// deltaops._C_cuda: the sparse-delta family on CUDA tensors.
//
// Names, signatures and semantics: docs/backend-contract.md; bit-for-bit
// specification: python/deltaops/reference/sparse.py. Argument names and
// defaults follow the reference so that keyword calls work on every backend.
#include <torch/extension.h>

#include <utility>

#include "cuda/quant_cuda.cuh"
#include "cuda/sparse_cuda.cuh"

namespace py = pybind11;
namespace dc = deltaops::cuda;

namespace {

// Invalid input the contract reports as ValueError; everything else keeps
// torch's translation (c10::Error -> RuntimeError).
template <typename F>
auto value_errors(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const dc::ValueError& e) {
    throw py::value_error(e.what());
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deltaops CUDA kernels: sparse-delta family (see docs/backend-contract.md)";
  using release = py::call_guard<py::gil_scoped_release>;

  m.def(
      "radix_histogram",
      [](const at::Tensor& x, int64_t level, int64_t prefix) {
        return value_errors([&] { return dc::radix_histogram(x, level, prefix); });
      },
      "int64 histogram of magnitude keys at one radix level", py::arg("x"), py::arg("level"),
      py::arg("prefix"), release());
  m.def(
      "threshold_mask",
      [](const at::Tensor& x, int64_t threshold_key, int64_t take_equal) {
        return value_errors([&] { return dc::threshold_mask(x, threshold_key, take_equal); });
      },
      "key > T, or key == T among the first take_equal such in flat order", py::arg("x"),
      py::arg("threshold_key"), py::arg("take_equal"), release());
  m.def(
      "topk_mask",
      [](const at::Tensor& x, int64_t k) {
        return value_errors([&] { return dc::topk_mask(x, k); });
      },
      "bool mask of the k largest magnitudes, ties to the lowest flat index", py::arg("x"),
      py::arg("k"), release());
  m.def(
      "philox_uniform_like",
      [](const at::Tensor& x, int64_t seed, int64_t stream) {
        return value_errors([&] { return dc::philox_uniform_like(x, seed, stream); });
      },
      "fp32 Philox uniforms in [0, 1) shaped like x", py::arg("x"), py::arg("seed"),
      py::arg("stream") = 0, release());
  m.def(
      "dare",
      [](const at::Tensor& delta, double density, int64_t seed, int64_t stream, bool rescale) {
        return value_errors([&] { return dc::dare(delta, density, seed, stream, rescale); });
      },
      "DARE drop-and-rescale", py::arg("delta"), py::arg("density"), py::arg("seed"),
      py::arg("stream") = 0, py::arg("rescale") = true, release());
  m.def(
      "apply_dense_",
      [](at::Tensor weight, const at::Tensor& delta, double alpha) {
        value_errors([&] { dc::apply_dense_(weight, delta, alpha); });
      },
      "in place weight += alpha * delta (fp32 math, no FMA, one rounding)", py::arg("weight"),
      py::arg("delta"), py::arg("alpha"), release());
  m.def(
      "apply_coo_",
      [](at::Tensor weight, const at::Tensor& indices, const at::Tensor& values, double alpha) {
        value_errors([&] { dc::apply_coo_(weight, indices, values, alpha); });
      },
      "in place weight.view(-1)[indices] += alpha * values; validates indices first",
      py::arg("weight"), py::arg("indices"), py::arg("values"), py::arg("alpha"), release());
  m.def(
      "apply_bitmask_",
      [](at::Tensor weight, const at::Tensor& packed_mask, const at::Tensor& values,
         double alpha) {
        value_errors([&] { dc::apply_bitmask_(weight, packed_mask, values, alpha); });
      },
      "in place add of values at the set bits of a packed uint8 mask; validates it first",
      py::arg("weight"), py::arg("packed_mask"), py::arg("values"), py::arg("alpha"), release());

  // ---- low-bit deltas (sign, ternary, 2/3/4/8-bit groups): csrc/cuda/quant_cuda.cuh ----
  m.def(
      "pack_bits",
      [](const at::Tensor& codes, int64_t bits) { return value_errors([&] { return dc::pack_bits(codes, bits); }); },
      "pack uint8 codes < 2**bits, LSB first", py::arg("codes"), py::arg("bits"), release());
  m.def(
      "unpack_bits",
      [](const at::Tensor& packed, int64_t bits, int64_t numel) {
        return value_errors([&] { return dc::unpack_bits(packed, bits, numel); });
      },
      "inverse of pack_bits", py::arg("packed"), py::arg("bits"), py::arg("numel"), release());
  m.def(
      "quantize_sign",
      [](const at::Tensor& x, bool per_row) { return value_errors([&] { return dc::quantize_sign(x, per_row); }); },
      "BitDelta sign bits and exact-mean scales", py::arg("x"), py::arg("per_row"), release());
  m.def(
      "quantize_ternary_absmean",
      [](const at::Tensor& x) { return value_errors([&] { return dc::quantize_ternary_absmean(x); }); },
      "BitNet b1.58 absmean ternary codes and scale", py::arg("x"), release());
  m.def(
      "quantize_uniform",
      [](const at::Tensor& x, int64_t bits, int64_t group_size, bool symmetric) {
        return value_errors([&] { return dc::quantize_uniform(x, bits, group_size, symmetric); });
      },
      "uniform group quantization", py::arg("x"), py::arg("bits"), py::arg("group_size"),
      py::arg("symmetric"), release());
  m.def(
      "apply_quantized_",
      [](at::Tensor weight, const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
         int64_t bits, int64_t group_size, double alpha) {
        value_errors([&] { dc::apply_quantized_(weight, packed, scales, zeros, bits, group_size, alpha); });
      },
      "in place weight += alpha * dequantized codes (one rounding)", py::arg("weight"), py::arg("packed"),
      py::arg("scales"), py::arg("zeros"), py::arg("bits"), py::arg("group_size"), py::arg("alpha"),
      release());
  m.def(
      "delta_bmm",
      [](const at::Tensor& x, const at::Tensor& base_weight, const at::Tensor& packed,
         const at::Tensor& scales, const at::Tensor& zeros, int64_t bits, int64_t group_size,
         const at::Tensor& indices) {
        return value_errors([&] {
          return dc::delta_bmm(x, base_weight, packed, scales, zeros, bits, group_size, indices);
        });
      },
      "y[b] = x[b] @ (W + delta[indices[b]])^T, no dense delta", py::arg("x"), py::arg("base_weight"),
      py::arg("packed"), py::arg("scales"), py::arg("zeros"), py::arg("bits"), py::arg("group_size"),
      py::arg("indices"), release());
  // ---- end of low-bit deltas ----
}
