// deltaops._C: the low-bit delta family on CPU tensors (tensors, validation,
// threading, loops). Per-element math: csrc/include/deltaops/quant.h, shared
// with the CUDA kernels; python/deltaops/reference/quant.py is the spec.
//
// Threading: fixed-size chunks of elements, handed out to at::parallel_for
// threads one at a time (parallel_chunks; chunk sizes are a multiple
// of 8, so every chunk starts on a byte boundary of any packed stream: eight
// codes fill `bits` whole bytes). Results never depend on the thread count:
// codes and applies are element-wise, and the exact-mean bins are integer
// sums. Two implementations: where the kernel table in use is "avx512"
// (sparse_cpu.cpp's run-time choice), the AVX-512 kernels of the section
// below (codes made and packed in registers, one read of the input per
// chunk); elsewhere the portable loops, where each chunk decodes (or
// encodes) its codes through a small uint8 buffer and runs a plain loop per
// (row, group) segment, which the compiler vectorizes (the build baseline is
// x86-64-v3; contraction is off). tests/test_quant_cpu_fast.py runs both.
// Floating-point operations never trap in deltaops (torch runs with exceptions
// masked): let GCC inline rintf as a vector round and vectorize the code
// loops. This allows no reassociation, contraction or change of rounding.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include "quant_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__) || defined(_M_X64)
// GCC 12 reports -Wmaybe-uninitialized inside the intrinsics headers once inlined.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

#include "deltaops/bits.h"
#include "deltaops/quant.h"
#include "chunk_loop.h"
#include "sparse_cpu.h"

namespace deltaops {
namespace cpu {
namespace {

using namespace deltaops::quant;

constexpr int64_t kChunk = 1 << 14;  // elements per task: a multiple of 8

// ---- dispatch -------------------------------------------------------------------------

template <typename F>
void with_dtype(const at::Tensor& t, const char* name, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat: f(float{}); return;
    case at::kBFloat16: f(bf16_t{}); return;
    case at::kHalf: f(fp16_t{}); return;
    default:
      throw TypeError(std::string(name) + " must be float32, bfloat16 or float16, got " +
                      std::string(c10::toString(t.scalar_type())));
  }
}

template <typename F>
void with_bits(int64_t bits, F&& f) {
  switch (bits) {
    case 1: f(std::integral_constant<int, 1>{}); return;
    case 2: f(std::integral_constant<int, 2>{}); return;
    case 3: f(std::integral_constant<int, 3>{}); return;
    case 4: f(std::integral_constant<int, 4>{}); return;
    case 8: f(std::integral_constant<int, 8>{}); return;
    default:
      throw ValueError("bits must be one of 1, 2, 3, 4, 8; got " + std::to_string(bits));
  }
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "deltaops._C: ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "deltaops._C: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "deltaops._C: ", name, " must be contiguous");
}

void check_dtype(const at::Tensor& t, at::ScalarType type, const char* name, const char* expected) {
  if (t.scalar_type() != type)
    throw TypeError(std::string(name) + " must be " + expected + ", got " +
                    std::string(c10::toString(t.scalar_type())));
}

// (rows, cols) with the input dimension last.
std::pair<int64_t, int64_t> rows_cols(const at::Tensor& t, const char* name) {
  if (t.dim() == 0)
    throw ValueError(std::string(name) + " must have at least one dimension (the input dimension is the last)");
  const int64_t cols = t.size(-1);
  return {cols ? t.numel() / cols : 0, cols};
}

// ---- packed streams -------------------------------------------------------------------------

// The `bits` bytes of unit u (eight codes), fewer at the end of the stream.
template <int BITS>
inline uint64_t read_unit(const uint8_t* packed, int64_t nbytes, int64_t unit) {
  uint64_t word = 0;
  const int64_t at = unit * BITS;
  std::memcpy(&word, packed + at, static_cast<size_t>(std::min<int64_t>(BITS, nbytes - at)));
  return word;
}

#if defined(__BMI2__)
// Eight codes of BITS bits <-> one byte lane each: pdep/pext with the mask that
// keeps the low BITS bits of every byte (BMI2; the x86-64-v3 baseline has it).
template <int BITS>
constexpr uint64_t lane_mask() {
  return 0x0101010101010101ull * ((1ull << BITS) - 1ull);
}
#endif

// Four 3-bit codes of each 12-bit value, one per byte (little-endian uint32).
const std::vector<uint32_t>& lut3() {
  static const std::vector<uint32_t> table = [] {
    std::vector<uint32_t> t(4096);
    for (uint32_t v = 0; v < 4096; ++v)
      t[v] = (v & 7u) | (((v >> 3) & 7u) << 8) | (((v >> 6) & 7u) << 16) | (((v >> 9) & 7u) << 24);
    return t;
  }();
  return table;
}

// codes[0, count) of the stream from code `first` (a multiple of 8).
template <int BITS>
void decode(const uint8_t* packed, int64_t nbytes, int64_t first, int64_t count, uint8_t* codes) {
  constexpr uint32_t mask = (1u << BITS) - 1u;
  const int64_t unit0 = first / 8, units = (count + 7) / 8;
  if (BITS == 8) {
    std::memcpy(codes, packed + first, static_cast<size_t>(count));
    return;
  }
  const int64_t full = count / 8;
  const uint8_t* p = packed + unit0 * BITS;
#if defined(__BMI2__)
  if (BITS == 3) {  // 12 bits -> four codes through a table (pdep is slow on some CPUs)
    const uint32_t* lut = lut3().data();
    for (int64_t u = 0; u < full; ++u) {
      const uint32_t word = uint32_t(p[u * 3]) | (uint32_t(p[u * 3 + 1]) << 8) | (uint32_t(p[u * 3 + 2]) << 16);
      const uint32_t lo = lut[word & 0xFFFu], hi = lut[word >> 12];
      std::memcpy(codes + u * 8, &lo, 4);
      std::memcpy(codes + u * 8 + 4, &hi, 4);
    }
  } else {
    for (int64_t u = 0; u < full; ++u) {
      uint64_t word = 0;
      std::memcpy(&word, p + u * BITS, BITS);
      const uint64_t lanes = _pdep_u64(word, lane_mask<BITS>());
      std::memcpy(codes + u * 8, &lanes, 8);
    }
  }
#else
  for (int64_t u = 0; u < full; ++u) {
    uint64_t word = 0;
    std::memcpy(&word, p + u * BITS, BITS);
    for (int s = 0; s < 8; ++s) codes[u * 8 + s] = static_cast<uint8_t>((word >> (s * BITS)) & mask);
  }
#endif
  if (full < units) {  // the last, partial unit
    const uint64_t word = read_unit<BITS>(packed, nbytes, unit0 + full);
    for (int64_t i = full * 8; i < count; ++i)
      codes[i] = static_cast<uint8_t>((word >> ((i - full * 8) * BITS)) & mask);
  }
}

// Pack codes[0, count) as the stream bytes from code `first` (a multiple of 8).
template <int BITS>
void encode(const uint8_t* codes, int64_t first, int64_t count, uint8_t* packed, int64_t nbytes) {
  const int64_t unit0 = first / 8, full = count / 8;
  uint8_t* p = packed + unit0 * BITS;
  if (BITS == 8) {
    std::memcpy(p, codes, static_cast<size_t>(count));
    return;
  }
  for (int64_t u = 0; u < full; ++u) {
#if defined(__BMI2__)
    uint64_t lanes;
    std::memcpy(&lanes, codes + u * 8, 8);
    const uint64_t word = _pext_u64(lanes, lane_mask<BITS>());
#else
    const uint64_t word = pack8(codes + u * 8, BITS);
#endif
    std::memcpy(p + u * BITS, &word, BITS);
  }
  if (full * 8 < count) {
    uint8_t last[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = full * 8; i < count; ++i) last[i - full * 8] = codes[i];
    const uint64_t word = pack8(last, BITS);
    const int64_t at = (unit0 + full) * BITS;
    std::memcpy(packed + at, &word, static_cast<size_t>(std::min<int64_t>(BITS, nbytes - at)));
  }
}

void validate_stream(const at::Tensor& packed, int64_t bits, int64_t numel) {
  const int64_t expected = packed_nbytes(numel, static_cast<int>(bits));
  if (packed.numel() != expected)
    throw ValueError("packed has " + std::to_string(packed.numel()) + " bytes; " +
                     std::to_string(numel) + " codes of " + std::to_string(bits) + " bits need " +
                     std::to_string(expected));
  const int used = static_cast<int>((numel * bits) % 8);
  if (used) {
    const uint8_t last = packed.data_ptr<uint8_t>()[expected - 1];
    if (last >> used)
      throw ValueError("padding bits of the last byte of packed must be zero (" +
                       std::to_string(used) + " valid bits)");
  }
}

// ---- exact mean |x| ------------------------------------------------------------------------

// Exact |x| sums, kExponentBins bins of 128 bits (lo + 2^64 hi): see quant.h.
struct AbsBins {
  uint64_t lo[kExponentBins];
  uint64_t hi[kExponentBins];
  void clear() {
    std::memset(lo, 0, sizeof(lo));
    std::memset(hi, 0, sizeof(hi));
  }
  void add(int e, uint64_t v) {
    lo[e] += v;
    hi[e] += lo[e] < v;  // carry
  }
  void merge(const AbsBins& o) {
    for (int e = 0; e < kExponentBins; ++e) {
      add(e, o.lo[e]);
      hi[e] += o.hi[e];
    }
  }
};

constexpr int64_t kSumBlock = 1 << 14;  // elements summed in one 64-bit lane set (< 2^62)

// Adds |x[0, n)| into bins one element at a time (each to its exponent's bin):
// every non-zero element whose fp32 exponent is below `below` (all of them by
// default; a block's window sum passes its own lowest exponent).
template <typename T>
void add_abs_each(const T* x, int64_t n, AbsBins& bins, int32_t below = kExponentBins) {
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t u = f32_bits(load_f32(x[i])) & 0x7FFFFFFFu;
    const int32_t ex = static_cast<int32_t>(u >> 23);
    if (ex < below && u != 0u) bins.add(ex, (u & 0x7FFFFFu) | (ex ? 0x800000u : 0u));
  }
}

// Adds |x[b, e)| into bins; false if a value is NaN or inf. Fast path, per
// block: with E the block's largest exponent, every element with exponent
// >= E - 24 adds m << (e - (E - 24)) (< 2^48) into one integer sum (a
// vectorized loop), credited to bin E - 24; the rare smaller non-zero
// elements go to their own bins one by one. Integer sums: exact, any order.
template <typename T>
bool add_abs_bins(const T* __restrict x, int64_t b, int64_t e, AbsBins& bins) {
  for (int64_t blk = b; blk < e; blk += kSumBlock) {
    const int64_t end = std::min(e, blk + kSumBlock);
    uint32_t worst = 0;
    for (int64_t i = blk; i < end; ++i) worst = std::max(worst, f32_bits(load_f32(x[i])) & 0x7FFFFFFFu);
    if (worst >= 0x7F800000u) return false;
    const int32_t top = static_cast<int32_t>(worst >> 23);
    const int32_t base = top - 24;
    if (base < 1) {  // tiny values only: bin by bin
      add_abs_each(x + blk, end - blk, bins);
      continue;
    }
    uint64_t sum = 0;
    uint32_t small = 0;
    for (int64_t i = blk; i < end; ++i) {
      const uint32_t u = f32_bits(load_f32(x[i])) & 0x7FFFFFFFu;
      const int32_t ex = static_cast<int32_t>(u >> 23);
      const uint64_t m = (u & 0x7FFFFFu) | 0x800000u;
      const bool in_window = ex >= base;
      sum += in_window ? (m << static_cast<uint32_t>(ex - base)) : 0u;
      small |= (!in_window && u != 0u) ? 1u : 0u;
    }
    bins.add(base, sum);
    if (small) add_abs_each(x + blk, end - blk, bins, base);
  }
  return true;
}

template <typename T>
[[noreturn]] void throw_nonfinite(const T* x, int64_t n, const char* name) {
  int64_t first = 0;
  while (first < n && (f32_bits(load_f32(x[first])) & 0x7FFFFFFFu) < 0x7F800000u) ++first;
  throw ValueError(std::string(name) + " contains NaN or inf (first at flat index " +
                   std::to_string(first) + "); low-bit quantizers need finite values");
}

// The exact mean |x| of a whole tensor of n elements: integer bins per chunk of
// 2^18 elements (add_chunk(b, e, bins) adds x[b, e) and returns false on
// NaN/inf, which clears `finite`), merged in chunk order.
template <typename AddChunk>
float whole_abs_mean(int64_t n, std::atomic<bool>& finite, const AddChunk& add_chunk) {
  const int64_t chunk = int64_t(1) << 18;
  const int64_t nchunks = (n + chunk - 1) / chunk;
  std::vector<AbsBins> chunk_bins(static_cast<size_t>(std::max<int64_t>(nchunks, 1)));
  parallel_chunks(n, chunk, [&](int64_t b, int64_t e) {
    AbsBins& bins = chunk_bins[b / chunk];
    bins.clear();
    if (!add_chunk(b, e, bins)) finite = false;
  });
  AbsBins total;
  total.clear();
  for (int64_t c = 0; c < nchunks; ++c) total.merge(chunk_bins[c]);
  return abs_mean_from_bins(total.lo, n, total.hi);
}

// Exact mean |x| of each row (per_row) or of the whole tensor; throws on NaN/inf.
template <typename T>
std::vector<float> abs_means(const T* x, int64_t rows, int64_t cols, bool per_row) {
  const int64_t n = rows * cols;
  std::atomic<bool> finite{true};
  if (per_row) {
    std::vector<float> means(rows);
    at::parallel_for(0, rows, std::max<int64_t>(1, kChunk / std::max<int64_t>(cols, 1)),
                     [&](int64_t rb, int64_t re) {
      AbsBins bins;
      for (int64_t r = rb; r < re; ++r) {
        bins.clear();
        if (!add_abs_bins(x, r * cols, (r + 1) * cols, bins)) finite = false;
        means[r] = abs_mean_from_bins(bins.lo, cols, bins.hi);
      }
    });
    if (!finite) throw_nonfinite(x, n, "x");
    return means;
  }
  const float mean = whole_abs_mean(n, finite, [&](int64_t b, int64_t e, AbsBins& bins) {
    return add_abs_bins(x, b, e, bins);
  });
  if (!finite) throw_nonfinite(x, n, "x");
  return {mean};
}

// Encode x into `bits`-bit codes, chunk by chunk: code_of(T* x, begin, end, codes) fills
// codes[0, end - begin).
template <int BITS, typename CodeFill>
at::Tensor encode_all(int64_t n, const at::TensorOptions& options, const CodeFill& fill) {
  const int64_t nbytes = packed_nbytes(n, BITS);
  at::Tensor packed = new_output({nbytes}, options.dtype(at::kByte));
  uint8_t* out = packed.data_ptr<uint8_t>();
  parallel_chunks(n, kChunk, [&](int64_t b, int64_t e) {
    uint8_t codes[kChunk];
    fill(b, e, codes);
    encode<BITS>(codes, b, e - b, out, nbytes);
  });
  return packed;
}

// The code loops, on restrict pointers: uint8_t stores may alias anything,
// and without the promise the compiler leaves these loops scalar.
template <typename T>
void sign_codes(const T* __restrict x, int64_t n, uint8_t* __restrict codes) {
  for (int64_t i = 0; i < n; ++i) codes[i] = static_cast<uint8_t>(sign_code(load_f32(x[i])));
}

template <typename T>
void scaled_codes(const T* __restrict x, int64_t n, float s, float z, float maxq,
                  uint8_t* __restrict codes) {
  for (int64_t i = 0; i < n; ++i)
    codes[i] = static_cast<uint8_t>(uniform_code_scaled(load_f32(x[i]), s, z, maxq));
}

// Per-thread scratch of at least n elements of T, kept between calls (one
// buffer per thread and element type).
template <typename T>
T* thread_scratch(int64_t n) {
  static thread_local std::vector<T> scratch;
  if (scratch.size() < static_cast<size_t>(n)) scratch.resize(static_cast<size_t>(n));
  return scratch.data();
}

// A driver's per-call bookkeeping (a sample, per-chunk sums and histograms):
// n copies of `fill` in a vector the calling thread keeps between calls, one
// per Role (a tag type, usually declared where it is used). Why: the op's
// large output comes from glibc's heap, and vectors made and freed beside it
// on every call fragment that heap, so that some calls find no hole for the
// output and grow the heap again (hundreds of page faults: 5-14 ms for a
// 3.5 ms ComPEFT call in bench/quant.py's sequence of formats; with the
// bookkeeping kept, fewer such calls, not none, as the heap is shared with
// the rest of the process). Vectors above kKeptBytes are given back when the
// call ends. Captured by reference in the workers' lambdas (a thread_local
// named there would be the worker's own).
template <typename T, typename Role>
class KeptVector {
 public:
  static constexpr size_t kKeptBytes = size_t(1) << 20;
  KeptVector(int64_t n, const T& fill) : v_(calling_thread()) { v_.assign(static_cast<size_t>(n), fill); }
  ~KeptVector() {
    if (v_.capacity() * sizeof(T) > kKeptBytes) std::vector<T>().swap(v_);
  }
  KeptVector(const KeptVector&) = delete;
  KeptVector& operator=(const KeptVector&) = delete;
  T& operator[](int64_t i) { return v_[static_cast<size_t>(i)]; }
  const T& operator[](int64_t i) const { return v_[static_cast<size_t>(i)]; }
  T* data() { return v_.data(); }
  const std::vector<T>& vector() const { return v_; }
  auto begin() { return v_.begin(); }
  auto end() { return v_.end(); }

