// deltaops._C: tensors, validation, threading and ISA dispatch of the
// sparse-delta family. The loops themselves are in kernels.inc.
//
// Threading: torch's intra-op pool (at::parallel_for starts one task per
// thread; the tasks then take fixed-size chunks of the work from a shared
// counter, so a thread that starts late, on a busy machine, leaves its share
// to the others instead of holding everyone up). Every result is independent
// of the thread count and of which thread runs which chunk: element-wise
// kernels trivially; histograms are sums of integer counts; the
// order-dependent passes (equal keys taken in flat order by threshold_mask,
// value offsets of a bitmask) work on chunks of a fixed size: a read-only
// count pass per chunk, an exclusive scan, then a write pass.
#include "sparse_cpu.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "chunk_loop.h"
#include "kernels.h"

namespace deltaops {
namespace cpu {
namespace {

// ---- ISA dispatch ------------------------------------------------------------------

bool cpu_runs_avx512() {
#if DELTAOPS_HAVE_AVX512_KERNELS && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") &&
         __builtin_cpu_supports("popcnt");
#else
  return false;
#endif
}

const Kernels* table_named(const std::string& name) {
  if (name == "avx2" || name == "baseline") return &baseline::kKernels;
  if (name == "avx512") {
#if DELTAOPS_HAVE_AVX512_KERNELS
    if (cpu_runs_avx512()) return &avx512::kKernels;
#endif
    throw ValueError("deltaops._C: this CPU cannot run the avx512 kernels");
  }
  if (name == "auto" || name.empty()) {
#if DELTAOPS_HAVE_AVX512_KERNELS
    if (cpu_runs_avx512()) return &avx512::kKernels;
#endif
    return &baseline::kKernels;
  }
  throw ValueError("deltaops._C: unknown ISA '" + name + "'; expected auto, avx512, avx2 or baseline");
}

std::atomic<const Kernels*> g_kernels{nullptr};

const Kernels& K() {
  const Kernels* table = g_kernels.load(std::memory_order_acquire);
  if (table == nullptr) {
    const char* env = std::getenv("DELTAOPS_CPU_ISA");
    try {
      table = table_named(env ? std::string(env) : std::string("auto"));
    } catch (const ValueError&) {
      table = table_named("auto");
    }
    g_kernels.store(table, std::memory_order_release);
  }
  return *table;
}

// ---- argument checks ---------------------------------------------------------------

// "torch.int16" style, as Python prints a dtype.
std::string torch_dtype_name(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kBool: return "torch.bool";
    default: return std::string(c10::toString(t.scalar_type()));
  }
}

DTypeCode dtype_code(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default:
      throw TypeError(std::string(name) + " must be float32, bfloat16 or float16, got " +
                      torch_dtype_name(t));
  }
}

void check_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "deltaops._C: ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "deltaops._C: ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "deltaops._C: ", name, " must be contiguous");
}

uint64_t checked_seed(int64_t seed) {
  if (seed < 0) throw ValueError("seed must be in [0, 2**63), got " + std::to_string(seed));
  return static_cast<uint64_t>(seed);
}

// Element-wise loops: chunk in elements (a multiple of 4 and of 64 bytes;
// tensors of one chunk stay on the calling thread).
constexpr int64_t kChunk = 1 << 16;
// Fixed chunk sizes of the order-dependent passes (never derived from the thread count).
constexpr int64_t kMaskChunk = 1 << 16;          // elements
constexpr int64_t kBitmaskChunkBytes = 1 << 13;  // bytes = 65536 elements
constexpr int64_t kCooChunk = 1 << 16;           // indices

// Whether new_output may advise huge pages (DELTAOPS_CPU_THP=0: no).
bool advise_huge_pages() {
  static const bool enabled = [] {
    const char* env = std::getenv("DELTAOPS_CPU_THP");
    return !(env && std::string(env) == "0");
  }();
  return enabled;
}

// ---- histograms ----------------------------------------------------------------------

enum class HistKind { k16, k32Level0, k32Level1 };

