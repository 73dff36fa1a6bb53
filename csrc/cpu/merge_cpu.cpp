// deltaops._C: the fused CPU kernel of the sign-elect / task-arithmetic
// family of merge_tensors (task_arithmetic, ties, dare_ties, dare_linear,
// breadcrumbs, breadcrumbs_ties, della, della_linear).
// python/deltaops/reference/merge.py is the specification.
//
// Loops are compiled for the build's baseline ISA only (x86-64-v3 by
// default); no per-ISA table yet.
//
// Passes (every one reads base and the models; nothing of the tensors' size is
// stored but the output):
//   1. selection (magnitude methods without a given threshold): radix
//      histograms of the keys of fp32(m_i) - fp32(base), computed on the fly,
//      give each model's (threshold_key, take_equal) exactly as topk_mask;
//   2. count (only for thresholds whose take_equal splits the equal keys):
//      per fixed chunk, the number of keys equal to the threshold, then an
//      exclusive scan: the rank among equal keys in flat order;
//   3. norms (rescale l1/l2/linf only): per-chunk partial norms of the delta
//      and the sparsified delta, in double, added in chunk order;
//   4. the merge: per element, the models in model order, fp32 arithmetic
//      with the reference's rounding points (no FMA: -ffp-contract=off), one
//      rounding to the output dtype.
// Chunks have a fixed size, so results do not depend on the thread count.
// della and della_linear replace passes 3 and 4 by passes over chunks of whole
// rows, which sort each row's keys per model when they reach it (see "della"
// below).
// Exactness: everything is bit-exact against the reference except the norm
// rescale factors, which the reference takes from torch's fp32 reductions
// (order not pinned); here they come from double sums rounded to fp32.
#include "merge_cpu.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <cstdlib>
#include <string>

#include "deltaops/bits.h"
#include "deltaops/merge.h"  // delta_key, sign_of, agrees, nonzero_or_one, masked_delta, ...
#include "deltaops/merge_args.h"  // the entry points' option and overlap checks
#include "deltaops/merge_select.h"  // top-k thresholds from the delta-key histograms
#include "deltaops/philox.h"  // philox_word, uniform_from_word (della on strided rows)
#include "f16_blocks.h"
#include "chunk_loop.h"
#include "sparse_cpu.h"