 private:
  static std::vector<T>& calling_thread() {
    static thread_local std::vector<T> kept;
    return kept;
  }
  std::vector<T>& v_;
};

// ---- ComPEFT: the sampled band of keys (AVX-512 table), fp64 moments (portable table) ----

constexpr int64_t kCompeftChunk = int64_t(1) << 16;  // a multiple of 32: chunks start on whole bytes of codes
constexpr int64_t kCompeftSample = int64_t(1) << 16;
constexpr int64_t kMaxBandCells = int64_t(1) << 22;  // per-chunk band histograms: 16 MiB at most
// Band elements a chunk keeps aside (at most n / 2 bytes in all for 16-bit
// types); a chunk with more (heavy ties at the threshold) is rewritten from x
// once the threshold is known.
constexpr int64_t kKeptPerChunk = kCompeftChunk / 8;

// A band [lo, hi] of magnitude keys that should hold the k-th largest
// (1 <= k <= n), and `guess`, the sample's own k-th largest: order statistics
// of a strided sample, the band widened by six standard deviations of the
// sample rank (plus 16). Only the speed depends on them: the caller counts what
// the band holds and falls back to the full top-k when it misses. Small
// tensors take every key. The keys are 16-bit: |x|'s pattern for bf16/fp16,
// its top 16 bits (key >> 15: exponent and 8 mantissa bits) for fp32.
struct CompeftBand {
  uint32_t lo, guess, hi;
};

inline uint32_t coarse_key(uint16_t bits) { return bits & 0x7FFFu; }
inline uint32_t coarse_key(uint32_t bits) { return (bits & 0x7FFFFFFFu) >> 15; }

template <typename U>
CompeftBand compeft_band(const U* bits, int64_t n, int64_t k) {
  constexpr int64_t S = kCompeftSample;
  constexpr uint32_t kTop = sizeof(U) == 2 ? 0x7FFFu : 0xFFFFu;
  if (n <= 2 * S) return {0, kTop, kTop};
  KeptVector<uint16_t, struct SampleKeys> sample(S, 0);
  at::parallel_for(0, S, 4096, [&](int64_t jb, int64_t je) {
    for (int64_t j = jb; j < je; ++j) sample[j] = coarse_key(bits[j * n / S]);  // j * n < 2^63 for n < 2^47
  });
  KeptVector<int32_t, struct SampleKeyCounts> count(kTop + 1, 0);  // the sample's keys, counted (no sort)
  for (const uint16_t key : sample) ++count[key];
  // the key of sample rank r, counting from the largest (rank 0)
  auto key_of_rank = [&](int64_t r) {
    int64_t key = kTop;
    for (int64_t seen = count[key]; seen <= r; seen += count[key]) --key;
    return static_cast<uint32_t>(key);
  };
  const double p = static_cast<double>(k) / static_cast<double>(n);
  const int64_t rank = std::min<int64_t>(S - 1, static_cast<int64_t>(static_cast<double>(k - 1) * S / n));
  const int64_t margin = static_cast<int64_t>(6.0 * std::sqrt(S * p * (1.0 - p))) + 16;
  return {rank + margin >= S ? 0u : key_of_rank(rank + margin), key_of_rank(rank),
          rank - margin < 0 ? kTop : key_of_rank(rank - margin)};
}

// [sum x, sum x^2, h] of x[0, n) in fp64 (compeft_quantize's moments, for the
// portable table, which then takes topk_mask and compeft_pack): per chunk 8
// lanes, each adding at most kCompeftChunk / 8 terms, a 3-level tree, then the
// chunks in order. False when x holds NaN or inf (the sums show it:
// finite fp32 values cannot overflow them).
template <typename T>
bool compeft_moments(const T* x, int64_t n, double* moments) {
  const int64_t nchunks = (n + kCompeftChunk - 1) / kCompeftChunk;
  std::vector<double> chunk_s1(static_cast<size_t>(nchunks)), chunk_s2(static_cast<size_t>(nchunks));
  parallel_chunks(n, kCompeftChunk, [&](int64_t b, int64_t e) {
    double s1[8] = {}, s2[8] = {};
    int64_t i = b;
    for (; i + 8 <= e; i += 8) {
      for (int j = 0; j < 8; ++j) {
        const double d = load_f32(x[i + j]);
        s1[j] += d;
        s2[j] += d * d;  // exact
      }
    }
    for (int j = 0; i < e; ++i, ++j) {
      const double d = load_f32(x[i]);
      s1[j] += d;
      s2[j] += d * d;
    }
    for (int width = 4; width >= 1; width /= 2) {
      for (int j = 0; j < width; ++j) {
        s1[j] += s1[j + width];
        s2[j] += s2[j + width];
      }
    }
    chunk_s1[b / kCompeftChunk] = s1[0];
    chunk_s2[b / kCompeftChunk] = s2[0];
  });
  moments[0] = moments[1] = 0.0;
  for (int64_t c = 0; c < nchunks; ++c) {
    moments[0] += chunk_s1[c];
    moments[1] += chunk_s2[c];
  }
  moments[2] = static_cast<double>(kCompeftChunk / 8 + 3 + nchunks);
  return std::isfinite(moments[0]) && std::isfinite(moments[1]);
}

// ---- AVX-512 kernels ------------------------------------------------------------------------
// Chosen at run time when the kernel table in use is "avx512" (sparse_cpu.cpp:
// the CPU check, DELTAOPS_CPU_ISA and deltaops._C._set_isa apply here too); the
// loops above are the portable path. Every function with AVX-512 code carries
// the target attribute itself (no pragma), lives in this anonymous namespace
// and is not shared with baseline code. The arithmetic is the per-element math
// of quant.h written with intrinsics, with the same roundings: vdivps is the
// correctly rounded fp32 division, vrndscaleps with imm 8 rounds half to even,
// products and sums are separate instructions (no FMA).
//
// Codes are made and consumed in units of 16 elements starting at flat
// indices that are multiples of 16 (2 * bits whole bytes of the stream).
// Chunks are multiples of 16 elements, so a unit never spans two chunks; a
// unit whose elements belong to two (row, group) segments takes per-lane
// scales and zero points, and the last, partial unit of the stream goes
// through the byte-buffer encode/decode above.
#if defined(__x86_64__) && defined(__GNUC__)
#define DELTAOPS_QUANT_AVX512 1
// GCC 12 reports the _mm*_undefined_* placeholders of the intrinsics as
// uninitialized where they are inlined into the functions below.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#define DQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,bmi,bmi2")))

bool use_avx512() { return isa() == "avx512"; }

// The low `bits` bits of every byte: eight byte-lane codes <-> `bits` packed bytes.
constexpr uint64_t byte_lane_mask(int bits) { return 0x0101010101010101ull * ((1ull << bits) - 1ull); }

// ---- loads and stores of 16 elements (fp32 bits / fp32 values) ----

DQ_AVX512 inline __m512i load_bits16(const float* p) { return _mm512_loadu_si512(p); }
DQ_AVX512 inline __m512i load_bits16(const bf16_t* p) {
  return _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
}
// vcvtph2ps is exact (fp16 -> fp32 always is); it quiets a signaling NaN,
// which only ever meets the NaN checks or a NaN result (see store16).
DQ_AVX512 inline __m512i load_bits16(const fp16_t* p) {
  return _mm512_castps_si512(_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
}
// Masked: lanes outside `m` read as +0.0 (and no memory outside them is touched).
DQ_AVX512 inline __m512i load_bits16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_epi32(m, p); }
DQ_AVX512 inline __m512i load_bits16(const bf16_t* p, __mmask16 m) {
  return _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16);
}
DQ_AVX512 inline __m512i load_bits16(const fp16_t* p, __mmask16 m) {
  return _mm512_castps_si512(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)));
}
template <typename T>
DQ_AVX512 inline __m512 load16(const T* p) { return _mm512_castsi512_ps(load_bits16(p)); }
template <typename T>
DQ_AVX512 inline __m512 load16(const T* p, __mmask16 m) { return _mm512_castsi512_ps(load_bits16(p, m)); }

// fp32 -> storage, rounding to nearest even as store_from_f32 does.
DQ_AVX512 inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
DQ_AVX512 inline void store16(bf16_t* p, __m512 v, __mmask16 m) {
  // f32_to_bf16: (u + 0x7FFF + ((u >> 16) & 1)) >> 16; NaN -> sign | 0x7FC0
  // (NaN is rare: tested once, then a second pass for it)
  const __m512i u = _mm512_castps_si512(v);
  const __m512i hi = _mm512_srli_epi32(u, 16);
  const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(hi, _mm512_set1_epi32(1)));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  const __mmask16 nan = _mm512_fpclass_ps_mask(v, 0x81);  // QNaN | SNaN
  if (__builtin_expect(nan != 0, 0))
    r = _mm512_mask_blend_epi32(nan, r, _mm512_or_si512(_mm512_and_si512(hi, _mm512_set1_epi32(0x8000)),
                                                        _mm512_set1_epi32(0x7FC0)));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}
DQ_AVX512 inline void store16(fp16_t* p, __m512 v, __mmask16 m) {
  // vcvtps2ph with round-to-nearest-even is f32_to_fp16 on every non-NaN value
  // (subnormal results and overflow to inf included); NaN -> sign | 0x7E00 as there.
  __m256i r = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __mmask16 nan = _mm512_fpclass_ps_mask(v, 0x81);  // QNaN | SNaN (rare: tested once)
  if (__builtin_expect(nan != 0, 0)) {
    const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(v), 16), _mm512_set1_epi32(0x8000));
    r = _mm256_mask_blend_epi16(nan, r, _mm512_cvtepi32_epi16(_mm512_or_si512(sign, _mm512_set1_epi32(0x7E00))));
  }
  _mm256_mask_storeu_epi16(p, m, r);
}

DQ_AVX512 inline __mmask16 first_lanes(int64_t len) {
  return len >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << len) - 1u);
}

// f(i, len, m, v) for the vectors of 32 16-bit patterns v = h[i, i + len) of
// [b, e) (lanes past len read 0; m: the lanes read, and no memory past them is
// touched). The whole vectors run in a loop of their own, where len and m are
// constants the compiler folds into f (a loop that computed them for every
// vector ran ComPEFT's scan 15% slower), then the partial last one.
template <typename F>
DQ_AVX512 inline __attribute__((always_inline)) void for_patterns32(const uint16_t* h, int64_t b, int64_t e,
                                                                    const F& f) {
  const int64_t full = b + ((e - b) & ~int64_t(31));
  for (int64_t i = b; i < full; i += 32) f(i, int64_t(32), __mmask32(0xFFFFFFFFu), _mm512_loadu_si512(h + i));
  if (full < e) {
    const __mmask32 m = static_cast<__mmask32>((1u << (e - full)) - 1u);
    f(full, e - full, m, _mm512_maskz_loadu_epi16(m, h + full));
  }
}

// Ternary 2-bit codes of the lanes in m (the first `len` elements of a unit of
// 16 or 32 at out): 2 where kept and not negative, 0 where kept and negative,
// 1 elsewhere, as a low bit "not kept" and a high bit "kept and positive"
// interleaved with pdep. The unit's whole bytes, or at the stream's end only
// the bytes of its `len` codes (padding bits zero).
DQ_AVX512 inline void store_ternary_codes(uint32_t kept, uint32_t negative, uint32_t m, int64_t len, uint8_t* out) {
  const uint64_t low = ~kept & m, high = kept & ~negative & m;
  const uint64_t word = _pdep_u64(low, 0x5555555555555555ull) | _pdep_u64(high, 0xAAAAAAAAAAAAAAAAull);
  if (len == 32)  // whole units: one fixed-size store (a variable-size copy is a call)
    std::memcpy(out, &word, 8);
  else if (len == 16)
    std::memcpy(out, &word, 4);
  else
    std::memcpy(out, &word, static_cast<size_t>((len + 3) / 4));
}

// ---- codes <-> packed units ----

// 16 codes (int32 lanes, each < 2^BITS) -> the 2 * BITS bytes of their unit.
template <int BITS>
DQ_AVX512 inline void pack16(__m512i q, uint8_t* out) {
  if constexpr (BITS == 4) {  // code pairs in each 64-bit lane: c0 | c1 << 4 in its low byte
    const __m512i pairs = _mm512_or_si512(q, _mm512_srli_epi64(q, 28));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm512_cvtepi64_epi8(pairs));
    return;
  }
  const __m128i b = _mm512_cvtepi32_epi8(q);
  if constexpr (BITS == 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), b);
  } else {
    constexpr uint64_t mask = byte_lane_mask(BITS);
    const uint64_t lo = _pext_u64(static_cast<uint64_t>(_mm_cvtsi128_si64(b)), mask);
    const uint64_t hi = _pext_u64(static_cast<uint64_t>(_mm_extract_epi64(b, 1)), mask);
    const uint64_t word = lo | (hi << (8 * BITS));
    std::memcpy(out, &word, 2 * BITS);
  }
}

// 64 codes (four units, int32 lanes, each < 2^BITS) -> their 8 * BITS bytes,
// for BITS = 2, 3 or 4, with fewer operations than four pack16 calls:
// saturating packs put each run of four consecutive codes in one byte
// quadruple (dword 4 L + k holds codes 16 k + 4 L .. + 3), one multiply-add
// pair joins each quadruple into a 4 * BITS bit field, a dword permutation
// restores element order, and the fields are narrowed into bytes.
template <int BITS>
DQ_AVX512 inline void pack64(__m512i q0, __m512i q1, __m512i q2, __m512i q3, uint8_t* out) {
  static_assert(BITS >= 2 && BITS <= 4, "pack64 packs 2- to 4-bit codes");
  const __m512i bytes = _mm512_packus_epi16(_mm512_packs_epi32(q0, q1), _mm512_packs_epi32(q2, q3));
  // c0 + c1 << BITS per byte pair, then per word pair: a 4 * BITS bit field per dword
  const __m512i pairs = _mm512_maddubs_epi16(bytes, _mm512_set1_epi16(int16_t(1 | (1 << (8 + BITS)))));
  const __m512i fields = _mm512_madd_epi16(pairs, _mm512_set1_epi32(1 | (1 << (16 + 2 * BITS))));
  const __m512i ordered = _mm512_permutexvar_epi32(
      _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), fields);
  if constexpr (BITS == 2) {  // one byte per field
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm512_cvtepi32_epi8(ordered));
  } else if constexpr (BITS == 4) {  // two bytes per field
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(ordered));
  } else {  // two 12-bit fields per 3 bytes
    const __m512i joined = _mm512_or_si512(ordered, _mm512_srli_epi64(ordered, 20));
    const __m256i threes = _mm256_shuffle_epi8(
        _mm512_cvtepi64_epi32(joined),
        _mm256_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1,
                         0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1));
    const __m256i packed = _mm256_permutevar8x32_epi32(threes, _mm256_setr_epi32(0, 1, 2, 4, 5, 6, 7, 7));
    _mm256_mask_storeu_epi8(out, 0x00FFFFFF, packed);
  }
}

// The 16 codes of a unit (2 * BITS bytes) as int32 lanes, without a
// round trip through memory: the unit's bytes in every 128-bit lane, code j's two bytes
// (byte (BITS * j) / 8 and the next) shuffled into lane j, shifted right by
// (BITS * j) % 8 and masked.
template <int BITS>
struct Unpacker {
  __m512i ctrl, shift, mask;
  DQ_AVX512 Unpacker() {
    alignas(64) int32_t c[16], sh[16];
    for (int j = 0; j < 16; ++j) {
      const int bit = BITS * j, byte = bit / 8;
      c[j] = byte | ((byte + 1) << 8) | int32_t(0x80800000u);  // 0x80: a zero byte
      sh[j] = bit % 8;
    }
    ctrl = _mm512_load_si512(c);
    shift = _mm512_load_si512(sh);
    mask = _mm512_set1_epi32((1 << BITS) - 1);
  }
  // The codes with the bits of the next ones above them (BITS < 8): enough
  // for a table lookup that reads an index's low 4 bits (apply_table).
  DQ_AVX512 inline __m512i unmasked(const uint8_t* in) const {
    if constexpr (BITS == 8) {
      return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in)));
    } else {
      __m128i bytes;  // exactly the unit's 2 * BITS bytes
      if constexpr (BITS == 4) {
        bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(in));
      } else if constexpr (BITS == 1) {
        uint16_t v;
        std::memcpy(&v, in, 2);
        bytes = _mm_cvtsi32_si128(v);
      } else {
        uint32_t lo;
        std::memcpy(&lo, in, 4);
        bytes = _mm_cvtsi32_si128(static_cast<int>(lo));
        if constexpr (BITS == 3) {
          uint16_t hi;
          std::memcpy(&hi, in + 4, 2);
          bytes = _mm_insert_epi16(bytes, hi, 2);
        }
      }
      const __m512i lanes = _mm512_shuffle_epi8(_mm512_broadcast_i32x4(bytes), ctrl);
      return _mm512_srlv_epi32(lanes, shift);
    }
  }
  DQ_AVX512 inline __m512i operator()(const uint8_t* in) const {
    return BITS == 8 ? unmasked(in) : _mm512_and_si512(unmasked(in), mask);
  }
};

