// Table of the raw-pointer loops behind deltaops._C (the sparse-delta family).
//
// The loops live in kernels.inc, which is compiled twice: once for the build's
// baseline ISA (kernels_baseline.cpp, x86-64-v3 by default) and once for
// AVX-512 (kernels_avx512.cpp). Each copy sits in its own namespace and fills
// one `Kernels` table; sparse_cpu.cpp picks a table at run time
// (__builtin_cpu_supports) and does everything else (tensors, validation,
// threading with at::parallel_for).
//
// Only plain data and function pointers cross this boundary, so no inline
// function or template is shared between the ISA-specific translation units
// (which would let AVX-512 code leak into baseline code paths at link time).
//
// Conventions: element ranges are [begin, end) in flat element indices of the
// tensor whose base pointer is passed; dtype codes index the tables.
#pragma once
#include <cstdint>

namespace deltaops {
namespace cpu {

enum DTypeCode : int { kF32 = 0, kBF16 = 1, kF16 = 2, kNumDTypes = 3 };
enum IndexCode : int { kI32 = 0, kI64 = 1 };

constexpr int kBins16 = 1 << 15;        // 16-bit keys and fp32 level 0
constexpr int kBinsLevel1 = 1 << 16;    // fp32 level 1

// Result of the read-only pass over COO indices.
struct CooScan {
  int64_t min;
  int64_t max;
  bool ordered;  // idx[i] > idx[i - 1] for every i in (max(begin, 1) - 1, end)
};

struct Kernels {
  const char* name;

  // ---- histograms: `nsub` sub-histograms of uint32 counts, laid out one after
  // the other (each kBins16 or kBinsLevel1 long); n < 2^31 per call.
  void (*hist16)(const uint16_t* x, int64_t n, uint32_t* sub, int nsub);
  // fp32 level 0 (bin = key >> 16); returns whether a NaN key was seen.
  bool (*hist32_level0)(const uint32_t* x, int64_t n, uint32_t* sub, int nsub);
  // fp32 level 1 (bin = key & 0xFFFF among keys with key >> 16 == prefix).
  void (*hist32_level1)(const uint32_t* x, int64_t n, uint32_t prefix, uint32_t* sub, int nsub);

  // ---- threshold masks over the magnitude keys of 16- or 32-bit patterns.
  // count of key == t in [0, n)
  int64_t (*count_equal16)(const uint16_t* x, int64_t n, uint32_t t);
  int64_t (*count_equal32)(const uint32_t* x, int64_t n, uint32_t t);
  // out[i] = key > t (inclusive: key >= t)
  void (*mask16)(const uint16_t* x, int64_t n, uint32_t t, bool inclusive, uint8_t* out);
  void (*mask32)(const uint32_t* x, int64_t n, uint32_t t, bool inclusive, uint8_t* out);

  // ---- Philox
  void (*philox_uniform)(float* out, int64_t begin, int64_t end, uint64_t seed, uint32_t stream);
  // [delta dtype][rescale]
  void (*dare[kNumDTypes][2])(const void* delta, void* out, int64_t begin, int64_t end,
                              uint64_t seed, uint32_t stream, float density);

  // ---- applying deltas: [weight dtype][delta/values dtype]
  void (*apply_dense[kNumDTypes][kNumDTypes])(void* weight, const void* delta, int64_t begin,
                                              int64_t end, float alpha);
  // [index type]
  void (*coo_scan[2])(const void* indices, int64_t begin, int64_t end, CooScan* out);
  // [weight dtype][values dtype][index type]; indices/values range [begin, end)
  void (*apply_coo[kNumDTypes][kNumDTypes][2])(void* weight, const void* indices,
                                               const void* values, int64_t begin, int64_t end,
                                               float alpha);
  // set bits of packed[0, nbytes)
  int64_t (*popcount)(const uint8_t* packed, int64_t nbytes);
  // elements [begin, end) (begin a multiple of 8) with their values starting
  // at values[value_begin] (values holds nvalues in all); bits past `end` in
  // the last byte must be zero.
  void (*apply_bitmask[kNumDTypes][kNumDTypes])(void* weight, const uint8_t* packed,
                                                const void* values, int64_t nvalues,
                                                int64_t begin, int64_t end, int64_t value_begin,
                                                float alpha);
};

namespace baseline {
extern const Kernels kKernels;
}
#if defined(__x86_64__) || defined(_M_X64)
#define DELTAOPS_HAVE_AVX512_KERNELS 1
namespace avx512 {
extern const Kernels kKernels;
}
#endif

}  // namespace cpu
}  // namespace deltaops
