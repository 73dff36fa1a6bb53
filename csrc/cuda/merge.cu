// Fused merge on CUDA: deltaops._C_cuda.merge_sign_elect, the sign-elect /
// task-arithmetic family of deltaops.merge_tensors (task_arithmetic, ties,
// dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties).
//
// The plan is the CPU kernel's (csrc/cpu/merge_cpu.cpp), pass for pass; the
// per-element math is csrc/include/deltaops/{bits,philox,merge}.h, the same
// functions the CPU kernel runs; python/deltaops/reference/merge.py is the
// specification.
//
// Passes (each reads base and one model; nothing of the tensor's size is stored
// but the output):
//   1. selection (magnitude methods without a given threshold): radix
//      histograms of the magnitude keys of fp32(m_i) - fp32(base), formed in
//      the kernel, give each model's (threshold_key, take_equal) exactly as
//      topk_mask (two levels: the delta is fp32 whatever the input dtype);
//   2. count (thresholds whose take_equal splits the equal keys): keys equal to
//      the threshold per tile, then at::cumsum: each tile's rank offset;
//   3. norms (rescale l1/l2/linf): per-tile partial norms in double, added on
//      the host in tile order;
//   4. the merge: each thread owns kItems consecutive elements of a tile and
//      loops over the models in model order (a device table of ModelArgs, so
//      any N), with the reference's fp32 rounding points (__f*_rn: no FMA), and
//      rounds once to the output dtype.
//
// The sign election needs every model's term twice (the votes, then the sum
// of the agreeing terms). Instead of keeping N terms per element or computing
// them twice, the loop carries both outcomes: the sums of the terms (and of
// the weights) that agree with +1 and with -1; the votes then pick one. Each
// is the same sequence of fp32 operations as the CPU kernel's sum over the
// agreeing models, so the results are the CPU's bit for bit.
//
// Exactness: bit-exact against the CPU kernel and the reference except the
// l1/l2 rescale factors (per-tile double sums here, per-chunk sequential
// double sums on the CPU, torch fp32 reductions in the reference): within a
// few ulps. linf (a max that skips NaN, as the CPU's) is exact.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "common.cuh"
#include "deltaops/merge.h"
#include "deltaops/merge_args.h"  // the entry points' option and overlap checks (host)
#include "deltaops/merge_select.h"  // top-k thresholds from the delta-key histograms (host)
#include "merge_cuda.cuh"

namespace deltaops {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 8;  // consecutive elements per thread: one 16-byte load of 16-bit, two of fp32
constexpr int64_t kTile = int64_t{kThreads} * kItems;  // unit of the rank offsets and norm partials
constexpr uint64_t kKeyNone = merge_select::kKeyNone;
using merge_select::magnitude_k;
using merge_select::Thr;
using merge_select::thr_from;
constexpr int kHistThreads = 1024;
constexpr int kHistItems = 8;
constexpr int64_t kBinsLevel0 = 1 << 15;
constexpr int64_t kBinsLevel1 = 1 << 16;

enum Mode : int32_t { kDense = 0, kZero = 1, kMagnitude = 2, kRandom = 3 };
enum SelKind : int32_t { kSelNone = 0, kSelGE = 1, kSelGT = 2, kSelRanked = 3 };
enum Norm : int { kNoNorm = 0, kL1 = 1, kL2 = 2, kLinf = 3, kDensity = 4 };

// One threshold of a model: keep key > T (kSelGT), key >= T (kSelGE), or key > T
// plus the first `take` keys == T in flat order (kSelRanked, ranks from `row`
// of the per-tile offsets); kSelNone selects nothing.
struct Selection {
  int32_t kind = kSelNone;
  uint32_t key = 0;
  int64_t take = 0;
  int64_t row = 0;
};

// Per-model configuration (as the CPU kernel's ModelCfg), in device memory.
struct ModelArgs {
  const void* data = nullptr;
  int32_t mode = kDense;
  int32_t scale = 0;  // multiply the sparsified delta by `factor` (norm rescale)
  float w = 1.0f;     // fp32(weight)
  float p = 1.0f;     // fp32(density): random keep probability, density rescale
  float factor = 1.0f;
  Selection keep, drop;
};

using BlockScan = cub::BlockScan<int, kThreads>;
using BlockReduceInt = cub::BlockReduce<int, kThreads>;
using BlockReduceDouble = cub::BlockReduce<double, kThreads>;
union TempStorage {
  typename BlockScan::TempStorage scan;
  typename BlockReduceInt::TempStorage reduce_int;
  typename BlockReduceDouble::TempStorage reduce_double;
};

struct MaxSkipNaN {  // std::max(a, b) of the CPU's linf loop: a NaN b is skipped
  __device__ __forceinline__ double operator()(double a, double b) const { return fmax(a, b); }
};

// ---- device helpers ---------------------------------------------------------------

__device__ __forceinline__ int valid_items(int64_t i0, int64_t n) {
  return i0 >= n ? 0 : static_cast<int>(n - i0 >= kItems ? kItems : n - i0);
}

template <typename T>
__device__ __forceinline__ Pack<T, kItems> load_items(const T* __restrict__ p, int64_t i0, int valid,
                                                      bool vec_ok) {
  if (vec_ok && valid == kItems) return load_pack<T, kItems>(p + i0);
  Pack<T, kItems> out;
#pragma unroll
  for (int j = 0; j < kItems; ++j) out.v[j] = j < valid ? p[i0 + j] : T{};
  return out;
}

// sel[j] for this thread's items; ranked thresholds scan the block (uniform branch).
__device__ __forceinline__ void select_items(const Selection& s, const uint32_t (&key)[kItems], int valid,
                                             const int64_t* __restrict__ before, int64_t ntiles,
                                             int64_t tile, TempStorage& temp, bool (&sel)[kItems]) {
  const uint32_t t = s.key;
  if (s.kind == kSelGE) {
#pragma unroll
    for (int j = 0; j < kItems; ++j) sel[j] = key[j] >= t;
  } else if (s.kind == kSelGT) {
#pragma unroll
    for (int j = 0; j < kItems; ++j) sel[j] = key[j] > t;
  } else if (s.kind == kSelRanked) {
    int count = 0;
#pragma unroll
    for (int j = 0; j < kItems; ++j) count += (j < valid && key[j] == t) ? 1 : 0;
    int earlier = 0;
    BlockScan(temp.scan).ExclusiveSum(count, earlier);
    __syncthreads();  // temp is reused by the next scan or reduction
    int64_t rank = before[s.row * ntiles + tile] + earlier;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      const bool equal = j < valid && key[j] == t;
      sel[j] = key[j] > t || (equal && rank < s.take);
      rank += equal ? 1 : 0;
    }
  } else {
#pragma unroll
    for (int j = 0; j < kItems; ++j) sel[j] = false;
  }
}