// The codes of flat elements [i, i + len) (len <= 16, i a multiple of 8):
// `codes` int32 lanes, written into the stream with encode (which writes only
// the bytes of these codes; used for partial units).
template <int BITS>
DQ_AVX512 inline void pack_partial(__m512i q, int64_t i, int64_t len, uint8_t* packed, int64_t nbytes) {
  alignas(16) uint8_t tmp[16];
  _mm_storeu_si128(reinterpret_cast<__m128i*>(tmp), _mm512_cvtepi32_epi8(q));
  encode<BITS>(tmp, i, len, packed, nbytes);
}

template <int BITS>
DQ_AVX512 inline __m512i unpack_partial(const uint8_t* packed, int64_t nbytes, int64_t i, int64_t len) {
  alignas(16) uint8_t tmp[16] = {};
  decode<BITS>(packed, nbytes, i, len, tmp);
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tmp)));
}

// uniform_code per lane: q = clamp(rne(x / s) + z, 0, maxq), z where s == 0.
// (rne_clamped's pre-clamp to [-512, 512] is left out: |z| and maxq are
// below 512, so clamping after the rounding gives the same code, inf included.)
DQ_AVX512 inline __m512i code16(__m512 x, __m512 s, __m512 z, __m512 maxq) {
  const __m512 y = _mm512_div_ps(x, s);
  const __m512 r = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 q = _mm512_add_ps(r, z);
  q = _mm512_min_ps(_mm512_max_ps(q, _mm512_setzero_ps()), maxq);
  q = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(s, _mm512_setzero_ps(), _CMP_GT_OQ), z, q);
  return _mm512_cvttps_epi32(q);
}

// code16 for the whole units of one group, its s, z and maxq fixed: with s > 0,
// the codes in integers, q = clamp(cvt_rne(x / s) + z, 0, maxq). |x / s| stays
// far below 2^31 (x lies between min(lo, 0) and max(hi, 0), and s, rounded to
// nearest, is at least half their spread / (2^b - 1), or half amax / (2^(b-1) - 1);
// smaller spreads round s to 0), so the conversion's rounding is rne and
// rne_clamped's pre-clamp changes nothing. With s == 0 every code is z.
struct GroupCoder {
  __m512 s;
  __m512i z, maxq;
  bool zero_scale;
  DQ_AVX512 GroupCoder(float scale, float zero, int bits)
      : s(_mm512_set1_ps(scale)), z(_mm512_set1_epi32(static_cast<int32_t>(zero))),
        maxq(_mm512_set1_epi32((1 << bits) - 1)), zero_scale(!(scale > 0.0f)) {}
  DQ_AVX512 inline __attribute__((always_inline)) __m512i operator()(__m512 x) const {
    if (zero_scale) return z;
    const __m512i r = _mm512_cvt_roundps_epi32(_mm512_div_ps(x, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(r, z), _mm512_setzero_si512()), maxq);
  }
};

// ---- exact |x| sums (and sign codes) over one block ----

constexpr int64_t kBlock512 = 2048;  // elements per block: stays in L1 between its two loops

// Prefetch the cache lines of x[i, i + 16) (one line for 16-bit types, which
// may be the one of the previous call: harmless). Pointers past the end are
// never dereferenced: prefetches do not fault.
template <typename T>
DQ_AVX512 inline void prefetch16(const T* x, int64_t i, int hint_l1) {
  const char* p = reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(x) + uintptr_t(i) * sizeof(T));
  if (hint_l1) {
    _mm_prefetch(p, _MM_HINT_T0);
    if (sizeof(T) == 4) _mm_prefetch(p + 32, _MM_HINT_T0);
  } else {
    _mm_prefetch(p, _MM_HINT_T1);
    if (sizeof(T) == 4) _mm_prefetch(p + 32, _MM_HINT_T1);
  }
}

// The sign codes of 16 values (1 where x >= 0; -0.0 included).
DQ_AVX512 inline uint16_t sign_bits16(__m512i u) {
  return static_cast<uint16_t>(~_mm512_cmp_ps_mask(_mm512_castsi512_ps(u), _mm512_setzero_ps(), _CMP_LT_OQ));
}

// Over x[0, n) (n <= kBlock512): when CODES, writes the sign codes
// (1 where x >= 0) as ceil(n / 8) bytes (x starts on a byte boundary of the
// stream); when `bins` is set, adds |x| into them exactly (add_abs_bins'
// window rule: with E the block's largest exponent, m << (e - (E - 24)) into
// one integer sum, smaller non-zero elements bin by bin). False if a value is
// NaN or inf (nothing added then). While the second loop runs on the block in
// L1, the next block (x[n, 2n)) is prefetched, so that memory keeps streaming.
// abs_block for bf16, on the 16-bit patterns: the scan takes 32 elements per
// vector, and the window sum uses the 8-bit significand m8 (m = m8 << 16) on
// a window of 20 exponents, base = E - 20: m8 << (e - base) < 2^28, so 16 of
// them add up in a 32-bit lane without overflow (the lanes go into 64-bit
// sums every 16 vectors), and the block's sum S8 is credited to bin base + 16
// (m << (e - base) = (m8 << (e - base)) << 16). Same bins, fewer operations;
// the narrower window leaves more elements to the bin-by-bin path, but only
// those 2^20 times below the block's largest (a block of 2048 normal samples
// has one about once in 200 blocks). The first loop also calls
// visit(i, len, m, v, a, nonzero) on each vector (v: 32 patterns, a: |v|),
// which writes codes where the caller wants them.
template <typename Visit>
DQ_AVX512 bool abs_block_bf16(const bf16_t* x, int64_t n, AbsBins* bins, const Visit& visit) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(x);
  const __m512i abs16 = _mm512_set1_epi16(0x7FFF);
  __m512i worst = _mm512_setzero_si512(), least = _mm512_set1_epi16(-1);
  for_patterns32(h, 0, n, [&](int64_t i, int64_t len, __mmask32 m, __m512i v) DQ_AVX512 __attribute__((always_inline)) {
    const __m512i a = _mm512_and_si512(v, abs16);
    const __mmask32 nonzero = _mm512_test_epi16_mask(a, a);
    visit(i, len, m, v, a, nonzero);
    worst = _mm512_max_epu16(worst, a);
    least = _mm512_mask_min_epu16(least, nonzero, least, a);
  });
  const uint32_t top_bits = _mm512_reduce_max_epu32(_mm512_max_epu32(_mm512_srli_epi32(worst, 16),
                                                                     _mm512_and_si512(worst, _mm512_set1_epi32(0xFFFF))));
  if (top_bits >= 0x7F80u) return false;
  if (!bins) return true;
  const int32_t base = static_cast<int32_t>(top_bits >> 7) - 20;
  if (base < 1) {  // tiny values only: bin by bin (as add_abs_bins)
    add_abs_each(x, n, *bins);
    return true;
  }
  const uint32_t least_bits = _mm512_reduce_min_epu32(_mm512_min_epu32(_mm512_srli_epi32(least, 16),
                                                                       _mm512_and_si512(least, _mm512_set1_epi32(0xFFFF))));
  const __m512i vbase = _mm512_set1_epi32(base), abs32 = _mm512_set1_epi32(0x7FFF);
  const __m512i mant = _mm512_set1_epi32(0x7F), implicit = _mm512_set1_epi32(0x80);
  __m512i part = _mm512_setzero_si512(), sum = _mm512_setzero_si512();  // 32-bit lanes; 64-bit lanes
  auto add16 = [&](__m512i v) DQ_AVX512 {  // v: 16 bf16 patterns in 32-bit lanes
    const __m512i a = _mm512_and_si512(v, abs32);
    const __m512i sh = _mm512_sub_epi32(_mm512_srli_epi32(a, 7), vbase);
    part = _mm512_add_epi32(part, _mm512_sllv_epi32(_mm512_ternarylogic_epi32(a, mant, implicit, 0xEA), sh));
  };
  auto flush = [&]() DQ_AVX512 {
    sum = _mm512_add_epi64(sum, _mm512_add_epi64(_mm512_cvtepu32_epi64(_mm512_castsi512_si256(part)),
                                                 _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(part, 1))));
    part = _mm512_setzero_si512();
  };
  auto load16 = [&](int64_t i) DQ_AVX512 {
    return _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(h + i)));
  };
  const int64_t full = n & ~int64_t(15);
  int64_t i = 0;
  for (; i + 256 <= full; i += 256) {
    for (int64_t j = i; j < i + 256; j += 16) {
      prefetch16(x, n + j, 1);
      add16(load16(j));
    }
    flush();
  }
  for (; i < full; i += 16) {
    prefetch16(x, n + i, 1);
    add16(load16(i));
  }
  if (full < n) add16(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(first_lanes(n - full), h + full)));
  flush();
  bins->add(base + 16, static_cast<uint64_t>(_mm512_reduce_add_epi64(sum)));
  if (least_bits < (static_cast<uint32_t>(base) << 7))  // non-zero elements below the window
    add_abs_each(x, n, *bins, base);
  return true;
}

template <typename T, bool CODES>
DQ_AVX512 bool abs_block(const T* x, int64_t n, AbsBins* bins, uint8_t* codes) {
  if constexpr (std::is_same_v<T, bf16_t>) {
    return abs_block_bf16(x, n, bins, [&](int64_t i, int64_t len, __mmask32 m, __m512i v, __m512i, __mmask32 nonzero)
                                          DQ_AVX512 __attribute__((always_inline)) {
      if constexpr (CODES) {  // code 0 where x < 0: sign bit set and |x| != 0
        const uint32_t bits = ~static_cast<uint32_t>(_mm512_movepi16_mask(v) & nonzero) & m;
        std::memcpy(codes + i / 8, &bits, static_cast<size_t>((len + 7) / 8));
      }
    });
  }
  const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF);
  // largest |x| and smallest non-zero |x| (as bits; masked lanes read +0.0)
  __m512i worst = _mm512_setzero_si512(), least = _mm512_set1_epi32(-1);
  auto scan16 = [&](__m512i u) DQ_AVX512 {
    const __m512i a = _mm512_and_si512(u, absmask);
    worst = _mm512_max_epu32(worst, a);
    least = _mm512_mask_min_epu32(least, _mm512_test_epi32_mask(a, a), least, a);
  };
  const int64_t full = n & ~int64_t(15);
  for (int64_t i = 0; i < full; i += 16) {
    const __m512i u = load_bits16(x + i);
    if constexpr (CODES) {
      const uint16_t bits = sign_bits16(u);
      std::memcpy(codes + i / 8, &bits, 2);
    }
    scan16(u);
  }
  if (full < n) {
    const __mmask16 m = first_lanes(n - full);
    const __m512i u = load_bits16(x + full, m);
    if constexpr (CODES) {
      const uint16_t bits = static_cast<uint16_t>(sign_bits16(u) & m);
      codes[full / 8] = static_cast<uint8_t>(bits);
      if (n - full > 8) codes[full / 8 + 1] = static_cast<uint8_t>(bits >> 8);
    }
    scan16(u);
  }
  const uint32_t top_bits = _mm512_reduce_max_epu32(worst);
  if (top_bits >= 0x7F800000u) return false;
  if (!bins) return true;
  const uint32_t least_bits = _mm512_reduce_min_epu32(least);
  const int32_t base = static_cast<int32_t>(top_bits >> 23) - 24;
  if (base < 1) {  // tiny values only: bin by bin (as add_abs_bins)
    add_abs_each(x, n, *bins);
    return true;
  }
  // m << (e - base) in 64-bit lanes, even and odd elements apart (the low and
  // high halves of each lane); a negative shift (e < base) reads as an
  // unsigned count above 63, for which vpsllvq gives 0. Each term is below
  // 2^48, so the block's sum (< 2^59) fits.
  const __m512i vbase = _mm512_set1_epi32(base);
  const __m512i mant = _mm512_set1_epi32(0x7FFFFF), implicit = _mm512_set1_epi32(0x800000);
  const __m512i low32 = _mm512_set1_epi64(0xFFFFFFFFll);
  __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
  auto add16 = [&](__m512i u) DQ_AVX512 {
    const __m512i sh = _mm512_sub_epi32(_mm512_srli_epi32(u, 23), vbase);
    const __m512i sig = _mm512_ternarylogic_epi32(u, mant, implicit, 0xEA);  // (u & mant) | implicit
    acc0 = _mm512_add_epi64(acc0, _mm512_sllv_epi64(_mm512_and_si512(sig, low32), _mm512_and_si512(sh, low32)));
    acc1 = _mm512_add_epi64(acc1, _mm512_sllv_epi64(_mm512_srli_epi64(sig, 32), _mm512_srli_epi64(sh, 32)));
  };
  for (int64_t i = 0; i < full; i += 16) {
    prefetch16(x, n + i, 1);
    add16(_mm512_and_si512(load_bits16(x + i), absmask));
  }
  if (full < n) add16(_mm512_and_si512(load_bits16(x + full, first_lanes(n - full)), absmask));
  bins->add(base, static_cast<uint64_t>(_mm512_reduce_add_epi64(_mm512_add_epi64(acc0, acc1))));
  if (least_bits < (static_cast<uint32_t>(base) << 23))  // non-zero elements below the window
    add_abs_each(x, n, *bins, base);
  return true;
}

// abs_block over x[0, n) block by block (codes, when set, at x's byte).
template <typename T>
DQ_AVX512 bool abs_range(const T* x, int64_t n, AbsBins* bins, uint8_t* codes) {
  bool finite = true;
  for (int64_t b = 0; b < n; b += kBlock512) {
    const int64_t len = std::min(kBlock512, n - b);
    finite &= codes ? abs_block<T, true>(x + b, len, bins, codes + b / 8)
                    : abs_block<T, false>(x + b, len, bins, nullptr);
  }
  return finite;
}

// ---- ternary absmean codes by a threshold ----
// With s > 0 fixed, fl(|x| / s) is non-decreasing in |x|, and the absmean code
// of x is 1 (q = 0) unless rne(fl(|x| / s)) >= 1, i.e. fl(|x| / s) > 0.5
// (0.5 itself rounds to the even 0); then q = sign(x) (the clamp to [-1, 1]
// takes care of larger quotients). So the code only needs the smallest
// float t with fl(t / s) > 0.5: x is kept iff |x| >= t, a comparison of
// magnitude bits. ternary_threshold finds t with the kernels' own division,
// and checks its neighbour below, so no argument about the rounding of the
// quotient is needed.
inline float ternary_threshold(float s) {
  float t = s * 0.5f;  // exact (s >= kAbsmeanEps is far from the subnormals)
  while (!(div_rn(t, s) > 0.5f)) t = std::nextafter(t, INFINITY);
  for (float below = std::nextafter(t, 0.0f); div_rn(below, s) > 0.5f; below = std::nextafter(t, 0.0f))
    t = below;
  return t;
}

// Codes of x[b, e) (b a multiple of 16): 2-bit code 2 (|x| >= t, x > 0),
// 0 (|x| >= t, x < 0) or 1, i.e. per element a low bit "not kept" and a high
// bit "kept and positive", interleaved into the stream with pdep.
// bf16: 32 elements per vector on the 16-bit patterns; |x| >= t iff the
// pattern of |x| is at least t's pattern rounded up to 16 bits.
DQ_AVX512 void ternary_chunk_bf16(const bf16_t* x, int64_t b, int64_t e, uint32_t t_bits, uint8_t* packed) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(x);
  const __m512i abs16 = _mm512_set1_epi16(0x7FFF);
  const __m512i tv = _mm512_set1_epi16(static_cast<int16_t>((t_bits + 0xFFFFu) >> 16));
  for_patterns32(h, b, e, [&](int64_t i, int64_t len, __mmask32 m, __m512i v) DQ_AVX512 __attribute__((always_inline)) {
    const __mmask32 kept = _mm512_cmpge_epu16_mask(_mm512_and_si512(v, abs16), tv);
    store_ternary_codes(kept, _mm512_movepi16_mask(v), m, len, packed + i / 4);
  });
}

template <typename T>
DQ_AVX512 void ternary_chunk(const T* x, int64_t b, int64_t e, uint32_t t_bits, uint8_t* packed) {
  if constexpr (std::is_same_v<T, bf16_t>) return ternary_chunk_bf16(x, b, e, t_bits, packed);
  const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF), tv = _mm512_set1_epi32(static_cast<int32_t>(t_bits));
  for (int64_t i = b; i < e; i += 16) {
    const int64_t len = std::min<int64_t>(16, e - i);
    const __mmask16 m = first_lanes(len);
    const __m512i u = m == 0xFFFF ? load_bits16(x + i) : load_bits16(x + i, m);
    const __mmask16 kept = _mm512_cmpge_epu32_mask(_mm512_and_si512(u, absmask), tv);
    store_ternary_codes(kept, _mm512_movepi32_mask(u), m, len, packed + i / 4);
  }
}

