// Philox4x32-10 counter-based RNG (Salmon et al., "Parallel random numbers:
// as easy as 1, 2, 3", SC'11), keyed so that every backend draws the same
// number for the same element whatever its tiling or thread count.
//
// deltaops keying (the contract; python/deltaops/reference/philox.py is the
// executable specification and triton_kernels/philox.py mirrors it):
//   key     = (lo32(seed), hi32(seed))
//   counter = (lo32(index >> 2), hi32(index >> 2), stream, 0)
//   word    = philox(counter, key)[index & 3]
//   uniform = (word >> 8) * 2^-24            exactly representable in fp32
//   keep    = uniform < p                    p rounded to fp32 first
// `stream` separates independent draws over the same elements (one per model
// in a merge). Four consecutive elements share one Philox block.
#pragma once
#include <cstdint>

#include "deltaops/hd.h"

namespace deltaops {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

struct Philox4 {
  uint32_t v[4];
};

DELTAOPS_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

DELTAOPS_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                  uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#else
#pragma GCC unroll 10
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = mulhi32(kPhiloxM0, c0);
    const uint32_t lo0 = kPhiloxM0 * c0;
    const uint32_t hi1 = mulhi32(kPhiloxM1, c2);
    const uint32_t lo1 = kPhiloxM1 * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The Philox block that holds elements [4*block, 4*block + 4).
DELTAOPS_HD Philox4 philox_block(uint64_t seed, uint32_t stream, uint64_t block) {
  return philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                       stream, 0u, static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

DELTAOPS_HD uint32_t philox_word(uint64_t seed, uint32_t stream, uint64_t index) {
  return philox_block(seed, stream, index >> 2).v[index & 3];
}

// 24 random bits scaled into [0, 1); exact in fp32 on every backend.
DELTAOPS_HD float uniform_from_word(uint32_t word) {
  return static_cast<float>(word >> 8) * 5.9604644775390625e-08f;  // 2^-24
}

DELTAOPS_HD bool keep_from_word(uint32_t word, float keep_probability) {
  return uniform_from_word(word) < keep_probability;
}

}  // namespace deltaops