// Adds the histogram of x's magnitude keys into out (int64, bins); returns
// whether a NaN key was seen (fp32 level 0 only).
bool histogram_into(const Kernels& k, HistKind kind, const void* data, int64_t n, uint32_t prefix,
                    int64_t* out) {
  const int bins = kind == HistKind::k32Level1 ? kBinsLevel1 : kBins16;
  std::atomic<bool> nan{false};
  // Per task: nsub uint32 sub-histograms, added into an int64 total before any
  // count could pass 2^31, and at the end.
  const int64_t chunk = int64_t(1) << 20;
  const int nsub = n >= (int64_t(1) << 16) ? (kind == HistKind::k32Level1 ? 2 : 4) : 1;
  ChunkLoop loop(n, chunk);
  struct Scratch {
    std::vector<uint32_t> sub;
    std::vector<int64_t> total;
    int64_t pending = 0;
  };
  std::vector<Scratch> scratch(loop.slots());
  auto flush = [&](Scratch& sc) {
    for (int s = 0; s < nsub; ++s) {
      uint32_t* h = sc.sub.data() + static_cast<size_t>(s) * bins;
      for (int b = 0; b < bins; ++b) {
        sc.total[b] += h[b];
        h[b] = 0;
      }
    }
    sc.pending = 0;
  };
  loop.run([&](int64_t slot, int64_t begin, int64_t end) {
    Scratch& sc = scratch[slot];
    if (sc.sub.empty()) {
      sc.sub.assign(static_cast<size_t>(nsub) * bins, 0u);
      sc.total.assign(bins, 0);
    }
    const int64_t len = end - begin;
    if (sc.pending + len >= (int64_t(1) << 31)) flush(sc);
    switch (kind) {
      case HistKind::k16:
        k.hist16(static_cast<const uint16_t*>(data) + begin, len, sc.sub.data(), nsub);
        break;
      case HistKind::k32Level0:
        if (k.hist32_level0(static_cast<const uint32_t*>(data) + begin, len, sc.sub.data(), nsub))
          nan.store(true, std::memory_order_relaxed);
        break;
      case HistKind::k32Level1:
        k.hist32_level1(static_cast<const uint32_t*>(data) + begin, len, prefix, sc.sub.data(), nsub);
        break;
    }
    sc.pending += len;
  });
  for (Scratch& sc : scratch) {
    if (sc.sub.empty()) continue;
    flush(sc);
    for (int b = 0; b < bins; ++b) out[b] += sc.total[b];
  }
  return nan.load();
}

// The bin holding the k-th largest key (1 <= k <= total) and the count above it
// (deltaops.selection.locate).
std::pair<int64_t, int64_t> locate(const int64_t* hist, int64_t bins, int64_t k) {
  int64_t above = 0;
  for (int64_t b = bins - 1; b >= 0; --b) {
    if (above + hist[b] >= k) return {b, above};
    above += hist[b];
  }
  TORCH_CHECK(false, "deltaops._C: internal error: k exceeds the histogram total");
}

// ---- threshold masks --------------------------------------------------------------------

bool is16(DTypeCode dt) { return dt != kF32; }

uint32_t key_at(const void* data, bool bits16, int64_t i) {
  return bits16 ? (static_cast<const uint16_t*>(data)[i] & 0x7FFFu)
                : (static_cast<const uint32_t*>(data)[i] & 0x7FFFFFFFu);
}