// ---- ComPEFT: top-k codes and fp64 moments, 16-bit types ----
// One read of x. A band [lo, hi] of magnitude keys that should hold the k-th
// largest, and a guess of it, come from a sample (compeft_band). The scan
// (compeft_scan) writes every element's code as if the guess were the
// threshold (kept iff key > guess), sums x and x^2 in fp64, and keeps the
// band's elements aside (their patterns and their offsets in the chunk, as two
// arrays in flat order). Their counts give the exact threshold;
// compeft_fixup then rewrites the codes the guess got wrong, all of them in
// the band. No full histogram, no mask tensor, no second pass over x.

// Per chunk of kCompeftChunk elements (chunk order makes the results
// independent of the thread count).
struct CompeftChunk {
  double s1 = 0.0, s2 = 0.0;  // sum x, sum x^2 (fp64)
  int64_t above = 0;          // keys > hi
  uint32_t max_key = 0;       // largest |x| pattern (NaN/inf check)
};

// 0, 1, ..., 31 in the 16-bit lanes.
DQ_AVX512 inline __m512i lane_index16() {
  alignas(64) static constexpr uint16_t kLanes[32] = {0,  1,  2,  3,  4,  5,  6,  7,  8,  9,  10,
                                                      11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,
                                                      22, 23, 24, 25, 26, 27, 28, 29, 30, 31};
  return _mm512_load_si512(kLanes);
}

// Stores the 16-bit lanes of v selected by m, in lane order, at out (writes
// 32 lanes: out needs that room); returns how many were selected. One
// vpcompressw (AVX512-VBMI2), as inline asm so that no function around it
// needs that target (and the compiler emits no VBMI2 instruction for a CPU
// without it: callers check).
DQ_AVX512 inline __attribute__((always_inline)) int64_t compress_store16(uint32_t m, __m512i v, uint16_t* out) {
  __m512i packed;
  asm("vpcompressw %1, %0%{%2%}%{z%}" : "=v"(packed) : "v"(v), "Yk"(static_cast<__mmask32>(m)));
  _mm512_storeu_si512(out, packed);
  return _mm_popcnt_u32(m);
}

// Appends the lanes of v selected by in_band (band elements of a 32-element
// vector) to band, and their offsets in the chunk (lane_offsets) to offsets,
// at nband. With VBMI2 as 16-bit lanes; without, as 32-bit entries
// (pattern | offset << 16: widened, so twice the compresses, which took a
// quarter of ComPEFT's scan) into scratch (band_entry_scratch), for
// split_band_entries once the chunk is scanned.
template <bool VBMI2>
DQ_AVX512 inline __attribute__((always_inline)) void keep_band_lanes(uint32_t in_band, __m512i v, __m512i lane_offsets,
                                                                     uint16_t* band, uint16_t* offsets,
                                                                     uint32_t* scratch, int64_t& nband) {
  if constexpr (VBMI2) {
    compress_store16(in_band, lane_offsets, offsets + nband);
    nband += compress_store16(in_band, v, band + nband);
  } else {
    for (int half = 0; half < 2; ++half) {
      const auto wide = [&](__m512i w) DQ_AVX512 {
        return _mm512_cvtepu16_epi32(half ? _mm512_extracti64x4_epi64(w, 1) : _mm512_castsi512_si256(w));
      };
      const __m512i entry = _mm512_or_si512(wide(v), _mm512_slli_epi32(wide(lane_offsets), 16));
      const __mmask16 lanes = static_cast<__mmask16>(in_band >> (16 * half));
      _mm512_storeu_si512(scratch + nband, _mm512_maskz_compress_epi32(lanes, entry));
      nband += _mm_popcnt_u32(lanes);
    }
  }
}

// keep_band_lanes' scratch for a chunk of n elements (nullptr with VBMI2).
template <bool VBMI2>
inline uint32_t* band_entry_scratch(int64_t n) {
  return VBMI2 ? nullptr : thread_scratch<uint32_t>(n + 16);
}

// The 32-bit entries of keep_band_lanes without VBMI2 into their two arrays.
DQ_AVX512 void split_band_entries(const uint32_t* entries, int64_t count, uint16_t* band, uint16_t* offsets) {
  for (int64_t j = 0; j < count; j += 16) {
    const __mmask16 m = first_lanes(count - j);
    const __m512i entry = _mm512_maskz_loadu_epi32(m, entries + j);
    _mm256_mask_storeu_epi16(band + j, m, _mm512_cvtepi32_epi16(entry));
    _mm256_mask_storeu_epi16(offsets + j, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(entry, 16)));
  }
}

// x[b, e) of a 16-bit type (b a multiple of 32): codes as if `guess` were the
// threshold into `packed` (guess <= hi); the band's elements (key in [lo, hi];
// none when lo > hi) compressed into `band` and their offsets in the chunk into
// `offsets` (each at least e - b + 32 slots; keep_band_lanes), without a
// branch per vector (one on "this vector has a band key" would be
// mispredicted about every other vector); returns how many. Moments: 32 fp64 lanes (four vectors of 8), each
// adding one element of every 32 (at most kCompeftChunk / 32 terms per lane),
// then 2 + 3 levels of vector additions.
template <bool BF16, bool VBMI2>
DQ_AVX512 int64_t compeft_scan(const uint16_t* h, int64_t b, int64_t e, CompeftBand range, uint8_t* packed,
                               uint16_t* band, uint16_t* offsets, CompeftChunk* out) {
  const __m512i abs16 = _mm512_set1_epi16(0x7FFF), lov = _mm512_set1_epi16(static_cast<int16_t>(range.lo)),
                guessv = _mm512_set1_epi16(static_cast<int16_t>(range.guess)),
                hiv = _mm512_set1_epi16(static_cast<int16_t>(range.hi)),
                high_halves = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  __m512i lane_offsets = lane_index16();  // of the next vector's lanes in the chunk
  __m512d s1[4], s2[4];
  for (int j = 0; j < 4; ++j) s1[j] = s2[j] = _mm512_setzero_pd();
  __m512i kmax = _mm512_setzero_si512();
  int64_t above = 0, nband = 0;
  uint32_t* scratch = band_entry_scratch<VBMI2>(e - b);
  for_patterns32(h, b, e, [&](int64_t i, int64_t len, __mmask32 m, __m512i v) DQ_AVX512 __attribute__((always_inline)) {
    const __m512i a = _mm512_and_si512(v, abs16);  // lanes past e are +0.0: no key, no sum
    kmax = _mm512_max_epu16(kmax, a);
    const uint32_t over = _mm512_cmpgt_epu16_mask(a, hiv);
    above += _mm_popcnt_u32(over);
    // kept as if key > guess (no zero is: guess >= 0)
    store_ternary_codes(_mm512_cmpgt_epu16_mask(a, guessv), _mm512_movepi16_mask(v), m, len, packed + i / 4);
    const uint32_t in_band = _mm512_cmpge_epu16_mask(a, lov) & m & ~over;
    keep_band_lanes<VBMI2>(in_band, v, lane_offsets, band, offsets, scratch, nband);
    lane_offsets = _mm512_add_epi16(lane_offsets, _mm512_set1_epi16(32));
    // x in fp32 (both exact): bf16 as the even and the odd 16-bit lanes (the
    // sums need no element order), fp16 as the two halves of the vector
    const __m512 f[2] = {
        BF16 ? _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)) : _mm512_cvtph_ps(_mm512_castsi512_si256(v)),
        BF16 ? _mm512_castsi512_ps(_mm512_and_si512(v, high_halves)) : _mm512_cvtph_ps(_mm512_extracti64x4_epi64(v, 1))};
    const __m512d d[4] = {_mm512_cvtps_pd(_mm512_castps512_ps256(f[0])), _mm512_cvtps_pd(_mm512_extractf32x8_ps(f[0], 1)),
                          _mm512_cvtps_pd(_mm512_castps512_ps256(f[1])), _mm512_cvtps_pd(_mm512_extractf32x8_ps(f[1], 1))};
    for (int j = 0; j < 4; ++j) {
      s1[j] = _mm512_add_pd(s1[j], d[j]);
      s2[j] = _mm512_fmadd_pd(d[j], d[j], s2[j]);  // d * d is exact: one rounding, as an add
    }
  });
  out->s1 = _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(s1[0], s1[1]), _mm512_add_pd(s1[2], s1[3])));
  out->s2 = _mm512_reduce_add_pd(_mm512_add_pd(_mm512_add_pd(s2[0], s2[1]), _mm512_add_pd(s2[2], s2[3])));
  out->above = above;
  alignas(64) uint16_t keys[32];
  _mm512_store_si512(keys, kmax);
  out->max_key = *std::max_element(keys, keys + 32);
  if constexpr (!VBMI2) split_band_entries(scratch, nband, band, offsets);
  return nband;
}

// The equal keys taken from `equal` (lanes in flat order) while `budget` lasts:
// all of them, or the lowest `budget`; the budget shrinks by what is taken.
DQ_AVX512 inline uint32_t take_ties(uint32_t equal, int64_t& budget) {
  const int64_t ties = _mm_popcnt_u32(equal);
  const uint32_t taken = ties <= budget ? equal : _pdep_u32((1u << budget) - 1u, equal);
  budget -= std::min(ties, budget);
  return taken;
}

// hist[key - lo] += 1 for the keys of `count` band patterns (coarse_key: the
// magnitude of bf16/fp16, its top 16 bits for fp32). A narrow band (the usual
// case: about ten keys) is counted key by key with vector compares: scalar
// increments of a few bins queue behind each other.
template <typename P>
DQ_AVX512 void count_band_keys(const P* band, int64_t count, uint32_t lo, int64_t width, uint32_t* hist) {
  if (width > 64) {
    for (int64_t j = 0; j < count; ++j) ++hist[coarse_key(band[j]) - lo];
    return;
  }
  for (int64_t w = 0; w < width; ++w) {
    const uint32_t key = lo + static_cast<uint32_t>(w);
    int64_t total = 0;
    if constexpr (sizeof(P) == 2) {
      const __m512i keyv = _mm512_set1_epi16(static_cast<int16_t>(key)), key_mask = _mm512_set1_epi16(0x7FFF);
      for_patterns32(band, 0, count, [&](int64_t, int64_t, __mmask32 m, __m512i pattern)
                                         DQ_AVX512 __attribute__((always_inline)) {
        total += _mm_popcnt_u32(_mm512_mask_cmpeq_epu16_mask(m, _mm512_and_si512(pattern, key_mask), keyv));
      });
    } else {
      const __m512i keyv = _mm512_set1_epi32(static_cast<int32_t>(key)), key_mask = _mm512_set1_epi32(0x7FFFFFFF);
      for (int64_t j = 0; j < count; j += 16) {
        const __mmask16 m = first_lanes(count - j);
        const __m512i pattern = _mm512_maskz_loadu_epi32(m, band + j);
        total += _mm_popcnt_u32(
            _mm512_mask_cmpeq_epu32_mask(m, _mm512_srli_epi32(_mm512_and_si512(pattern, key_mask), 15), keyv));
      }
    }
    hist[w] += static_cast<uint32_t>(total);
  }
}

// The 31-bit magnitude keys of fp32 band patterns band[j, j + 16), for the
// masked lanes of the last vector too (past them: 0).
DQ_AVX512 inline __m512i band_keys16(const uint32_t* band, int64_t j, int64_t count, __mmask16* m) {
  *m = first_lanes(count - j);
  return _mm512_and_si512(_mm512_maskz_loadu_epi32(*m, band + j), _mm512_set1_epi32(0x7FFFFFFF));
}

// fine[key & 0x7FFF] += 1 for the fp32 patterns in coarse bin `coarse` (a few
// percent of them: a vector filter, then scalar counts).
DQ_AVX512 void count_fine_keys(const uint32_t* band, int64_t count, uint32_t coarse, int64_t* fine) {
  const __m512i bin = _mm512_set1_epi32(static_cast<int32_t>(coarse));
  for (int64_t j = 0; j < count; j += 16) {
    __mmask16 m;
    const __m512i key = band_keys16(band, j, count, &m);
    for (uint32_t hit = _mm512_mask_cmpeq_epi32_mask(m, _mm512_srli_epi32(key, 15), bin); hit; hit &= hit - 1)
      ++fine[band[j + __builtin_ctz(hit)] & 0x7FFFu];
  }
}

// How many fp32 patterns have the 31-bit key `thr`.
DQ_AVX512 int64_t count_equal_keys(const uint32_t* band, int64_t count, uint32_t thr) {
  const __m512i key = _mm512_set1_epi32(static_cast<int32_t>(thr));
  int64_t total = 0;
  for (int64_t j = 0; j < count; j += 16) {
    __mmask16 m;
    total += _mm_popcnt_u32(_mm512_mask_cmpeq_epi32_mask(m, band_keys16(band, j, count, &m), key));
  }
  return total;
}

// Rewrites the codes of a chunk starting at element b: changes[j] is
// offset << 2 | new code. The chunk's codes left the caches during the scan, so
// every line is requested first, then rewritten (independent misses overlap
// instead of queueing behind each write).
inline void write_code_changes(const uint32_t* changes, int64_t nchanges, int64_t b, uint8_t* packed) {
  for (int64_t j = 0; j < nchanges; ++j) __builtin_prefetch(packed + (b + (changes[j] >> 2)) / 4, 1);
  for (int64_t j = 0; j < nchanges; ++j) {
    const int64_t i = b + (changes[j] >> 2);
    const int shift = 2 * static_cast<int>(i % 4);
    packed[i / 4] = static_cast<uint8_t>((packed[i / 4] & ~(3 << shift)) | ((changes[j] & 3) << shift));
  }
}

// The band's elements of one chunk starting at element b (flat order), once
// the threshold is known: those with key > thr, and the first `budget` with
// key == thr, are kept (code sign(x) + 1; a kept zero has code 1). The scan
// wrote the codes for key > guess; the decision is made 16 elements at a time
// and only the codes that differ are rewritten. Patterns P (uint16_t for
// bf16/fp16, uint32_t for fp32) and the 16-bit offsets in the chunk are both
// widened to 32-bit lanes.
template <typename P>
DQ_AVX512 void compeft_fixup(const P* band, const uint16_t* offsets, int64_t count, int64_t b, uint32_t guess, uint32_t thr,
                             int64_t budget, uint8_t* packed) {
  constexpr uint32_t kSign = sizeof(P) == 2 ? 0x8000u : 0x80000000u;
  const __m512i key_mask = _mm512_set1_epi32(static_cast<int32_t>(kSign - 1)),
                sign = _mm512_set1_epi32(static_cast<int32_t>(kSign)), tv = _mm512_set1_epi32(static_cast<int32_t>(thr)),
                guessv = _mm512_set1_epi32(static_cast<int32_t>(guess)), one = _mm512_set1_epi32(1),
                two = _mm512_set1_epi32(2);
  static_assert(kKeptPerChunk + 16 <= 8208, "a chunk keeps at most kKeptPerChunk band elements");
  alignas(64) uint32_t changes[8208];  // offset << 2 | new code, in flat order
  int64_t nchanges = 0;
  auto load32 = [](auto* p, __mmask16 m) DQ_AVX512 {  // 16 entries as 32-bit lanes (past m: 0)
    if constexpr (sizeof(*p) == 2)
      return _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    else
      return _mm512_maskz_loadu_epi32(m, p);
  };
  for (int64_t j = 0; j < count; j += 16) {
    const __mmask16 m = first_lanes(count - j);
    const __m512i pattern = load32(band + j, m), offset = load32(offsets + j, m);
    const __m512i key = _mm512_and_si512(pattern, key_mask);
    uint32_t keep = _mm512_cmpgt_epu32_mask(key, tv) & m;
    if (budget > 0) keep |= take_ties(_mm512_cmpeq_epu32_mask(key, tv) & m, budget);
    keep &= _mm512_test_epi32_mask(key, key);
    const __mmask16 wrong = static_cast<__mmask16>(keep ^ _mm512_cmpgt_epu32_mask(key, guessv));
    const __m512i kept_code = _mm512_mask_blend_epi32(_mm512_test_epi32_mask(pattern, sign), two, _mm512_setzero_si512());
    const __m512i code = _mm512_mask_blend_epi32(static_cast<__mmask16>(keep), one, kept_code);
    const __m512i change = _mm512_or_si512(_mm512_slli_epi32(offset, 2), code);
    _mm512_storeu_si512(changes + nchanges, _mm512_maskz_compress_epi32(wrong, change));
    nchanges += _mm_popcnt_u32(wrong);
  }
  write_code_changes(changes, nchanges, b, packed);
}

// The codes of x[b, e) (b a multiple of 32) for threshold thr: kept = key > thr,
// or key == thr for the first `budget` such elements of the range.
DQ_AVX512 void compeft_codes_chunk(const uint16_t* h, int64_t b, int64_t e, uint16_t thr, int64_t budget,
                                   uint8_t* packed) {
  const __m512i abs16 = _mm512_set1_epi16(0x7FFF), tv = _mm512_set1_epi16(static_cast<int16_t>(thr));
  for_patterns32(h, b, e, [&](int64_t i, int64_t len, __mmask32 m, __m512i v) DQ_AVX512 __attribute__((always_inline)) {
    const __m512i a = _mm512_and_si512(v, abs16);
    uint32_t kept = _mm512_cmpgt_epu16_mask(a, tv) & m;
    if (budget > 0) kept |= take_ties(_mm512_cmpeq_epu16_mask(a, tv) & m, budget);
    // a kept zero has code 1 (sign 0)
    store_ternary_codes(kept & _mm512_test_epi16_mask(a, a), _mm512_movepi16_mask(v), m, len, packed + i / 4);
  });
}