namespace deltaops {
namespace cpu {
namespace {

constexpr int64_t kChunk = 1 << 14;     // elements; fixed (rank and norm passes depend on it)
constexpr int kBlock = 256;             // elements per inner block (multiple of 4)
using merge_select::kKeyNone;
using merge_select::magnitude_k;
using merge_select::Thr;
using merge_select::thr_from;
constexpr int kBins0 = 1 << 15, kBins1 = 1 << 16;

// f(slot, c) for every chunk c in [0, nchunks) of `chunk_elems` elements, as
// ChunkLoop hands them out (runs of consecutive chunks).
template <typename F>
void for_chunks(int64_t nchunks, int64_t chunk_elems, const F& f) {
  ChunkLoop(nchunks, 1, kRunItems / std::max<int64_t>(chunk_elems, 1)).run([&](int64_t slot, int64_t c, int64_t) { f(slot, c); });
}

int64_t num_slots(int64_t nchunks) { return ChunkLoop(nchunks, 1).slots(); }

// ---- vector helpers (AVX2 is in the x86-64-v3 baseline) ------------------------------

#if defined(__AVX2__)
// Eight elements widened to fp32, exactly as load_f32 does one.
inline __m256 load8_f32(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8_f32(const bf16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8_f32(const fp16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
// delta_key of eight deltas fp32(m) - fp32(b).
template <typename T>
inline __m256i delta_keys8(const T* b, const T* m) {
  const __m256 d = _mm256_sub_ps(load8_f32(m), load8_f32(b));
  return _mm256_and_si256(_mm256_castps_si256(d), _mm256_set1_epi32(0x7FFFFFFF));
}
#endif

// ---- pass 1: histograms of delta keys ---------------------------------------------

// Level 0: bins of key >> 16 over [begin, end); returns whether a NaN delta was seen.
// The keys are formed eight at a time into a small buffer, then counted: the
// increments are the only scalar work left.
template <typename T>
bool histogram_level0(const T* b, const T* m, int64_t begin, int64_t end, uint32_t* h) {
  int64_t j = begin;
  uint32_t nan_seen = 0;
#if defined(__AVX2__)
  alignas(32) uint32_t bins[kBlock];
  const __m256i inf = _mm256_set1_epi32(0x7F800000);
  __m256i nan_acc = _mm256_setzero_si256();
  for (; j + kBlock <= end; j += kBlock) {
    for (int k = 0; k < kBlock; k += 8) {
      const __m256i key = delta_keys8(b + j + k, m + j + k);
      nan_acc = _mm256_or_si256(nan_acc, _mm256_cmpgt_epi32(key, inf));
      _mm256_store_si256(reinterpret_cast<__m256i*>(bins + k), _mm256_srli_epi32(key, 16));
    }
    for (int k = 0; k < kBlock; ++k) ++h[bins[k]];
  }
  nan_seen = static_cast<uint32_t>(!_mm256_testz_si256(nan_acc, nan_acc));
#endif
  for (; j < end; ++j) {
    const uint32_t key = delta_key(load_f32(m[j]) - load_f32(b[j]));
    nan_seen |= key > 0x7F800000u;
    ++h[key >> 16];
  }
  return nan_seen != 0;
}

// Level 1: bins of key & 0xFFFF among the keys with key >> 16 == prefix (a small
// fraction: the vector compare skips the rest eight at a time).
template <typename T>
void histogram_level1(const T* b, const T* m, int64_t begin, int64_t end, uint32_t prefix,
                      uint32_t* h) {
  int64_t j = begin;
#if defined(__AVX2__)
  const __m256i want = _mm256_set1_epi32(static_cast<int>(prefix));
  alignas(32) uint32_t keys[8];
  for (; j + 8 <= end; j += 8) {
    const __m256i key = delta_keys8(b + j, m + j);
    const int hit = _mm256_movemask_ps(
        _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_srli_epi32(key, 16), want)));
    if (hit == 0) continue;
    _mm256_store_si256(reinterpret_cast<__m256i*>(keys), key);
    for (int bits = hit; bits; bits &= bits - 1) ++h[keys[__builtin_ctz(bits)] & 0xFFFFu];
  }
#endif
  for (; j < end; ++j) {
    const uint32_t key = delta_key(load_f32(m[j]) - load_f32(b[j]));
    if ((key >> 16) == prefix) ++h[key & 0xFFFFu];
  }
}

// The number of keys equal to `key` in [begin, end).
template <typename T>
int64_t count_equal_keys(const T* b, const T* m, int64_t begin, int64_t end, uint32_t key) {
  int64_t j = begin, count = 0;
#if defined(__AVX2__)
  const __m256i want = _mm256_set1_epi32(static_cast<int>(key));
  for (; j + 8 <= end; j += 8) {
    const __m256i eq = _mm256_cmpeq_epi32(delta_keys8(b + j, m + j), want);
    count += __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(eq))));
  }
#endif
  for (; j < end; ++j) count += delta_key(load_f32(m[j]) - load_f32(b[j])) == key;
  return count;
}

template <typename T>
bool delta_histogram(const T* b, const T* m, int64_t n, int level, uint32_t prefix, int64_t* out) {
  const int bins = level == 0 ? kBins0 : kBins1;
  const int64_t nchunks = (n + kChunk * 16 - 1) / (kChunk * 16);
  const int64_t slots = num_slots(nchunks);
  std::vector<std::vector<uint32_t>> hist(slots);
  std::vector<uint8_t> nan(slots, 0);
  for_chunks(nchunks, kChunk * 16, [&](int64_t slot, int64_t c) {
    std::vector<uint32_t>& h = hist[slot];
    if (h.empty()) h.assign(bins, 0u);
    const int64_t begin = c * kChunk * 16, end = std::min(n, begin + kChunk * 16);
    if (level == 0) {
      if (histogram_level0(b, m, begin, end, h.data())) nan[slot] = 1;
    } else {
      histogram_level1(b, m, begin, end, prefix, h.data());
    }
  });
  // uint32 counts: n < 2^32 per call is checked by the caller.
  bool any_nan = false;
  for (int64_t s = 0; s < slots; ++s) {
    if (!hist[s].empty())
      for (int i = 0; i < bins; ++i) out[i] += hist[s][i];
    any_nan |= nan[s] != 0;
  }
  return any_nan;
}

template <typename T>
std::vector<Thr> topk_thresholds(const T* b, const T* m, int64_t n, const std::vector<int64_t>& ks) {
  std::vector<int64_t> level0(kBins0, 0);
  if (delta_histogram(b, m, n, 0, 0, level0.data()))
    throw ValueError("topk_mask: x contains NaN; magnitudes of NaN have no order");
  return merge_select::thresholds_from(level0, n, ks, [&](int64_t bucket) {
    std::vector<int64_t> h(kBins1, 0);
    delta_histogram(b, m, n, 1, static_cast<uint32_t>(bucket), h.data());
    return h;
  });
}

// ---- per-model configuration ------------------------------------------------------

enum Mode { kDense = 0, kZero = 1, kMagnitude = 2, kRandom = 3, kDella = 4 };
enum Rescale { kNone = 0, kL1 = 1, kL2 = 2, kLinf = 3, kDensity = 4 };

struct ModelCfg {
  Mode mode = kDense;
  Thr keep, drop;        // kMagnitude
  bool has_drop = false;
  float p = 1.0f;        // fp32(density): random keep probability, density rescale
  float low = 0.0f;      // kDella: fp32(density - epsilon), the lowest rank's probability
  float width = 0.0f;    // kDella: fp32(2 * epsilon)
  float w = 1.0f;        // fp32(weight)
  bool scale = false;    // multiply the sparsified delta by `factor` (norm rescale)
  float factor = 1.0f;
  // rank bookkeeping: index into the per-chunk count table (or -1)
  int count_keep = -1, count_drop = -1;
};

// State of one threshold inside one chunk.
struct SelState {
  uint32_t key;        // only meaningful when key_valid
  bool key_valid;      // threshold key <= 0x7FFFFFFF (else nothing is selected)
  int kind;            // 0: key > T; 1: key >= T; 2: partial (rank among equal)
  int64_t left;        // partial: equal keys still to take
};

SelState sel_state(const Thr& t, int count_index, const std::vector<int64_t>& before, int64_t nchunks,
                   int64_t c) {
  SelState s;
  s.key_valid = t.key <= 0x7FFFFFFFu;
  s.key = s.key_valid ? static_cast<uint32_t>(t.key) : 0u;
  s.left = 0;
  if (t.take < 0) {
    s.kind = 1;
  } else if (t.take == 0) {
    s.kind = 0;
  } else {
    const int64_t* bc = before.data() + static_cast<int64_t>(count_index) * (nchunks + 1);
    if (bc[c + 1] <= t.take) {
      s.kind = 1;
    } else if (bc[c] >= t.take) {
      s.kind = 0;
    } else {
      s.kind = 2;
      s.left = t.take - bc[c];
    }
  }
  return s;
}

// sel[k] = 1 where the threshold selects element k of the block (keys given).
inline void select_block(SelState& s, const uint32_t* __restrict keys, int len, uint8_t* __restrict sel) {
  if (!s.key_valid) {
    for (int k = 0; k < len; ++k) sel[k] = 0;
    return;
  }
  const uint32_t t = s.key;
  if (s.kind == 1) {
    for (int k = 0; k < len; ++k) sel[k] = keys[k] >= t;
  } else {
    for (int k = 0; k < len; ++k) sel[k] = keys[k] > t;
    if (s.kind == 2) {
      for (int k = 0; k < len && s.left > 0; ++k) {
        if (keys[k] == t) {
          sel[k] = 1;
          --s.left;
        }
      }
    }
  }
}

// Per-thread scratch of one block.
struct Scratch {
  std::vector<float> bf, d, masked, div, x;  // x: N * kBlock
  std::vector<uint32_t> keys;
  std::vector<float> uniforms;
  std::vector<uint8_t> keep, drop;
  std::vector<SelState> states;  // 2 per model
  void init(int nmodels) {
    if (!bf.empty()) return;
    bf.resize(kBlock);
    d.resize(kBlock);
    masked.resize(kBlock);
    div.resize(kBlock);
    x.resize(static_cast<size_t>(nmodels) * kBlock);
    keys.resize(kBlock);
    uniforms.resize(kBlock);
    keep.resize(kBlock);
    drop.resize(kBlock);
    states.resize(2 * static_cast<size_t>(nmodels));
  }
};

struct Plan {
  int64_t n = 0, nchunks = 0;
  int nmodels = 0;
  std::vector<ModelCfg> cfg;
  Rescale rescale = kNone;
  uint64_t seed = 0;
  std::vector<int64_t> before;  // per counted threshold: nchunks + 1 prefix counts
  int ncounted = 0;
};

// d = fp32(m) - bf; masked = the sparsified d before any norm rescale (mergekit's
// `delta * keep`, or where(keep, d / p, 0) for the density rescale).
template <typename T>
void sparsify_block(const Plan& plan, int i, const T* __restrict m, int64_t j0, int len, Scratch& sc,
                    bool want_d) {
  const ModelCfg& cfg = plan.cfg[i];
  const float* __restrict bf = sc.bf.data();
  float* __restrict d = sc.d.data();
  float* __restrict out = sc.masked.data();
  to_f32_block(m + j0, d, len);
  for (int k = 0; k < len; ++k) d[k] = d[k] - bf[k];
  (void)want_d;
  switch (cfg.mode) {
    case kDense:
      for (int k = 0; k < len; ++k) out[k] = d[k];
      return;
    case kZero:
      for (int k = 0; k < len; ++k) out[k] = 0.0f;
      return;
    case kMagnitude: {
      uint32_t* __restrict keys = sc.keys.data();
      uint8_t* __restrict keep = sc.keep.data();
      uint8_t* __restrict drop = sc.drop.data();
      for (int k = 0; k < len; ++k) keys[k] = delta_key(d[k]);
      select_block(sc.states[2 * i], keys, len, keep);
      if (cfg.has_drop) {
        select_block(sc.states[2 * i + 1], keys, len, drop);
        for (int k = 0; k < len; ++k) keep[k] = keep[k] & (drop[k] ^ 1);
      }
      break;
    }
    case kRandom: {
      uint8_t* __restrict keep = sc.keep.data();
      const float p = cfg.p;
      const uint32_t stream = static_cast<uint32_t>(i);
      // j0 is a multiple of 4 (chunks and blocks are).
      // The uniforms of deltaops.dare (same keying), from the sparse family's
      // kernel table: AVX-512 where the CPU has it.
      float* __restrict u = sc.uniforms.data();
      philox_uniform_block(u, j0, j0 + len, plan.seed, stream);
      for (int k = 0; k < len; ++k) keep[k] = u[k] < p;
      break;
    }
  }
  const uint8_t* __restrict keep = sc.keep.data();
  if (plan.rescale == kDensity) {
    const float p = cfg.p;
    for (int k = 0; k < len; ++k) out[k] = keep[k] ? d[k] / p : 0.0f;
  } else {
    for (int k = 0; k < len; ++k) out[k] = masked_delta(d[k], keep[k]);
  }
}

template <typename T>
void load_base(const T* __restrict b, int64_t j0, int len, float* __restrict bf) {
  to_f32_block(b + j0, bf, len);
}

void init_states(const Plan& plan, int64_t c, Scratch& sc) {
  for (int i = 0; i < plan.nmodels; ++i) {
    const ModelCfg& cfg = plan.cfg[i];
    if (cfg.mode != kMagnitude) continue;
    sc.states[2 * i] = sel_state(cfg.keep, cfg.count_keep, plan.before, plan.nchunks, c);
    if (cfg.has_drop) sc.states[2 * i + 1] = sel_state(cfg.drop, cfg.count_drop, plan.before, plan.nchunks, c);
  }
}

// ---- pass 2: equal-key counts per chunk -------------------------------------------

template <typename T>
void count_pass(Plan& plan, const T* b, const std::vector<const T*>& ms) {
  struct Item { int model; uint32_t key; int index; };
  std::vector<Item> items;
  auto need = [](const Thr& t) { return t.take > 0 && t.key <= 0x7FFFFFFFu; };
  for (int i = 0; i < plan.nmodels; ++i) {
    ModelCfg& cfg = plan.cfg[i];
    if (cfg.mode != kMagnitude) continue;
    if (need(cfg.keep)) {
      cfg.count_keep = plan.ncounted++;
      items.push_back({i, static_cast<uint32_t>(cfg.keep.key), cfg.count_keep});
    }
    if (cfg.has_drop && need(cfg.drop)) {
      cfg.count_drop = plan.ncounted++;
      items.push_back({i, static_cast<uint32_t>(cfg.drop.key), cfg.count_drop});
    }
  }
  if (items.empty()) return;
  const int64_t nc = plan.nchunks;
  plan.before.assign(static_cast<size_t>(plan.ncounted) * (nc + 1), 0);
  for_chunks(nc, kChunk, [&](int64_t, int64_t c) {
    const int64_t begin = c * kChunk, end = std::min(plan.n, begin + kChunk);
    for (const Item& it : items) {
      plan.before[static_cast<size_t>(it.index) * (nc + 1) + c + 1] =
          count_equal_keys(b, ms[it.model], begin, end, it.key);
    }
  });
  for (int q = 0; q < plan.ncounted; ++q) {
    int64_t* bc = plan.before.data() + static_cast<size_t>(q) * (nc + 1);
    for (int64_t c = 0; c < nc; ++c) bc[c + 1] += bc[c];
  }
}

// ---- pass 3: norms for the rescale ------------------------------------------------

// The rescale factors from per-chunk partial norms part[(c * nw + q) * 2 + {0, 1}] (norm
// of the delta, of the sparsified delta) of models which[q], added in chunk order:
// factor = fp32(|d|) / fp32(|masked|), skipped (as rescale_to_norm) when either is < 1e-7.
void finish_norms(Plan& plan, const std::vector<int>& which, const std::vector<double>& part,
                  int64_t nc) {
  const size_t nw = which.size();
  for (size_t q = 0; q < nw; ++q) {
    double before = 0, after = 0;
    for (int64_t c = 0; c < nc; ++c) {
      const double x0 = part[(static_cast<size_t>(c) * nw + q) * 2];
      const double x1 = part[(static_cast<size_t>(c) * nw + q) * 2 + 1];
      if (plan.rescale == kLinf) {
        before = std::max(before, x0);
        after = std::max(after, x1);
      } else {
        before += x0;
        after += x1;
      }
    }
    if (plan.rescale == kL2) {
      before = std::sqrt(before);
      after = std::sqrt(after);
    }
    const float fb = static_cast<float>(before), fa = static_cast<float>(after);
    ModelCfg& cfg = plan.cfg[which[q]];
    if (fb < 1e-7f || fa < 1e-7f) continue;  // rescale_to_norm skips
    cfg.scale = true;
    cfg.factor = fb / fa;
  }
}

// Adds the norm of the delta d[0, n) into acc[0] and of its sparsified form
// mk[0, n) into acc[1] (l1, l2 squared: double sums in element order; linf: max).
inline void accumulate_norms(Rescale rescale, const float* __restrict d, const float* __restrict mk,
                             int64_t n, double* acc) {
  double a0 = acc[0], a1 = acc[1];
  if (rescale == kL1) {
    for (int64_t k = 0; k < n; ++k) { a0 += std::fabs(d[k]); a1 += std::fabs(mk[k]); }
  } else if (rescale == kL2) {
    for (int64_t k = 0; k < n; ++k) {
      a0 += double(d[k]) * double(d[k]);
      a1 += double(mk[k]) * double(mk[k]);
    }
  } else {  // linf
    for (int64_t k = 0; k < n; ++k) {
      a0 = std::max(a0, double(std::fabs(d[k])));
      a1 = std::max(a1, double(std::fabs(mk[k])));
    }
  }
  acc[0] = a0;
  acc[1] = a1;
}

template <typename T>
void norm_pass(Plan& plan, const T* b, const std::vector<const T*>& ms) {
  std::vector<int> which;
  for (int i = 0; i < plan.nmodels; ++i)
    if (plan.cfg[i].mode == kMagnitude || plan.cfg[i].mode == kRandom) which.push_back(i);
  if (which.empty()) return;
  const int64_t nc = plan.nchunks;
  const size_t nw = which.size();
  // per chunk, per model: (norm of d, norm of masked)
  std::vector<double> part(static_cast<size_t>(nc) * nw * 2, 0.0);
  std::vector<Scratch> scratch(num_slots(nc));
  for_chunks(nc, kChunk, [&](int64_t slot, int64_t c) {
    Scratch& sc = scratch[slot];
    sc.init(plan.nmodels);
    init_states(plan, c, sc);
    const int64_t begin = c * kChunk, end = std::min(plan.n, begin + kChunk);
    std::vector<double> acc(nw * 2, 0.0);
    for (int64_t j0 = begin; j0 < end; j0 += kBlock) {
      const int len = static_cast<int>(std::min<int64_t>(kBlock, end - j0));
      load_base(b, j0, len, sc.bf.data());
      for (size_t q = 0; q < nw; ++q) {
        sparsify_block(plan, which[q], ms[which[q]], j0, len, sc, true);
        const float* d = sc.d.data();
        const float* mk = sc.masked.data();
        accumulate_norms(plan.rescale, d, mk, len, &acc[2 * q]);
      }
    }
    std::copy(acc.begin(), acc.end(), part.begin() + static_cast<size_t>(c) * nw * 2);
  });
  finish_norms(plan, which, part, nc);
}

// ---- pass 4: the merge ------------------------------------------------------------

struct MergeOpts {
  bool consensus, sign_count, normalize, apply_lambda;
  float divisor;  // non-consensus normalize divisor (already 0 -> 1)
  float lambda;
};

// sign_of, agrees, nonzero_or_one: deltaops/merge.h (shared with the CUDA kernel).

// The task-arithmetic mix of a block when every model is dense and no sign is
// elected: res = bf + lambda * ((sum_i (m_i - bf) * w_i) / divisor), the
// reference's operations in its order, kept in registers eight elements at a time
// (the buffered per-model loops of merge_pass cost more than the memory traffic).
template <typename T>
void dense_mix_block(const MergeOpts& o, const float* __restrict w, const T* const* ms, int N,
                     const T* __restrict b, int64_t j0, int len, float* __restrict res) {
  int k = 0;
#if defined(__AVX2__)
  const __m256 divisor = _mm256_set1_ps(o.divisor), lambda = _mm256_set1_ps(o.lambda);
  for (; k + 8 <= len; k += 8) {
    const __m256 bf = load8_f32(b + j0 + k);
    __m256 mixed = _mm256_mul_ps(_mm256_sub_ps(load8_f32(ms[0] + j0 + k), bf), _mm256_set1_ps(w[0]));
    for (int i = 1; i < N; ++i)
      mixed = _mm256_add_ps(
          mixed, _mm256_mul_ps(_mm256_sub_ps(load8_f32(ms[i] + j0 + k), bf), _mm256_set1_ps(w[i])));
    if (o.normalize) mixed = _mm256_div_ps(mixed, divisor);
    if (o.apply_lambda) mixed = _mm256_mul_ps(mixed, lambda);
    _mm256_storeu_ps(res + k, _mm256_add_ps(bf, mixed));
  }
#endif
  for (; k < len; ++k) {
    const float bf = load_f32(b[j0 + k]);
    float mixed = (load_f32(ms[0][j0 + k]) - bf) * w[0];
    for (int i = 1; i < N; ++i) mixed = mixed + (load_f32(ms[i][j0 + k]) - bf) * w[i];
    if (o.normalize) mixed = mixed / o.divisor;
    if (o.apply_lambda) mixed = mixed * o.lambda;
    res[k] = bf + mixed;
  }
}

// The sign-elect mix of n elements from the weighted terms of every model (model
// i's at xs + i * stride): votes in model order and the elected sign (a zero sum
// elects +1), then the sum of the agreeing terms, divided by the sum of their
// weights when normalizing. votes and div are scratch of n floats. Shared by the
// block pass and della's row pass.
inline void consensus_mix(const Plan& plan, const MergeOpts& o, const float* __restrict xs,
                          size_t stride, int64_t n, float* __restrict votes, float* __restrict div,
                          float* __restrict mixed) {
  const int N = plan.nmodels;
  if (o.sign_count) {
    for (int64_t k = 0; k < n; ++k) votes[k] = sign_of(xs[k]);
    for (int i = 1; i < N; ++i) {
      const float* __restrict x = xs + i * stride;
      for (int64_t k = 0; k < n; ++k) votes[k] = votes[k] + sign_of(x[k]);
    }
  } else {
    for (int64_t k = 0; k < n; ++k) votes[k] = xs[k];
    for (int i = 1; i < N; ++i) {
      const float* __restrict x = xs + i * stride;
      for (int64_t k = 0; k < n; ++k) votes[k] = votes[k] + x[k];
    }
  }
  for (int64_t k = 0; k < n; ++k) votes[k] = votes[k] >= 0.0f ? 1.0f : -1.0f;
  if (o.normalize) {
    const float w0 = plan.cfg[0].w;
    for (int64_t k = 0; k < n; ++k) {
      const float keep = agrees(xs[k], votes[k]);
      mixed[k] = xs[k] * keep;
      div[k] = w0 * keep;
    }
    for (int i = 1; i < N; ++i) {
      const float* __restrict x = xs + i * stride;
      const float w = plan.cfg[i].w;
      for (int64_t k = 0; k < n; ++k) {
        const float keep = agrees(x[k], votes[k]);
        mixed[k] = mixed[k] + x[k] * keep;
        div[k] = div[k] + w * keep;
      }
    }
    for (int64_t k = 0; k < n; ++k) mixed[k] = mixed[k] / nonzero_or_one(div[k]);
  } else {
    for (int64_t k = 0; k < n; ++k) mixed[k] = xs[k] * agrees(xs[k], votes[k]);
    for (int i = 1; i < N; ++i) {
      const float* __restrict x = xs + i * stride;
      for (int64_t k = 0; k < n; ++k) mixed[k] = mixed[k] + x[k] * agrees(x[k], votes[k]);
    }
  }
}

template <typename T, typename O>
void merge_pass(const Plan& plan, const MergeOpts& o, const T* b, const std::vector<const T*>& ms,
                O* out) {
  const int64_t nc = plan.nchunks;
  const int N = plan.nmodels;
  std::vector<float> weights(N);
  bool all_dense = true;
  for (int i = 0; i < N; ++i) {
    weights[i] = plan.cfg[i].w;
    all_dense = all_dense && plan.cfg[i].mode == kDense;
  }
  std::vector<Scratch> scratch(num_slots(nc));
  for_chunks(nc, kChunk, [&](int64_t slot, int64_t c) {
    Scratch& sc = scratch[slot];
    sc.init(N);
    init_states(plan, c, sc);
    const int64_t begin = c * kChunk, end = std::min(plan.n, begin + kChunk);
    for (int64_t j0 = begin; j0 < end; j0 += kBlock) {
      const int len = static_cast<int>(std::min<int64_t>(kBlock, end - j0));
      if (all_dense && !o.consensus) {
        float* __restrict res = sc.masked.data();
        dense_mix_block(o, weights.data(), ms.data(), N, b, j0, len, res);
        O* __restrict o_ = out + j0;
        from_f32_block(res, o_, len);
        continue;
      }
      float* __restrict bf = sc.bf.data();
      load_base(b, j0, len, bf);
      for (int i = 0; i < N; ++i) {
        const ModelCfg& cfg = plan.cfg[i];
        float* __restrict x = sc.x.data() + static_cast<size_t>(i) * kBlock;
        const float w = cfg.w;
        if (cfg.mode == kDense) {  // no sparsification: x = (m - b) * w
          const T* __restrict m = ms[i];
          to_f32_block(m + j0, x, len);
          for (int k = 0; k < len; ++k) x[k] = (x[k] - bf[k]) * w;
          continue;
        }
        sparsify_block(plan, i, ms[i], j0, len, sc, false);
        const float* __restrict mk = sc.masked.data();
        if (cfg.scale) {
          const float f = cfg.factor;
          for (int k = 0; k < len; ++k) x[k] = (mk[k] * f) * w;
        } else {
          for (int k = 0; k < len; ++k) x[k] = mk[k] * w;
        }
      }
      const float* __restrict xs = sc.x.data();
      O* __restrict o_ = out + j0;
      if (o.consensus) {
        float* __restrict mixed = sc.masked.data();
        consensus_mix(plan, o, xs, kBlock, len, sc.d.data(), sc.div.data(), mixed);
        if (o.apply_lambda)
          for (int k = 0; k < len; ++k) mixed[k] = mixed[k] * o.lambda;
        for (int k = 0; k < len; ++k) mixed[k] = bf[k] + mixed[k];
        from_f32_block(mixed, o_, len);
      } else {
        float* __restrict mixed = sc.masked.data();
        for (int k = 0; k < len; ++k) mixed[k] = xs[k];
        for (int i = 1; i < N; ++i)
          for (int k = 0; k < len; ++k) mixed[k] = mixed[k] + xs[i * kBlock + k];
        if (o.normalize)
          for (int k = 0; k < len; ++k) mixed[k] = mixed[k] / o.divisor;
        if (o.apply_lambda)
          for (int k = 0; k < len; ++k) mixed[k] = mixed[k] * o.lambda;
        for (int k = 0; k < len; ++k) mixed[k] = bf[k] + mixed[k];
        from_f32_block(mixed, o_, len);
      }
    }
  });
}

// ---- della: per-row rank probabilities (MAGPRUNE) --------------------------------
//
// della_keep_probability ranks each row of |delta| along dim 1: the tensor is viewed as
// (outer, n, inner) with n = size(1) (a 1-D tensor is one row: outer = inner = 1), and
// row r holds the elements first(r) + k * inner, k = 0..n-1. A row's ranks need the whole
// row, so della runs its own passes over chunks of whole rows (rows_per_chunk rows each,
// about kChunk elements; at least one row), instead of merge_pass's flat chunks. Each
// model's ranks are computed when the pass reaches the row, in row-sized per-thread
// scratch: nothing of the tensor's size is stored. Chunks are fixed, so results do not
// depend on the thread count.

struct RowGeom {
  int64_t n = 1, inner = 1, nrows = 0, rows_per_chunk = 1, nchunks = 0;
  int64_t first(int64_t r) const { return (r / inner) * n * inner + r % inner; }
};

RowGeom row_geom(const at::Tensor& base) {
  RowGeom g;
  const int64_t numel = base.numel();
  if (base.dim() >= 2) {
    g.n = base.size(1);
    g.inner = 1;
    for (int64_t d = 2; d < base.dim(); ++d) g.inner *= base.size(d);
  } else {
    g.n = numel;
  }
  g.nrows = g.n == 0 ? 0 : numel / g.n;
  g.rows_per_chunk = std::max<int64_t>(1, kChunk / std::max<int64_t>(1, g.n));
  g.nchunks = (g.nrows + g.rows_per_chunk - 1) / g.rows_per_chunk;
  return g;
}

// Radix digits of the rank sort: at most 11 bits (three passes cover 31-bit keys; on
// 4096x11008 bf16 rows three passes of ~8 bits, whose histograms stay in L1, beat two
// of ~12 bits); rows up to kSmallRow elements are ranked by direct counting.
constexpr int kMaxDigitBits = 11;
constexpr int kSmallRow = 48;

// Per-thread scratch of one row (n elements); xs holds every model's weighted row for
// the sign election (consensus only).
struct DellaScratch {
  std::vector<float> bf, d, rn, u, mk, acc, xs;
  std::vector<uint32_t> keys;
  std::vector<uint64_t> items, tmp;
  std::vector<uint32_t> hist;
  void init(int64_t n, int nmodels, bool consensus) {
    if (!bf.empty()) return;
    const size_t len = static_cast<size_t>(n);
    for (auto* v : {&bf, &d, &rn, &u, &mk, &acc}) v->resize(len);
    if (consensus) xs.resize(len * static_cast<size_t>(nmodels));
    keys.resize(len);
    items.resize(len);
    tmp.resize(len);
    hist.resize(size_t(3) << kMaxDigitBits);
  }
};

// out[k] = rank_norm[q_k] for the n deltas d of a row, q_k the ascending rank of |d_k|
// counted from 0 with equal keys ordered as in top-k (the lower index ranks higher):
// the reference's fp32((r - 1) / (n - 1)), tabulated in rank_norm.
//
// A stable LSD radix sort of (key, index), fed in descending index order so that equal
// keys keep the higher index first. Only the bits in which the row's keys differ are
// sorted on, in one to three passes whose digits split that span evenly; the last pass
// writes out[] directly instead of moving the items once more.
void della_rank_norms(const float* __restrict d, int64_t n, const float* __restrict rank_norm,
                      DellaScratch& sc, float* __restrict out) {
  uint32_t* __restrict keys = sc.keys.data();
  const uint32_t key0 = delta_key(d[0]);
  uint32_t diff = 0;
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t key = delta_key(d[k]);
    keys[k] = key;
    diff |= key ^ key0;
  }
  if (diff == 0) {  // every key equal: the lower index ranks higher
    for (int64_t k = 0; k < n; ++k) out[k] = rank_norm[n - 1 - k];
    return;
  }
  if (n <= kSmallRow) {  // rank by counting: keys below, and equal keys at higher indices
    for (int64_t k = 0; k < n; ++k) {
      const uint32_t key = keys[k];
      int64_t q = 0;
      for (int64_t j = 0; j < n; ++j) q += keys[j] < key || (keys[j] == key && j > k);
      out[k] = rank_norm[q];
    }
    return;
  }
  const int lo = __builtin_ctz(diff), span = 32 - __builtin_clz(diff) - lo;
  const int npasses = (span + kMaxDigitBits - 1) / kMaxDigitBits;
  const int bits = (span + npasses - 1) / npasses;
  const uint32_t mask = (1u << bits) - 1;
  const size_t nb = size_t(1) << bits;
  uint32_t* __restrict h = sc.hist.data();
  std::fill(h, h + npasses * nb, 0u);
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t v = keys[k] >> lo;
    ++h[v & mask];
    if (npasses > 1) ++h[nb + ((v >> bits) & mask)];
    if (npasses > 2) ++h[2 * nb + ((v >> (2 * bits)) & mask)];  // v keeps the constant high bits
  }
  for (int p = 0; p < npasses; ++p) {
    uint32_t* __restrict off = h + p * nb;
    uint32_t sum = 0;
    for (size_t v = 0; v < nb; ++v) {
      const uint32_t c = off[v];
      off[v] = sum;
      sum += c;
    }
  }
  if (npasses == 1) {
    for (int64_t k = n - 1; k >= 0; --k) out[k] = rank_norm[h[(keys[k] >> lo) & mask]++];
    return;
  }
  uint64_t* src = sc.items.data();  // not __restrict: the passes swap them
  uint64_t* dst = sc.tmp.data();
  for (int64_t k = n - 1; k >= 0; --k) {  // pass 0: from the keys, descending index
    const uint32_t v = keys[k] >> lo;
    src[h[v & mask]++] = (static_cast<uint64_t>(v) << 32) | static_cast<uint64_t>(k);
  }
  for (int p = 1; p < npasses - 1; ++p) {
    uint32_t* __restrict off = h + p * nb;
    const int shift = 32 + p * bits;
    for (int64_t k = 0; k < n; ++k) {
      const uint64_t item = src[k];
      dst[off[(item >> shift) & mask]++] = item;
    }
    std::swap(src, dst);
  }
  {  // the last pass: the sorted position of each item is its rank
    const int p = npasses - 1;
    uint32_t* __restrict off = h + p * nb;
    const int shift = 32 + p * bits;
    for (int64_t k = 0; k < n; ++k) {
      const uint64_t item = src[k];
      out[static_cast<uint32_t>(item)] = rank_norm[off[(item >> shift) & mask]++];
    }
  }
}