// Model `stream`'s sparsified delta before any norm rescale (modes other than
// kDense): the CPU kernel's sparsify_block for kItems elements.
__device__ __forceinline__ void sparsify_items(const ModelArgs& m, uint32_t stream,
                                               const float (&d)[kItems], int valid, int64_t i0,
                                               int64_t tile, const int64_t* __restrict__ before,
                                               int64_t ntiles, uint64_t seed, bool density_rescale,
                                               TempStorage& temp, float (&masked)[kItems]) {
  bool keep[kItems];
  if (m.mode == kMagnitude) {
    uint32_t key[kItems];
#pragma unroll
    for (int j = 0; j < kItems; ++j) key[j] = delta_key(d[j]);
    select_items(m.keep, key, valid, before, ntiles, tile, temp, keep);
    if (m.drop.kind != kSelNone) {
      bool drop[kItems];
      select_items(m.drop, key, valid, before, ntiles, tile, temp, drop);
#pragma unroll
      for (int j = 0; j < kItems; ++j) keep[j] = keep[j] && !drop[j];
    }
  } else if (m.mode == kRandom) {
    // i0 is a multiple of 8: kItems / 4 whole Philox blocks, no word drawn twice.
    const uint64_t q = static_cast<uint64_t>(i0) >> 2;
#pragma unroll
    for (int h = 0; h < kItems / 4; ++h) {
      const Philox4 r = philox_block(seed, stream, q + static_cast<uint64_t>(h));
#pragma unroll
      for (int e = 0; e < 4; ++e) keep[4 * h + e] = keep_from_word(r.v[e], m.p);
    }
  } else {  // kZero
#pragma unroll
    for (int j = 0; j < kItems; ++j) masked[j] = 0.0f;
    return;
  }
#pragma unroll
  for (int j = 0; j < kItems; ++j)
    masked[j] = density_rescale ? density_rescaled_delta(d[j], keep[j], m.p) : masked_delta(d[j], keep[j]);
}

// ---- pass 1 and 2: histograms and equal-key counts of the deltas ---------------------