// ---- ComPEFT, fp32: the same plan on 31-bit magnitude keys ----
// The band, the guess and the per-chunk histograms use the coarse key
// (key >> 15, as many bins around the threshold as bf16 has); band patterns
// are whole, and the exact threshold inside the coarse bin comes from a
// histogram of the low 15 bits of that bin's patterns.

// x[b, e) of fp32 (b a multiple of 32): as compeft_scan (band and offsets: at
// least e - b + 32 slots each). Moments: 16 fp64 lanes (two vectors of 8),
// each adding one element of every 16 (at most kCompeftChunk / 16 terms per
// lane), then 1 + 3 levels of vector additions. The band's patterns are
// compressed 16 lanes at a time; their offsets, as 16-bit lanes, 32 at a time
// with VBMI2 (one vpcompressw: the offsets' 32-bit compresses and stores took
// about a sixth of the op), else 16 at a time and narrowed.
template <bool VBMI2>
DQ_AVX512 int64_t compeft_scan32(const uint32_t* u, int64_t b, int64_t e, CompeftBand range, uint8_t* packed,
                                 uint32_t* band, uint16_t* offsets, CompeftChunk* out) {
  const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF),
                lov = _mm512_set1_epi32(static_cast<int32_t>(range.lo << 15)),
                guessv = _mm512_set1_epi32(static_cast<int32_t>((range.guess << 15) | 0x7FFFu)),
                hiv = _mm512_set1_epi32(static_cast<int32_t>((range.hi << 15) | 0x7FFFu));
  const __m512i lanes16 = lane_index16(),
                lanes32 = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  __m512d s1[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()}, s2[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()};
  __m512i kmax = _mm512_setzero_si512();
  int64_t above = 0, npatterns = 0, noffsets = 0;
  // One vector: its lanes kept as if key > guess (no zero is: guess >= 0) and its negative lanes; its band
  // lanes' patterns go to band; returns the band lanes. The codes are stored 32 at a time (one code word per
  // two vectors).
  auto scan16 = [&](__mmask16 m, __m512i v, uint32_t* kept, uint32_t* negative)
                    DQ_AVX512 __attribute__((always_inline)) -> uint32_t {
    const __m512i a = _mm512_and_si512(v, absmask);  // lanes past e are +0.0: no key, no sum
    kmax = _mm512_max_epu32(kmax, a);
    const __mmask16 over = _mm512_cmpgt_epu32_mask(a, hiv);
    above += _mm_popcnt_u32(over);
    *kept = _mm512_cmpgt_epu32_mask(a, guessv);
    *negative = _mm512_movepi32_mask(v);
    const __mmask16 in_band = _mm512_mask_cmpge_epu32_mask(m & ~over, a, lov);
    _mm512_storeu_si512(band + npatterns, _mm512_maskz_compress_epi32(in_band, v));
    npatterns += _mm_popcnt_u32(in_band);
    for (int half = 0; half < 2; ++half) {
      const __m256i part = half ? _mm512_extracti64x4_epi64(v, 1) : _mm512_castsi512_si256(v);
      const __m512d d = _mm512_cvtps_pd(_mm256_castsi256_ps(part));  // exact
      s1[half] = _mm512_add_pd(s1[half], d);
      s2[half] = _mm512_fmadd_pd(d, d, s2[half]);  // d * d is exact in fp64: one rounding, as an add
    }
    return in_band;
  };
  // The offsets of the band lanes of up to 32 elements from x[i]: bit l of in_band for element i + l.
  auto keep_offsets = [&](uint32_t in_band, int64_t i) DQ_AVX512 __attribute__((always_inline)) {
    if constexpr (VBMI2) {
      noffsets += compress_store16(in_band, _mm512_add_epi16(lanes16, _mm512_set1_epi16(static_cast<int16_t>(i - b))),
                                   offsets + noffsets);
    } else {
      for (int half = 0; half < 2; ++half) {
        const __mmask16 lanes = static_cast<__mmask16>(in_band >> (16 * half));
        const __m512i at = _mm512_add_epi32(lanes32, _mm512_set1_epi32(static_cast<int32_t>(i - b + 16 * half)));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(offsets + noffsets),
                            _mm512_cvtepi32_epi16(_mm512_maskz_compress_epi32(lanes, at)));
        noffsets += _mm_popcnt_u32(lanes);
      }
    }
  };
  int64_t i = b;
  for (; i + 32 <= e; i += 32) {
    uint32_t kept0, negative0, kept1, negative1;
    const uint32_t band0 = scan16(0xFFFF, _mm512_loadu_si512(u + i), &kept0, &negative0);
    const uint32_t band1 = scan16(0xFFFF, _mm512_loadu_si512(u + i + 16), &kept1, &negative1);
    keep_offsets(band0 | band1 << 16, i);
    store_ternary_codes(kept0 | kept1 << 16, negative0 | negative1 << 16, 0xFFFFFFFFu, 32, packed + i / 4);
  }
  for (; i < e; i += 16) {  // the last 31 elements or fewer
    const int64_t len = std::min<int64_t>(16, e - i);
    const __mmask16 m = first_lanes(len);
    uint32_t kept, negative;
    keep_offsets(scan16(m, _mm512_maskz_loadu_epi32(m, u + i), &kept, &negative), i);
    store_ternary_codes(kept, negative, m, len, packed + i / 4);
  }
  out->s1 = _mm512_reduce_add_pd(_mm512_add_pd(s1[0], s1[1]));
  out->s2 = _mm512_reduce_add_pd(_mm512_add_pd(s2[0], s2[1]));
  out->above = above;
  out->max_key = static_cast<uint32_t>(_mm512_reduce_max_epu32(kmax));
  return npatterns;
}

// ---- uniform quantization of a chunk, groups fused ----

// Position in the (row, group) layout: the group of flat element i.
struct GroupCursor {
  int64_t cols, gs, groups;
  int64_t r, g, end;  // current row, group, flat end of the group
  void seek(int64_t i) {
    r = i / cols;
    g = (i - r * cols) / gs;
    end = r * cols + std::min(cols, (g + 1) * gs);
  }
  void next() {
    if (++g == groups) {
      g = 0;
      ++r;
    }
    end = r * cols + std::min(cols, (g + 1) * gs);
  }
  int64_t begin() const { return r * cols + g * gs; }
  int64_t index() const { return r * groups + g; }
};

// A group's min, max and max |x| bits, each still spread over 16 lanes (the
// groups are reduced 16 at a time: reduce_each16).
struct GroupStats {
  __m512 lo, hi, worst;
};

template <typename T>
DQ_AVX512 inline __attribute__((always_inline)) GroupStats group_stats(const T* x, int64_t b, int64_t e) {
  const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF);
  __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps();  // 0 is always in range (uniform_params)
  __m512i worst = _mm512_setzero_si512();
  int64_t i = b;
  for (; i + 16 <= e; i += 16) {
    const __m512i u = load_bits16(x + i);
    lo = _mm512_min_ps(lo, _mm512_castsi512_ps(u));
    hi = _mm512_max_ps(hi, _mm512_castsi512_ps(u));
    worst = _mm512_max_epu32(worst, _mm512_and_si512(u, absmask));
  }
  if (i < e) {  // masked lanes read +0.0: no change to min(lo, 0), max(hi, 0) or max |x|
    const __m512i u = load_bits16(x + i, first_lanes(e - i));
    lo = _mm512_min_ps(lo, _mm512_castsi512_ps(u));
    hi = _mm512_max_ps(hi, _mm512_castsi512_ps(u));
    worst = _mm512_max_epu32(worst, _mm512_and_si512(u, absmask));
  }
  return {lo, hi, _mm512_castsi512_ps(worst)};
}

// Lane g of the result: op (a min or max) over the 16 lanes of v[g], for 16
// vectors at once: four levels of pairwise shuffles (46 operations; 16
// separate reductions take about 128). After them lane 4q + r holds v[4r + q].
template <typename Op>
DQ_AVX512 inline __attribute__((always_inline)) __m512 reduce_each16(const __m512* v, const Op& op) {
  __m512 u[8], w[4], y[2];
  for (int j = 0; j < 8; ++j)  // quarters 0-1: v[2j]'s 8 partials; 2-3: v[2j + 1]'s
    u[j] = op(_mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0x44), _mm512_shuffle_f32x4(v[2 * j], v[2 * j + 1], 0xEE));
  for (int j = 0; j < 4; ++j)  // quarter q: v[4j + q]'s 4 partials
    w[j] = op(_mm512_shuffle_f32x4(u[2 * j], u[2 * j + 1], 0x88), _mm512_shuffle_f32x4(u[2 * j], u[2 * j + 1], 0xDD));
  for (int j = 0; j < 2; ++j)  // quarter q: v[8j + q]'s 2 partials, then v[8j + 4 + q]'s
    y[j] = op(_mm512_shuffle_ps(w[2 * j], w[2 * j + 1], 0x44), _mm512_shuffle_ps(w[2 * j], w[2 * j + 1], 0xEE));
  const __m512 z = op(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
  return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), z);
}

// uniform_params for 16 groups at once (lo, hi: the groups' min and max;
// amax: max |x|): the same operations in the same order, with vminps/vmaxps
// for the selects (vminps(a, b) is a < b ? a : b, vmaxps(a, b) is a > b ? a : b,
// which is what the scalar selects compute, signed zeros included).
template <int BITS>
DQ_AVX512 inline void uniform_params16(__m512 lo, __m512 hi, __m512 amax, bool symmetric, __m512* scale,
                                       __m512* zero) {
  const __m512 zero_v = _mm512_setzero_ps();
  if (symmetric) {
    const __m512 s = _mm512_div_ps(amax, _mm512_set1_ps(static_cast<float>((1 << (BITS - 1)) - 1)));
    *scale = _mm512_max_ps(s, zero_v);
    *zero = _mm512_set1_ps(static_cast<float>(1 << (BITS - 1)));
    return;
  }
  const __m512 maxq = _mm512_set1_ps(static_cast<float>((1 << BITS) - 1));
  lo = _mm512_min_ps(lo, zero_v);
  hi = _mm512_max_ps(hi, zero_v);
  const __m512 s = _mm512_max_ps(_mm512_div_ps(_mm512_sub_ps(hi, lo), maxq), zero_v);
  const __mmask16 pos = _mm512_cmp_ps_mask(s, zero_v, _CMP_GT_OQ);
  // rne_clamped(-lo / s): clamp to [-512, 512], round half to even
  const __m512 neg_lo = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(lo), _mm512_set1_epi32(int32_t(0x80000000u))));
  __m512 y = _mm512_maskz_div_ps(pos, neg_lo, s);
  y = _mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(-kPreClamp)), _mm512_set1_ps(kPreClamp));
  __m512 z = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // z < 0 ? 0 : (z > maxq ? maxq : z); only a -0.0 may come out as +0.0, which no code can tell
  z = _mm512_min_ps(_mm512_max_ps(z, zero_v), maxq);
  *scale = s;
  *zero = _mm512_maskz_mov_ps(pos, z);
}

// One chunk [b, e) of quantize_uniform: scale and zero point of every group
// that meets the chunk (from the whole group, which may reach outside it;
// written to s_out / z_out by the chunk holding the group's first element),
// then the chunk's codes while it is still in cache. scratch: 5 arrays of
// at least e - b + 16 floats.
template <typename T, int BITS>
DQ_AVX512 void uniform_chunk(const T* x, int64_t b, int64_t e, int64_t cols, int64_t gs, int64_t groups,
                             bool symmetric, float* s_out, uint8_t* z_out, uint8_t* packed, int64_t nbytes,
                             float* scratch, int64_t stride, std::atomic<bool>& finite,
                             std::atomic<bool>& overflow) {
  float* ls = scratch;
  float* lz = scratch + stride;
  float* glo = scratch + 2 * stride;
  float* ghi = scratch + 3 * stride;
  float* gamax = scratch + 4 * stride;
  // the groups' min, max and max |x|
  GroupCursor cur{cols, gs, groups, 0, 0, 0};
  cur.seek(b);
  const bool first_owned = cur.begin() >= b;
  const int64_t first_index = cur.index();
  int64_t ngroups = 0;
  alignas(64) __m512 lo16[16], hi16[16], worst16[16];  // a batch of groups, not yet reduced
  int batch = 0;
  auto reduce_batch = [&]() DQ_AVX512 {  // the batch's 16 lanes into glo, ghi, gamax (zeros pad it)
    for (int j = batch; j < 16; ++j) lo16[j] = hi16[j] = worst16[j] = _mm512_setzero_ps();
    const __mmask16 m = first_lanes(batch);
    const int64_t at = ngroups - batch;
    _mm512_mask_storeu_ps(glo + at, m, reduce_each16(lo16, [](__m512 a, __m512 b) DQ_AVX512 { return _mm512_min_ps(a, b); }));
    _mm512_mask_storeu_ps(ghi + at, m, reduce_each16(hi16, [](__m512 a, __m512 b) DQ_AVX512 { return _mm512_max_ps(a, b); }));
    _mm512_mask_storeu_ps(gamax + at, m, reduce_each16(worst16, [](__m512 a, __m512 b) DQ_AVX512 {
      return _mm512_castsi512_ps(_mm512_max_epu32(_mm512_castps_si512(a), _mm512_castps_si512(b)));
    }));
    batch = 0;
  };
  for (int64_t pos = b; pos < e; cur.next()) {
    const GroupStats st = group_stats(x, cur.begin(), cur.end);
    pos = cur.end;
    lo16[batch] = st.lo;
    hi16[batch] = st.hi;
    worst16[batch] = st.worst;
    ++ngroups;
    if (++batch == 16) reduce_batch();
  }
  if (batch > 0) reduce_batch();
  // their parameters, 16 at a time (lanes past ngroups: zeros, never stored)
  __mmask16 bad = 0, huge = 0;
  for (int64_t k = 0; k < ngroups; k += 16) {
    const __mmask16 m = first_lanes(ngroups - k);
    const __m512i w = _mm512_castps_si512(_mm512_maskz_loadu_ps(m, gamax + k));
    __m512 sv, zv;
    uniform_params16<BITS>(_mm512_maskz_loadu_ps(m, glo + k), _mm512_maskz_loadu_ps(m, ghi + k),
                           _mm512_castsi512_ps(w), symmetric, &sv, &zv);
    bad |= _mm512_cmpge_epu32_mask(w, _mm512_set1_epi32(0x7F800000));
    huge |= _mm512_cmp_ps_mask(sv, _mm512_set1_ps(3.4028234663852886e38f), _CMP_NLE_UQ);
    _mm512_storeu_ps(ls + k, sv);
    _mm512_storeu_ps(lz + k, zv);
  }
  if (bad) finite = false;
  if (huge) overflow = true;
  // groups owned by this chunk: consecutive global indices from first_index
  const int64_t own0 = first_owned ? 0 : 1;
  if (ngroups > own0) {
    std::memcpy(s_out + first_index + own0, ls + own0, static_cast<size_t>(ngroups - own0) * sizeof(float));
    for (int64_t k = own0; k < ngroups; k += 16) {
      const __mmask16 m = first_lanes(ngroups - k);
      _mm512_mask_cvtepi32_storeu_epi8(z_out + first_index + k, m, _mm512_cvttps_epi32(_mm512_maskz_loadu_ps(m, lz + k)));
    }
  }
  // the codes
  const __m512 mv = _mm512_set1_ps(static_cast<float>((1 << BITS) - 1));
  const int64_t ahead = e - b;
  cur.seek(b);
  int64_t k = 0;
  int64_t i = b;
  while (i < e) {
    while (i >= cur.end) {
      cur.next();
      ++k;
    }
    const int64_t len = std::min<int64_t>(16, e - i);
    if (cur.end - i >= len) {  // whole units in this group
      const int64_t lim = std::min(cur.end, e);
      const GroupCoder code(ls[k], lz[k], BITS);
      if constexpr (BITS <= 4) {
        for (; i + 64 <= lim; i += 64) {
          for (int u = 0; u < 64; u += 16) prefetch16(x, i + u + ahead, 1);
          pack64<BITS>(code(load16(x + i)), code(load16(x + i + 16)), code(load16(x + i + 32)),
                       code(load16(x + i + 48)), packed + (i / 8) * BITS);
        }
      }
      for (; i + 16 <= lim; i += 16) {
        prefetch16(x, i + ahead, 1);  // the next chunk, while this one is in L1
        pack16<BITS>(code(load16(x + i)), packed + (i / 8) * BITS);
      }
      if (i < lim && lim == e) {  // the stream's last, partial unit
        pack_partial<BITS>(code(load16(x + i, first_lanes(e - i))), i, e - i, packed, nbytes);
        i = e;
      }
    } else {  // a unit across groups: per-lane scales and zero points
      alignas(64) float sl[16], zl[16];
      GroupCursor lane = cur;
      int64_t kk = k;
      for (int64_t j = 0; j < 16; ++j) {
        if (j < len) {
          while (i + j >= lane.end) {
            lane.next();
            ++kk;
          }
          sl[j] = ls[kk];
          zl[j] = lz[kk];
        } else {
          sl[j] = 1.0f;
          zl[j] = 0.0f;
        }
      }
      const __m512i q = code16(load16(x + i, first_lanes(len)), _mm512_load_ps(sl), _mm512_load_ps(zl), mv);
      if (len == 16) {
        pack16<BITS>(q, packed + (i / 8) * BITS);
      } else {
        pack_partial<BITS>(q, i, len, packed, nbytes);
      }
      i += len;
    }
  }
}