// key > t, or key == t among the first `take` such in flat order. `equal_total`
// is the number of keys equal to t when known (topk), else -1.
at::Tensor threshold_impl(const at::Tensor& x, uint64_t t, int64_t take, int64_t equal_total) {
  const Kernels& k = K();
  const DTypeCode dt = dtype_code(x, "x");
  at::Tensor out = new_output(x.sizes(), x.options().dtype(at::kBool));
  const int64_t n = x.numel();
  if (n == 0) return out;
  const bool bits16 = is16(dt);
  const uint64_t key_max = bits16 ? 0x7FFFu : 0x7FFFFFFFu;
  if (t > key_max) {  // no key reaches t
    out.zero_();
    return out;
  }
  const void* data = x.data_ptr();
  uint8_t* mask = reinterpret_cast<uint8_t*>(out.data_ptr<bool>());
  const uint32_t t32 = static_cast<uint32_t>(t);
  auto write = [&](int64_t begin, int64_t end, bool inclusive) {
    if (bits16)
      k.mask16(static_cast<const uint16_t*>(data) + begin, end - begin, t32, inclusive, mask + begin);
    else
      k.mask32(static_cast<const uint32_t*>(data) + begin, end - begin, t32, inclusive, mask + begin);
  };
  if (take <= 0 || (equal_total >= 0 && take >= equal_total)) {
    const bool inclusive = take > 0;
    parallel_chunks(n, kChunk, [&](int64_t b, int64_t e) { write(b, e, inclusive); });
    return out;
  }
  const int64_t nchunks = (n + kMaskChunk - 1) / kMaskChunk;
  std::vector<int64_t> before(nchunks + 1, 0);
  parallel_chunks(nchunks, 4, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t b = c * kMaskChunk, len = std::min(kMaskChunk, n - b);
      before[c + 1] = bits16 ? k.count_equal16(static_cast<const uint16_t*>(data) + b, len, t32)
                             : k.count_equal32(static_cast<const uint32_t*>(data) + b, len, t32);
    }
  });
  for (int64_t c = 0; c < nchunks; ++c) before[c + 1] += before[c];  // exclusive scan
  parallel_chunks(nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t b = c * kMaskChunk, e = std::min(n, b + kMaskChunk);
      if (before[c + 1] <= take) {
        write(b, e, true);  // every equal key of this chunk is taken
      } else if (before[c] >= take) {
        write(b, e, false);  // none is
      } else {  // the chunk where the quota runs out
        write(b, e, false);
        int64_t left = take - before[c];
        for (int64_t i = b; i < e && left > 0; ++i) {
          if (key_at(data, bits16, i) == t32) {
            mask[i] = 1;
            --left;
          }
        }
      }
    }
  });
  return out;
}

// ---- bitmask helpers ----------------------------------------------------------------

void fill_bool(at::Tensor& out, bool value) {
  if (out.numel()) out.fill_(value);
}

}  // namespace

