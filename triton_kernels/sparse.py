"""Triton backend of the sparse-delta family (see ``docs/backend-contract.md``).

Every function here matches :mod:`deltaops.reference.sparse` bit for bit
(NaN outputs may differ in payload only). Element math mirrors
``csrc/include/deltaops/{bits,philox,sparse}.h``:

* Tensors enter the kernels as their raw bits (fp32 as int32, bf16/fp16 as
  int16). Conversions to and from fp32 are integer code (round to nearest,
  ties to even, NaN canonicalised with its sign kept), exactly as ``bits.h``,
  so the results do not depend on the GPU's or the interpreter's conversion
  instructions (the Triton interpreter's own fp32->bf16 cast does not round
  ties to even).
* ``weight + alpha * delta`` is one fp32 multiply and one fp32 add: every
  kernel is launched with ``enable_fp_fusion=False``, so no FMA contraction
  happens. Scalars (alpha, density) are rounded to fp32 on the host (as
  ``torch.tensor(x, dtype=torch.float32)`` does) and cast to fp32 again inside
  the kernels, so an fp64 scalar argument changes nothing.
* DARE divides with ``tl.math.div_rn`` (IEEE round-to-nearest; plain ``/``
  may lower to an approximate division on GPUs).
* Ranks among equal keys (``threshold_mask``) and value positions of set bits
  (``apply_bitmask_``) use a cross-block prefix: a per-block count kernel,
  ``torch.cumsum`` for exclusive block offsets, then ``tl.cumsum`` inside the
  block. Results never depend on the block size.

``apply_coo_`` and ``apply_bitmask_`` validate their inputs with torch ops
before any kernel writes (``validate_coo_indices``, ``validate_bitmask``).
Every wrapper takes a keyword-only ``block_size`` (a power of two, >= 8; the
tests use it to check that tiling changes nothing).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltaops.reference.sparse import (
    HIST_BINS_16BIT,
    HIST_BINS_FP32_LEVEL0,
    HIST_BINS_FP32_LEVEL1,
    SUPPORTED_DTYPES,
    validate_bitmask,
    validate_bitmask_layout,
    validate_coo_indices,
)
from deltaops.selection import topk_mask_by_histogram

from .philox import philox_uniform_tile, split_seed, stream_word

__all__ = [
    "radix_histogram",
    "threshold_mask",
    "topk_mask",
    "philox_uniform_like",
    "dare",
    "dare_out_",
    "apply_dense_",
    "apply_coo_",
    "apply_bitmask_",
]

DEFAULT_BLOCK = 1024

# Element kinds (constexpr kernel arguments).
_FP32, _BF16, _FP16 = 0, 1, 2
_KIND = {torch.float32: _FP32, torch.bfloat16: _BF16, torch.float16: _FP16}

# Launch options of every kernel: no FMA contraction anywhere (the apply kernels
# need it; elsewhere it is explicit and silences Triton 3.9's fp-fusion warning).
_LAUNCH = {"enable_fp_fusion": False}


# ---- helpers -------------------------------------------------------------------------


def _block(block_size: int | None, minimum: int = 8) -> int:
    block = DEFAULT_BLOCK if block_size is None else int(block_size)
    if block < minimum or block & (block - 1):
        raise ValueError(f"block_size must be a power of two >= {minimum}, got {block_size}")
    return block


def _kind(t: torch.Tensor) -> int:
    try:
        return _KIND[t.dtype]
    except KeyError:
        raise TypeError(f"unsupported dtype {t.dtype}; "
                        f"expected one of {SUPPORTED_DTYPES}") from None


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Flat view of a float tensor's bits (int32 for fp32, int16 for 16-bit floats)."""
    flat = t.reshape(-1)
    return flat.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _check_writable(weight: torch.Tensor, op: str) -> None:
    # a flat view of a non-contiguous tensor would be a copy: the writes would be lost
    if not weight.is_contiguous():
        raise ValueError(f"{op}: weight must be contiguous to be updated in place")


def _f32(value: float) -> float:
    """``value`` rounded to fp32 like ``torch.tensor(value, dtype=torch.float32)``."""
    return float(torch.tensor(float(value), dtype=torch.float32))


def _grid(n: int, per_program: int) -> tuple[int]:
    return (triton.cdiv(n, per_program),)


# ---- element math (mirrors bits.h) -------------------------------------------------------