// ---- applying ----

// w[i, i + 16) (lanes in m) += alpha * dq, dq from codes q with per-lane s, z.
template <typename T, int BITS>
DQ_AVX512 inline void apply16(T* w, __m512i q, __mmask16 code_bits, __m512 s, __m512i z, __m512 alpha,
                              __mmask16 m) {
  __m512 dq;
  if constexpr (BITS == 1) {
    const __m512 neg = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(s), _mm512_set1_epi32(int32_t(0x80000000u))));
    dq = _mm512_mask_blend_ps(code_bits, neg, s);
  } else {
    dq = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q, z)), s);
  }
  const __m512 wv = m == 0xFFFF ? load16(w) : load16(w, m);
  store16(w, _mm512_add_ps(wv, _mm512_mul_ps(alpha, dq)), m);
}

// What apply16 adds for each code of one group, as a 16-entry table: entry j
// holds alpha * dequant(j mod 2^BITS), formed by apply16's operations in its
// order, so that w + table[code] is apply16's result bit for bit. vpermps
// reads an index's low 4 bits, so the unmasked codes (the next codes' bits
// above them) index the table directly (BITS <= 4; sign codes pick entry 0
// or 1 by their mask bit).
template <int BITS>
DQ_AVX512 inline __m512 apply_table(__m512 s, __m512i z, __m512 alpha) {
  static_assert(BITS <= 4, "a 16-entry table holds codes of at most 4 bits");
  const __m512i j = _mm512_and_si512(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                     _mm512_set1_epi32((1 << BITS) - 1));
  __m512 dq;
  if constexpr (BITS == 1) {
    const __m512 neg = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(s), _mm512_set1_epi32(int32_t(0x80000000u))));
    dq = _mm512_mask_blend_ps(_mm512_test_epi32_mask(j, j), neg, s);
  } else {
    dq = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(j, z)), s);
  }
  return _mm512_mul_ps(alpha, dq);
}

DQ_AVX512 inline __mmask16 load_sign_mask16(const uint8_t* in) {
  uint16_t bits;
  std::memcpy(&bits, in, 2);
  return bits;
}

template <typename T, int BITS>
DQ_AVX512 void apply_chunk(T* w, const uint8_t* packed, int64_t nbytes, const float* s_in, const uint8_t* z_in,
                           int64_t R, int64_t cols, int64_t gs, int64_t groups, float alpha, int64_t b,
                           int64_t e) {
  const __m512 av = _mm512_set1_ps(alpha);
  const Unpacker<BITS> unpack16;
  GroupCursor cur{cols, gs, groups, 0, 0, 0};
  cur.seek(b);
  auto param = [&](const GroupCursor& c) { return (R > 1 ? c.r : 0) * groups + c.g; };
  int64_t i = b;
  while (i < e) {
    while (i >= cur.end) cur.next();
    const int64_t len = std::min<int64_t>(16, e - i);
    __m512 sv;
    __m512i zv;
    if (cur.end - i >= len) {  // whole units in this group
      const int64_t k = param(cur);
      sv = _mm512_set1_ps(s_in[k]);
      zv = _mm512_set1_epi32(z_in ? int32_t(z_in[k]) : 0);
      const int64_t lim = std::min(cur.end, e);
      if constexpr (BITS == 8) {
        for (; i + 16 <= lim; i += 16) apply16<T, 8>(w + i, unpack16(packed + i), 0, sv, zv, av, 0xFFFF);
      } else {
        const __m512 table = apply_table<BITS>(sv, zv, av);
        const __m512 if0 = _mm512_permutexvar_ps(_mm512_setzero_si512(), table);
        const __m512 if1 = _mm512_permutexvar_ps(_mm512_set1_epi32(1), table);
        for (; i + 16 <= lim; i += 16) {
          const uint8_t* unit = packed + (i / 8) * BITS;
          __m512 add;
          if constexpr (BITS == 1) {
            add = _mm512_mask_blend_ps(load_sign_mask16(unit), if0, if1);
          } else {
            add = _mm512_permutexvar_ps(unpack16.unmasked(unit), table);
          }
          store16(w + i, _mm512_add_ps(load16(w + i), add), 0xFFFF);
        }
      }
      if (!(i < lim && lim == e)) continue;
    } else {  // a unit across groups
      alignas(64) float sl[16];
      alignas(64) int32_t zl[16];
      GroupCursor lane = cur;
      for (int64_t j = 0; j < 16; ++j) {
        if (j < len) {
          while (i + j >= lane.end) lane.next();
          const int64_t k = param(lane);
          sl[j] = s_in[k];
          zl[j] = z_in ? int32_t(z_in[k]) : 0;
        } else {
          sl[j] = 0.0f;
          zl[j] = 0;
        }
      }
      sv = _mm512_load_ps(sl);
      zv = _mm512_load_si512(zl);
    }
    // one unit [i, i + len) with sv / zv: partial at the stream's end, or across groups
    const __mmask16 m = first_lanes(e - i);
    const int64_t ulen = std::min<int64_t>(16, e - i);
    const __m512i q = ulen == 16 && BITS > 1 ? unpack16(packed + (i / 8) * BITS)
                                             : unpack_partial<BITS>(packed, nbytes, i, ulen);
    const __mmask16 code_bits = BITS == 1 ? _mm512_cmpneq_epi32_mask(q, _mm512_setzero_si512()) : 0;
    apply16<T, BITS>(w + i, q, code_bits, sv, zv, av, m);
    i += ulen;
  }
}


// ---- drivers (threading; no AVX-512 code of their own) ----

// abs_mean_from_bins for bins whose non-zero entries span few exponents (a
// row's usually span a handful): the total as one 128-bit integer at the
// lowest of them, converted to double by the compiler's correctly rounded
// (nearest even) integer conversion, then scaled by a power of two (exact:
// the result is at least 2^-149). That is the double abs_sum_to_double
// computes; other bins go through it. Clears the bins it read.
float row_abs_mean(AbsBins& bins, int64_t count) {
  int emin = kExponentBins, emax = -1;
  bool wide = false;
  for (int e = 0; e < kExponentBins; ++e) {
    if (bins.lo[e] | bins.hi[e]) {
      emin = std::min(emin, e);
      emax = e;
      wide |= bins.hi[e] != 0;
    }
  }
  if (emax < 0) return 0.0f;
  const int base = std::max(emin, 1);
  float mean;
  if (!wide && emax - base <= 56) {  // each term < 2^120, at most 57 of them: < 2^126
    unsigned __int128 total = 0;
    for (int e = emin; e <= emax; ++e)
      total += static_cast<unsigned __int128>(bins.lo[e]) << (std::max(e, 1) - base);
    const double sum = std::ldexp(static_cast<double>(total), base - 150);
    mean = static_cast<float>(sum / static_cast<double>(count));
  } else {
    mean = abs_mean_from_bins(bins.lo, count, bins.hi);
  }
  std::memset(bins.lo + emin, 0, sizeof(uint64_t) * static_cast<size_t>(emax - emin + 1));
  std::memset(bins.hi + emin, 0, sizeof(uint64_t) * static_cast<size_t>(emax - emin + 1));
  return mean;
}

// Sign codes into out and the exact mean |x| (per row or of the tensor): one
// read of x where rows start on byte boundaries (always for the tensor).
template <typename T>
std::vector<float> sign_avx512(const T* x, int64_t rows, int64_t cols, bool per_row, uint8_t* out) {
  const int64_t n = rows * cols;
  std::atomic<bool> finite{true};
  std::vector<float> means;
  if (per_row) {
    means.resize(static_cast<size_t>(rows));
    const bool fused = cols % 8 == 0;
    parallel_chunks(rows, std::max<int64_t>(1, kChunk / std::max<int64_t>(cols, 1)), [&](int64_t rb, int64_t re) {
      AbsBins bins;
      bins.clear();
      for (int64_t r = rb; r < re; ++r) {  // row_abs_mean leaves the bins cleared
        if (!abs_range(x + r * cols, cols, &bins, fused ? out + r * cols / 8 : nullptr)) finite = false;
        means[r] = cols ? row_abs_mean(bins, cols) : 0.0f;
      }
    });
    if (!fused)
      parallel_chunks(n, kChunk, [&](int64_t b, int64_t e) { abs_range(x + b, e - b, nullptr, out + b / 8); });
  } else {
    means.push_back(whole_abs_mean(n, finite, [&](int64_t b, int64_t e, AbsBins& bins) {
      return abs_range(x + b, e - b, &bins, out + b / 8);  // chunks of 2^18: whole bytes of the signs
    }));
  }
  if (!finite) throw_nonfinite(x, n, "x");
  return means;
}

// The exact mean |x| of the whole tensor; throws on NaN/inf.
template <typename T>
float abs_mean_avx512(const T* x, int64_t n) {
  std::atomic<bool> finite{true};
  const float mean = whole_abs_mean(n, finite, [&](int64_t b, int64_t e, AbsBins& bins) {
    return abs_range(x + b, e - b, &bins, nullptr);
  });
  if (!finite) throw_nonfinite(x, n, "x");
  return mean;
}

// The band elements of one call, per scanning thread: each thread appends its
// chunks' elements (patterns of type P, and offsets in their chunk) to
// its own buffers and lists its chunks, so the fix-up reads each buffer as one
// stream. The buffers and lists belong to the calling thread (made in its
// constructor, used from the workers) and keep their capacity between calls,
// as the per-chunk records do (KeptVector): no allocation on the next call of
// the same size, no clearing. Per chunk: where its elements are, how many,
// and whether it kept them (at most kKeptPerChunk) or is to be rewritten.
template <typename P>
struct BandBuffers {
  struct PerThread {
    std::vector<P> patterns;  // [0, used) hold this call's elements
    std::vector<uint16_t> offsets;
    int64_t used = 0;
    std::vector<int64_t> chunks;  // the chunks this thread scanned, in order
  };
  struct Chunk {
    int thread = 0;  // that scanned it
    bool rewrite = false;  // too many band elements to keep
    int64_t first = 0, count = 0;  // its elements in that thread's buffers
  };
  struct Slot {  // where the chunk being scanned puts its band elements
    int t;
    int64_t first;
    P* patterns;
    uint16_t* offsets;
  };
  std::vector<PerThread>& of;  // of[t]: thread t's elements
  KeptVector<Chunk, BandBuffers> chunk;
  const int nthreads;

  explicit BandBuffers(int64_t nchunks)
      : of(calling_thread()), chunk(nchunks, Chunk{}), nthreads(at::get_num_threads()) {
    of.resize(static_cast<size_t>(nthreads));
    for (PerThread& buf : of) {
      buf.used = 0;
      buf.chunks.clear();
    }
  }
  static std::vector<PerThread>& calling_thread() {
    static thread_local std::vector<PerThread> buffers;
    return buffers;
  }
  // The running worker's slot for a chunk of up to `elements` band elements
  // (room for a 64-byte store past them too: 32 16-bit offsets).
  Slot open(int64_t elements) {
    const int t = at::get_thread_num();
    TORCH_CHECK(t >= 0 && t < nthreads, "deltaops._C: internal error: thread ", t, " of ", nthreads);
    PerThread& buf = of[t];
    const int64_t first = buf.used, need = first + elements + 32;
    if (static_cast<int64_t>(buf.patterns.size()) < need) {
      const size_t grown = std::max(2 * buf.patterns.size(), static_cast<size_t>(need));
      buf.patterns.resize(grown);
      buf.offsets.resize(grown);
    }
    return {t, first, buf.patterns.data() + first, buf.offsets.data() + first};
  }
  // Chunk c, scanned into `slot`, found `count` band elements: kept when at
  // most kKeptPerChunk, else the chunk is to be rewritten.
  void close(const Slot& slot, int64_t c, int64_t count) {
    const bool keep = count <= kKeptPerChunk;
    chunk[c] = {slot.t, !keep, slot.first, keep ? count : 0};
    of[slot.t].used = slot.first + chunk[c].count;
    of[slot.t].chunks.push_back(c);
  }
  const P* patterns(int64_t c) const { return of[chunk[c].thread].patterns.data() + chunk[c].first; }
  const uint16_t* offsets(int64_t c) const { return of[chunk[c].thread].offsets.data() + chunk[c].first; }
  int64_t count(int64_t c) const { return chunk[c].count; }
  bool rewrite(int64_t c) const { return chunk[c].rewrite; }
  bool any_rewrite() const {
    return std::any_of(chunk.vector().begin(), chunk.vector().end(), [](const Chunk& c) { return c.rewrite; });
  }
  // f(c) for every chunk, each thread's chunks in order on one thread (its
  // buffers read as one stream), the threads in parallel.
  template <typename F>
  void for_each_chunk(const F& f) const {
    at::parallel_for(0, nthreads, 1, [&](int64_t tb, int64_t te) {
      for (int64_t t = tb; t < te; ++t)
        for (const int64_t c : of[t].chunks) f(c);
    });
  }
};

// Adds up the chunks in chunk order (one addition per chunk): moments[0..1],
// and returns (largest key, keys above the band).
std::pair<uint32_t, int64_t> add_up_chunks(const std::vector<CompeftChunk>& chunks, double* moments) {
  uint32_t max_key = 0;
  int64_t above = 0;
  moments[0] = moments[1] = 0.0;
  for (const CompeftChunk& c : chunks) {
    max_key = std::max(max_key, c.max_key);
    above += c.above;
    moments[0] += c.s1;
    moments[1] += c.s2;
  }
  return {max_key, above};
}

// The band key holding the k-th largest element: the per-chunk histograms
// (hist[c * width + key - lo]) added up, then walked down from the top with
// `count` starting at the keys above the band. Returns the key, or -1 when the
// band missed it; `count` ends at the number of elements above that key.
int64_t key_of_kth(const std::vector<uint32_t>& hist, int64_t nchunks, int64_t lo, int64_t width, int64_t k,
                   int64_t& count) {
  KeptVector<int64_t, struct MergedHistogram> merged(width, 0);
  for (int64_t c = 0; c < nchunks; ++c)
    for (int64_t w = 0; w < width; ++w) merged[w] += hist[c * width + w];
  for (int64_t key = lo + width - 1; count < k && key >= lo; --key) {
    if (count + merged[key - lo] >= k) return key;
    count += merged[key - lo];
  }
  return -1;
}

// Each chunk's share of the `take` threshold ties kept, in place of its
// count of ties: equal keys are kept in flat order, so chunk by chunk until
// `take` is used up.
void ties_to_budgets(int64_t* ties, int64_t nchunks, int64_t take) {
  int64_t before = 0;
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t tied = ties[c];
    ties[c] = std::clamp<int64_t>(take - before, 0, tied);
    before += tied;
  }
}

// ComPEFT for bf16/fp16 (see compeft_scan): fills `moments` with
// [sum x, sum x^2, h] (compeft_quantize's contract). When the sample's band
// misses the k-th largest key, the codes come from the full top-k instead.
template <typename T>
at::Tensor compeft_avx512(const at::Tensor& x, int64_t k, double* moments) {
  constexpr bool kBF16 = std::is_same_v<T, bf16_t>;
  const uint16_t* h = static_cast<const uint16_t*>(x.data_ptr());
  const int64_t n = x.numel(), nchunks = (n + kCompeftChunk - 1) / kCompeftChunk;
  CompeftBand range{0x8000, 0x7FFF, 0x7FFF};  // an empty band above every key (k == 0 keeps nothing)
  if (k > 0) range = compeft_band(h, n, k);
  if (nchunks * (range.hi - range.lo + 1) > kMaxBandCells) range = {0x8000, 0x7FFF, 0x7FFF};  // full top-k below
  const int64_t lo = range.lo, hi = range.hi, width = hi - lo + 1;
  at::Tensor packed = new_output({packed_nbytes(n, 2)}, x.options().dtype(at::kByte));
  uint8_t* out = packed.data_ptr<uint8_t>();
  KeptVector<CompeftChunk, struct ChunkSums> chunks(nchunks, CompeftChunk{});
  KeptVector<uint32_t, struct BandHistograms> hist(nchunks * width, 0u);  // per chunk: hist[key - lo]
  BandBuffers<uint16_t> bands(nchunks);
  const bool vbmi2 = vbmi2_enabled();
  parallel_chunks(n, kCompeftChunk, [&](int64_t b, int64_t e) {
    const auto slot = bands.open(e - b);
    const int64_t c = b / kCompeftChunk;
    const int64_t count =
        vbmi2 ? compeft_scan<kBF16, true>(h, b, e, range, out, slot.patterns, slot.offsets, &chunks[c])
              : compeft_scan<kBF16, false>(h, b, e, range, out, slot.patterns, slot.offsets, &chunks[c]);
    count_band_keys(slot.patterns, count, range.lo, width, hist.data() + c * width);
    bands.close(slot, c, count);
  });
  const auto [max_key, above] = add_up_chunks(chunks.vector(), moments);
  if (max_key >= (kBF16 ? 0x7F80u : 0x7C00u)) throw_nonfinite(static_cast<const T*>(x.data_ptr()), n, "x");
  // additions per term: in its lane, 2 + 3 levels of vector sums (counted as 2 + 7), one per chunk
  moments[2] = static_cast<double>(kCompeftChunk / 32 + 9 + nchunks);
  if (k == 0) return packed;

  int64_t count = above;
  const int64_t thr = key_of_kth(hist.vector(), nchunks, lo, width, k, count);
  if (thr < 0) return compeft_pack(x, topk_mask(x, k));  // the band missed the k-th key
  KeptVector<int64_t, struct TieBudgets> budget(nchunks, 0);  // each chunk's threshold ties, then how many it keeps
  for (int64_t c = 0; c < nchunks; ++c) budget[c] = hist[c * width + (thr - lo)];
  ties_to_budgets(budget.data(), nchunks, k - count);
  bands.for_each_chunk([&](int64_t c) {
    const int64_t b = c * kCompeftChunk, e = std::min(n, b + kCompeftChunk);
    if (bands.rewrite(c))
      compeft_codes_chunk(h, b, e, static_cast<uint16_t>(thr), budget[c], out);
    else
      compeft_fixup(bands.patterns(c), bands.offsets(c), bands.count(c), b, range.guess, static_cast<uint32_t>(thr),
                    budget[c], out);
  });
  return packed;
}

