// deltaops._C_cuda: the sparse-delta family and the fused merge on CUDA tensors.
//
// Names, signatures and semantics: docs/backend-contract.md; bit-for-bit
// specification: python/deltaops/reference/sparse.py. Argument names and
// defaults follow the reference so that keyword calls work on every backend.
#include <torch/extension.h>

#include <utility>

#include "cuda/quant_cuda.cuh"
#include "cuda/sparse_cuda.cuh"
#include "cuda/merge_cuda.cuh"
#include "cuda/lowrank_cuda.cuh"  // low-rank family

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
  m.doc() = "deltaops CUDA kernels: sparse-delta family (see docs/backend-contract.md), fused merge";
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
      "dare_out_",
      [](const at::Tensor& delta, double density, int64_t seed, int64_t stream, bool rescale,
         at::Tensor& out) {
        value_errors([&] {
          dc::dare_out_(delta, density, seed, stream, rescale, out);
          return 0;
        });
      },
      "dare written into out", py::arg("delta"), py::arg("density"), py::arg("seed"),
      py::arg("stream"), py::arg("rescale"), py::arg("out"), release());
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

  // ---- merge family (csrc/cuda/merge.cu): the fused sign-elect / task-arithmetic merge ----
  // Same names, arguments and errors as deltaops._C (csrc/bindings.cpp): ValueError and
  // TypeError for bad input, RuntimeError (c10::Error) for non-CUDA tensors.
  auto merge_errors = [](auto&& f) -> decltype(f()) {
    try {
      return f();
    } catch (const dc::ValueError& e) {
      throw py::value_error(e.what());
    } catch (const dc::TypeError& e) {
      throw py::type_error(e.what());
    }
  };
  m.def(
      "merge_sign_elect",
      [merge_errors](const at::Tensor& base, const std::vector<at::Tensor>& models,
                     const std::string& method, const std::vector<double>& weights,
                     const std::vector<double>& densities, const std::vector<double>& gammas,
                     double lambda, bool normalize, const std::string& rescale,
                     const std::string& sign_method, int64_t seed,
                     const std::vector<int64_t>& thresholds, const std::string& out_dtype) {
        return merge_errors([&] {
          return dc::merge_sign_elect(base, models, method, weights, densities, gammas, lambda,
                                      normalize, rescale, sign_method, seed, thresholds, out_dtype);
        });
      },
      "fused merge_tensors for task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, "
      "breadcrumbs_ties (options resolved per model; see csrc/cpu/merge_cpu.h)",
      py::arg("base"), py::arg("models"), py::arg("method"), py::arg("weights"),
      py::arg("densities"), py::arg("gammas"), py::arg("lambda_"), py::arg("normalize"),
      py::arg("rescale"), py::arg("sign_method"), py::arg("seed"), py::arg("thresholds"),
      py::arg("out_dtype"), release());
  m.def(
      "merge_sign_elect_out_",
      [merge_errors](const at::Tensor& base, const std::vector<at::Tensor>& models,
                     const std::string& method, const std::vector<double>& weights,
                     const std::vector<double>& densities, const std::vector<double>& gammas,
                     double lambda, bool normalize, const std::string& rescale,
                     const std::string& sign_method, int64_t seed,
                     const std::vector<int64_t>& thresholds, at::Tensor& out) {
        merge_errors([&] {
          dc::merge_sign_elect_out_(base, models, method, weights, densities, gammas, lambda,
                                    normalize, rescale, sign_method, seed, thresholds, out);
        });
      },
      "merge_sign_elect written into out (base's shape, the output dtype; may be base or a model)",
      py::arg("base"), py::arg("models"), py::arg("method"), py::arg("weights"),
      py::arg("densities"), py::arg("gammas"), py::arg("lambda_"), py::arg("normalize"),
      py::arg("rescale"), py::arg("sign_method"), py::arg("seed"), py::arg("thresholds"),
      py::arg("out"), release());
  m.def(
      "merge_linear",
      [merge_errors](const std::vector<at::Tensor>& models, const std::vector<double>& weights,
                     bool normalize, const std::string& out_dtype) {
        return merge_errors([&] { return dc::merge_linear(models, weights, normalize, out_dtype); });
      },
      "merge_tensors' linear method: fma-accumulated weighted sum of the models, "
      "optionally divided by the fp32 sum of the weights",
      py::arg("models"), py::arg("weights"), py::arg("normalize"), py::arg("out_dtype"), release());
  m.def(
      "merge_linear_out_",
      [merge_errors](const std::vector<at::Tensor>& models, const std::vector<double>& weights,
                     bool normalize, at::Tensor& out) {
        merge_errors([&] { dc::merge_linear_out_(models, weights, normalize, out); });
      },
      "merge_linear written into out (the models' shape, the output dtype; may be a model)",
      py::arg("models"), py::arg("weights"), py::arg("normalize"), py::arg("out"), release());
  m.def(
      "merge_delta_histogram",
      [merge_errors](const at::Tensor& base, const at::Tensor& model, int64_t level,
                     int64_t prefix) {
        return merge_errors([&] { return dc::merge_delta_histogram(base, model, level, prefix); });
      },
      "radix histogram of the magnitude keys of fp32(model) - fp32(base), no delta stored",
      py::arg("base"), py::arg("model"), py::arg("level"), py::arg("prefix"), release());
  m.def(
      "merge_delta_topk",
      [merge_errors](const at::Tensor& base, const at::Tensor& model,
                     const std::vector<int64_t>& ks) {
        return merge_errors([&] { return dc::merge_delta_topk(base, model, ks); });
      },
      "(threshold_key, take_equal) per k for the top-k of fp32(model) - fp32(base); "
      "take_equal -1 means every equal key",
      py::arg("base"), py::arg("model"), py::arg("ks"), release());
  // ---- end of the merge family ----
  // ---- low-rank family (csrc/cuda/lowrank.cu; spec: reference/lowrank.py) ----
  m.def(
      "lora_merge_",
      [](at::Tensor weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
         bool fan_in_fan_out) {
        value_errors([&] { dc::lora_merge_(weight, lora_A, lora_B, scale, fan_in_fan_out); });
      },
      "in place weight += scale * lora_B @ lora_A (PEFT layouts), fp32 accumulation, one rounding",
      py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"), py::arg("scale"),
      py::arg("fan_in_fan_out"), release());
  m.def(
      "lora_shrink",
      [](const at::Tensor& x, const at::Tensor& lora_a_stack, const at::Tensor& token_lora_ids,
         double scale) {
        return value_errors([&] { return dc::lora_shrink(x, lora_a_stack, token_lora_ids, scale); });
      },
      "fp32 [T, r]: scale * lora_a_stack[id] @ x[t], zeros for id -1", py::arg("x"),
      py::arg("lora_a_stack"), py::arg("token_lora_ids"), py::arg("scale"), release());
  m.def(
      "lora_expand",
      [](at::Tensor y, const at::Tensor& intermediate, const at::Tensor& lora_b_stack,
         const at::Tensor& token_lora_ids) {
        value_errors([&] { dc::lora_expand(y, intermediate, lora_b_stack, token_lora_ids); });
      },
      "in place y[t] += lora_b_stack[id] @ intermediate[t] (one rounding), id -1 skipped",
      py::arg("y"), py::arg("intermediate"), py::arg("lora_b_stack"), py::arg("token_lora_ids"),
      release());
  // ---- end of the low-rank family ----
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
      "compeft_pack",
      [](const at::Tensor& x, const at::Tensor& keep) { return value_errors([&] { return dc::compeft_pack(x, keep); }); },
      "ComPEFT's packed 2-bit codes: sign(x) + 1 where keep, 1 elsewhere", py::arg("x"), py::arg("keep"),
      release());
  m.def(
      "compeft_quantize",
      [](const at::Tensor& x, int64_t k) { return value_errors([&] { return dc::compeft_quantize(x, k); }); },
      "ComPEFT's packed codes of the top k magnitudes and fp64 moments [sum x, sum x^2, h]", py::arg("x"),
      py::arg("k"), release());
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