template <typename T>
__global__ void __launch_bounds__(kHistThreads)
    delta_histogram_kernel(const T* __restrict__ base, const T* __restrict__ model, int64_t n,
                           bool vec_ok, int level, uint32_t prefix, uint32_t chunk_bins,
                           unsigned long long* __restrict__ out, int* __restrict__ nan_seen) {
  extern __shared__ uint32_t hist[];
  const uint32_t first_bin = blockIdx.y * chunk_bins;
  for (uint32_t b = threadIdx.x; b < chunk_bins; b += blockDim.x) hist[b] = 0;
  __syncthreads();

  // Runs of equal bins inside a thread (the zero deltas of unchanged elements)
  // are added with one shared atomic.
  RunLengthHistogram runs{hist, first_bin, chunk_bins};
  bool nan = false;
  auto count = [&](T b, T m) {
    const uint32_t key = delta_key(__fsub_rn(load_f32(m), load_f32(b)));
    uint32_t bin;
    if (level == 0) {
      nan |= key > 0x7F800000u;
      bin = key >> 16;
    } else {
      if ((key >> 16) != prefix) return;
      bin = key & 0xFFFFu;
    }
    runs.add(bin);
  };

  const int64_t stride = grid_threads();
  const int64_t groups = vec_ok ? n / kHistItems : 0;
  for (int64_t g = global_thread(); g < groups; g += stride) {
    const Pack<T, kHistItems> pb = load_pack<T, kHistItems>(base + g * kHistItems);
    const Pack<T, kHistItems> pm = load_pack<T, kHistItems>(model + g * kHistItems);
#pragma unroll
    for (int j = 0; j < kHistItems; ++j) count(pb.v[j], pm.v[j]);
  }
  for (int64_t i = groups * kHistItems + global_thread(); i < n; i += stride) count(base[i], model[i]);
  runs.flush();
  if (nan) atomicOr(nan_seen, 1);
  __syncthreads();

  for (uint32_t b = threadIdx.x; b < chunk_bins; b += blockDim.x) {
    const uint32_t c = hist[b];
    if (c != 0) atomicAdd(out + first_bin + b, static_cast<unsigned long long>(c));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    delta_equal_count_kernel(const T* __restrict__ base, const T* __restrict__ model, int64_t n,
                             bool vec_ok, uint32_t threshold, int64_t ntiles,
                             int64_t* __restrict__ counts) {
  __shared__ TempStorage temp;
  for (int64_t t = blockIdx.x; t < ntiles; t += gridDim.x) {
    const int64_t i0 = t * kTile + int64_t{threadIdx.x} * kItems;
    const int valid = valid_items(i0, n);
    const Pack<T, kItems> pb = load_items(base, i0, valid, vec_ok);
    const Pack<T, kItems> pm = load_items(model, i0, valid, vec_ok);
    int c = 0;
#pragma unroll
    for (int j = 0; j < kItems; ++j)
      c += (j < valid && delta_key(__fsub_rn(load_f32(pm.v[j]), load_f32(pb.v[j]))) == threshold) ? 1 : 0;
    const int total = BlockReduceInt(temp.reduce_int).Sum(c);
    if (threadIdx.x == 0) counts[t] = total;
    __syncthreads();  // temp is reused by the next tile
  }
}

// ---- pass 3: norms ------------------------------------------------------------------

// partial[2 t] = norm part of the delta over tile t, partial[2 t + 1] = of the
// sparsified delta (before the rescale): sums of |x| (l1), of x^2 (l2), max |x| (linf).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    norm_kernel(const T* __restrict__ base, const ModelArgs* __restrict__ models, int index,
                int64_t n, int64_t ntiles, bool vec_ok, const int64_t* __restrict__ before,
                uint64_t seed, int norm, double* __restrict__ partial) {
  __shared__ TempStorage temp;
  const ModelArgs& m = models[index];
  const T* __restrict__ data = static_cast<const T*>(m.data);
  for (int64_t t = blockIdx.x; t < ntiles; t += gridDim.x) {
    const int64_t i0 = t * kTile + int64_t{threadIdx.x} * kItems;
    const int valid = valid_items(i0, n);
    const Pack<T, kItems> pb = load_items(base, i0, valid, vec_ok);
    const Pack<T, kItems> pm = load_items(data, i0, valid, vec_ok);
    float d[kItems], masked[kItems];
#pragma unroll
    for (int j = 0; j < kItems; ++j) d[j] = __fsub_rn(load_f32(pm.v[j]), load_f32(pb.v[j]));
    sparsify_items(m, static_cast<uint32_t>(index), d, valid, i0, t, before, ntiles, seed, false,
                   temp, masked);
    double a0 = 0.0, a1 = 0.0;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      if (j >= valid) continue;
      const double x0 = fabs(static_cast<double>(d[j])), x1 = fabs(static_cast<double>(masked[j]));
      if (norm == kL1) {
        a0 += x0;
        a1 += x1;
      } else if (norm == kL2) {
        a0 += x0 * x0;
        a1 += x1 * x1;
      } else {
        a0 = fmax(a0, x0);
        a1 = fmax(a1, x1);
      }
    }
    const double r0 = norm == kLinf ? BlockReduceDouble(temp.reduce_double).Reduce(a0, MaxSkipNaN())
                                    : BlockReduceDouble(temp.reduce_double).Sum(a0);
    __syncthreads();
    const double r1 = norm == kLinf ? BlockReduceDouble(temp.reduce_double).Reduce(a1, MaxSkipNaN())
                                    : BlockReduceDouble(temp.reduce_double).Sum(a1);
    if (threadIdx.x == 0) {
      partial[2 * t] = r0;
      partial[2 * t + 1] = r1;
    }
    __syncthreads();  // temp is reused by the next tile
  }
}

// ---- pass 4: the merge ----------------------------------------------------------------

struct MergeFlags {
  bool sign_count, normalize, apply_lambda, density_rescale;
  float divisor;  // non-consensus normalize divisor (already 0 -> 1)
  float lambda;
};