// A fresh output tensor. Large outputs are advised as transparent huge pages
// before their first touch (as torch does under THP_MEM_ALLOC_ENABLE=1):
// first-touch faults of 4 KiB pages otherwise cost more than the kernel
// itself (several times over in a VM). Purely a performance hint;
// DELTAOPS_CPU_THP=0 turns it off.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const size_t bytes = out.nbytes();
  if (bytes >= (size_t(8) << 20) && advise_huge_pages()) {
    const uintptr_t start = reinterpret_cast<uintptr_t>(out.data_ptr());
    const uintptr_t first = (start + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t last = (start + bytes) & ~(kHuge - 1);
    if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return out;
}

// ================================ public functions ================================

at::Tensor radix_histogram(const at::Tensor& x, int64_t level, int64_t prefix) {
  check_tensor(x, "x");
  const DTypeCode dt = dtype_code(x, "x");
  const Kernels& k = K();
  HistKind kind;
  int64_t bins = kBins16;
  if (is16(dt)) {
    if (level != 0)
      throw ValueError("16-bit inputs have one radix level, got level=" + std::to_string(level));
    kind = HistKind::k16;
  } else if (level == 0) {
    kind = HistKind::k32Level0;
  } else if (level == 1) {
    kind = HistKind::k32Level1;
    bins = kBinsLevel1;
  } else {
    throw ValueError("fp32 inputs have radix levels 0 and 1, got level=" + std::to_string(level));
  }
  at::Tensor out = at::zeros({bins}, x.options().dtype(at::kLong));
  if (kind == HistKind::k32Level1 && (prefix < 0 || prefix >= (int64_t(1) << 15)))
    return out;  // no key has that prefix
  histogram_into(k, kind, x.data_ptr(), x.numel(), static_cast<uint32_t>(prefix),
                 out.data_ptr<int64_t>());
  return out;
}

at::Tensor threshold_mask(const at::Tensor& x, int64_t threshold_key, int64_t take_equal) {
  check_tensor(x, "x");
  dtype_code(x, "x");
  if (threshold_key < 0)
    throw ValueError("threshold_key must be non-negative, got " + std::to_string(threshold_key));
  if (take_equal < 0)
    throw ValueError("take_equal must be non-negative, got " + std::to_string(take_equal));
  return threshold_impl(x, static_cast<uint64_t>(threshold_key), take_equal, -1);
}

at::Tensor topk_mask(const at::Tensor& x, int64_t k) {
  check_tensor(x, "x");
  const DTypeCode dt = dtype_code(x, "x");
  const int64_t n = x.numel();
  if (k < 0 || k > n)
    throw ValueError("k must be in [0, " + std::to_string(n) + "], got " + std::to_string(k));
  at::Tensor out = new_output(x.sizes(), x.options().dtype(at::kBool));
  if (n == 0) return out;
  const Kernels& kt = K();
  const void* data = x.data_ptr();
  const char* nan_message = "topk_mask: x contains NaN; magnitudes of NaN have no order";
  std::vector<int64_t> level0(kBins16, 0);
  if (is16(dt)) {
    histogram_into(kt, HistKind::k16, data, n, 0, level0.data());
    const int64_t nan_floor = dt == kBF16 ? 0x7F81 : 0x7C01;
    for (int64_t b = nan_floor; b < kBins16; ++b)
      if (level0[b]) throw ValueError(nan_message);
  } else if (histogram_into(kt, HistKind::k32Level0, data, n, 0, level0.data())) {
    throw ValueError(nan_message);
  }
  if (k == 0 || k == n) {
    fill_bool(out, k == n);
    return out;
  }
  const auto [bucket, above] = locate(level0.data(), kBins16, k);
  if (is16(dt)) return threshold_impl(x, static_cast<uint64_t>(bucket), k - above, level0[bucket]);
  std::vector<int64_t> level1(kBinsLevel1, 0);
  histogram_into(kt, HistKind::k32Level1, data, n, static_cast<uint32_t>(bucket), level1.data());
  const auto [low, above_low] = locate(level1.data(), kBinsLevel1, k - above);
  const uint64_t t = (static_cast<uint64_t>(bucket) << 16) | static_cast<uint64_t>(low);
  return threshold_impl(x, t, k - above - above_low, level1[low]);
}

at::Tensor philox_uniform_like(const at::Tensor& x, int64_t seed, int64_t stream) {
  TORCH_CHECK(x.defined() && x.device().is_cpu(), "deltaops._C: x must be a CPU tensor");
  const uint64_t s = checked_seed(seed);
  const uint32_t st = static_cast<uint32_t>(stream);
  at::Tensor out = new_output(x.sizes(), x.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const Kernels& k = K();
  parallel_chunks(x.numel(), kChunk, [&](int64_t b, int64_t e) { k.philox_uniform(o, b, e, s, st); });
  return out;
}

void dare_out_(const at::Tensor& delta, double density, int64_t seed, int64_t stream, bool rescale,
               at::Tensor& out) {
  check_tensor(delta, "delta");
  check_tensor(out, "out");
  const DTypeCode dt = dtype_code(delta, "delta");
  if (out.scalar_type() != delta.scalar_type())
    throw ValueError("out must have delta's dtype");
  if (!out.sizes().equals(delta.sizes())) throw ValueError("out must have delta's shape");
  const uint64_t s = checked_seed(seed);
  const uint32_t st = static_cast<uint32_t>(stream);
  const float p = static_cast<float>(density);
  const void* d = delta.data_ptr();
  void* o = out.data_ptr();
  auto fn = K().dare[dt][rescale ? 1 : 0];
  parallel_chunks(delta.numel(), kChunk, [&](int64_t b, int64_t e) { fn(d, o, b, e, s, st, p); });
}

at::Tensor dare(const at::Tensor& delta, double density, int64_t seed, int64_t stream, bool rescale) {
  check_tensor(delta, "delta");
  dtype_code(delta, "delta");
  at::Tensor out = new_output(delta.sizes(), delta.options());
  dare_out_(delta, density, seed, stream, rescale, out);
  return out;
}

void apply_dense_(at::Tensor& weight, const at::Tensor& delta, double alpha) {
  check_tensor(weight, "weight");
  check_tensor(delta, "delta");
  const DTypeCode wt = dtype_code(weight, "weight");
  const DTypeCode dt = dtype_code(delta, "delta");
  if (weight.numel() != delta.numel())
    throw ValueError("delta has " + std::to_string(delta.numel()) + " elements but weight has " +
                     std::to_string(weight.numel()));
  void* w = weight.data_ptr();
  const void* d = delta.data_ptr();
  const float a = static_cast<float>(alpha);
  auto fn = K().apply_dense[wt][dt];
  parallel_chunks(weight.numel(), kChunk, [&](int64_t b, int64_t e) { fn(w, d, b, e, a); });
}

void apply_coo_(at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values, double alpha) {
  check_tensor(weight, "weight");
  check_tensor(indices, "indices");
  check_tensor(values, "values");
  const DTypeCode wt = dtype_code(weight, "weight");
  const DTypeCode vt = dtype_code(values, "values");
  // Validation, in the reference's order and with its messages
  // (deltaops.reference.sparse.validate_coo_indices).
  const int64_t nnz = indices.numel();
  if (values.numel() != nnz)
    throw ValueError(std::to_string(nnz) + " indices but " + std::to_string(values.numel()) + " values");
  if (nnz == 0) return;
  IndexCode it;
  if (indices.scalar_type() == at::kInt) {
    it = kI32;
  } else if (indices.scalar_type() == at::kLong) {
    it = kI64;
  } else {
    throw ValueError("indices must be int32 or int64, got " + torch_dtype_name(indices));
  }
  const Kernels& k = K();
  const int64_t numel = weight.numel();
  const void* idx = indices.data_ptr();
  // Read-only pass, per fixed chunk; nothing is written before it passes.
  const int64_t nchunks = (nnz + kCooChunk - 1) / kCooChunk;
  std::vector<CooScan> scans(nchunks);
  parallel_chunks(nchunks, 4, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c)
      k.coo_scan[it](idx, c * kCooChunk, std::min(nnz, (c + 1) * kCooChunk), &scans[c]);
  });
  auto index_at = [&](int64_t i) -> int64_t {
    return it == kI32 ? int64_t(static_cast<const int32_t*>(idx)[i]) : static_cast<const int64_t*>(idx)[i];
  };
  // The first offending position (flat order) is located in its chunk only.
  for (int64_t c = 0; c < nchunks; ++c) {
    if (scans[c].min >= 0 && scans[c].max < numel) continue;
    for (int64_t i = c * kCooChunk; i < std::min(nnz, (c + 1) * kCooChunk); ++i) {
      const int64_t v = index_at(i);
      if (v < 0 || v >= numel)
        throw ValueError("index " + std::to_string(v) + " at position " + std::to_string(i) +
                         " is out of range [0, " + std::to_string(numel) + ")");
    }
  }
  for (int64_t c = 0; c < nchunks; ++c) {
    if (scans[c].ordered) continue;
    for (int64_t i = std::max<int64_t>(c * kCooChunk, 1); i < std::min(nnz, (c + 1) * kCooChunk); ++i) {
      if (index_at(i) <= index_at(i - 1))
        throw ValueError("indices must be strictly increasing; index " + std::to_string(index_at(i)) +
                         " at position " + std::to_string(i) + " follows " + std::to_string(index_at(i - 1)));
    }
  }
  void* w = weight.data_ptr();
  const void* v = values.data_ptr();
  const float a = static_cast<float>(alpha);
  auto fn = k.apply_coo[wt][vt][it];
  parallel_chunks(nnz, kChunk / 4, [&](int64_t b, int64_t e) { fn(w, idx, v, b, e, a); });
}

