// Bit-level conversions between fp32 and the 16-bit float formats, and the
// magnitude keys used by the histogram top-k selection.
//
// Conversions round to nearest, ties to even, as torch's `.to(dtype)` does;
// NaN becomes the canonical quiet NaN with the sign kept. They are written
// with integer operations only, so the CPU and CUDA builds give the same bits
// (no dependence on FTZ/DAZ or on the host's F16C/AVX512-BF16 units).
#pragma once
#include <cstdint>
#include <cstring>

#include "deltaops/hd.h"

namespace deltaops {

DELTAOPS_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

DELTAOPS_HD float f32_from_bits(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// ---- bfloat16 --------------------------------------------------------------

DELTAOPS_HD float bf16_to_f32(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

DELTAOPS_HD uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>(((u >> 16) & 0x8000u) | 0x7FC0u);
  const uint32_t rounding_bias = 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding_bias) >> 16);
}

// ---- float16 (IEEE binary16) -----------------------------------------------

DELTAOPS_HD float fp16_to_f32(uint16_t h) {
  // Branch-free (selects only) so that compilers vectorize it.
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  // normal: rebias the exponent (15 -> 127); inf / NaN: all-ones exponent, payload kept
  const uint32_t normal = (exp == 0x1Fu ? 0x7F800000u : ((exp + 112u) << 23)) | (mant << 13);
  // zero or subnormal: mant * 2^-24, exact in fp32
  const uint32_t subnormal = f32_bits(static_cast<float>(static_cast<int32_t>(mant)) * 5.9604644775390625e-08f);
  return f32_from_bits(sign | (exp == 0 ? subnormal : normal));
}

DELTAOPS_HD uint16_t f32_to_fp16(float f) {
  // Branch-free (every case computed, then selected) so that compilers vectorize it.
  uint32_t u = f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7FFFFFFFu;
  // Normal half: rebias the exponent (127 -> 15) and round half to even.
  const uint32_t normal = (u + 0xC8000FFFu + ((u >> 13) & 1u)) >> 13;
  // Half subnormal (2^-25 <= |f| < 2^-14): its mantissa is round(|f| * 2^24),
  // the fp32 significand (with implicit bit) shifted right with RNE. The shift
  // is clamped so that it stays defined where this result is not selected.
  const int32_t exp = static_cast<int32_t>(u >> 23);
  const int32_t raw_shift = 126 - exp;
  const uint32_t shift = static_cast<uint32_t>(raw_shift < 14 ? 14 : (raw_shift > 25 ? 25 : raw_shift));
  const uint32_t significand = (u & 0x7FFFFFu) | 0x800000u;
  const uint32_t odd = (significand >> shift) & 1u;
  const uint32_t mant = (significand + (1u << (shift - 1u)) - 1u + odd) >> shift;  // RNE
  // Select with masks (compilers keep these as data flow, not branches).
  const uint32_t is_sub = 0u - static_cast<uint32_t>(u < 0x38800000u);   // < 2^-14: subnormal
  const uint32_t is_zero = 0u - static_cast<uint32_t>(u < 0x33000000u);  // < 2^-25: rounds to zero
  const uint32_t is_inf = 0u - static_cast<uint32_t>(u >= 0x477FF000u);  // >= 65520: inf
  const uint32_t is_nan = 0u - static_cast<uint32_t>(u > 0x7F800000u);
  uint32_t r = (normal & ~is_sub) | (mant & is_sub);
  r &= ~is_zero;
  r = (r & ~is_inf) | (0x7C00u & is_inf);
  r = (r & ~is_nan) | (0x7E00u & is_nan);
  return static_cast<uint16_t>(sign | r);
}

// ---- one element type tag per supported dtype -------------------------------
// Storage types: float (fp32), and 16-bit patterns tagged by these structs so
// that templates can tell bf16 from fp16.
struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

DELTAOPS_HD float load_f32(float v) { return v; }
DELTAOPS_HD float load_f32(bf16_t v) { return bf16_to_f32(v.bits); }
DELTAOPS_HD float load_f32(fp16_t v) { return fp16_to_f32(v.bits); }

template <typename T>
DELTAOPS_HD T store_from_f32(float f);
template <>
DELTAOPS_HD float store_from_f32<float>(float f) { return f; }
template <>
DELTAOPS_HD bf16_t store_from_f32<bf16_t>(float f) { return bf16_t{f32_to_bf16(f)}; }
template <>
DELTAOPS_HD fp16_t store_from_f32<fp16_t>(float f) { return fp16_t{f32_to_fp16(f)}; }

// ---- magnitude keys ----------------------------------------------------------
// For IEEE formats the bit pattern of |x|, read as an unsigned integer, orders
// like |x| (NaN patterns sort above inf). Histograms over these keys give an
// exact k-th-largest threshold without sorting.
DELTAOPS_HD uint32_t magnitude_key(float v) { return f32_bits(v) & 0x7FFFFFFFu; }
DELTAOPS_HD uint32_t magnitude_key(bf16_t v) { return v.bits & 0x7FFFu; }
DELTAOPS_HD uint32_t magnitude_key(fp16_t v) { return v.bits & 0x7FFFu; }

}  // namespace deltaops