// sc.mk = model i's sparsified row (before any norm rescale), sc.d its delta; sc.bf holds
// the row of fp32(base). della: keep iff philox(seed, stream=i, flat index) < p with
// p = low + rank_norm * width (the reference's two fp32 roundings); the kept value is
// d * keep (mergekit's mask), or d / p for the density rescale.
template <typename T>
void della_row(const Plan& plan, const RowGeom& g, const float* rank_norm, int i, const T* m,
               int64_t first, DellaScratch& sc) {
  const ModelCfg& cfg = plan.cfg[i];
  const int64_t n = g.n, st = g.inner;
  const float* __restrict bf = sc.bf.data();
  float* __restrict d = sc.d.data();
  float* __restrict mk = sc.mk.data();
  if (st == 1) {
    const T* __restrict mr = m + first;
    for (int64_t k = 0; k < n; ++k) d[k] = load_f32(mr[k]) - bf[k];
  } else {
    for (int64_t k = 0; k < n; ++k) d[k] = load_f32(m[first + k * st]) - bf[k];
  }
  if (cfg.mode == kDense) {
    for (int64_t k = 0; k < n; ++k) mk[k] = d[k];
    return;
  }
  if (cfg.mode == kZero) {
    for (int64_t k = 0; k < n; ++k) mk[k] = 0.0f;
    return;
  }
  float* __restrict rn = sc.rn.data();
  float* __restrict u = sc.u.data();
  della_rank_norms(d, n, rank_norm, sc, rn);
  const uint32_t stream = static_cast<uint32_t>(i);
  if (st == 1) {
    philox_uniform_block(u, first, first + n, plan.seed, stream);
  } else {
    for (int64_t k = 0; k < n; ++k)
      u[k] = uniform_from_word(philox_word(plan.seed, stream, static_cast<uint64_t>(first + k * st)));
  }
  const float low = cfg.low, width = cfg.width;
  if (plan.rescale == kDensity) {
    // divide every element, then select with integer ops (+0.0 where dropped): a
    // division under the keep branch would neither vectorize nor predict
    for (int64_t k = 0; k < n; ++k) {
      const float p = low + rn[k] * width;
      const uint32_t keep = 0u - static_cast<uint32_t>(u[k] < p);
      mk[k] = f32_from_bits(f32_bits(d[k] / p) & keep);
    }
  } else {
    for (int64_t k = 0; k < n; ++k) {
      const float p = low + rn[k] * width;
      mk[k] = masked_delta(d[k], u[k] < p);
    }
  }
}

