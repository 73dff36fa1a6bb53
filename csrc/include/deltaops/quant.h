// Per-element math of the low-bit delta family (sign, ternary, 2/3/4/8-bit
// groups), shared by the CPU and CUDA kernels. The specification is
// python/deltaops/reference/quant.py; triton_kernels/quant.py mirrors it.
//
// Bit order: code i of `bits` bits occupies bits [i*bits, (i+1)*bits) of a
// little-endian bit stream (stream bit j is bit j % 8 of byte j / 8), least
// significant bit first. Eight codes always fill exactly `bits` whole bytes,
// so kernels work in units of eight codes.
#pragma once
#include <cmath>
#include <cstdint>

#include "deltaops/bits.h"
#include "deltaops/hd.h"
#include "deltaops/sparse.h"

namespace deltaops {
namespace quant {

constexpr float kPreClamp = 512.0f;     // |x / s| is clamped here before rounding
constexpr float kAbsmeanEps = 1e-5f;    // BitNet b1.58's lower bound on the scale
constexpr uint32_t kTernaryZero = 1;    // ternary codes are q + 1
constexpr int kExponentBins = 256;      // one bin per fp32 biased exponent

DELTAOPS_HD int64_t packed_nbytes(int64_t numel, int bits) { return (numel * bits + 7) / 8; }

// ---- packing ------------------------------------------------------------------------

// Eight codes (each < 2^bits) as the `bits` bytes they fill, in a uint64 (low byte first).
DELTAOPS_HD uint64_t pack8(const uint8_t* codes, int bits) {
  uint64_t word = 0;
  for (int s = 0; s < 8; ++s) word |= static_cast<uint64_t>(codes[s]) << (s * bits);
  return word;
}

// Code s (0..7) of a unit of eight codes held in `word`.
DELTAOPS_HD uint32_t unit_code(uint64_t word, int s, int bits) {
  return static_cast<uint32_t>(word >> (s * bits)) & ((1u << bits) - 1u);
}

// Code i of a stream of `nbytes` bytes (reads at most two bytes; for 3-bit
// codes that cross a byte boundary).
DELTAOPS_HD uint32_t read_code(const uint8_t* packed, int64_t nbytes, int64_t i, int bits) {
  const int64_t bit = i * bits;
  const int64_t byte = bit >> 3;
  uint32_t window = packed[byte];
  if (byte + 1 < nbytes) window |= static_cast<uint32_t>(packed[byte + 1]) << 8;
  return (window >> (bit & 7)) & ((1u << bits) - 1u);
}

// ---- rounding and division ------------------------------------------------------------

DELTAOPS_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

DELTAOPS_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// Round half to even after clamping to [-512, 512] (the clamp changes no
// code, since codes are clamped to a smaller range afterwards; it keeps
// inf out of the integer conversions).
DELTAOPS_HD float rne_clamped(float y) {
  y = y < -kPreClamp ? -kPreClamp : (y > kPreClamp ? kPreClamp : y);
  return rintf(y);  // the default rounding mode: nearest, ties to even
}

// ---- quantizing ---------------------------------------------------------------------------

// q = clamp(rne(x / s) + z, 0, maxq) for s > 0 (branch-free: loops vectorize).
DELTAOPS_HD uint32_t uniform_code_scaled(float x, float scale, float zero, float maxq) {
  float q = rne_clamped(div_rn(x, scale)) + zero;  // exact: small integers
  q = q < 0.0f ? 0.0f : (q > maxq ? maxq : q);
  return static_cast<uint32_t>(static_cast<int32_t>(q));
}

// The code of x: uniform_code_scaled, or z when s == 0 (an all-zero group).
// Ternary absmean is this with z = 1, maxq = 2 (its s is never 0).
DELTAOPS_HD uint32_t uniform_code(float x, float scale, float zero, float maxq) {
  return scale > 0.0f ? uniform_code_scaled(x, scale, zero, maxq) : static_cast<uint32_t>(zero);
}

// Scale and zero point of a group from its min, max and max |x| (fp32).
// Asymmetric: s = (max(hi, 0) - min(lo, 0)) / (2^b - 1), z = clamp(rne(-lo / s), 0, 2^b - 1)
// (0 when s == 0). Symmetric: s = amax / (2^(b-1) - 1), z = 2^(b-1).
DELTAOPS_HD void uniform_params(float lo, float hi, float amax, int bits, bool symmetric,
                                float* scale, float* zero) {
  const float maxq = static_cast<float>((1 << bits) - 1);
  if (symmetric) {
    const float s = div_rn(amax, static_cast<float>((1 << (bits - 1)) - 1));
    *scale = s > 0.0f ? s : 0.0f;
    *zero = static_cast<float>(1 << (bits - 1));
    return;
  }
  lo = lo < 0.0f ? lo : 0.0f;
  hi = hi > 0.0f ? hi : 0.0f;
  float s = div_rn(hi - lo, maxq);
  s = s > 0.0f ? s : 0.0f;  // +0.0 for an all-zero group, whatever the signs of its zeros
  *scale = s;
  if (s > 0.0f) {
    float z = rne_clamped(div_rn(-lo, s));
    *zero = z < 0.0f ? 0.0f : (z > maxq ? maxq : z);
  } else {
    *zero = 0.0f;
  }
}

// BitDelta: 1 where x >= 0 (zero and -0.0 included), 0 where x < 0.
DELTAOPS_HD uint32_t sign_code(float x) { return x < 0.0f ? 0u : 1u; }

// ---- dequantizing and applying -------------------------------------------------------------

// sign (bits == 1): +s or -s; otherwise fp32(q - z) * s (one rounding).
DELTAOPS_HD float dequant_sign(uint32_t code, float scale) { return code ? scale : -scale; }
DELTAOPS_HD float dequant_uniform(uint32_t code, int32_t zero, float scale) {
  return mul_rn(static_cast<float>(static_cast<int32_t>(code) - zero), scale);
}

// ---- exact mean |x| -------------------------------------------------------------------------
// |x| = m * 2^(max(e, 1) - 150) with e the fp32 biased exponent and m the
// significand (implicit bit included for e > 0). Summing m per exponent in
// integers is exact and order-free; abs_sum_to_double converts the total
// once, rounding to nearest even (Python's float(int)).

DELTAOPS_HD void abs_bin_add(uint64_t* bins, float v) {
  const uint32_t u = f32_bits(v) & 0x7FFFFFFFu;
  const uint32_t e = u >> 23;
  bins[e] += (u & 0x7FFFFFu) | (e ? 0x800000u : 0u);
}

// sum_e (bins[e] + 2^64 * bins_hi[e]) * 2^(max(e, 1) - 150), rounded to the
// nearest double (ties to even). bins_hi may be null; it carries the high
// words of bins that kernels accumulate 128 bits wide.
inline double abs_sum_to_double(const uint64_t* bins, const uint64_t* bins_hi = nullptr) {
  // T = sum_e value_e << (max(e, 1) - 1) as a 448-bit integer; the sum is T * 2^-149.
  constexpr int kLimbs = 7;
  uint64_t limb[kLimbs] = {0, 0, 0, 0, 0, 0, 0};
  auto add_at = [&](uint64_t m, int shift) {
    if (m == 0) return;
    const int w = shift >> 6, off = shift & 63;
    const uint64_t add[2] = {m << off, off ? (m >> (64 - off)) : 0};
    uint64_t carry = 0;
    for (int i = w; i < kLimbs; ++i) {
      const uint64_t a = (i - w) < 2 ? add[i - w] : 0;
      const uint64_t s1 = limb[i] + a;
      const uint64_t c1 = s1 < a;
      const uint64_t s2 = s1 + carry;
      const uint64_t c2 = s2 < carry;
      limb[i] = s2;
      carry = c1 | c2;
      if (i - w >= 1 && carry == 0) break;
    }
  };
  for (int e = 0; e < kExponentBins; ++e) {
    const int shift = (e > 1 ? e : 1) - 1;
    add_at(bins[e], shift);
    if (bins_hi) add_at(bins_hi[e], shift + 64);
  }
  int top = -1;  // index of the most significant set bit
  for (int i = kLimbs - 1; i >= 0 && top < 0; --i)
    if (limb[i]) top = i * 64 + 63 - __builtin_clzll(limb[i]);
  if (top < 0) return 0.0;
  auto bit_at = [&](int b) -> uint64_t { return b < 0 ? 0 : (limb[b >> 6] >> (b & 63)) & 1u; };
  // the 53 bits from `top` down, then round half to even on the rest
  uint64_t mant = 0;
  for (int b = top; b > top - 53; --b) mant = (mant << 1) | bit_at(b);
  const int low = top - 53;  // highest discarded bit
  uint64_t round_bit = bit_at(low), sticky = 0;
  for (int b = low - 1; b >= 0 && !sticky; --b) sticky |= bit_at(b);
  if (round_bit && (sticky || (mant & 1u))) mant += 1;  // may carry to 2^53: still exact
  return std::ldexp(static_cast<double>(mant), top - 52 - 149);
}

// fp32(fp64(S) / count), 0 for an empty set.
inline float abs_mean_from_bins(const uint64_t* bins, int64_t count, const uint64_t* bins_hi = nullptr) {
  if (count == 0) return 0.0f;
  return static_cast<float>(abs_sum_to_double(bins, bins_hi) / static_cast<double>(count));
}

}  // namespace quant
}  // namespace deltaops