@triton.jit
def _to_f32(bits, KIND: tl.constexpr):
    """fp32 value of raw bits (int32 for fp32, int16 for bf16/fp16); exact."""
    if KIND == 0:
        return bits.to(tl.float32, bitcast=True)
    elif KIND == 1:
        h = bits.to(tl.uint16, bitcast=True).to(tl.uint32)
        return (h << 16).to(tl.float32, bitcast=True)
    else:
        h = bits.to(tl.uint16, bitcast=True).to(tl.uint32)
        sign = (h & 0x8000) << 16
        exp = (h >> 10) & 0x1F
        mant = h & 0x3FF
        inf_nan = sign | 0x7F800000 | (mant << 13)
        normal = sign | ((exp + 112) << 23) | (mant << 13)
        # zero or subnormal: mant * 2^-24, exact in fp32
        tiny = (mant.to(tl.float32) * 5.9604644775390625e-08).to(tl.uint32, bitcast=True)
        out = tl.where(exp == 0x1F, inf_nan, tl.where(exp != 0, normal, sign | tiny))
        return out.to(tl.float32, bitcast=True)


@triton.jit
def _from_f32(f, KIND: tl.constexpr):
    """Raw bits of fp32 ``f`` rounded (nearest, ties to even) to the kind's dtype."""
    if KIND == 0:
        return f.to(tl.int32, bitcast=True)
    elif KIND == 1:
        u = f.to(tl.uint32, bitcast=True)
        is_nan = (u & 0x7FFFFFFF) > 0x7F800000
        rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
        out = tl.where(is_nan, ((u >> 16) & 0x8000) | 0x7FC0, rounded)
        return out.to(tl.uint16).to(tl.int16, bitcast=True)
    else:
        u = f.to(tl.uint32, bitcast=True)
        sign = (u >> 16) & 0x8000
        a = u & 0x7FFFFFFF
        # normal range: rebias the exponent (127 -> 15) and round half to even
        normal = (a + (0xC8000FFF + ((a >> 13) & 1))) >> 13
        # half subnormal: round(|f| * 2^24) = significand >> (126 - exp), RNE
        exp = (a >> 23).to(tl.int32)
        shift = tl.minimum(tl.maximum(126 - exp, 1), 31).to(tl.uint32)
        significand = (a & 0x7FFFFF) | 0x800000
        halfway = tl.full([], 1, tl.uint32) << (shift - 1)
        rest = significand & ((tl.full([], 1, tl.uint32) << shift) - 1)
        mant = significand >> shift
        round_up = (rest > halfway) | ((rest == halfway) & ((mant & 1) != 0))
        mant = mant + round_up.to(tl.uint32)
        out = tl.where(a < 0x38800000, tl.where(a < 0x33000000, 0, mant), normal)
        out = tl.where(a >= 0x477FF000, 0x7C00, out)
        out = tl.where(a > 0x7F800000, 0x7E00, out)
        return (sign | out).to(tl.uint16).to(tl.int16, bitcast=True)


@triton.jit
def _magnitude_key(bits, KIND: tl.constexpr):
    """int32 magnitude key: ``bits & 0x7FFFFFFF`` (fp32) or ``bits & 0x7FFF`` (16-bit)."""
    if KIND == 0:
        return bits & 0x7FFFFFFF
    else:
        return bits.to(tl.int32) & 0x7FFF


@triton.jit
def _offsets(BLOCK: tl.constexpr):
    """int64 flat offsets of this program's tile."""
    return tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)


# ---- histogram / threshold / top-k ---------------------------------------------------------


@triton.jit(do_not_specialize=["prefix"])
def _histogram_kernel(x_ptr, hist_ptr, n, prefix, KIND: tl.constexpr, LEVEL: tl.constexpr,
                      BLOCK: tl.constexpr):
    offs = _offsets(BLOCK)
    valid = offs < n
    key = _magnitude_key(tl.load(x_ptr + offs, mask=valid, other=0), KIND)
    if KIND != 0:
        bin_index = key
    elif LEVEL == 0:
        bin_index = key >> 16
    else:
        valid = valid & ((key >> 16) == prefix)
        bin_index = key & 0xFFFF
    ones = tl.full([BLOCK], 1, tl.int64)
    tl.atomic_add(hist_ptr + bin_index, ones, mask=valid, sem="relaxed")