template <typename T>
void load_row(const T* b, const RowGeom& g, int64_t first, float* __restrict bf) {
  if (g.inner == 1) {
    const T* __restrict br = b + first;
    for (int64_t k = 0; k < g.n; ++k) bf[k] = load_f32(br[k]);
  } else {
    for (int64_t k = 0; k < g.n; ++k) bf[k] = load_f32(b[first + k * g.inner]);
  }
}

// fp32((r - 1) / (n - 1)) for r - 1 = 0..n-1, as della_keep_probability rounds it (the
// rank converted to fp32, divided by fp32(n - 1)); 0.5 for a row of one element.
std::vector<float> rank_norm_table(int64_t n) {
  std::vector<float> t(static_cast<size_t>(n));
  if (n == 1) {
    t[0] = 0.5f;
  } else {
    const float denom = static_cast<float>(n - 1);
    for (int64_t q = 0; q < n; ++q) t[q] = static_cast<float>(q) / denom;
  }
  return t;
}

// Pass 3 for della: the norms of each della model's delta and sparsified delta, per
// chunk of rows (in double, row by row in element order), added in chunk order.
template <typename T>
void della_norm_pass(Plan& plan, const RowGeom& g, const std::vector<float>& rank_norm, const T* b,
                     const std::vector<const T*>& ms) {
  std::vector<int> which;
  for (int i = 0; i < plan.nmodels; ++i)
    if (plan.cfg[i].mode == kDella) which.push_back(i);
  if (which.empty()) return;
  const int64_t nc = g.nchunks;
  const size_t nw = which.size();
  std::vector<double> part(static_cast<size_t>(nc) * nw * 2, 0.0);
  std::vector<DellaScratch> scratch(num_slots(nc));
  for_chunks(nc, g.rows_per_chunk * g.n, [&](int64_t slot, int64_t c) {
    DellaScratch& sc = scratch[slot];
    sc.init(g.n, plan.nmodels, false);
    const int64_t r_end = std::min(g.nrows, (c + 1) * g.rows_per_chunk);
    std::vector<double> acc(nw * 2, 0.0);
    for (int64_t r = c * g.rows_per_chunk; r < r_end; ++r) {
      const int64_t first = g.first(r);
      load_row(b, g, first, sc.bf.data());
      for (size_t q = 0; q < nw; ++q) {
        della_row(plan, g, rank_norm.data(), which[q], ms[which[q]], first, sc);
        const float* d = sc.d.data();
        const float* mk = sc.mk.data();
        accumulate_norms(plan.rescale, d, mk, g.n, &acc[2 * q]);
      }
    }
    std::copy(acc.begin(), acc.end(), part.begin() + static_cast<size_t>(c) * nw * 2);
  });
  finish_norms(plan, which, part, nc);
}

