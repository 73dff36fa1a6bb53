// deltaops._C: the low-rank family on CPU tensors (LoRA merge / unmerge,
// multi-LoRA shrink and expand). python/deltaops/reference/lowrank.py is the
// specification.
//
// Merge, W[M, N] += s * L[M, r] @ R[r, N] (L = B, R = A; with fan_in_fan_out
// L = A^T, R = B^T):
//   * the factors are converted to fp32 once (r * (M + N) floats: the only
//     scratch; nothing of the weight's size is allocated, not even a tile);
//   * rows are split into fixed chunks of kRowChunk rows, run in parallel
//     (at::parallel_for);
//   * inside a chunk, columns go in blocks of kPanelFloats / r so that the
//     [r, block] panel of R stays in L2 while every row of the chunk reads it;
//   * R is repacked in strips of 16 columns ([N / 16][r][16], zero padded) so
//     that a micro-tile reads its part of R sequentially;
//   * a micro-tile of 6 rows x 16 columns is accumulated in 12 AVX2 registers
//     (k = 0 .. r-1, one fused multiply-add each), then added to the weight
//     and rounded once (deltaops/lowrank.h): each weight element is read and
//     written exactly once, and the fp32 product never leaves the registers.
//   * Every element's accumulation is the same sequential FMA chain over k
//     (the vector lanes, and the std::fma loop of a build without AVX2, round
//     every step the same way), so results do not depend on the tiling or on
//     the thread count.
//
// Shrink and expand are per-token dot products (16 independent lanes of FMA
// chains, then a fixed-order tree over the lanes): deterministic too.
#include "lowrank_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DELTAOPS_LOWRANK_AVX2 1
#endif

#include "deltaops/bits.h"
#include "deltaops/lowrank.h"
#include "sparse_cpu.h"

namespace deltaops {
namespace cpu {
namespace {

constexpr int kMR = 6;                    // rows per micro-tile
constexpr int kNR = 16;                   // columns per micro-tile (two 8-float registers)
constexpr int64_t kRowChunk = 48;         // rows per parallel task (a multiple of kMR)
constexpr int64_t kPanelFloats = 1 << 16; // R panel of r x block floats: 256 KiB
constexpr int64_t kTokenChunk = 4;        // tokens per parallel task (shrink)
constexpr int64_t kExpandRows = 256;      // output features per parallel task (expand)

std::string dtype_name(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return "float32";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    case at::kDouble: return "float64";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kShort: return "int16";
    case at::kChar: return "int8";
    case at::kByte: return "uint8";
    case at::kBool: return "bool";
    default: return std::string(c10::toString(t.scalar_type()));
  }
}

enum Kind { kFloat32, kBFloat16, kFloat16 };

Kind kind_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return kFloat32;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kFloat16;
    default:
      throw TypeError(std::string(name) + " has dtype " + dtype_name(t) +
                      "; expected one of float32, bfloat16, float16");
  }
}

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), "deltaops._C: ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), "deltaops._C: ", name, " must be a CPU tensor, got ", t.device());
}

void check_dim(const at::Tensor& t, const char* name, int64_t dim) {
  if (t.dim() != dim)
    throw ValueError(std::string(name) + " must be " + std::to_string(dim) + "-D, got " +
                     std::to_string(t.dim()) + "-D");
}

std::string shape(at::IntArrayRef s) {
  std::string out = "(";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + (s.size() == 1 ? ",)" : ")");
}

// ---- merge -------------------------------------------------------------------------

// One output element's accumulation: the FMA chain every path uses.
inline float dot_column(const float* l, const float* r_col, int64_t r, int64_t stride) {
  float acc = 0.0f;
  for (int64_t k = 0; k < r; ++k) acc = std::fma(l[k], r_col[k * stride], acc);
  return acc;
}

template <typename T>
void merge_scalar(T* w, int64_t N, const float* L, const float* R, int64_t r, float scale,
                  int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  for (int64_t m = m0; m < m1; ++m)
    for (int64_t n = n0; n < n1; ++n)
      w[m * N + n] = lora_add_round(w[m * N + n], scale, dot_column(L + m * r, R + n, r, N));
}