void apply_bitmask_(at::Tensor& weight, const at::Tensor& packed_mask, const at::Tensor& values,
                    double alpha) {
  check_tensor(weight, "weight");
  check_tensor(packed_mask, "packed_mask");
  check_tensor(values, "values");
  const DTypeCode wt = dtype_code(weight, "weight");
  const DTypeCode vt = dtype_code(values, "values");
  // Validation, in the reference's order and with its messages
  // (deltaops.reference.sparse.validate_bitmask).
  if (packed_mask.scalar_type() != at::kByte)
    throw ValueError("packed mask must be uint8, got " + torch_dtype_name(packed_mask));
  const int64_t n = weight.numel();
  const int64_t nbytes = (n + 7) / 8;
  if (packed_mask.numel() != nbytes)
    throw ValueError("packed mask has " + std::to_string(packed_mask.numel()) + " bytes; " +
                     std::to_string(n) + " elements need " + std::to_string(nbytes));
  const uint8_t* packed = nbytes ? packed_mask.data_ptr<uint8_t>() : nullptr;
  const int tail = static_cast<int>(n & 7);
  if (tail && (packed[nbytes - 1] >> tail) != 0) {
    static const char* hex = "0123456789abcdef";
    const uint8_t last = packed[nbytes - 1];
    throw ValueError(std::string("padding bits of the last mask byte must be zero (byte 0x") +
                     hex[last >> 4] + hex[last & 15] + ", " + std::to_string(tail) + " valid bits)");
  }
  const Kernels& k = K();
  // Count pass per fixed chunk of bytes, then an exclusive scan: value offsets.
  const int64_t nchunks = (nbytes + kBitmaskChunkBytes - 1) / kBitmaskChunkBytes;
  std::vector<int64_t> before(nchunks + 1, 0);
  parallel_chunks(nchunks, 8, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t b = c * kBitmaskChunkBytes;
      before[c + 1] = k.popcount(packed + b, std::min(kBitmaskChunkBytes, nbytes - b));
    }
  });
  for (int64_t c = 0; c < nchunks; ++c) before[c + 1] += before[c];
  const int64_t kept = before[nchunks];
  if (kept != values.numel())
    throw ValueError("mask has " + std::to_string(kept) + " set bits but " +
                     std::to_string(values.numel()) + " values");
  if (kept == 0) return;
  void* w = weight.data_ptr();
  const void* v = values.data_ptr();
  const float a = static_cast<float>(alpha);
  auto fn = k.apply_bitmask[wt][vt];
  constexpr int64_t chunk_elems = kBitmaskChunkBytes * 8;
  parallel_chunks(nchunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      if (before[c + 1] == before[c]) continue;  // no bit set in this chunk
      fn(w, packed, v, kept, c * chunk_elems, std::min(n, (c + 1) * chunk_elems), before[c], a);
    }
  });
}