// Pass 4 for della: per row, each model's weighted sparsified row x_i in model order,
// then merge_pass's arithmetic (the same operations in the same order) on the row.
// Without sign election the x_i are summed as they come (one row of scratch); with it
// every model's row is kept until the signs are elected.
template <typename T, typename O>
void della_merge_pass(const Plan& plan, const RowGeom& g, const std::vector<float>& rank_norm,
                      const MergeOpts& o, const T* b, const std::vector<const T*>& ms, O* out) {
  const int64_t nc = g.nchunks, n = g.n;
  const int N = plan.nmodels;
  std::vector<DellaScratch> scratch(num_slots(nc));
  for_chunks(nc, g.rows_per_chunk * n, [&](int64_t slot, int64_t c) {
    DellaScratch& sc = scratch[slot];
    sc.init(n, N, o.consensus);
    const int64_t r_end = std::min(g.nrows, (c + 1) * g.rows_per_chunk);
    for (int64_t r = c * g.rows_per_chunk; r < r_end; ++r) {
      const int64_t first = g.first(r);
      float* __restrict bf = sc.bf.data();
      load_row(b, g, first, bf);
      float* __restrict mixed = sc.acc.data();
      for (int i = 0; i < N; ++i) {
        const ModelCfg& cfg = plan.cfg[i];
        della_row(plan, g, rank_norm.data(), i, ms[i], first, sc);
        const float* __restrict mk = sc.mk.data();
        float* __restrict x = o.consensus ? sc.xs.data() + static_cast<size_t>(i) * n : sc.d.data();
        const float w = cfg.w;
        if (cfg.scale) {
          const float f = cfg.factor;
          for (int64_t k = 0; k < n; ++k) x[k] = (mk[k] * f) * w;
        } else {
          for (int64_t k = 0; k < n; ++k) x[k] = mk[k] * w;
        }
        if (!o.consensus) {
          if (i == 0) {
            for (int64_t k = 0; k < n; ++k) mixed[k] = x[k];
          } else {
            for (int64_t k = 0; k < n; ++k) mixed[k] = mixed[k] + x[k];
          }
        }
      }
      if (o.consensus) {
        consensus_mix(plan, o, sc.xs.data(), static_cast<size_t>(n), n, sc.d.data(), sc.mk.data(),
                      mixed);
      } else if (o.normalize) {
        for (int64_t k = 0; k < n; ++k) mixed[k] = mixed[k] / o.divisor;
      }
      if (o.apply_lambda)
        for (int64_t k = 0; k < n; ++k) mixed[k] = mixed[k] * o.lambda;
      if (g.inner == 1) {
        for (int64_t k = 0; k < n; ++k) mixed[k] = bf[k] + mixed[k];
        from_f32_block(mixed, out + first, n);
      } else {
        for (int64_t k = 0; k < n; ++k) out[first + k * g.inner] = store_from_f32<O>(bf[k] + mixed[k]);
      }
    }
  });
}