#if DELTAOPS_LOWRANK_AVX2
// round(w + scale * acc) for 16 consecutive elements.
template <typename T>
inline void epilogue16(T* w, __m256 a0, __m256 a1, __m256 s);

template <>
inline void epilogue16<float>(float* w, __m256 a0, __m256 a1, __m256 s) {
  _mm256_storeu_ps(w, _mm256_add_ps(_mm256_loadu_ps(w), _mm256_mul_ps(s, a0)));
  _mm256_storeu_ps(w + 8, _mm256_add_ps(_mm256_loadu_ps(w + 8), _mm256_mul_ps(s, a1)));
}

// bf16: bits.h's f32_to_bf16 (RNE by integer add, canonical NaN) on 8 lanes.
inline __m256i bf16_round8(__m256 f) {
  const __m256i u = _mm256_castps_si256(f);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i rounded =
      _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
  const __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7FFFFFFF)),
                                            _mm256_set1_epi32(0x7F800000));
  const __m256i nan = _mm256_or_si256(
      _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x8000)),
      _mm256_set1_epi32(0x7FC0));
  return _mm256_blendv_epi8(rounded, nan, is_nan);
}

template <>
inline void epilogue16<bf16_t>(bf16_t* w, __m256 a0, __m256 a1, __m256 s) {
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256 w0 = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(bits)), 16));
  const __m256 w1 = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(bits, 1)), 16));
  const __m256i r0 = bf16_round8(_mm256_add_ps(w0, _mm256_mul_ps(s, a0)));
  const __m256i r1 = bf16_round8(_mm256_add_ps(w1, _mm256_mul_ps(s, a1)));
  // packus works per 128-bit lane: restore the element order with a 64-bit permute.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r0, r1), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w), packed);
}

template <>
inline void epilogue16<fp16_t>(fp16_t* w, __m256 a0, __m256 a1, __m256 s) {
  alignas(32) float acc[16];
  _mm256_store_ps(acc, a0);
  _mm256_store_ps(acc + 8, a1);
  const float scale = _mm256_cvtss_f32(s);
  for (int j = 0; j < 16; ++j) w[j] = lora_add_round(w[j], scale, acc[j]);
}

// Rows [m, m + MR) x columns [n, n + valid) (valid <= 16); `strip` is the
// packed [r][16] block of R for these columns (zero beyond N).
template <typename T, int MR>
inline void micro_tile(T* w, int64_t N, const float* L, const float* strip, int64_t r, __m256 s,
                       int64_t m, int64_t n, int64_t valid) {
  // Every loop over i is unrolled, so that c0 / c1 live in registers only (with
  // a runtime-indexed loop GCC keeps them in memory and stores all twelve on
  // every k: a store-port bound loop, 3-4x slower).
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm256_setzero_ps();
  const float* l = L + m * r;
  for (int64_t k = 0; k < r; ++k) {
    const __m256 r0 = _mm256_loadu_ps(strip + k * kNR);
    const __m256 r1 = _mm256_loadu_ps(strip + k * kNR + 8);
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      const __m256 b = _mm256_broadcast_ss(l + i * r + k);
      c0[i] = _mm256_fmadd_ps(b, r0, c0[i]);
      c1[i] = _mm256_fmadd_ps(b, r1, c1[i]);
    }
  }
  if (valid == kNR) {
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) epilogue16<T>(w + (m + i) * N + n, c0[i], c1[i], s);
    return;
  }
  const float scale = _mm256_cvtss_f32(s);
  alignas(32) float acc[kNR];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i) {
    _mm256_store_ps(acc, c0[i]);
    _mm256_store_ps(acc + 8, c1[i]);
    T* row = w + (m + i) * N + n;
    for (int64_t j = 0; j < valid; ++j) row[j] = lora_add_round(row[j], scale, acc[j]);
  }
}

