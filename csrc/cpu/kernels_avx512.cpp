// The kernel loops compiled for AVX-512 (F, BW, VL, DQ), chosen at run time by
// sparse_cpu.cpp when the CPU (and OS) support it.
//
// Everything that could be emitted out of line here lives in namespace
// deltaops::cpu::avx512 (kernels.inc). The system and deltaops headers are
// included *before* the target pragma, so their inline functions keep the
// baseline target in this translation unit too (the deltaops ones are
// always_inline and get inlined into the AVX-512 loops); no function with an
// AVX-512 body can be shared with, or chosen by the linker for, baseline code.

// Floating-point operations never trap in deltaops (torch runs with exceptions
// masked), so let GCC speculate them: it may then if-convert the branches of
// the shared element math (dare_element's division, fp16_to_f32's subnormal
// product) and vectorize those loops. Results are unchanged: this allows no
// reassociation, contraction or change of rounding.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include <cstdint>
#include <cstring>

#include "kernels.h"

#if DELTAOPS_HAVE_AVX512_KERNELS && defined(__GNUC__)
// GCC 12 reports -Wmaybe-uninitialized inside the intrinsics headers (their
// _mm*_undefined_* placeholders) once inlined; silence it for those headers.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include "deltaops/bits.h"
#include "deltaops/philox.h"
#include "deltaops/sparse.h"
#include "f16_blocks.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt,lzcnt"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt,lzcnt")
#endif

#define DELTAOPS_ISA avx512
#define DELTAOPS_ISA_NAME "avx512"
#define DELTAOPS_KERNELS_AVX512 1

#include "kernels.inc"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#elif DELTAOPS_HAVE_AVX512_KERNELS
// A compiler without GCC-style target pragmas: reuse the baseline loops.
namespace deltaops {
namespace cpu {
namespace avx512 {
const Kernels kKernels = baseline::kKernels;
}
}  // namespace cpu
}  // namespace deltaops
#endif