void philox_uniform_block(float* out, int64_t begin, int64_t end, uint64_t seed, uint32_t stream) {
  K().philox_uniform(out - begin, begin, end, seed, stream);  // the kernel indexes absolutely
}

at::Tensor philox_uniform_range(int64_t first, int64_t count, int64_t seed, int64_t stream) {
  if (first < 0 || count < 0) throw ValueError("first and count must be non-negative");
  const uint64_t s = checked_seed(seed);
  const uint32_t st = static_cast<uint32_t>(stream);
  at::Tensor out = at::empty({count}, at::TensorOptions().dtype(at::kFloat));
  // The kernel indexes its output by absolute element index.
  float* base = out.data_ptr<float>() - first;
  const Kernels& k = K();
  parallel_chunks(count, kChunk, [&](int64_t b, int64_t e) { k.philox_uniform(base, first + b, first + e, s, st); });
  return out;
}

std::string isa() { return K().name; }

namespace {
bool cpu_runs_vbmi2() {
#if DELTAOPS_HAVE_AVX512_KERNELS && defined(__GNUC__)
  __builtin_cpu_init();
  return cpu_runs_avx512() && __builtin_cpu_supports("avx512vbmi2");
#else
  return false;
#endif
}
std::atomic<bool> g_vbmi2{cpu_runs_vbmi2()};
}  // namespace

bool vbmi2_enabled() { return g_vbmi2.load(std::memory_order_relaxed); }

bool set_vbmi2(bool enabled) {
  if (enabled && !cpu_runs_vbmi2()) throw ValueError("deltaops._C: this CPU has no AVX512-VBMI2 instructions");
  g_vbmi2.store(enabled, std::memory_order_relaxed);
  return enabled;
}

std::string set_isa(const std::string& name) {
  const Kernels* table = table_named(name);
  g_kernels.store(table, std::memory_order_release);
  return table->name;
}

}  // namespace cpu
}  // namespace deltaops