template <typename T, int MR>
void micro_row_block(T* w, int64_t N, const float* L, const float* packed, int64_t r, float scale,
                     int64_t m, int64_t n0, int64_t n1) {
  const __m256 s = _mm256_set1_ps(scale);
  for (int64_t n = n0; n < n1; n += kNR)
    micro_tile<T, MR>(w, N, L, packed + (n / kNR) * r * kNR, r, s, m, n, std::min<int64_t>(kNR, N - n));
}
#endif

template <typename T>
void merge_rows(T* w, int64_t N, const float* L, const float* R, int64_t r, float scale,
                int64_t m0, int64_t m1) {
  const int64_t block = std::max<int64_t>(kNR, (kPanelFloats / std::max<int64_t>(r, 1)) / kNR * kNR);
  for (int64_t n0 = 0; n0 < N; n0 += block) {
    const int64_t n1 = std::min(N, n0 + block);
#if DELTAOPS_LOWRANK_AVX2
    int64_t m = m0;
    for (; m + kMR <= m1; m += kMR) micro_row_block<T, kMR>(w, N, L, R, r, scale, m, n0, n1);
    switch (m1 - m) {
      case 5: micro_row_block<T, 5>(w, N, L, R, r, scale, m, n0, n1); break;
      case 4: micro_row_block<T, 4>(w, N, L, R, r, scale, m, n0, n1); break;
      case 3: micro_row_block<T, 3>(w, N, L, R, r, scale, m, n0, n1); break;
      case 2: micro_row_block<T, 2>(w, N, L, R, r, scale, m, n0, n1); break;
      case 1: micro_row_block<T, 1>(w, N, L, R, r, scale, m, n0, n1); break;
      default: break;
    }
#else
    merge_scalar(w, N, L, R, r, scale, m0, m1, n0, n1);
#endif
  }
}

template <typename T>
void merge_all(void* weight, int64_t M, int64_t N, const float* L, const float* R, int64_t r,
               float scale) {
  T* w = static_cast<T*>(weight);
  const int64_t chunks = (M + kRowChunk - 1) / kRowChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      merge_rows(w, N, L, R, r, scale, c * kRowChunk, std::min(M, (c + 1) * kRowChunk));
  });
}

// ---- shrink / expand -----------------------------------------------------------------

template <typename A, typename B>
float dot(const A* a, const B* b, int64_t n) {
  // 16 independent FMA chains (vectorizable without reassociation), then a
  // fixed tree over the lanes, then the tail: the same order on every call.
  float lane[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) lane[l] = std::fma(load_f32(a[i + l]), load_f32(b[i + l]), lane[l]);
  for (int width = 8; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) lane[l] += lane[l + width];
  float acc = lane[0];
  for (; i < n; ++i) acc = std::fma(load_f32(a[i]), load_f32(b[i]), acc);
  return acc;
}

// Dispatch f.template operator()<T>() on a dtype kind.
template <typename F>
void with_type(Kind k, const F& f) {
  switch (k) {
    case kFloat32: f(float{}); break;
    case kBFloat16: f(bf16_t{}); break;
    case kFloat16: f(fp16_t{}); break;
  }
}

// ids as int64, checked against [-1, adapters) before anything is written.
std::vector<int64_t> checked_ids(const at::Tensor& ids, int64_t tokens, int64_t adapters) {
  check_cpu(ids, "token_lora_ids");
  if (ids.scalar_type() != at::kInt && ids.scalar_type() != at::kLong)
    throw TypeError("token_lora_ids has dtype " + dtype_name(ids) + "; expected one of int32, int64");
  check_dim(ids, "token_lora_ids", 1);
  if (ids.size(0) != tokens)
    throw ValueError("token_lora_ids has " + std::to_string(ids.size(0)) + " entries, expected " +
                     std::to_string(tokens) + " (one per token)");
  at::Tensor as64 = ids.to(at::kLong).contiguous();
  const int64_t* p = as64.data_ptr<int64_t>();
  std::vector<int64_t> out(p, p + tokens);
  for (int64_t t = 0; t < tokens; ++t)
    if (out[t] < -1 || out[t] >= adapters)
      throw ValueError("token_lora_ids[" + std::to_string(t) + "] = " + std::to_string(out[t]) +
                       " is out of range [-1, " + std::to_string(adapters) + ")");
  return out;
}

}  // namespace

