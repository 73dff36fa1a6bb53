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
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  if (exp == 0x1Fu) return f32_from_bits(sign | 0x7F800000u | (mant << 13));  // inf / NaN
  if (exp != 0) return f32_from_bits(sign | ((exp + 112u) << 23) | (mant << 13));
  // zero or subnormal: mant * 2^-24, exact in fp32
  const float magnitude = static_cast<float>(mant) * 5.9604644775390625e-08f;
  return f32_from_bits(sign | f32_bits(magnitude));
}

DELTAOPS_HD uint16_t f32_to_fp16(float f) {
  uint32_t u = f32_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7FFFFFFFu;
  if (u > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u);  // NaN
  if (u >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520: inf
  if (u < 0x38800000u) {
    // Result is a half subnormal (or zero): its mantissa is round(|f| * 2^24).
    // Shift the fp32 significand (with implicit bit) right with RNE.
    if (u < 0x33000000u) return static_cast<uint16_t>(sign);  // < 2^-25: rounds to zero
    const uint32_t exp = u >> 23;                              // 102..112
    const uint32_t significand = (u & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - exp;                         // 14..24
    const uint32_t halfway = 1u << (shift - 1);
    const uint32_t rest = significand & ((1u << shift) - 1u);
    uint32_t mant = significand >> shift;
    if (rest > halfway || (rest == halfway && (mant & 1u))) ++mant;
    return static_cast<uint16_t>(sign | mant);
  }
  const uint32_t mant_odd = (u >> 13) & 1u;
  u += 0xC8000FFFu + mant_odd;  // rebias exponent (127 -> 15) and round half to even
  return static_cast<uint16_t>(sign | (u >> 13));
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