def radix_histogram(x: torch.Tensor, level: int, prefix: int, *,
                    block_size: int | None = None) -> torch.Tensor:
    """int64 magnitude-key histogram (32768 bins, or 65536 for fp32 level 1)."""
    kind = _kind(x)
    if kind != _FP32:
        if level != 0:
            raise ValueError(f"16-bit inputs have one radix level, got level={level}")
        bins = HIST_BINS_16BIT
    elif level == 0:
        bins = HIST_BINS_FP32_LEVEL0
    elif level == 1:
        bins = HIST_BINS_FP32_LEVEL1
    else:
        raise ValueError(f"fp32 inputs have radix levels 0 and 1, got level={level}")
    block = _block(block_size)
    hist = torch.zeros(bins, dtype=torch.int64, device=x.device)
    n = x.numel()
    if n == 0:
        return hist
    prefix = int(prefix) if kind == _FP32 and level == 1 else 0
    if not 0 <= prefix <= 0x7FFF:
        return hist  # no key has that prefix
    _histogram_kernel[_grid(n, block)](_bits(x), hist, n, prefix, KIND=kind, LEVEL=level,
                                       BLOCK=block, **_LAUNCH)
    return hist


@triton.jit(do_not_specialize=["threshold"])
def _equal_count_kernel(x_ptr, count_ptr, n, threshold, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = _offsets(BLOCK)
    valid = offs < n
    key = _magnitude_key(tl.load(x_ptr + offs, mask=valid, other=0), KIND)
    equal = valid & (key == threshold)
    tl.store(count_ptr + tl.program_id(0), tl.sum(equal.to(tl.int32), axis=0).to(tl.int64))


@triton.jit(do_not_specialize=["threshold", "take_equal"])
def _threshold_kernel(x_ptr, block_offset_ptr, out_ptr, n, threshold, take_equal,
                      KIND: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr):
    # MODE 0: key > T;  1: key >= T;  2: key > T or (key == T and rank < take_equal)
    offs = _offsets(BLOCK)
    valid = offs < n
    key = _magnitude_key(tl.load(x_ptr + offs, mask=valid, other=0), KIND)
    if MODE == 0:
        keep = key > threshold
    elif MODE == 1:
        keep = key >= threshold
    else:
        equal = valid & (key == threshold)
        before = tl.load(block_offset_ptr + tl.program_id(0))
        rank = before + (tl.cumsum(equal.to(tl.int32), axis=0) - 1).to(tl.int64)
        keep = (key > threshold) | (equal & (rank < take_equal))
    tl.store(out_ptr + offs, keep.to(tl.uint8), mask=valid)


def threshold_mask(x: torch.Tensor, threshold_key: int, take_equal: int, *,
                   block_size: int | None = None) -> torch.Tensor:
    """``key > T``, plus the first ``take_equal`` elements (flat order) with ``key == T``."""
    kind = _kind(x)
    block = _block(block_size)
    n = x.numel()
    threshold_key, take_equal = int(threshold_key), int(take_equal)
    key_max = 0x7FFFFFFF if kind == _FP32 else 0x7FFF
    if n == 0 or threshold_key > key_max:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    if threshold_key < 0:
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    take_equal = max(0, min(take_equal, n))
    out = torch.empty(x.shape, dtype=torch.bool, device=x.device)
    bits = _bits(x)
    grid = _grid(n, block)
    if take_equal == 0:
        mode, block_offsets = 0, bits  # block_offsets unused
    elif take_equal == n:
        mode, block_offsets = 1, bits
    else:
        mode = 2
        counts = torch.empty(grid[0], dtype=torch.int64, device=x.device)
        _equal_count_kernel[grid](bits, counts, n, threshold_key, KIND=kind, BLOCK=block,
                                  **_LAUNCH)
        block_offsets = torch.cumsum(counts, 0) - counts
    _threshold_kernel[grid](bits, block_offsets, out.view(-1).view(torch.uint8), n, threshold_key,
                            take_equal, KIND=kind, MODE=mode, BLOCK=block, **_LAUNCH)
    return out


def topk_mask(x: torch.Tensor, k: int, *, block_size: int | None = None) -> torch.Tensor:
    """The ``k`` largest ``|x|`` (ties to the lowest flat index); ``ValueError`` on NaN."""
    _kind(x)
    if not 0 <= k <= x.numel():
        raise ValueError(f"k must be in [0, {x.numel()}], got {k}")

    def histogram(t, level, prefix):
        return radix_histogram(t, level, prefix, block_size=block_size)

    def threshold(t, key, take_equal):
        return threshold_mask(t, key, take_equal, block_size=block_size)

    return topk_mask_by_histogram(histogram, threshold, x, int(k))


# ---- Philox / DARE ---------------------------------------------------------------------------


@triton.jit(do_not_specialize=["seed_lo", "seed_hi", "stream"])
def _philox_uniform_kernel(out_ptr, n, seed_lo, seed_hi, stream, NBLOCKS: tl.constexpr):
    first_block = tl.program_id(0).to(tl.int64) * NBLOCKS
    offs = first_block * 4 + tl.arange(0, 4 * NBLOCKS).to(tl.int64)
    u = philox_uniform_tile(first_block, seed_lo, seed_hi, stream, NBLOCKS)
    tl.store(out_ptr + offs, u, mask=offs < n)


def philox_uniform_like(x: torch.Tensor, seed: int, stream: int = 0, *,
                        block_size: int | None = None) -> torch.Tensor:
    """fp32 uniforms in [0, 1) shaped like ``x``, keyed by (seed, stream, flat index)."""
    block = _block(block_size)
    seed_lo, seed_hi = split_seed(seed)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    n = x.numel()
    if n == 0:
        return out
    _philox_uniform_kernel[_grid(n, block)](out.view(-1), n, seed_lo, seed_hi, stream_word(stream),
                                            NBLOCKS=block // 4, **_LAUNCH)
    return out


@triton.jit(do_not_specialize=["density", "seed_lo", "seed_hi", "stream"])
def _dare_kernel(d_ptr, out_ptr, n, density, seed_lo, seed_hi, stream, KIND: tl.constexpr,
                 RESCALE: tl.constexpr, NBLOCKS: tl.constexpr):
    first_block = tl.program_id(0).to(tl.int64) * NBLOCKS
    offs = first_block * 4 + tl.arange(0, 4 * NBLOCKS).to(tl.int64)
    valid = offs < n
    density32 = tl.cast(density, tl.float32)
    keep = philox_uniform_tile(first_block, seed_lo, seed_hi, stream, NBLOCKS) < density32
    bits = tl.load(d_ptr + offs, mask=valid, other=0)
    if RESCALE:
        kept = _from_f32(tl.math.div_rn(_to_f32(bits, KIND), density32), KIND)
    else:
        kept = bits
    tl.store(out_ptr + offs, tl.where(keep, kept, 0).to(bits.dtype), mask=valid)


def dare_out_(delta: torch.Tensor, density: float, seed: int, stream: int, rescale: bool,
              out: torch.Tensor, *, block_size: int | None = None) -> None:
    """:func:`dare` written into ``out`` (delta's dtype and shape; may be delta itself)."""
    kind = _kind(delta)
    if out.dtype != delta.dtype or out.shape != delta.shape or not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor of delta's dtype and shape")
    block = _block(block_size)
    seed_lo, seed_hi = split_seed(seed)
    density32 = _f32(density)
    n = delta.numel()
    if n == 0:
        return
    if not density32 > 0:  # u >= 0: nothing is kept at density 0
        out.zero_()
        return
    _dare_kernel[_grid(n, block)](_bits(delta), _bits(out), n, density32, seed_lo, seed_hi,
                                  stream_word(stream), KIND=kind, RESCALE=bool(rescale),
                                  NBLOCKS=block // 4, **_LAUNCH)


def dare(delta: torch.Tensor, density: float, seed: int, stream: int = 0, rescale: bool = True,
         *, block_size: int | None = None) -> torch.Tensor:
    """DARE: keep iff ``u < fp32(density)``; kept values ``fp32(d) / fp32(density)`` if rescale."""
    out = torch.empty(delta.shape, dtype=delta.dtype, device=delta.device)
    dare_out_(delta, density, seed, stream, rescale, out, block_size=block_size)
    return out


# ---- applying deltas ---------------------------------------------------------------------------


@triton.jit
def _apply_element(w_bits, d_bits, alpha32, W_KIND: tl.constexpr, D_KIND: tl.constexpr):
    """Bits of ``round_w(fp32(w) + fp32(alpha * fp32(d)))`` (two fp32 roundings, no FMA)."""
    scaled = alpha32 * _to_f32(d_bits, D_KIND)
    return _from_f32(_to_f32(w_bits, W_KIND) + scaled, W_KIND)


@triton.jit(do_not_specialize=["alpha"])
def _apply_dense_kernel(w_ptr, d_ptr, n, alpha, W_KIND: tl.constexpr, D_KIND: tl.constexpr,
                        BLOCK: tl.constexpr):
    offs = _offsets(BLOCK)
    valid = offs < n
    alpha32 = tl.cast(alpha, tl.float32)
    w = tl.load(w_ptr + offs, mask=valid, other=0)
    d = tl.load(d_ptr + offs, mask=valid, other=0)
    tl.store(w_ptr + offs, _apply_element(w, d, alpha32, W_KIND, D_KIND), mask=valid)


def apply_dense_(weight: torch.Tensor, delta: torch.Tensor, alpha: float, *,
                 block_size: int | None = None) -> None:
    """In place ``weight += alpha * delta`` (fp32 math, one rounding to weight's dtype)."""
    w_kind, d_kind = _kind(weight), _kind(delta)
    block = _block(block_size)
    _check_writable(weight, "apply_dense_")
    n = weight.numel()
    if n == 0:
        return
    _apply_dense_kernel[_grid(n, block)](_bits(weight), _bits(delta), n, _f32(alpha),
                                         W_KIND=w_kind, D_KIND=d_kind, BLOCK=block, **_LAUNCH)


@triton.jit(do_not_specialize=["alpha"])
def _apply_coo_kernel(w_ptr, index_ptr, v_ptr, nnz, alpha, W_KIND: tl.constexpr,
                      D_KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = _offsets(BLOCK)
    valid = offs < nnz
    alpha32 = tl.cast(alpha, tl.float32)
    index = tl.load(index_ptr + offs, mask=valid, other=0).to(tl.int64)
    v = tl.load(v_ptr + offs, mask=valid, other=0)
    w = tl.load(w_ptr + index, mask=valid, other=0)
    tl.store(w_ptr + index, _apply_element(w, v, alpha32, W_KIND, D_KIND), mask=valid)


def apply_coo_(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, alpha: float,
               *, block_size: int | None = None) -> None:
    """In place ``weight.flat[indices] += alpha * values``; validates indices first."""
    w_kind, d_kind = _kind(weight), _kind(values)
    block = _block(block_size)
    _check_writable(weight, "apply_coo_")
    validate_coo_indices(indices, weight.numel(), values.numel())
    nnz = indices.numel()
    if nnz == 0:
        return
    _apply_coo_kernel[_grid(nnz, block)](_bits(weight), indices.reshape(-1), _bits(values), nnz,
                                         _f32(alpha), W_KIND=w_kind, D_KIND=d_kind, BLOCK=block,
                                         **_LAUNCH)


@triton.jit
def _mask_bits(packed_ptr, offs, valid):
    """Bit ``offs % 8`` of byte ``offs // 8`` as int32 (0 where not valid)."""
    byte = tl.load(packed_ptr + (offs >> 3), mask=valid, other=0).to(tl.int32)
    return (byte >> (offs & 7).to(tl.int32)) & 1


@triton.jit
def _bitmask_count_kernel(packed_ptr, count_ptr, n, BLOCK: tl.constexpr):
    offs = _offsets(BLOCK)
    bit = _mask_bits(packed_ptr, offs, offs < n)
    tl.store(count_ptr + tl.program_id(0), tl.sum(bit, axis=0).to(tl.int64))


@triton.jit(do_not_specialize=["alpha"])
def _apply_bitmask_kernel(w_ptr, packed_ptr, block_offset_ptr, v_ptr, n, alpha,
                          W_KIND: tl.constexpr, D_KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = _offsets(BLOCK)
    valid = offs < n
    bit = _mask_bits(packed_ptr, offs, valid)
    selected = bit != 0
    before = tl.load(block_offset_ptr + tl.program_id(0))
    value_index = before + (tl.cumsum(bit, axis=0) - 1).to(tl.int64)
    alpha32 = tl.cast(alpha, tl.float32)
    v = tl.load(v_ptr + value_index, mask=selected, other=0)
    w = tl.load(w_ptr + offs, mask=selected, other=0)
    tl.store(w_ptr + offs, _apply_element(w, v, alpha32, W_KIND, D_KIND), mask=selected)


def apply_bitmask_(weight: torch.Tensor, packed_mask: torch.Tensor, values: torch.Tensor,
                   alpha: float, *, block_size: int | None = None) -> None:
    """In place add of ``values`` (flat order of the set bits) where the packed mask is set."""
    w_kind, d_kind = _kind(weight), _kind(values)
    block = _block(block_size)
    _check_writable(weight, "apply_bitmask_")
    n = weight.numel()
    validate_bitmask_layout(packed_mask, n)
    packed = packed_mask.reshape(-1)
    if n == 0:
        validate_bitmask(packed, n, values.numel())
        return
    grid = _grid(n, block)
    counts = torch.empty(grid[0], dtype=torch.int64, device=weight.device)
    _bitmask_count_kernel[grid](packed, counts, n, BLOCK=block, **_LAUNCH)  # writes only `counts`
    set_bits = int(counts.sum())
    if set_bits != values.numel():
        raise ValueError(f"apply_bitmask_: mask has {set_bits} set bits but "
                         f"{values.numel()} values")
    if set_bits == 0:
        return
    block_offsets = torch.cumsum(counts, 0) - counts
    _apply_bitmask_kernel[grid](_bits(weight), packed, block_offsets, _bits(values), n, _f32(alpha),
                                W_KIND=w_kind, D_KIND=d_kind, BLOCK=block, **_LAUNCH)