// ==================================== public ====================================

void lora_merge_(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                 double scale, bool fan_in_fan_out) {
  check_cpu(weight, "weight");
  check_cpu(lora_A, "lora_A");
  check_cpu(lora_B, "lora_B");
  TORCH_CHECK(weight.is_contiguous(), "deltaops._C: weight must be contiguous");
  const Kind wk = kind_of(weight, "weight");
  kind_of(lora_A, "lora_A");
  kind_of(lora_B, "lora_B");
  check_dim(weight, "weight", 2);
  check_dim(lora_A, "lora_A", 2);
  check_dim(lora_B, "lora_B", 2);
  const int64_t r = lora_A.size(0), in = lora_A.size(1), out = lora_B.size(0);
  if (lora_B.size(1) != r)
    throw ValueError("lora_B has shape " + shape(lora_B.sizes()) + "; expected (out, " +
                     std::to_string(r) + ") to match lora_A's rank " + std::to_string(r));
  const int64_t M = fan_in_fan_out ? in : out, N = fan_in_fan_out ? out : in;
  if (weight.size(0) != M || weight.size(1) != N)
    throw ValueError("weight has shape " + shape(weight.sizes()) + "; expected (" +
                     std::to_string(M) + ", " + std::to_string(N) + ") for lora_A " +
                     shape(lora_A.sizes()) + " and lora_B " + shape(lora_B.sizes()) +
                     (fan_in_fan_out ? " with fan_in_fan_out" : ""));
  if (!std::isfinite(scale)) throw ValueError("scale must be finite, got " + std::to_string(scale));
  if (M == 0 || N == 0 || r == 0) return;
  const at::Tensor L = (fan_in_fan_out ? lora_A.t() : lora_B).to(at::kFloat).contiguous();
  at::Tensor R = (fan_in_fan_out ? lora_B.t() : lora_A).to(at::kFloat).contiguous();
#if DELTAOPS_LOWRANK_AVX2
  // Strips of 16 columns, each [r][16] contiguous (zero past N): the micro-tile
  // reads its columns of R sequentially. Same size as R itself.
  const int64_t strips = (N + kNR - 1) / kNR;
  at::Tensor padded = at::zeros({r, strips * kNR}, R.options());
  padded.narrow(1, 0, N).copy_(R);
  R = padded.view({r, strips, kNR}).permute({1, 0, 2}).contiguous();
#endif
  const float s = static_cast<float>(scale);
  const float* lp = L.data_ptr<float>();
  const float* rp = R.data_ptr<float>();
  void* w = weight.data_ptr();
  switch (wk) {
    case kFloat32: merge_all<float>(w, M, N, lp, rp, r, s); break;
    case kBFloat16: merge_all<bf16_t>(w, M, N, lp, rp, r, s); break;
    case kFloat16: merge_all<fp16_t>(w, M, N, lp, rp, r, s); break;
  }
}