template <typename T, typename O, bool kConsensus>
__global__ void __launch_bounds__(kThreads)
    merge_kernel(const T* __restrict__ base, const ModelArgs* __restrict__ models, int nmodels,
                 O* __restrict__ out, int64_t n, int64_t ntiles, bool vec_ok, bool out_vec_ok,
                 const int64_t* __restrict__ before, uint64_t seed, MergeFlags f) {
  __shared__ TempStorage temp;
  for (int64_t t = blockIdx.x; t < ntiles; t += gridDim.x) {
    const int64_t i0 = t * kTile + int64_t{threadIdx.x} * kItems;
    const int valid = valid_items(i0, n);
    const Pack<T, kItems> pb = load_items(base, i0, valid, vec_ok);
    float bf[kItems];
#pragma unroll
    for (int j = 0; j < kItems; ++j) bf[j] = load_f32(pb.v[j]);
    // consensus: votes and the sums agreeing with +1 / -1 (terms and weights);
    // otherwise pos holds the plain sum of the terms
    float votes[kItems], pos[kItems], neg[kItems], pos_div[kItems], neg_div[kItems];
    // Model i + 1's items are loaded before model i's arithmetic: two loads in
    // flight per thread.
    Pack<T, kItems> next = load_items(static_cast<const T*>(models[0].data), i0, valid, vec_ok);
    for (int i = 0; i < nmodels; ++i) {
      const ModelArgs& m = models[i];
      const Pack<T, kItems> cur = next;
      if (i + 1 < nmodels) next = load_items(static_cast<const T*>(models[i + 1].data), i0, valid, vec_ok);
      float d[kItems], x[kItems];
#pragma unroll
      for (int j = 0; j < kItems; ++j) d[j] = __fsub_rn(load_f32(cur.v[j]), bf[j]);
      if (m.mode == kDense) {  // no sparsification: x = (m - b) * w
#pragma unroll
        for (int j = 0; j < kItems; ++j) x[j] = __fmul_rn(d[j], m.w);
      } else {
        float masked[kItems];
        sparsify_items(m, static_cast<uint32_t>(i), d, valid, i0, t, before, ntiles, seed,
                       f.density_rescale, temp, masked);
#pragma unroll
        for (int j = 0; j < kItems; ++j)
          x[j] = m.scale ? __fmul_rn(__fmul_rn(masked[j], m.factor), m.w) : __fmul_rn(masked[j], m.w);
      }
      const bool first = i == 0;
#pragma unroll
      for (int j = 0; j < kItems; ++j) {
        if constexpr (kConsensus) {
          const float vote = f.sign_count ? sign_of(x[j]) : x[j];
          const float keep_pos = agrees(x[j], 1.0f), keep_neg = agrees(x[j], -1.0f);
          const float x_pos = __fmul_rn(x[j], keep_pos), x_neg = __fmul_rn(x[j], keep_neg);
          const float w_pos = __fmul_rn(m.w, keep_pos), w_neg = __fmul_rn(m.w, keep_neg);
          votes[j] = first ? vote : __fadd_rn(votes[j], vote);
          pos[j] = first ? x_pos : __fadd_rn(pos[j], x_pos);
          neg[j] = first ? x_neg : __fadd_rn(neg[j], x_neg);
          pos_div[j] = first ? w_pos : __fadd_rn(pos_div[j], w_pos);
          neg_div[j] = first ? w_neg : __fadd_rn(neg_div[j], w_neg);
        } else {
          pos[j] = first ? x[j] : __fadd_rn(pos[j], x[j]);
        }
      }
    }
    Pack<O, kItems> o;
#pragma unroll
    for (int j = 0; j < kItems; ++j) {
      float mixed;
      if constexpr (kConsensus) {
        const bool elected_pos = votes[j] >= 0.0f;  // a zero sum elects +1; NaN elects -1
        mixed = elected_pos ? pos[j] : neg[j];
        if (f.normalize) mixed = __fdiv_rn(mixed, nonzero_or_one(elected_pos ? pos_div[j] : neg_div[j]));
      } else {
        mixed = pos[j];
        if (f.normalize) mixed = __fdiv_rn(mixed, f.divisor);
      }
      if (f.apply_lambda) mixed = __fmul_rn(mixed, f.lambda);
      o.v[j] = store_from_f32<O>(__fadd_rn(bf[j], mixed));
    }
    if (out_vec_ok && valid == kItems) {
      store_pack(out + i0, o);
    } else {
#pragma unroll
      for (int j = 0; j < kItems; ++j)  // static indices: `o` stays in registers
        if (j < valid) out[i0 + j] = o.v[j];
    }
  }
}

// linear: acc = fma(fp32(m_i), w_i, acc) from +0 in model order (mergekit's
// addcmul_), divided by the fp32 weight sum when normalizing, rounded once.
// Each thread loads its items of every model before storing them: out may be a model.
template <typename T, typename O>
__global__ void __launch_bounds__(kThreads)
    linear_kernel(const ModelArgs* __restrict__ models, int nmodels, O* out, int64_t n,
                  int64_t ntiles, bool vec_ok, bool out_vec_ok, bool normalize, float divisor) {
  for (int64_t t = blockIdx.x; t < ntiles; t += gridDim.x) {
    const int64_t i0 = t * kTile + int64_t{threadIdx.x} * kItems;
    const int valid = valid_items(i0, n);
    float acc[kItems];
#pragma unroll
    for (int j = 0; j < kItems; ++j) acc[j] = 0.0f;
    for (int i = 0; i < nmodels; ++i) {
      const Pack<T, kItems> m = load_items(static_cast<const T*>(models[i].data), i0, valid, vec_ok);
      const float w = models[i].w;
#pragma unroll
      for (int j = 0; j < kItems; ++j) acc[j] = __fmaf_rn(load_f32(m.v[j]), w, acc[j]);
    }
    Pack<O, kItems> o;
#pragma unroll
    for (int j = 0; j < kItems; ++j) o.v[j] = store_from_f32<O>(normalize ? __fdiv_rn(acc[j], divisor) : acc[j]);
    if (out_vec_ok && valid == kItems) {
      store_pack(out + i0, o);
    } else {
#pragma unroll
      for (int j = 0; j < kItems; ++j)
        if (j < valid) out[i0 + j] = o.v[j];
    }
  }
}