// ---- linear: a weighted average of the models (no base) ----------------------------

// acc = fma(fp32(m_i), w_i, acc) from acc = +0 in model order (mergekit's addcmul_,
// one rounding per model), then acc / divisor when normalizing; one rounding to O.
template <typename T, typename O>
void linear_pass(const std::vector<const T*>& ms, const std::vector<float>& w, bool normalize,
                 float divisor, int64_t n, O* out) {
  const int N = static_cast<int>(ms.size());
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  std::vector<std::vector<float>> scratch(num_slots(nchunks));
  for_chunks(nchunks, kChunk, [&](int64_t slot, int64_t c) {
    std::vector<float>& res = scratch[slot];
    if (res.empty()) res.resize(kBlock);
    const int64_t begin = c * kChunk, end = std::min(n, begin + kChunk);
    for (int64_t j0 = begin; j0 < end; j0 += kBlock) {
      const int len = static_cast<int>(std::min<int64_t>(kBlock, end - j0));
      float* __restrict r = res.data();
      int k = 0;
#if defined(__AVX2__) && defined(__FMA__)
      for (; k + 8 <= len; k += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int i = 0; i < N; ++i)
          acc = _mm256_fmadd_ps(load8_f32(ms[i] + j0 + k), _mm256_set1_ps(w[i]), acc);
        if (normalize) acc = _mm256_div_ps(acc, _mm256_set1_ps(divisor));
        _mm256_storeu_ps(r + k, acc);
      }
#endif
      for (; k < len; ++k) {
        float acc = 0.0f;
        for (int i = 0; i < N; ++i) acc = std::fma(load_f32(ms[i][j0 + k]), w[i], acc);
        r[k] = normalize ? acc / divisor : acc;
      }
      O* __restrict o_ = out + j0;
      from_f32_block(r, o_, len);
    }
  });
}