at::Tensor lora_shrink(const at::Tensor& x, const at::Tensor& lora_a_stack,
                       const at::Tensor& token_lora_ids, double scale) {
  check_cpu(x, "x");
  check_cpu(lora_a_stack, "lora_a_stack");
  const Kind xk = kind_of(x, "x");
  const Kind ak = kind_of(lora_a_stack, "lora_a_stack");
  check_dim(x, "x", 2);
  check_dim(lora_a_stack, "lora_a_stack", 3);
  const int64_t T = x.size(0), in = x.size(1);
  const int64_t adapters = lora_a_stack.size(0), r = lora_a_stack.size(1);
  if (lora_a_stack.size(2) != in)
    throw ValueError("lora_a_stack has shape " + shape(lora_a_stack.sizes()) +
                     "; expected (adapters, r, " + std::to_string(in) + ") to match x's features");
  if (!std::isfinite(scale)) throw ValueError("scale must be finite, got " + std::to_string(scale));
  const std::vector<int64_t> ids = checked_ids(token_lora_ids, T, adapters);
  at::Tensor out = at::zeros({T, r}, x.options().dtype(at::kFloat));
  if (T == 0 || r == 0) return out;
  const at::Tensor xc = x.contiguous(), ac = lora_a_stack.contiguous();
  const float s = static_cast<float>(scale);
  float* o = out.data_ptr<float>();
  with_type(xk, [&](auto x_tag) {
    using X = decltype(x_tag);
    with_type(ak, [&](auto a_tag) {
      using A = decltype(a_tag);
      const X* xp = static_cast<const X*>(xc.data_ptr());
      const A* ap = static_cast<const A*>(ac.data_ptr());
      at::parallel_for(0, T, kTokenChunk, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          if (ids[t] < 0) continue;
          const A* a = ap + ids[t] * r * in;
          for (int64_t j = 0; j < r; ++j) o[t * r + j] = s * dot(a + j * in, xp + t * in, in);
        }
      });
    });
  });
  return out;
}

void lora_expand(at::Tensor& y, const at::Tensor& intermediate, const at::Tensor& lora_b_stack,
                 const at::Tensor& token_lora_ids) {
  check_cpu(y, "y");
  check_cpu(intermediate, "intermediate");
  check_cpu(lora_b_stack, "lora_b_stack");
  TORCH_CHECK(y.is_contiguous(), "deltaops._C: y must be contiguous");
  const Kind yk = kind_of(y, "y");
  const Kind bk = kind_of(lora_b_stack, "lora_b_stack");
  if (intermediate.scalar_type() != at::kFloat)
    throw TypeError("intermediate has dtype " + dtype_name(intermediate) + "; expected float32");
  check_dim(y, "y", 2);
  check_dim(intermediate, "intermediate", 2);
  check_dim(lora_b_stack, "lora_b_stack", 3);
  const int64_t T = y.size(0), out_features = y.size(1);
  const int64_t adapters = lora_b_stack.size(0), r = lora_b_stack.size(2);
  if (lora_b_stack.size(1) != out_features)
    throw ValueError("lora_b_stack has shape " + shape(lora_b_stack.sizes()) +
                     "; expected (adapters, " + std::to_string(out_features) + ", r) to match y");
  if (intermediate.size(0) != T || intermediate.size(1) != r)
    throw ValueError("intermediate has shape " + shape(intermediate.sizes()) + "; expected (" +
                     std::to_string(T) + ", " + std::to_string(r) + ")");
  const std::vector<int64_t> ids = checked_ids(token_lora_ids, T, adapters);
  if (T == 0 || out_features == 0) return;
  const at::Tensor ic = intermediate.contiguous(), bc = lora_b_stack.contiguous();
  const float* ip = ic.data_ptr<float>();
  const int64_t row_chunks = (out_features + kExpandRows - 1) / kExpandRows;
  with_type(yk, [&](auto y_tag) {
    using Y = decltype(y_tag);
    with_type(bk, [&](auto b_tag) {
      using B = decltype(b_tag);
      Y* yp = static_cast<Y*>(y.data_ptr());
      const B* bp = static_cast<const B*>(bc.data_ptr());
      at::parallel_for(0, T * row_chunks, 1, [&](int64_t w0, int64_t w1) {
        for (int64_t work = w0; work < w1; ++work) {
          const int64_t t = work / row_chunks, chunk = work % row_chunks;
          if (ids[t] < 0) continue;
          const B* b = bp + ids[t] * out_features * r;
          const int64_t o1 = std::min(out_features, (chunk + 1) * kExpandRows);
          for (int64_t o = chunk * kExpandRows; o < o1; ++o)
            yp[t * out_features + o] =
                lora_add_round(yp[t * out_features + o], dot(b + o * r, ip + t * r, r));
        }
      });
    });
  });
}

}  // namespace cpu
}  // namespace deltaops
