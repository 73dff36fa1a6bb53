// Python bindings of deltaops._C, the C++ CPU backend of the sparse-delta
// family. Names and semantics: docs/backend-contract.md; the reference in
// python/deltaops/reference/sparse.py is the bit-for-bit specification.
// Every function releases the GIL; invalid input raises ValueError (TypeError
// for an unsupported dtype) before anything is written.
#include <torch/extension.h>

#include "cpu/sparse_cpu.h"
#include "cpu/merge_cpu.h"
#include "cpu/lowrank_cpu.h"  // low-rank family
#include "cpu/quant_cpu.h"

namespace py = pybind11;
namespace dc = deltaops::cpu;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deltaops C++ CPU kernels: the sparse-delta family (see docs/backend-contract.md)";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const dc::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    }
  });

  using release = py::call_guard<py::gil_scoped_release>;

  m.def("radix_histogram", &dc::radix_histogram, py::arg("x"), py::arg("level"), py::arg("prefix"),
        release(),
        "int64 histogram of magnitude keys: 32768 bins (16-bit, fp32 level 0) or 65536 "
        "(fp32 level 1, keys with key >> 16 == prefix)");
  m.def("threshold_mask", &dc::threshold_mask, py::arg("x"), py::arg("threshold_key"),
        py::arg("take_equal"), release(),
        "bool mask: key > threshold_key, or key == threshold_key among the first take_equal such "
        "in flat order");
  m.def("topk_mask", &dc::topk_mask, py::arg("x"), py::arg("k"), release(),
        "bool mask of the k largest |x|, ties to the lowest flat index; ValueError on NaN");
  m.def("philox_uniform_like", &dc::philox_uniform_like, py::arg("x"), py::arg("seed"),
        py::arg("stream"), release(), "fp32 Philox4x32-10 uniforms in [0, 1), shaped like x");
  m.def("dare", &dc::dare, py::arg("delta"), py::arg("density"), py::arg("seed"), py::arg("stream"),
        py::arg("rescale"), release(), "DARE drop (and rescale) of delta, same dtype");
  m.def("dare_out_", &dc::dare_out_, py::arg("delta"), py::arg("density"), py::arg("seed"),
        py::arg("stream"), py::arg("rescale"), py::arg("out"), release(),
        "dare written into out (delta's dtype and shape; out may be delta)");
  m.def("apply_dense_", &dc::apply_dense_, py::arg("weight"), py::arg("delta"), py::arg("alpha"),
        release(), "in place weight += alpha * delta (fp32 math, no FMA, one rounding)");
  m.def("apply_coo_", &dc::apply_coo_, py::arg("weight"), py::arg("indices"), py::arg("values"),
        py::arg("alpha"), release(),
        "in place weight.flat[indices] += alpha * values; indices validated first");
  m.def("apply_bitmask_", &dc::apply_bitmask_, py::arg("weight"), py::arg("packed_mask"),
        py::arg("values"), py::arg("alpha"), release(),
        "in place add of values at the set bits of packed_mask; mask validated first");

  // Diagnostics (underscored: not part of the backend table).
  m.def("_philox_uniform_range", &dc::philox_uniform_range, py::arg("first"), py::arg("count"),
        py::arg("seed"), py::arg("stream"), release(),
        "test hook: the philox_uniform_like values of flat elements [first, first + count)");
  m.def("_isa", &dc::isa, "the kernel table in use: avx512, avx2 or baseline");
  m.def("_set_isa", &dc::set_isa, py::arg("name"),
        "choose the kernel table: auto, avx512, avx2 or baseline; returns the one in use");
  m.def("_set_vbmi2", &dc::set_vbmi2, py::arg("enabled"),
        "test hook: let the avx512 table use AVX512-VBMI2 instructions (the default where the CPU "
        "has them) or not; returns whether it will");

  // The fused merge kernel (sign-elect / task-arithmetic family of merge_tensors).
  m.def("merge_sign_elect", &dc::merge_sign_elect, py::arg("base"), py::arg("models"),
        py::arg("method"), py::arg("weights"), py::arg("densities"), py::arg("gammas"),
        py::arg("lambda_"), py::arg("normalize"), py::arg("rescale"), py::arg("sign_method"),
        py::arg("seed"), py::arg("thresholds"), py::arg("out_dtype"), release(),
        "fused merge_tensors for task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, "
        "breadcrumbs_ties, della, della_linear (options resolved per model; della's epsilons in "
        "gammas; see csrc/cpu/merge_cpu.h)");
  m.def("merge_sign_elect_out_", &dc::merge_sign_elect_out_, py::arg("base"), py::arg("models"),
        py::arg("method"), py::arg("weights"), py::arg("densities"), py::arg("gammas"),
        py::arg("lambda_"), py::arg("normalize"), py::arg("rescale"), py::arg("sign_method"),
        py::arg("seed"), py::arg("thresholds"), py::arg("out"), release(),
        "merge_sign_elect written into out (base's shape, the output dtype; may be base or a model)");
  m.def("merge_linear", &dc::merge_linear, py::arg("models"), py::arg("weights"),
        py::arg("normalize"), py::arg("out_dtype"), release(),
        "merge_tensors' linear method: fma-accumulated weighted sum of the models, "
        "optionally divided by the fp32 sum of the weights");
  m.def("merge_linear_out_", &dc::merge_linear_out_, py::arg("models"), py::arg("weights"),
        py::arg("normalize"), py::arg("out"), release(),
        "merge_linear written into out (the models' shape, the output dtype; may be a model)");
  m.def("merge_delta_histogram", &dc::merge_delta_histogram, py::arg("base"), py::arg("model"),
        py::arg("level"), py::arg("prefix"), release(),
        "radix histogram of the magnitude keys of fp32(model) - fp32(base), no delta stored");
  m.def("merge_delta_topk", &dc::merge_delta_topk, py::arg("base"), py::arg("model"), py::arg("ks"),
        release(), "(threshold_key, take_equal) per k for the top-k of fp32(model) - fp32(base); "
        "take_equal -1 means every equal key");

  // ---- low-rank family (csrc/cpu/lowrank_cpu.h; spec: reference/lowrank.py) ----
  m.def("lora_merge_", &dc::lora_merge_, py::arg("weight"), py::arg("lora_A"), py::arg("lora_B"),
        py::arg("scale"), py::arg("fan_in_fan_out"), release(),
        "in place weight += scale * lora_B @ lora_A (PEFT layouts), fp32 accumulation in registers, "
        "one rounding; no scratch of the weight's size");
  m.def("lora_shrink", &dc::lora_shrink, py::arg("x"), py::arg("lora_a_stack"),
        py::arg("token_lora_ids"), py::arg("scale"), release(),
        "fp32 [T, r]: scale * lora_a_stack[id] @ x[t] per token, zeros for id -1");
  m.def("lora_expand", &dc::lora_expand, py::arg("y"), py::arg("intermediate"),
        py::arg("lora_b_stack"), py::arg("token_lora_ids"), release(),
        "in place y[t] += lora_b_stack[id] @ intermediate[t] (fp32 sum, one rounding), id -1 skipped");
  // ---- end of the low-rank family ----
  // ---- low-bit deltas (sign, ternary, 2/3/4/8-bit groups): csrc/cpu/quant_cpu.h ----
  m.def("pack_bits", &dc::pack_bits, py::arg("codes"), py::arg("bits"), release(),
        "pack uint8 codes < 2**bits into a little-endian bit stream (LSB first)");
  m.def("unpack_bits", &dc::unpack_bits, py::arg("packed"), py::arg("bits"), py::arg("numel"),
        release(), "inverse of pack_bits; byte count and padding bits validated");
  m.def("quantize_sign", &dc::quantize_sign, py::arg("x"), py::arg("per_row"), release(),
        "BitDelta: (packed sign bits, fp32 exact-mean |x| scales)");
  m.def("quantize_ternary_absmean", &dc::quantize_ternary_absmean, py::arg("x"), release(),
        "BitNet b1.58 absmean: (packed 2-bit codes q + 1, fp32 scale)");
  m.def("quantize_uniform", &dc::quantize_uniform, py::arg("x"), py::arg("bits"),
        py::arg("group_size"), py::arg("symmetric"), release(),
        "uniform group quantization: (packed codes, fp32 scales, uint8 zeros)");
  m.def("compeft_pack", &dc::compeft_pack, py::arg("x"), py::arg("keep"), release(),
        "ComPEFT's packed 2-bit codes: sign(x) + 1 where keep, 1 elsewhere");
  m.def("compeft_quantize", &dc::compeft_quantize, py::arg("x"), py::arg("k"), release(),
        "ComPEFT: (packed codes of the top k magnitudes, fp64 moments [sum x, sum x^2, h])");
  m.def("apply_quantized_", &dc::apply_quantized_, py::arg("weight"), py::arg("packed"),
        py::arg("scales"), py::arg("zeros"), py::arg("bits"), py::arg("group_size"),
        py::arg("alpha"), release(), "in place weight += alpha * dequantized codes (one rounding)");
  m.def("delta_bmm", &dc::delta_bmm, py::arg("x"), py::arg("base_weight"), py::arg("packed"),
        py::arg("scales"), py::arg("zeros"), py::arg("bits"), py::arg("group_size"),
        py::arg("indices"), release(), "y[b] = x[b] @ (W + delta[indices[b]])^T, no dense delta");
  // ---- end of low-bit deltas ----
}