// ComPEFT for fp32 (see compeft_scan32); as compeft_avx512. Falls back to the
// full top-k when the band misses, or when a chunk holds too many band
// elements to keep them (heavy ties).
at::Tensor compeft_avx512_f32(const at::Tensor& x, int64_t k, double* moments) {
  const uint32_t* u = static_cast<const uint32_t*>(x.data_ptr());
  const int64_t n = x.numel(), nchunks = (n + kCompeftChunk - 1) / kCompeftChunk;
  constexpr CompeftBand kEmpty{0x10000, 0xFFFF, 0xFFFF};  // above every coarse key: nothing kept, no band
  CompeftBand range = k > 0 ? compeft_band(u, n, k) : kEmpty;
  if (nchunks * (range.hi - range.lo + 1) > kMaxBandCells) range = kEmpty;  // full top-k below
  const int64_t lo = range.lo, width = static_cast<int64_t>(range.hi) - lo + 1;
  at::Tensor packed = new_output({packed_nbytes(n, 2)}, x.options().dtype(at::kByte));
  uint8_t* out = packed.data_ptr<uint8_t>();
  KeptVector<CompeftChunk, struct ChunkSums> chunks(nchunks, CompeftChunk{});
  KeptVector<uint32_t, struct BandHistograms> hist(nchunks * width, 0u);  // per chunk: hist[coarse key - lo]
  BandBuffers<uint32_t> bands(nchunks);
  const bool vbmi2 = vbmi2_enabled();
  parallel_chunks(n, kCompeftChunk, [&](int64_t b, int64_t e) {
    const auto slot = bands.open(e - b);
    const int64_t c = b / kCompeftChunk;
    const int64_t count = vbmi2 ? compeft_scan32<true>(u, b, e, range, out, slot.patterns, slot.offsets, &chunks[c])
                                : compeft_scan32<false>(u, b, e, range, out, slot.patterns, slot.offsets, &chunks[c]);
    count_band_keys(slot.patterns, count, range.lo, width, hist.data() + c * width);
    bands.close(slot, c, count);
  });
  const auto [max_key, above] = add_up_chunks(chunks.vector(), moments);
  if (max_key >= 0x7F800000u) throw_nonfinite(static_cast<const float*>(x.data_ptr()), n, "x");
  // additions per term: in its lane, 1 + 3 levels of vector sums (counted as 1 + 7), one per chunk
  moments[2] = static_cast<double>(kCompeftChunk / 16 + 8 + nchunks);
  if (k == 0) return packed;
  // a chunk with too many band elements to keep: the full top-k
  if (bands.any_rewrite() || width == 0) return compeft_pack(x, topk_mask(x, k));

  // the coarse bin of the k-th largest key, then its exact key among the bin's entries
  int64_t count = above;
  const int64_t coarse = key_of_kth(hist.vector(), nchunks, lo, width, k, count);
  if (coarse < 0) return compeft_pack(x, topk_mask(x, k));  // the band missed the k-th key
  // (each thread's buffer counted on its own, then added up)
  KeptVector<int64_t, struct FineKeyCounts> fine_of(bands.nthreads * 0x8000, 0);  // thread t: [t * 0x8000, +0x8000)
  at::parallel_for(0, bands.nthreads, 1, [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t)
      count_fine_keys(bands.of[t].patterns.data(), bands.of[t].used, static_cast<uint32_t>(coarse),
                      fine_of.data() + t * 0x8000);
  });
  int64_t* fine = fine_of.data();  // thread 0's counts, the others added in
  for (int64_t t = 1; t < bands.nthreads; ++t)
    for (int64_t f = 0; f < 0x8000; ++f) fine[f] += fine_of[t * 0x8000 + f];
  int64_t low = 0x7FFF;
  for (; count + fine[low] < k; --low) count += fine[low];
  const uint32_t thr = (static_cast<uint32_t>(coarse) << 15) | static_cast<uint32_t>(low);
  const int64_t take = k - count;  // keys equal to thr that are kept, in flat order
  KeptVector<int64_t, struct TieBudgets> budget(nchunks, 0);  // each chunk's threshold ties, then how many it keeps
  bands.for_each_chunk([&](int64_t c) { budget[c] = count_equal_keys(bands.patterns(c), bands.count(c), thr); });
  ties_to_budgets(budget.data(), nchunks, take);
  const uint32_t guess = (range.guess << 15) | 0x7FFFu;
  bands.for_each_chunk([&](int64_t c) {
    compeft_fixup(bands.patterns(c), bands.offsets(c), bands.count(c), c * kCompeftChunk, guess, thr, budget[c], out);
  });
  return packed;
}

// ---- BitNet absmean, bf16, in one read of x ----
// As ComPEFT's scan: a band of threshold keys comes from a sample's mean |x|;
// one pass sums |x| exactly (abs_block_bf16), writes every code as if the
// sample's guess were the threshold key and keeps the band's elements aside;
// once the exact mean gives the exact key, the codes between the two are
// rewritten (compeft_fixup with no ties). The two-pass path (exact mean, then
// the codes) reads x twice.

// Band of bf16 threshold keys (x is kept iff its magnitude pattern is at
// least the key of ternary_threshold(s)): the keys of s = the sample's mean
// |x| (the guess) and of +-6 standard errors of it, widened by two keys. Only
// the speed depends on it; an empty band (lo > hi) when the sample is not finite.
inline uint32_t absmean_key(double s) {
  const double clamped = std::min(std::max(s, static_cast<double>(kAbsmeanEps)), 3.0e38);
  return (f32_bits(ternary_threshold(static_cast<float>(clamped))) + 0xFFFFu) >> 16;
}

CompeftBand absmean_band(const uint16_t* h, int64_t n) {
  constexpr int64_t S = kCompeftSample;
  KeptVector<float, struct SampleMagnitudes> sample(S, 0.0f);
  at::parallel_for(0, S, 4096, [&](int64_t jb, int64_t je) {
    for (int64_t j = jb; j < je; ++j) sample[j] = std::fabs(bf16_to_f32(h[j * n / S]));
  });
  double sum = 0.0, squares = 0.0;
  for (const float a : sample) {
    sum += a;
    squares += static_cast<double>(a) * a;
  }
  const double mean = sum / S, spread = 6.0 * std::sqrt(std::max(squares / S - mean * mean, 0.0) / S);
  if (!std::isfinite(mean + spread)) return {1, 0, 0};  // empty: no exact key falls in it, every code is rewritten
  return {std::max<uint32_t>(absmean_key(mean - spread), 3) - 2, absmean_key(mean),
          std::min<uint32_t>(absmean_key(mean + spread) + 2, 0x7F80u)};
}

// One chunk [b, e) of the scan (b a multiple of 2048): exact |x| sums into
// `bins`, codes for key >= range.guess into packed, the band's elements (key
// in [lo, hi]) into band / offsets (keep_band_lanes); returns how many, or -1
// on NaN/inf.
template <bool VBMI2>
DQ_AVX512 int64_t absmean_scan(const bf16_t* x, int64_t b, int64_t e, CompeftBand range, AbsBins& bins,
                               uint8_t* packed, uint16_t* band, uint16_t* offsets) {
  const __m512i lanes = lane_index16(), lov = _mm512_set1_epi16(static_cast<int16_t>(range.lo)),
                guessv = _mm512_set1_epi16(static_cast<int16_t>(range.guess)),
                hiv = _mm512_set1_epi16(static_cast<int16_t>(range.hi));
  int64_t nband = 0;
  uint32_t* scratch = band_entry_scratch<VBMI2>(e - b);
  bool finite = true;
  for (int64_t bb = b; bb < e; bb += kBlock512) {
    const int64_t chunk_at = bb - b;  // of the block in the chunk
    finite &= abs_block_bf16(x + bb, std::min(kBlock512, e - bb), &bins,
                             [&](int64_t i, int64_t len, __mmask32 m, __m512i v, __m512i a, __mmask32)
                                 DQ_AVX512 __attribute__((always_inline)) {
      store_ternary_codes(_mm512_cmpge_epu16_mask(a, guessv), _mm512_movepi16_mask(v), m, len, packed + (bb + i) / 4);
      const uint32_t in_band = _mm512_mask_cmpge_epu16_mask(m, a, lov) & _mm512_cmple_epu16_mask(a, hiv);
      const __m512i lane_offsets = _mm512_add_epi16(lanes, _mm512_set1_epi16(static_cast<int16_t>(chunk_at + i)));
      keep_band_lanes<VBMI2>(in_band, v, lane_offsets, band, offsets, scratch, nband);
    });
  }
  if constexpr (!VBMI2) split_band_entries(scratch, nband, band, offsets);
  return finite ? nband : -1;
}

// BitNet absmean of a bf16 tensor (n > 2 * kCompeftSample): codes into
// packed, returns the scale s = max(exact mean |x|, kAbsmeanEps); throws on
// NaN/inf.
float absmean_one_read(const bf16_t* x, int64_t n, uint8_t* packed) {
  const uint16_t* h = reinterpret_cast<const uint16_t*>(x);
  const CompeftBand range = absmean_band(h, n);
  BandBuffers<uint16_t> bands((n + kCompeftChunk - 1) / kCompeftChunk);
  KeptVector<AbsBins, struct ThreadAbsBins> bins(bands.nthreads, AbsBins{});  // exact integer sums: any order
  for (AbsBins& b : bins) b.clear();
  std::atomic<bool> finite{true};
  const bool vbmi2 = vbmi2_enabled();
  parallel_chunks(n, kCompeftChunk, [&](int64_t b, int64_t e) {
    const auto slot = bands.open(e - b);
    const int64_t count = vbmi2 ? absmean_scan<true>(x, b, e, range, bins[slot.t], packed, slot.patterns, slot.offsets)
                                : absmean_scan<false>(x, b, e, range, bins[slot.t], packed, slot.patterns, slot.offsets);
    if (count < 0) finite = false;
    bands.close(slot, b / kCompeftChunk, std::max<int64_t>(count, 0));
  });
  if (!finite) throw_nonfinite(x, n, "x");
  AbsBins total;
  total.clear();
  for (const AbsBins& b : bins) total.merge(b);
  const float mean = abs_mean_from_bins(total.lo, n, total.hi);
  const float s = mean > kAbsmeanEps ? mean : kAbsmeanEps;
  const uint32_t t_bits = f32_bits(ternary_threshold(s));
  const uint32_t key = (t_bits + 0xFFFFu) >> 16;
  // the codes that differ have keys in [min(guess, key), max(guess, key)): all in the band?
  if (key < range.lo || key > range.hi + 1) {
    parallel_chunks(n, kChunk, [&](int64_t b, int64_t e) { ternary_chunk(x, b, e, t_bits, packed); });
    return s;
  }
  bands.for_each_chunk([&](int64_t c) {
    const int64_t b = c * kCompeftChunk, e = std::min(n, b + kCompeftChunk);
    if (bands.rewrite(c))
      ternary_chunk(x, b, e, t_bits, packed);
    else  // kept iff key >= `key`: compeft_fixup's key > key - 1, no ties
      compeft_fixup(bands.patterns(c), bands.offsets(c), bands.count(c), b, range.guess - 1, key - 1, 0, packed);
  });
  return s;
}

#pragma GCC diagnostic pop
#endif  // DELTAOPS_QUANT_AVX512

}  // namespace

// ---- pack / unpack ------------------------------------------------------------------------------

at::Tensor pack_bits(const at::Tensor& codes, int64_t bits) {
  check_cpu(codes, "codes");
  check_dtype(codes, at::kByte, "codes", "uint8");
  at::Tensor out;
  with_bits(bits, [&](auto bits_tag) {
    constexpr int B = decltype(bits_tag)::value;
    const int64_t n = codes.numel();
    const uint8_t* c = codes.data_ptr<uint8_t>();
    uint8_t worst = 0;
    for (int64_t i = 0; i < n; ++i) worst = std::max(worst, c[i]);
    if (B < 8 && worst >= (1u << B)) {
      int64_t first = 0;
      while (c[first] < (1u << B)) ++first;
      throw ValueError("code " + std::to_string(c[first]) + " at flat index " + std::to_string(first) +
                       " does not fit in " + std::to_string(B) + " bits");
    }
    out = encode_all<B>(n, codes.options(), [&](int64_t b, int64_t e, uint8_t* buf) {
      std::memcpy(buf, c + b, static_cast<size_t>(e - b));
    });
  });
  return out;
}

at::Tensor unpack_bits(const at::Tensor& packed, int64_t bits, int64_t numel) {
  check_cpu(packed, "packed");
  check_dtype(packed, at::kByte, "packed", "uint8");
  if (numel < 0) throw ValueError("numel must be non-negative, got " + std::to_string(numel));
  at::Tensor out;
  with_bits(bits, [&](auto bits_tag) {
    constexpr int B = decltype(bits_tag)::value;
    validate_stream(packed, B, numel);
    out = new_output({numel}, packed.options());
    const uint8_t* p = packed.data_ptr<uint8_t>();
    uint8_t* o = out.data_ptr<uint8_t>();
    const int64_t nbytes = packed.numel();
    parallel_chunks(numel, kChunk, [&](int64_t b, int64_t e) { decode<B>(p, nbytes, b, e - b, o + b); });
  });
  return out;
}

// ---- quantizers ------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> quantize_sign(const at::Tensor& x, bool per_row) {
  check_cpu(x, "x");
  const auto [rows, cols] = rows_cols(x, "x");
  at::Tensor packed, scales;
  with_dtype(x, "x", [&](auto tag) {
    using T = decltype(tag);
    const T* data = static_cast<const T*>(x.data_ptr());
#if DELTAOPS_QUANT_AVX512
    if (use_avx512()) {
      packed = new_output({packed_nbytes(x.numel(), 1)}, x.options().dtype(at::kByte));
      const std::vector<float> means = sign_avx512(data, rows, cols, per_row, packed.data_ptr<uint8_t>());
      scales = at::empty({per_row ? rows : 1, 1}, x.options().dtype(at::kFloat));
      std::copy(means.begin(), means.end(), scales.data_ptr<float>());
      return;
    }
#endif
    const std::vector<float> means = abs_means(data, rows, cols, per_row);
    scales = at::empty({per_row ? rows : 1, 1}, x.options().dtype(at::kFloat));
    std::copy(means.begin(), means.end(), scales.data_ptr<float>());
    packed = encode_all<1>(x.numel(), x.options(), [&](int64_t b, int64_t e, uint8_t* codes) {
      sign_codes(data + b, e - b, codes);
    });
  });
  return {packed, scales};
}

std::tuple<at::Tensor, at::Tensor> quantize_ternary_absmean(const at::Tensor& x) {
  check_cpu(x, "x");
  const auto [rows, cols] = rows_cols(x, "x");
  at::Tensor packed, scale;
  with_dtype(x, "x", [&](auto tag) {
    using T = decltype(tag);
    const T* data = static_cast<const T*>(x.data_ptr());
#if DELTAOPS_QUANT_AVX512
    if (use_avx512()) {
      const int64_t n = x.numel(), nbytes = packed_nbytes(n, 2);
      packed = new_output({nbytes}, x.options().dtype(at::kByte));
      uint8_t* out = packed.data_ptr<uint8_t>();
      if constexpr (std::is_same_v<T, bf16_t>) {
        if (n > 2 * kCompeftSample) {
          scale = at::full({1, 1}, absmean_one_read(data, n, out), x.options().dtype(at::kFloat));
          return;
        }
      }
      const float mean = abs_mean_avx512(data, n);
      const float s = mean > kAbsmeanEps ? mean : kAbsmeanEps;
      scale = at::full({1, 1}, s, x.options().dtype(at::kFloat));
      const uint32_t t_bits = f32_bits(ternary_threshold(s));
      parallel_chunks(n, kChunk, [&](int64_t b, int64_t e) { ternary_chunk(data, b, e, t_bits, out); });
      return;
    }
#endif
    const float mean = abs_means(data, rows, cols, false)[0];
    const float s = mean > kAbsmeanEps ? mean : kAbsmeanEps;
    scale = at::full({1, 1}, s, x.options().dtype(at::kFloat));
    const float zero = static_cast<float>(kTernaryZero);
    packed = encode_all<2>(x.numel(), x.options(), [&](int64_t b, int64_t e, uint8_t* codes) {
      scaled_codes(data + b, e - b, s, zero, 2.0f, codes);
    });
  });
  return {packed, scale};
}