// ---- host ------------------------------------------------------------------------------

std::vector<int64_t> to_host(const at::Tensor& t) {
  const at::Tensor h = t.to(at::kCPU).contiguous();
  const int64_t* p = h.data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + h.numel());
}

unsigned tiles_grid(int64_t ntiles, int blocks_per_sm = 8) {
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(ntiles, int64_t{sm_count()} * blocks_per_sm)));
}

// Histogram of the delta keys at one level; sets *nan when level 0 saw a NaN key.
template <typename T>
at::Tensor delta_histogram(const T* b, const T* m, int64_t n, int level, uint32_t prefix,
                           const at::Tensor& like, bool* nan) {
  const int64_t bins = level == 0 ? kBinsLevel0 : kBinsLevel1;
  at::Tensor out = at::zeros({bins}, like.options().dtype(at::kLong));
  at::Tensor flag = at::zeros({1}, like.options().dtype(at::kInt));
  if (n == 0 || (level == 1 && prefix > 0x7FFFu)) return out;
  // Bins per block: as many as shared memory allows (32768 x 4 B = 128 KiB on sm_80/sm_90),
  // the rest of the level over blockIdx.y.
  const size_t optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
  uint32_t chunk = static_cast<uint32_t>(std::min<int64_t>(bins, 32768));
  while (chunk > 1024 && chunk * sizeof(uint32_t) > optin) chunk /= 2;
  const size_t smem = chunk * sizeof(uint32_t);
  auto kernel = delta_histogram_kernel<T>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kHistThreads, smem));
  const bool vec_ok = pack_aligned<T, kHistItems>(b) && pack_aligned<T, kHistItems>(m);
  const dim3 grid(grid_for((n + kHistItems - 1) / kHistItems, kHistThreads, std::max(per_sm, 1)),
                  static_cast<unsigned>(bins / chunk));
  kernel<<<grid, kHistThreads, smem, at::cuda::getCurrentCUDAStream()>>>(
      b, m, n, vec_ok, level, prefix, chunk,
      reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>()), flag.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (nan != nullptr) *nan = flag.item<int>() != 0;
  return out;
}

// The CPU kernel's topk_thresholds: (key, take) per k; ValueError on a NaN delta.
template <typename T>
std::vector<Thr> topk_thresholds(const T* b, const T* m, int64_t n, const std::vector<int64_t>& ks,
                                 const at::Tensor& like) {
  bool nan = false;
  const std::vector<int64_t> level0 = to_host(delta_histogram(b, m, n, 0, 0, like, &nan));
  if (nan) throw ValueError("topk_mask: x contains NaN; magnitudes of NaN have no order");
  return merge_select::thresholds_from(level0, n, ks, [&](int64_t bucket) {
    return to_host(delta_histogram(b, m, n, 1, static_cast<uint32_t>(bucket), like, nullptr));
  });
}

// The CPU kernel's sel_state, for a whole tensor: ranked thresholds get a row.
Selection selection_of(const Thr& t, std::vector<uint32_t>& ranked_keys, std::vector<int>& ranked_models,
                       int model) {
  Selection s;
  if (t.key > 0x7FFFFFFFu) return s;  // selects nothing
  s.key = static_cast<uint32_t>(t.key);
  if (t.take < 0) {
    s.kind = kSelGE;
  } else if (t.take == 0) {
    s.kind = kSelGT;
  } else {
    s.kind = kSelRanked;
    s.take = t.take;
    s.row = static_cast<int64_t>(ranked_keys.size());
    ranked_keys.push_back(s.key);
    ranked_models.push_back(model);
  }
  return s;
}

at::Tensor to_device(const std::vector<ModelArgs>& args, const at::Tensor& like) {
  at::Tensor host = at::empty({static_cast<int64_t>(args.size() * sizeof(ModelArgs))},
                              at::TensorOptions().dtype(at::kByte));
  std::memcpy(host.data_ptr(), args.data(), args.size() * sizeof(ModelArgs));
  return host.to(like.device());  // pageable source: the copy is done when this returns
}

at::ScalarType out_type(const std::string& name) {
  if (name == "float32") return at::kFloat;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  throw TypeError("out_dtype must be float32, bfloat16 or float16, got " + name);
}

bool supported(at::ScalarType s) { return s == at::kFloat || s == at::kBFloat16 || s == at::kHalf; }

void check_pair(const at::Tensor& base, const at::Tensor& model, const char* op) {
  check_input(base, op, "base");
  check_input(model, op, "model");
  check_same_device(base, model, op);
  if (!supported(base.scalar_type())) throw TypeError("base must be float32, bfloat16 or float16");
  if (model.scalar_type() != base.scalar_type()) throw TypeError("model and base dtypes differ");
  if (model.numel() != base.numel()) throw ValueError("model and base sizes differ");
}