// ---- argument handling ------------------------------------------------------------

int dtype_code_of(at::ScalarType s) {
  switch (s) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: return -1;
  }
}

at::ScalarType out_type(const std::string& name) {
  if (name == "float32") return at::kFloat;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  throw TypeError("out_dtype must be float32, bfloat16 or float16, got " + name);
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined() && t.device().is_cpu(), "deltaops._C: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), "deltaops._C: ", name, " must be contiguous");
  if (dtype_code_of(t.scalar_type()) < 0)
    throw TypeError(std::string(name) + " must be float32, bfloat16 or float16");
}

template <typename T>
void run(const at::Tensor& base, const std::vector<at::Tensor>& models, const std::string& method,
               const std::vector<double>& weights, const std::vector<double>& densities,
               const std::vector<double>& gammas, double lambda, bool normalize,
               const std::string& rescale, const std::string& sign_method, int64_t seed,
               const std::vector<int64_t>& thresholds, at::Tensor& out) {
  Plan plan;
  plan.n = base.numel();
  plan.nmodels = static_cast<int>(models.size());
  plan.nchunks = (plan.n + kChunk - 1) / kChunk;
  const T* b = static_cast<const T*>(base.data_ptr());
  std::vector<const T*> ms;
  for (const at::Tensor& m : models) ms.push_back(static_cast<const T*>(m.data_ptr()));

  enum Kind { kNoSparse, kMag, kRand, kOutliers, kDellaRank } kind;
  bool consensus;
  if (method == "task_arithmetic") { kind = kNoSparse; consensus = false; }
  else if (method == "ties") { kind = kMag; consensus = true; }
  else if (method == "dare_ties") { kind = kRand; consensus = true; }
  else if (method == "dare_linear") { kind = kRand; consensus = false; }
  else if (method == "breadcrumbs") { kind = kOutliers; consensus = false; }
  else if (method == "breadcrumbs_ties") { kind = kOutliers; consensus = true; }
  else if (method == "della") { kind = kDellaRank; consensus = true; }
  else if (method == "della_linear") { kind = kDellaRank; consensus = false; }
  else throw ValueError("merge_sign_elect: unsupported method " + method);

  if (rescale.empty()) plan.rescale = kNone;
  else if (rescale == "l1") plan.rescale = kL1;
  else if (rescale == "l2") plan.rescale = kL2;
  else if (rescale == "linf") plan.rescale = kLinf;
  else if (rescale == "density") plan.rescale = kDensity;
  else throw ValueError("unknown rescale " + rescale);
  if (kind == kNoSparse) plan.rescale = kNone;
  plan.seed = static_cast<uint64_t>(seed);

  plan.cfg.resize(plan.nmodels);
  for (int i = 0; i < plan.nmodels; ++i) {
    ModelCfg& cfg = plan.cfg[i];
    cfg.w = static_cast<float>(weights[i]);
    const double density = densities[i];
    cfg.p = static_cast<float>(density);
    const bool has_thr = !thresholds.empty() && thresholds[4 * i] >= 0;
    if (kind == kNoSparse) {
      cfg.mode = kDense;
      continue;
    }
    if (kind == kDellaRank && has_thr)
      throw ValueError("della does not take thresholds (model " + std::to_string(i) + ")");
    if (!has_thr) {
      if (density >= 1) { cfg.mode = kDense; continue; }
      if (density <= 0) { cfg.mode = kZero; continue; }
    }
    if (kind == kRand) {
      cfg.mode = kRandom;
    } else if (kind == kDellaRank) {
      // della passes its epsilons in the gammas slot (della has no gamma).
      const double epsilon = gammas[i];
      if (!(0 < density - epsilon && density + epsilon < 1))
        throw ValueError("della: epsilon=" + std::to_string(epsilon) +
                         " must leave density +- epsilon inside (0, 1) (model " + std::to_string(i) +
                         " has density=" + std::to_string(density) + ")");
      cfg.mode = kDella;
      cfg.low = static_cast<float>(density - epsilon);
      cfg.width = static_cast<float>(2 * epsilon);
    } else {
      cfg.mode = kMagnitude;
      if (has_thr) {
        cfg.keep = thr_from(thresholds[4 * i], thresholds[4 * i + 1]);
        if (thresholds[4 * i + 2] >= 0) {
          cfg.has_drop = true;
          cfg.drop = thr_from(thresholds[4 * i + 2], thresholds[4 * i + 3]);
        }
      } else if (kind == kMag) {
        cfg.keep = topk_thresholds(b, ms[i], plan.n, {magnitude_k(density, plan.n)})[0];
      } else {  // outlier band
        const int64_t n = plan.n;
        const int64_t target = static_cast<int64_t>(density * static_cast<double>(n));
        const int64_t n_top = static_cast<int64_t>(gammas[i] * static_cast<double>(n));
        const int64_t n_bottom = std::max<int64_t>(0, n - target - n_top);
        const int64_t n_drop = n - n_bottom - target;
        const auto t = topk_thresholds(b, ms[i], n, {n_drop + target, n_drop});
        cfg.keep = t[0];
        cfg.has_drop = true;
        cfg.drop = t[1];
      }
    }
    if (plan.rescale == kDensity && density <= 0 && cfg.mode == kMagnitude)
      throw ValueError("rescale='density' needs density > 0 (model " + std::to_string(i) + ")");
  }
  const bool norm = plan.rescale == kL1 || plan.rescale == kL2 || plan.rescale == kLinf;
  RowGeom geom;
  std::vector<float> rank_norm;
  if (kind == kDellaRank) {
    if (base.dim() == 0) throw ValueError("della ranks along dim 1: base must have at least one dimension");
    geom = row_geom(base);
    rank_norm = rank_norm_table(geom.n);
    if (norm) della_norm_pass(plan, geom, rank_norm, b, ms);
  } else {
    count_pass(plan, b, ms);
    if (norm) norm_pass(plan, b, ms);
  }

  MergeOpts o;
  o.consensus = consensus;
  o.sign_count = sign_method == "count";
  o.normalize = normalize;
  o.lambda = static_cast<float>(lambda);
  o.apply_lambda = lambda != 1.0;
  float div = 0.0f;
  for (int i = 0; i < plan.nmodels; ++i) div = i == 0 ? plan.cfg[i].w : div + plan.cfg[i].w;
  o.divisor = std::fabs(div) < 1e-8f ? 1.0f : div;

  // Every check and pre-pass is done: the first write to out. Each element of
  // out is written after its inputs are read, so out may be base or a model.
  auto pass = [&](auto* o_ptr) {
    if (kind == kDellaRank) della_merge_pass(plan, geom, rank_norm, o, b, ms, o_ptr);
    else merge_pass(plan, o, b, ms, o_ptr);
  };
  switch (out.scalar_type()) {
    case at::kFloat: pass(static_cast<float*>(out.data_ptr())); break;
    case at::kBFloat16: pass(static_cast<bf16_t*>(out.data_ptr())); break;
    default: pass(static_cast<fp16_t*>(out.data_ptr())); break;
  }
}

void check_pair(const at::Tensor& base, const at::Tensor& model) {
  check_cpu(base, "base");
  check_cpu(model, "model");
  if (model.scalar_type() != base.scalar_type()) throw TypeError("model and base dtypes differ");
  if (model.numel() != base.numel()) throw ValueError("model and base sizes differ");
}