at::Tensor compeft_pack(const at::Tensor& x, const at::Tensor& keep) {
  check_cpu(x, "x");
  check_cpu(keep, "keep");
  check_dtype(keep, at::kBool, "keep", "bool");
  if (keep.numel() != x.numel())
    throw ValueError("keep must have x's " + std::to_string(x.numel()) + " elements, got " +
                     std::to_string(keep.numel()));
  at::Tensor packed;
  with_dtype(x, "x", [&](auto tag) {
    using T = decltype(tag);
    const T* data = static_cast<const T*>(x.data_ptr());
    const uint8_t* kept = reinterpret_cast<const uint8_t*>(keep.data_ptr<bool>());
    // one pass: sign(x) + 1 (2, 1 or 0) where kept, 1 elsewhere; branch-free so it vectorizes
    packed = encode_all<2>(x.numel(), x.options(), [&](int64_t b, int64_t e, uint8_t* codes) {
      const T* __restrict v = data + b;
      const uint8_t* __restrict k = kept + b;
      for (int64_t i = 0; i < e - b; ++i) {
        const float f = load_f32(v[i]);
        const uint8_t sign_plus_one = static_cast<uint8_t>(1 + (f > 0.0f) - (f < 0.0f));
        codes[i] = k[i] ? sign_plus_one : static_cast<uint8_t>(kTernaryZero);
      }
    });
  });
  return packed;
}

std::tuple<at::Tensor, at::Tensor> compeft_quantize(const at::Tensor& x, int64_t k) {
  check_cpu(x, "x");
  const int64_t n = x.numel();
  if (k < 0 || k > n)
    throw ValueError("k must be in [0, " + std::to_string(n) + "], got " + std::to_string(k));
  double m[3] = {0.0, 0.0, 0.0};
  at::Tensor packed;
  with_dtype(x, "x", [&](auto tag) {
    using T = decltype(tag);
    const T* data = static_cast<const T*>(x.data_ptr());
#if DELTAOPS_QUANT_AVX512
    if (use_avx512()) {
      if constexpr (std::is_same_v<T, float>)
        packed = compeft_avx512_f32(x, k, m);
      else
        packed = compeft_avx512<T>(x, k, m);
      return;
    }
#endif
    if (!compeft_moments(data, n, m)) throw_nonfinite(data, n, "x");
    packed = compeft_pack(x, topk_mask(x, k));
  });
  at::Tensor moments = at::empty({3}, x.options().dtype(at::kDouble));
  std::copy(m, m + 3, moments.data_ptr<double>());
  return {packed, moments};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_uniform(const at::Tensor& x, int64_t bits,
                                                                int64_t group_size, bool symmetric) {
  check_cpu(x, "x");
  if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
    throw ValueError("bits must be one of 2, 3, 4, 8; got " + std::to_string(bits));
  if (group_size <= 0) throw ValueError("group_size must be positive, got " + std::to_string(group_size));
  const auto [rows, cols] = rows_cols(x, "x");
  const int64_t groups = cols ? (cols + group_size - 1) / group_size : 0;
  at::Tensor scales = new_output({rows, groups}, x.options().dtype(at::kFloat));
  at::Tensor zeros = new_output({rows, groups}, x.options().dtype(at::kByte));
  at::Tensor packed;
  with_dtype(x, "x", [&](auto tag) {
    using T = decltype(tag);
    const T* data = static_cast<const T*>(x.data_ptr());
    float* s_out = scales.data_ptr<float>();
    uint8_t* z_out = zeros.data_ptr<uint8_t>();
    std::atomic<bool> finite{true}, overflow{false};
#if DELTAOPS_QUANT_AVX512
    if (use_avx512()) {
      // One pass: each chunk computes the parameters of its groups, then its codes.
      const int64_t n = x.numel();
      with_bits(bits, [&](auto bits_tag) {
        constexpr int B = decltype(bits_tag)::value;
        if constexpr (B >= 2) {
          const int64_t nbytes = packed_nbytes(n, B);
          packed = new_output({nbytes}, x.options().dtype(at::kByte));
          uint8_t* out = packed.data_ptr<uint8_t>();
          // chunks of 8192 elements: a chunk and the next one (prefetched while
          // the codes of this one are made) stay in L1 for 16-bit inputs
          constexpr int64_t kChunk = 1 << 13;
          constexpr int64_t stride = kChunk + 16;
          parallel_chunks(n, kChunk, [&](int64_t b, int64_t e) {
            uniform_chunk<T, B>(data, b, e, cols, group_size, groups, symmetric, s_out, z_out, out, nbytes,
                                thread_scratch<float>(5 * stride), stride, finite, overflow);
          });
        }
      });
      if (!finite) throw_nonfinite(data, x.numel(), "x");
      if (overflow) throw ValueError("x: the value range of a quantization group overflows fp32");
      return;
    }
#endif
    std::vector<float> zf(static_cast<size_t>(rows * groups));
    // Pass 1: min, max, max |x| of every group, then its scale and zero point.
    const int64_t ngroups = rows * groups;
    parallel_chunks(ngroups, std::max<int64_t>(1, kChunk / group_size), [&](int64_t gb, int64_t ge) {
      for (int64_t gi = gb; gi < ge; ++gi) {
        const int64_t r = gi / groups, g = gi % groups;
        const int64_t b = r * cols + g * group_size, e = r * cols + std::min(cols, (g + 1) * group_size);
        // min and max on order-preserving integer keys of the fp32 bits (integer
        // min/max vectorize; float ones do not without fast-math), and
        // max |x| on the magnitude bits.
        uint32_t lo_key = 0xFFFFFFFFu, hi_key = 0u, worst = 0u;
        for (int64_t i = b; i < e; ++i) {
          const uint32_t u = f32_bits(load_f32(data[i]));
          const uint32_t key = (u >> 31) ? ~u : (u | 0x80000000u);
          lo_key = std::min(lo_key, key);
          hi_key = std::max(hi_key, key);
          worst = std::max(worst, u & 0x7FFFFFFFu);
        }
        auto from_key = [](uint32_t key) { return f32_from_bits((key >> 31) ? (key & 0x7FFFFFFFu) : ~key); };
        const float lo = from_key(lo_key), hi = from_key(hi_key), amax = f32_from_bits(worst);
        if (worst >= 0x7F800000u) {
          finite = false;
          continue;
        }
        float s, z;
        uniform_params(lo, hi, amax, static_cast<int>(bits), symmetric, &s, &z);
        if (!(s <= 3.4028234663852886e38f)) overflow = true;
        s_out[gi] = s;
        zf[gi] = z;
        z_out[gi] = static_cast<uint8_t>(z);
      }
    });
    if (!finite) throw_nonfinite(data, x.numel(), "x");
    if (overflow) throw ValueError("x: the value range of a quantization group overflows fp32");
    // Pass 2: codes, one (row, group) segment at a time.
    const float maxq = static_cast<float>((1 << bits) - 1);
    with_bits(bits, [&](auto bits_tag) {
      constexpr int B = decltype(bits_tag)::value;
      packed = encode_all<B>(x.numel(), x.options(), [&](int64_t b, int64_t e, uint8_t* codes) {
        int64_t i = b;
        while (i < e) {
          const int64_t r = i / cols, c = i - r * cols, g = c / group_size;
          const int64_t seg_end = std::min(e, r * cols + std::min(cols, (g + 1) * group_size));
          const float s = s_out[r * groups + g], z = zf[r * groups + g];
          if (s > 0.0f) {
            scaled_codes(data + i, seg_end - i, s, z, maxq, codes + (i - b));
          } else {
            std::memset(codes + (i - b), static_cast<int>(z), static_cast<size_t>(seg_end - i));
          }
          i = seg_end;
        }
      });
    });
  });
  return {packed, scales, zeros};
}

// ---- applying ------------------------------------------------------------------------------------------

namespace {

// Checks the stored tensors of a delta of (rows, cols) against each other.
// Returns R (1 or rows) and G.
std::pair<int64_t, int64_t> validate_params(int64_t rows, int64_t cols, const at::Tensor& packed,
                                            const at::Tensor& scales, const at::Tensor& zeros,
                                            int64_t bits, int64_t group_size) {
  check_cpu(packed, "packed");
  check_cpu(scales, "scales");
  check_dtype(packed, at::kByte, "packed", "uint8");
  check_dtype(scales, at::kFloat, "scales", "float32");
  if (bits != 1 && bits != 2 && bits != 3 && bits != 4 && bits != 8)
    throw ValueError("bits must be one of 1, 2, 3, 4, 8; got " + std::to_string(bits));
  if (group_size <= 0) throw ValueError("group_size must be positive, got " + std::to_string(group_size));
  validate_stream(packed, bits, rows * cols);
  const int64_t groups = cols ? (cols + group_size - 1) / group_size : 0;
  if (scales.dim() != 2 || scales.size(1) != groups || (scales.size(0) != 1 && scales.size(0) != rows))
    throw ValueError("scales has shape " + c10::str(scales.sizes()) + "; expected (1, " +
                     std::to_string(groups) + ") or (" + std::to_string(rows) + ", " +
                     std::to_string(groups) + ")");
  const float* s = scales.data_ptr<float>();
  for (int64_t i = 0; i < scales.numel(); ++i)
    if (!((f32_bits(s[i]) & 0x7FFFFFFFu) < 0x7F800000u)) throw ValueError("scales contain NaN or inf");
  if (bits > 1) {
    check_cpu(zeros, "zeros");
    check_dtype(zeros, at::kByte, "zeros", "uint8");
    if (!zeros.sizes().equals(scales.sizes()))
      throw ValueError("zeros has shape " + c10::str(zeros.sizes()) + ", expected scales' shape " +
                       c10::str(scales.sizes()));
    const uint8_t* z = zeros.data_ptr<uint8_t>();
    for (int64_t i = 0; i < zeros.numel(); ++i)
      if (z[i] >= (1u << bits))
        throw ValueError("zeros must be below 2**" + std::to_string(bits) + ", got " + std::to_string(z[i]));
  }
  return {scales.size(0), groups};
}

// w[j] = round(w[j] + alpha * dq(code[j])) over one segment sharing s and z.
template <typename T, bool SIGN>
inline void apply_segment(T* __restrict w, const uint8_t* __restrict codes, int64_t len, float s,
                          int32_t z, float alpha) {
  if (SIGN) {
    const float pos = s, neg = -s;
    for (int64_t j = 0; j < len; ++j)
      w[j] = store_from_f32<T>(apply_element(load_f32(w[j]), codes[j] ? pos : neg, alpha));
  } else {
    for (int64_t j = 0; j < len; ++j) {
      const float dq = static_cast<float>(static_cast<int32_t>(codes[j]) - z) * s;
      w[j] = store_from_f32<T>(apply_element(load_f32(w[j]), dq, alpha));
    }
  }
}

}  // namespace

void apply_quantized_(at::Tensor& weight, const at::Tensor& packed, const at::Tensor& scales,
                      const at::Tensor& zeros, int64_t bits, int64_t group_size, double alpha) {
  check_cpu(weight, "weight");
  const auto [rows, cols] = rows_cols(weight, "weight");
  const auto [R, groups] = validate_params(rows, cols, packed, scales, zeros, bits, group_size);
  const float alpha32 = static_cast<float>(alpha);
  const int64_t n = weight.numel();
  const uint8_t* p = packed.data_ptr<uint8_t>();
  const int64_t nbytes = packed.numel();
  const float* s_in = scales.data_ptr<float>();
  const uint8_t* z_in = bits > 1 ? zeros.data_ptr<uint8_t>() : nullptr;
  with_dtype(weight, "weight", [&](auto tag) {
    using T = decltype(tag);
    T* w = static_cast<T*>(weight.data_ptr());
    with_bits(bits, [&](auto bits_tag) {
      constexpr int B = decltype(bits_tag)::value;
#if DELTAOPS_QUANT_AVX512
      if (use_avx512()) {
        parallel_chunks(n, kChunk, [&](int64_t b, int64_t e) {
          apply_chunk<T, B>(w, p, nbytes, s_in, z_in, R, cols, group_size, groups, alpha32, b, e);
        });
        return;
      }
#endif
      parallel_chunks(n, kChunk, [&](int64_t b, int64_t e) {
        uint8_t codes[kChunk];
        decode<B>(p, nbytes, b, e - b, codes);
        int64_t i = b;
        while (i < e) {
          const int64_t r = i / cols, c = i - r * cols, g = c / group_size;
          const int64_t seg_end = std::min(e, r * cols + std::min(cols, (g + 1) * group_size));
          const int64_t k = (R > 1 ? r : 0) * groups + g;
          apply_segment<T, B == 1>(w + i, codes + (i - b), seg_end - i, s_in[k],
                                   z_in ? static_cast<int32_t>(z_in[k]) : 0, alpha32);
          i = seg_end;
        }
      });
    });
  });
}

// ---- serving many deltas of one base ----------------------------------------------------------------

at::Tensor delta_bmm(const at::Tensor& x, const at::Tensor& base_weight, const at::Tensor& packed,
                     const at::Tensor& scales, const at::Tensor& zeros, int64_t bits,
                     int64_t group_size, const at::Tensor& indices) {
  check_cpu(x, "x");
  check_cpu(base_weight, "base_weight");
  check_cpu(indices, "indices");
  TORCH_CHECK(x.dim() == 3 && base_weight.dim() == 2 && base_weight.size(1) == x.size(2),
              "deltaops._C: delta_bmm: x must be (B, M, K) and base_weight (N, K)");
  const int64_t batch = x.size(0), m = x.size(1), k = x.size(2), n = base_weight.size(0);
  TORCH_CHECK(indices.dim() == 1 && indices.size(0) == batch, "deltaops._C: indices must be (B,)");
  TORCH_CHECK(packed.dim() == 2 && scales.dim() == 3, "deltaops._C: packed must be (T, bytes), scales (T, R, G)");
  const int64_t t_count = packed.size(0);
  // Validate every delta and every index before computing anything.
  for (int64_t t = 0; t < t_count; ++t)
    validate_params(n, k, packed[t].contiguous(), scales[t].contiguous(),
                    bits > 1 ? zeros[t].contiguous() : zeros, bits, group_size);
  const at::Tensor idx = indices.to(at::kLong);
  const int64_t* ip = idx.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b)
    if (ip[b] < 0 || ip[b] >= t_count)
      throw ValueError("indices must be in [0, " + std::to_string(t_count) + "), got " + std::to_string(ip[b]));
  const int64_t groups = (k + group_size - 1) / group_size;
  const int64_t R = scales.size(1);
  // x D^T without D: for each output row n of delta t, y[b, :, n] += sum_k x[b, :, k] * dq(n, k),
  // with dq decoded one row at a time into an fp32 buffer. The base term is one matmul.
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor acc = at::matmul(xf, base_weight.to(at::kFloat).t());  // (B, M, N) fp32
  const float* xp = xf.data_ptr<float>();
  float* ap = acc.data_ptr<float>();
  const int64_t nbytes = packed.size(1);
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const uint8_t* zp = bits > 1 ? zeros.data_ptr<uint8_t>() : nullptr;
  with_bits(bits, [&](auto bits_tag) {
    constexpr int B = decltype(bits_tag)::value;
    // parallel over (batch, output rows): each task owns its outputs
    at::parallel_for(0, batch * n, 16, [&](int64_t begin, int64_t end) {
      std::vector<float> dq(static_cast<size_t>(k));
      std::vector<uint8_t> codes(static_cast<size_t>(k) + 8);
      for (int64_t bn = begin; bn < end; ++bn) {
        const int64_t b = bn / n, row = bn % n, t = ip[b];
        const uint8_t* stream = pp + t * nbytes;
        // codes of row `row`: it may start inside a byte, so read code by code
        // where it is not unit-aligned
        const int64_t first = row * k;
        if (first % 8 == 0) {
          decode<B>(stream, nbytes, first, k, codes.data());
        } else {
          for (int64_t c = 0; c < k; ++c) codes[c] = static_cast<uint8_t>(read_code(stream, nbytes, first + c, B));
        }
        const int64_t srow = (R > 1 ? row : 0) * groups;
        for (int64_t c = 0; c < k; ++c) {
          const int64_t g = srow + c / group_size;
          const float s = sp[(t * R) * groups + g];
          dq[c] = B == 1 ? dequant_sign(codes[c], s)
                         : dequant_uniform(codes[c], static_cast<int32_t>(zp[(t * R) * groups + g]), s);
        }
        for (int64_t i = 0; i < m; ++i) {
          const float* xr = xp + (b * m + i) * k;
          float sum = 0.0f;
          for (int64_t c = 0; c < k; ++c) sum += xr[c] * dq[c];
          ap[(b * m + i) * n + row] += sum;
        }
      }
    });
  });
  return acc.to(x.scalar_type());
}

}  // namespace cpu
}  // namespace deltaops