// out of a merge: a contiguous float tensor of base's shape on base's device whose
// memory is either disjoint from each input or exactly that input (each thread
// loads its elements of every input before it stores them: in place is safe).
void check_out(const at::Tensor& out, const at::Tensor& base, const std::vector<at::Tensor>& models,
               const char* op) {
  check_input(out, op, "out");
  check_same_device(base, out, op);
  if (!supported(out.scalar_type())) throw TypeError("out must be float32, bfloat16 or float16");
  if (!out.sizes().equals(base.sizes())) throw ValueError("out must have the inputs' shape");
  std::vector<at::Tensor> inputs(models);
  inputs.push_back(base);
  for (const at::Tensor& t : inputs)
    if (merge_args::partial_overlap(out.const_data_ptr(), out.nbytes(), t.const_data_ptr(), t.nbytes(),
                                    t.scalar_type() == out.scalar_type()))
      throw ValueError(merge_args::kPartialOverlap);
}

template <typename T>
void run(const at::Tensor& base, const std::vector<at::Tensor>& models, const std::string& method,
         const std::vector<double>& weights, const std::vector<double>& densities,
         const std::vector<double>& gammas, double lambda, bool normalize,
         const std::string& rescale, const std::string& sign_method, int64_t seed,
         const std::vector<int64_t>& thresholds, at::Tensor& out) {
  const int64_t n = base.numel();
  const int nmodels = static_cast<int>(models.size());
  const int64_t ntiles = (n + kTile - 1) / kTile;
  const T* b = static_cast<const T*>(base.const_data_ptr());
  std::vector<const T*> ms;
  for (const at::Tensor& m : models) ms.push_back(static_cast<const T*>(m.const_data_ptr()));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  enum Kind { kNoSparse, kMag, kRand, kOutliers } kind;
  bool consensus;
  if (method == "task_arithmetic") { kind = kNoSparse; consensus = false; }
  else if (method == "ties") { kind = kMag; consensus = true; }
  else if (method == "dare_ties") { kind = kRand; consensus = true; }
  else if (method == "dare_linear") { kind = kRand; consensus = false; }
  else if (method == "breadcrumbs") { kind = kOutliers; consensus = false; }
  else if (method == "breadcrumbs_ties") { kind = kOutliers; consensus = true; }
  else throw ValueError("merge_sign_elect: unsupported method " + method);

  int norm;
  if (rescale.empty()) norm = kNoNorm;
  else if (rescale == "l1") norm = kL1;
  else if (rescale == "l2") norm = kL2;
  else if (rescale == "linf") norm = kLinf;
  else if (rescale == "density") norm = kDensity;
  else throw ValueError("unknown rescale " + rescale);
  if (kind == kNoSparse) norm = kNoNorm;

  // per-model configuration (the CPU kernel's ModelCfg)
  std::vector<ModelArgs> args(nmodels);
  std::vector<uint32_t> ranked_keys;
  std::vector<int> ranked_models;
  for (int i = 0; i < nmodels; ++i) {
    ModelArgs& a = args[i];
    a.data = ms[i];
    a.w = static_cast<float>(weights[i]);
    const double density = densities[i];
    a.p = static_cast<float>(density);
    const bool has_thr = !thresholds.empty() && thresholds[4 * i] >= 0;
    if (kind == kNoSparse) continue;
    if (!has_thr) {
      if (density >= 1) continue;  // kDense
      if (density <= 0) { a.mode = kZero; continue; }
    }
    if (kind == kRand) {
      a.mode = kRandom;
      continue;
    }
    a.mode = kMagnitude;
    Thr keep, drop;
    if (has_thr) {
      keep = thr_from(thresholds[4 * i], thresholds[4 * i + 1]);
      if (thresholds[4 * i + 2] >= 0) drop = thr_from(thresholds[4 * i + 2], thresholds[4 * i + 3]);
    } else if (kind == kMag) {
      keep = topk_thresholds(b, ms[i], n, {magnitude_k(density, n)}, base)[0];
    } else {  // outlier band
      const int64_t target = static_cast<int64_t>(density * static_cast<double>(n));
      const int64_t n_top = static_cast<int64_t>(gammas[i] * static_cast<double>(n));
      const int64_t n_bottom = std::max<int64_t>(0, n - target - n_top);
      const int64_t n_drop = n - n_bottom - target;
      const std::vector<Thr> t = topk_thresholds(b, ms[i], n, {n_drop + target, n_drop}, base);
      keep = t[0];
      drop = t[1];
    }
    if (norm == kDensity && density <= 0)
      throw ValueError("rescale='density' needs density > 0 (model " + std::to_string(i) + ")");
    a.keep = selection_of(keep, ranked_keys, ranked_models, i);
    a.drop = selection_of(drop, ranked_keys, ranked_models, i);
  }

  // pass 2: per-tile rank offsets of the equal keys, one row per ranked threshold
  at::Tensor before;
  if (!ranked_keys.empty()) {
    const int64_t rows = static_cast<int64_t>(ranked_keys.size());
    at::Tensor counts = at::empty({rows, ntiles}, base.options().dtype(at::kLong));
    const bool vec_ok = pack_aligned<T, kItems>(b);
    for (int64_t r = 0; r < rows; ++r) {
      const T* m = ms[ranked_models[r]];
      delta_equal_count_kernel<T><<<tiles_grid(ntiles), kThreads, 0, stream>>>(
          b, m, n, vec_ok && pack_aligned<T, kItems>(m), ranked_keys[r], ntiles,
          counts.data_ptr<int64_t>() + r * ntiles);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    before = (at::cumsum(counts, 1) - counts).contiguous();
  }
  const int64_t* before_ptr = before.defined() ? before.data_ptr<int64_t>() : nullptr;

  bool vec_ok = pack_aligned<T, kItems>(b);
  for (const T* m : ms) vec_ok = vec_ok && pack_aligned<T, kItems>(m);
  const uint64_t seed64 = static_cast<uint64_t>(seed);
  at::Tensor args_dev = to_device(args, base);

  // pass 3: norm rescale factors (mergekit's rescaled_masked_tensor)
  if (norm == kL1 || norm == kL2 || norm == kLinf) {
    bool changed = false;
    for (int i = 0; i < nmodels; ++i) {
      if (args[i].mode != kMagnitude && args[i].mode != kRandom) continue;
      at::Tensor partial = at::empty({ntiles, 2}, base.options().dtype(at::kDouble));
      norm_kernel<T><<<tiles_grid(ntiles), kThreads, 0, stream>>>(
          b, reinterpret_cast<const ModelArgs*>(args_dev.const_data_ptr()), i, n, ntiles, vec_ok,
          before_ptr, seed64, norm, partial.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const at::Tensor host = partial.to(at::kCPU);
      const double* p = host.data_ptr<double>();
      double nb = 0.0, na = 0.0;
      for (int64_t t = 0; t < ntiles; ++t) {  // tile order: deterministic
        if (norm == kLinf) {
          nb = std::fmax(nb, p[2 * t]);
          na = std::fmax(na, p[2 * t + 1]);
        } else {
          nb += p[2 * t];
          na += p[2 * t + 1];
        }
      }
      if (norm == kL2) {
        nb = std::sqrt(nb);
        na = std::sqrt(na);
      }
      const float fb = static_cast<float>(nb), fa = static_cast<float>(na);
      if (fb < 1e-7f || fa < 1e-7f) continue;  // rescale_to_norm skips
      args[i].scale = 1;
      args[i].factor = fb / fa;
      changed = true;
    }
    if (changed) args_dev = to_device(args, base);
  }

  MergeFlags f;
  f.sign_count = sign_method == "count";
  f.normalize = normalize;
  f.apply_lambda = lambda != 1.0;
  f.density_rescale = norm == kDensity;
  f.lambda = static_cast<float>(lambda);
  float div = 0.0f;
  for (int i = 0; i < nmodels; ++i) div = i == 0 ? args[i].w : div + args[i].w;
  f.divisor = std::fabs(div) < 1e-8f ? 1.0f : div;

  const ModelArgs* args_ptr = reinterpret_cast<const ModelArgs*>(args_dev.const_data_ptr());
  dispatch_float(out.scalar_type(), "merge_sign_elect", [&](auto tag) {
    using O = typename decltype(tag)::type;
    O* o = static_cast<O*>(out.data_ptr());
    const bool out_vec_ok = pack_aligned<O, kItems>(o);
    auto launch = [&](auto kernel) {
      int per_sm = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
      kernel<<<tiles_grid(ntiles, std::max(per_sm, 1)), kThreads, 0, stream>>>(
          b, args_ptr, nmodels, o, n, ntiles, vec_ok, out_vec_ok, before_ptr, seed64, f);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (consensus) launch(merge_kernel<T, O, true>);
    else launch(merge_kernel<T, O, false>);
  });
}

}  // namespace

void merge_sign_elect_out_(const at::Tensor& base, const std::vector<at::Tensor>& models,
                           const std::string& method, const std::vector<double>& weights,
                           const std::vector<double>& densities, const std::vector<double>& gammas,
                           double lambda, bool normalize, const std::string& rescale,
                           const std::string& sign_method, int64_t seed,
                           const std::vector<int64_t>& thresholds, at::Tensor& out) {
  const char* op = "merge_sign_elect";
  check_input(base, op, "base");
  if (!supported(base.scalar_type())) throw TypeError("base must be float32, bfloat16 or float16");
  const std::string bad = merge_args::options_error(models.size(), weights.size(), densities.size(),
                                                    gammas.size(), thresholds.size(), sign_method, seed);
  if (!bad.empty()) throw ValueError(bad);
  for (const at::Tensor& m : models) {
    check_pair(base, m, op);
    if (!m.sizes().equals(base.sizes())) throw ValueError("models must have base's shape");
  }
  check_out(out, base, models, op);
  c10::cuda::CUDAGuard guard(base.device());
  if (base.numel() == 0) return;
  dispatch_float(base.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    run<T>(base, models, method, weights, densities, gammas, lambda, normalize, rescale, sign_method,
           seed, thresholds, out);
  });
}

at::Tensor merge_sign_elect(const at::Tensor& base, const std::vector<at::Tensor>& models,
                            const std::string& method, const std::vector<double>& weights,
                            const std::vector<double>& densities, const std::vector<double>& gammas,
                            double lambda, bool normalize, const std::string& rescale,
                            const std::string& sign_method, int64_t seed,
                            const std::vector<int64_t>& thresholds, const std::string& out_dtype) {
  check_input(base, "merge_sign_elect", "base");
  at::Tensor out = at::empty(base.sizes(), base.options().dtype(out_type(out_dtype)));
  merge_sign_elect_out_(base, models, method, weights, densities, gammas, lambda, normalize, rescale,
                        sign_method, seed, thresholds, out);
  return out;
}

void merge_linear_out_(const std::vector<at::Tensor>& models, const std::vector<double>& weights,
                       bool normalize, at::Tensor& out) {
  const char* op = "merge_linear";
  const size_t count = models.size();
  if (count == 0) throw ValueError("models must hold at least one tensor");
  if (weights.size() != count) throw ValueError("merge_linear: one weight per model");
  const at::Tensor& first = models[0];
  check_input(first, op, "models[0]");
  if (!supported(first.scalar_type())) throw TypeError("models must be float32, bfloat16 or float16");
  for (const at::Tensor& m : models) {
    check_pair(first, m, op);
    if (!m.sizes().equals(first.sizes())) throw ValueError("models must share one shape");
  }
  check_out(out, first, std::vector<at::Tensor>(models.begin() + 1, models.end()), op);
  c10::cuda::CUDAGuard guard(first.device());
  const int64_t n = first.numel();
  if (n == 0) return;
  std::vector<float> w(weights.begin(), weights.end());
  // The divisor exactly as the reference takes it: torch's fp32 sum of the weights.
  const float divisor = at::tensor(w).sum().item<float>();
  std::vector<ModelArgs> args(count);
  for (size_t i = 0; i < count; ++i) {
    args[i].data = models[i].const_data_ptr();
    args[i].w = w[i];
  }
  const at::Tensor args_dev = to_device(args, first);
  const ModelArgs* args_ptr = reinterpret_cast<const ModelArgs*>(args_dev.const_data_ptr());
  const int64_t ntiles = (n + kTile - 1) / kTile;
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_float(first.scalar_type(), op, [&](auto tag) {
    using T = typename decltype(tag)::type;
    bool vec_ok = true;
    for (const at::Tensor& m : models) vec_ok = vec_ok && pack_aligned<T, kItems>(m.const_data_ptr());
    dispatch_float(out.scalar_type(), op, [&](auto out_tag) {
      using O = typename decltype(out_tag)::type;
      O* o = static_cast<O*>(out.data_ptr());
      auto kernel = linear_kernel<T, O>;
      int per_sm = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
      kernel<<<tiles_grid(ntiles, std::max(per_sm, 1)), kThreads, 0, stream>>>(
          args_ptr, static_cast<int>(count), o, n, ntiles, vec_ok, pack_aligned<O, kItems>(o),
          normalize, divisor);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

at::Tensor merge_linear(const std::vector<at::Tensor>& models, const std::vector<double>& weights,
                        bool normalize, const std::string& out_dtype) {
  if (models.empty()) throw ValueError("models must hold at least one tensor");
  check_input(models[0], "merge_linear", "models[0]");
  at::Tensor out = at::empty(models[0].sizes(), models[0].options().dtype(out_type(out_dtype)));
  merge_linear_out_(models, weights, normalize, out);
  return out;
}

at::Tensor merge_delta_histogram(const at::Tensor& base, const at::Tensor& model, int64_t level,
                                 int64_t prefix) {
  check_pair(base, model, "merge_delta_histogram");
  if (level != 0 && level != 1)
    throw ValueError("fp32 deltas have radix levels 0 and 1, got level=" + std::to_string(level));
  c10::cuda::CUDAGuard guard(base.device());
  if (level == 1 && (prefix < 0 || prefix >= kBinsLevel0))
    return at::zeros({kBinsLevel1}, base.options().dtype(at::kLong));
  at::Tensor out;
  dispatch_float(base.scalar_type(), "merge_delta_histogram", [&](auto tag) {
    using T = typename decltype(tag)::type;
    out = delta_histogram(static_cast<const T*>(base.const_data_ptr()),
                          static_cast<const T*>(model.const_data_ptr()), base.numel(),
                          static_cast<int>(level), static_cast<uint32_t>(prefix), base, nullptr);
  });
  return out;
}

std::vector<std::tuple<int64_t, int64_t>> merge_delta_topk(const at::Tensor& base,
                                                           const at::Tensor& model,
                                                           const std::vector<int64_t>& ks) {
  check_pair(base, model, "merge_delta_topk");
  const int64_t n = base.numel();
  for (int64_t k : ks)
    if (k < 0 || k > n) throw ValueError("k must be in [0, " + std::to_string(n) + "]");
  c10::cuda::CUDAGuard guard(base.device());
  std::vector<Thr> t;
  dispatch_float(base.scalar_type(), "merge_delta_topk", [&](auto tag) {
    using T = typename decltype(tag)::type;
    t = topk_thresholds(static_cast<const T*>(base.const_data_ptr()),
                        static_cast<const T*>(model.const_data_ptr()), n, ks, base);
  });
  std::vector<std::tuple<int64_t, int64_t>> out;
  for (const Thr& x : t) out.emplace_back(static_cast<int64_t>(x.key), x.take);
  return out;
}

}  // namespace cuda
}  // namespace deltaops
