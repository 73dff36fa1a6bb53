// Block conversions between fp16 storage and fp32 for the CPU kernels.
//
// bits.h's fp16 conversions are branch-free so that compilers vectorize them,
// but in software they cost several times what the bf16 shift does, which made
// every fp16 path 2-5x slower than bf16. The x86-64-v3 baseline has F16C, whose
// vcvtph2ps / vcvtps2ph (round to nearest even) give the same values, so hot
// loops convert whole blocks with them. The one difference: a NaN keeps its
// payload's top bits instead of becoming the canonical 0x7E00 (NaNs compare
// payload-free everywhere in deltaops).
//
// Everything here is static inline (internal linkage): the AVX-512 copy of the
// kernels (kernels_avx512.cpp) includes it before its target pragma, so no
// out-of-line copy can be shared between the ISA builds.
#pragma once
#include <cstdint>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "deltaops/bits.h"

namespace deltaops {
namespace cpu {

// dst[0, n) = fp32 of the fp16 patterns src[0, n).
static inline __attribute__((always_inline)) void fp16_to_f32_block(const uint16_t* __restrict src,
                                                                  float* __restrict dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = fp16_to_f32(src[i]);
}

// dst[0, n) = src[0, n) rounded to fp16 (nearest, ties to even).
static inline __attribute__((always_inline)) void f32_to_fp16_block(const float* __restrict src,
                                                                  uint16_t* __restrict dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) dst[i] = f32_to_fp16(src[i]);
}

// The same for the typed storage of the merge and quant kernels: float and
// bf16 in plain loops (the compiler vectorizes those), fp16 as above.
template <typename T>
static inline __attribute__((always_inline)) void to_f32_block(const T* __restrict src,
                                                             float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = load_f32(src[i]);
}
static inline __attribute__((always_inline)) void to_f32_block(const fp16_t* __restrict src,
                                                             float* __restrict dst, int64_t n) {
  fp16_to_f32_block(reinterpret_cast<const uint16_t*>(src), dst, n);
}

template <typename T>
static inline __attribute__((always_inline)) void from_f32_block(const float* __restrict src,
                                                               T* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = store_from_f32<T>(src[i]);
}
static inline __attribute__((always_inline)) void from_f32_block(const float* __restrict src,
                                                               fp16_t* __restrict dst, int64_t n) {
  f32_to_fp16_block(src, reinterpret_cast<uint16_t*>(dst), n);
}

}  // namespace cpu
}  // namespace deltaops