// out of a merge into `like`'s shape: a contiguous float CPU tensor of that shape
// whose memory is either disjoint from each input or exactly that input.
void check_out(const at::Tensor& out, const at::Tensor& like, const std::vector<at::Tensor>& inputs) {
  check_cpu(out, "out");
  if (!out.sizes().equals(like.sizes()))
    throw ValueError("out has shape " + c10::str(out.sizes()) + ", expected " + c10::str(like.sizes()));
  for (const at::Tensor& t : inputs)
    if (merge_args::partial_overlap(out.data_ptr(), out.nbytes(), t.data_ptr(), t.nbytes(),
                                    t.scalar_type() == out.scalar_type()))
      throw ValueError(merge_args::kPartialOverlap);
}

}  // namespace

void merge_sign_elect_out_(const at::Tensor& base, const std::vector<at::Tensor>& models,
                           const std::string& method, const std::vector<double>& weights,
                           const std::vector<double>& densities, const std::vector<double>& gammas,
                           double lambda, bool normalize, const std::string& rescale,
                           const std::string& sign_method, int64_t seed,
                           const std::vector<int64_t>& thresholds, at::Tensor& out) {
  check_cpu(base, "base");
  const std::string bad = merge_args::options_error(models.size(), weights.size(), densities.size(),
                                                    gammas.size(), thresholds.size(), sign_method, seed);
  if (!bad.empty()) throw ValueError(bad);
  for (const at::Tensor& m : models) {
    check_pair(base, m);
    if (!m.sizes().equals(base.sizes())) throw ValueError("models must have base's shape");
  }
  std::vector<at::Tensor> inputs(models);
  inputs.push_back(base);
  check_out(out, base, inputs);
  if (base.numel() == 0) return;
  if (base.numel() >= (int64_t(1) << 32) / 2)
    throw ValueError("merge_sign_elect: tensors of 2^31 elements or more are not supported");
  switch (base.scalar_type()) {
    case at::kFloat:
      return run<float>(base, models, method, weights, densities, gammas, lambda, normalize, rescale,
                        sign_method, seed, thresholds, out);
    case at::kBFloat16:
      return run<bf16_t>(base, models, method, weights, densities, gammas, lambda, normalize, rescale,
                         sign_method, seed, thresholds, out);
    default:
      return run<fp16_t>(base, models, method, weights, densities, gammas, lambda, normalize, rescale,
                         sign_method, seed, thresholds, out);
  }
}

at::Tensor merge_sign_elect(const at::Tensor& base, const std::vector<at::Tensor>& models,
                            const std::string& method, const std::vector<double>& weights,
                            const std::vector<double>& densities, const std::vector<double>& gammas,
                            double lambda, bool normalize, const std::string& rescale,
                            const std::string& sign_method, int64_t seed,
                            const std::vector<int64_t>& thresholds, const std::string& out_dtype) {
  check_cpu(base, "base");
  at::Tensor out = new_output(base.sizes(), base.options().dtype(out_type(out_dtype)));
  merge_sign_elect_out_(base, models, method, weights, densities, gammas, lambda, normalize, rescale,
                        sign_method, seed, thresholds, out);
  return out;
}

void merge_linear_out_(const std::vector<at::Tensor>& models, const std::vector<double>& weights,
                       bool normalize, at::Tensor& out) {
  const size_t n = models.size();
  if (n == 0) throw ValueError("models must hold at least one tensor");
  if (weights.size() != n) throw ValueError("merge_linear: one weight per model");
  const at::Tensor& first = models[0];
  check_cpu(first, "models[0]");
  for (const at::Tensor& m : models) {
    check_pair(first, m);
    if (!m.sizes().equals(first.sizes())) throw ValueError("models must share one shape");
  }
  check_out(out, first, models);
  std::vector<float> w(weights.begin(), weights.end());
  // The divisor exactly as the reference takes it: torch's fp32 sum of the weights
  // (its summation order is torch's, not necessarily left to right).
  const float divisor = at::tensor(w).sum().item<float>();
  const int64_t numel = first.numel();
  if (numel == 0) return;
  // Each element of out is written after every model's element is read: out may be a model.
  auto dispatch = [&](auto tag) {
    using T = decltype(tag);
    std::vector<const T*> ms;
    for (const at::Tensor& m : models) ms.push_back(static_cast<const T*>(m.data_ptr()));
    switch (out.scalar_type()) {
      case at::kFloat: linear_pass(ms, w, normalize, divisor, numel, static_cast<float*>(out.data_ptr())); break;
      case at::kBFloat16: linear_pass(ms, w, normalize, divisor, numel, static_cast<bf16_t*>(out.data_ptr())); break;
      default: linear_pass(ms, w, normalize, divisor, numel, static_cast<fp16_t*>(out.data_ptr())); break;
    }
  };
  switch (first.scalar_type()) {
    case at::kFloat: dispatch(float{}); break;
    case at::kBFloat16: dispatch(bf16_t{}); break;
    default: dispatch(fp16_t{}); break;
  }
}

at::Tensor merge_linear(const std::vector<at::Tensor>& models, const std::vector<double>& weights,
                        bool normalize, const std::string& out_dtype) {
  if (models.empty()) throw ValueError("models must hold at least one tensor");
  check_cpu(models[0], "models[0]");
  at::Tensor out = new_output(models[0].sizes(), models[0].options().dtype(out_type(out_dtype)));
  merge_linear_out_(models, weights, normalize, out);
  return out;
}

at::Tensor merge_delta_histogram(const at::Tensor& base, const at::Tensor& model, int64_t level,
                                 int64_t prefix) {
  check_pair(base, model);
  if (level != 0 && level != 1)
    throw ValueError("fp32 deltas have radix levels 0 and 1, got level=" + std::to_string(level));
  at::Tensor out = at::zeros({level == 0 ? kBins0 : kBins1}, at::TensorOptions().dtype(at::kLong));
  if (level == 1 && (prefix < 0 || prefix >= kBins0)) return out;
  const int64_t n = base.numel();
  if (n >= (int64_t(1) << 32) - 1) throw ValueError("merge_delta_histogram: tensor too large");
  const uint32_t p = static_cast<uint32_t>(prefix);
  int64_t* o = out.data_ptr<int64_t>();
  const void* b = base.data_ptr();
  const void* m = model.data_ptr();
  switch (base.scalar_type()) {
    case at::kFloat:
      delta_histogram(static_cast<const float*>(b), static_cast<const float*>(m), n, int(level), p, o);
      break;
    case at::kBFloat16:
      delta_histogram(static_cast<const bf16_t*>(b), static_cast<const bf16_t*>(m), n, int(level), p, o);
      break;
    default:
      delta_histogram(static_cast<const fp16_t*>(b), static_cast<const fp16_t*>(m), n, int(level), p, o);
      break;
  }
  return out;
}

std::vector<std::tuple<int64_t, int64_t>> merge_delta_topk(const at::Tensor& base, const at::Tensor& model,
                                                           const std::vector<int64_t>& ks) {
  check_pair(base, model);
  const int64_t n = base.numel();
  for (int64_t k : ks)
    if (k < 0 || k > n) throw ValueError("k must be in [0, " + std::to_string(n) + "]");
  std::vector<Thr> t;
  switch (base.scalar_type()) {
    case at::kFloat:
      t = topk_thresholds(static_cast<const float*>(base.data_ptr()),
                          static_cast<const float*>(model.data_ptr()), n, ks);
      break;
    case at::kBFloat16:
      t = topk_thresholds(static_cast<const bf16_t*>(base.data_ptr()),
                          static_cast<const bf16_t*>(model.data_ptr()), n, ks);
      break;
    default:
      t = topk_thresholds(static_cast<const fp16_t*>(base.data_ptr()),
                          static_cast<const fp16_t*>(model.data_ptr()), n, ks);
      break;
  }
  std::vector<std::tuple<int64_t, int64_t>> out;
  for (const Thr& x : t) out.emplace_back(static_cast<int64_t>(x.key), x.take);
  return out;
}

}  // namespace cpu
}  // namespace deltaops
