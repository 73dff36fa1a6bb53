// The kernel loops compiled for the build's baseline ISA (setup.py: -march,
// x86-64-v3 by default, i.e. AVX2/FMA/F16C/BMI2; contraction is off).

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

#if defined(__x86_64__) || defined(_M_X64)
// GCC 12 reports -Wmaybe-uninitialized inside the intrinsics headers (their
// _mm*_undefined_* placeholders) once inlined; silence it for those headers.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

#include "deltaops/bits.h"
#include "deltaops/philox.h"
#include "deltaops/sparse.h"
#include "f16_blocks.h"

#include "kernels.h"

#define DELTAOPS_ISA baseline
#if defined(__AVX2__)
#define DELTAOPS_ISA_NAME "avx2"
#else
#define DELTAOPS_ISA_NAME "baseline"
#endif
#define DELTAOPS_KERNELS_AVX512 0

#include "kernels.inc"
