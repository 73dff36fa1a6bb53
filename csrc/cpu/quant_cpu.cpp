// deltaops._C: the low-bit delta family on CPU tensors (tensors, validation,
// threading, loops). Per-element math: csrc/include/deltaops/quant.h, shared
// with the CUDA kernels; python/deltaops/reference/quant.py is the spec.
//
// Threading: at::parallel_for over fixed-size chunks of elements (a multiple
// of 8, so every chunk starts on a byte boundary of any packed stream: eight
// codes fill `bits` whole bytes). Results never depend on the thread count:
// codes and applies are element-wise, and the exact-mean bins are integer
// sums. Each chunk decodes (or encodes) its codes through a small uint8
// buffer and runs a plain loop per (row, group) segment, which the compiler
// vectorizes (the build baseline is x86-64-v3; contraction is off).
// Floating-point operations never trap in deltaops (torch runs with exceptions
// masked): let GCC inline rintf as a vector round and vectorize the code
// loops. This allows no reassociation, contraction or change of rounding.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include "quant_cpu.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__BMI2__)
#include <immintrin.h>
#endif

#include "deltaops/bits.h"
#include "deltaops/quant.h"
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

// f(begin, end) over chunks of [0, n) of `chunk` items.
template <typename F>
void parallel_chunks(int64_t n, int64_t chunk, const F& f) {
  const int64_t nchunks = (n + chunk - 1) / chunk;
  if (nchunks == 0) return;
  if (nchunks == 1) {
    f(int64_t(0), n);
    return;
  }
  at::parallel_for(0, nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) f(c * chunk, std::min(n, (c + 1) * chunk));
  });
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
      for (int64_t i = blk; i < end; ++i) {
        const uint32_t u = f32_bits(load_f32(x[i])) & 0x7FFFFFFFu;
        const uint32_t ex = u >> 23;
        bins.add(static_cast<int>(ex), (u & 0x7FFFFFu) | (ex ? 0x800000u : 0u));
      }
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
    if (small) {
      for (int64_t i = blk; i < end; ++i) {
        const uint32_t u = f32_bits(load_f32(x[i])) & 0x7FFFFFFFu;
        const int32_t ex = static_cast<int32_t>(u >> 23);
        if (ex < base && u != 0u) bins.add(ex, (u & 0x7FFFFFu) | (ex ? 0x800000u : 0u));
      }
    }
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
  const int64_t chunk = int64_t(1) << 18;
  const int64_t nchunks = (n + chunk - 1) / chunk;
  std::vector<AbsBins> chunk_bins(static_cast<size_t>(std::max<int64_t>(nchunks, 1)));
  parallel_chunks(n, chunk, [&](int64_t b, int64_t e) {
    AbsBins& bins = chunk_bins[b / chunk];
    bins.clear();
    if (!add_abs_bins(x, b, e, bins)) finite = false;
  });
  if (!finite) throw_nonfinite(x, n, "x");
  AbsBins total;
  total.clear();
  for (int64_t c = 0; c < nchunks; ++c) total.merge(chunk_bins[c]);
  return {abs_mean_from_bins(total.lo, n, total.hi)};
}

// Encode x into `bits`-bit codes, chunk by chunk: code_of(T* x, begin, end, codes) fills
// codes[0, end - begin).
template <int BITS, typename CodeFill>
at::Tensor encode_all(int64_t n, const at::TensorOptions& options, const CodeFill& fill) {
  const int64_t nbytes = packed_nbytes(n, BITS);
  at::Tensor packed = at::empty({nbytes}, options.dtype(at::kByte));
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
    out = at::empty({numel}, packed.options());
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> quantize_uniform(const at::Tensor& x, int64_t bits,
                                                                int64_t group_size, bool symmetric) {
  check_cpu(x, "x");
  if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
    throw ValueError("bits must be one of 2, 3, 4, 8; got " + std::to_string(bits));
  if (group_size <= 0) throw ValueError("group_size must be positive, got " + std::to_string(group_size));
  const auto [rows, cols] = rows_cols(x, "x");
  const int64_t groups = cols ? (cols + group_size - 1) / group_size : 0;
  at::Tensor scales = at::empty({rows, groups}, x.options().dtype(at::kFloat));
  at::Tensor zeros = at::empty({rows, groups}, x.options().dtype(at::kByte));
  at::Tensor packed;
  with_dtype(x, "x", [&](auto tag) {
    using T = decltype(tag);
    const T* data = static_cast<const T*>(x.data_ptr());
    float* s_out = scales.data_ptr<float>();
    uint8_t* z_out = zeros.data_ptr<uint8_t>();
    std::vector<float> zf(static_cast<size_t>(rows * groups));
    std::atomic<bool> finite{true}, overflow{false};
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
