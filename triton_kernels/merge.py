"""Triton backend of the fused merge: ``deltaops::merge_sign_elect``.

The sign-elect / task-arithmetic family of ``deltaops.merge_tensors``
(task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties)
with the per-model options already resolved by ``deltaops.ops.merge``; the
plan mirrors the CPU kernel (``csrc/cpu/merge_cpu.cpp``) step for step and
:mod:`deltaops.reference.merge` is the specification.

Passes (each reads base and one model; nothing of the tensor's size is stored
but the output):

1. selection (magnitude methods without a given threshold): radix histograms
   of the magnitude keys of ``fp32(m_i) - fp32(base)``, formed in the kernel
   (``_delta_histogram_kernel``), give each model's ``(threshold_key,
   take_equal)`` exactly as ``topk_mask`` (:mod:`deltaops.selection`);
2. count (thresholds whose ``take_equal`` splits the equal keys): keys equal
   to the threshold per program, then ``torch.cumsum``: each program's rank
   offset among the equal keys in flat order;
3. norms (rescale ``l1``/``l2``/``linf``): per-program partial norms of the
   delta and of the sparsified delta in fp64, added exactly (``math.fsum``);
4. the merge (``_merge_kernel``): per element, the models in model order
   (a runtime loop over a table of model pointers, so any N), the reference's
   fp32 rounding points (no FMA, ``div_rn``), one rounding to the output dtype.

The sign election needs every model's term twice (votes, then the agreeing
sum). Rather than keep N terms in registers or recompute them, the loop
carries both outcomes: the sums of the terms that agree with +1 and with -1
(and of their weights), then picks the one the votes elect. Each is the same
sequence of fp32 operations as the reference's sum over the agreeing models,
so the result is bit for bit the reference's.

Exactness: bit-identical to the CPU kernel and the reference except for the
``l1``/``l2`` rescale factors (fp64 partial sums per program, against the
CPU's per-chunk sequential fp64 sums and the reference's torch fp32
reductions): within a few ulps. ``linf`` (a max) is exact.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from deltaops.reference.merge import KEY_NONE, TASK_ARITHMETIC
from deltaops.reference.sparse import magnitude_k, outlier_band
from deltaops.selection import has_nan, locate

from .philox import philox_words_tile, split_seed, uniform_from_word
from .sparse import _LAUNCH, _bits, _block, _from_f32, _kind, _to_f32

__all__ = ["merge_sign_elect", "merge_sign_elect_out_", "merge_linear", "merge_linear_out_",
           "merge_delta_histogram", "merge_delta_topk"]

DEFAULT_BLOCK = 1024
KEY_MAX = 0x7FFFFFFF

# Per-model modes (as csrc/cpu/merge_cpu.cpp's Mode).
_DENSE, _ZERO, _MAGNITUDE, _RANDOM = 0, 1, 2, 3
# Threshold selection kinds: nothing, key >= T, key > T, key > T or a ranked equal key.
_SEL_NONE, _SEL_GE, _SEL_GT, _SEL_RANKED = 0, 1, 2, 3
# Rescale kinds of the norm pass.
_NORMS = {"l1": 1, "l2": 2, "linf": 3}

# Per-model integer config: one row of _ICFG int64 values. The kernels index these rows
# with the literal offsets of this layout (row + 1 ... row + 9; fcfg row + 0 ... + 2):
# Triton kernels can read only constexpr globals, so keep both in step.
(_I_MODE, _I_KEEP_KIND, _I_KEEP_KEY, _I_KEEP_TAKE, _I_KEEP_ROW, _I_DROP_KIND, _I_DROP_KEY,
 _I_DROP_TAKE, _I_DROP_ROW, _I_SCALE) = range(10)
_ICFG = 10
# Per-model float config: weight, keep probability (fp32(density)), norm factor.
_F_W, _F_P, _F_FACTOR = range(3)
_FCFG = 3

_OUT_KIND = {"float32": 0, "bfloat16": 1, "float16": 2}
_OUT_DTYPE = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- element math --------------------------------------------------------------------------


@triton.jit
def _delta(b_bits, m_bits, KIND: tl.constexpr):
    """fp32(m) - fp32(b) and its magnitude key (int32, ``bits & 0x7FFFFFFF``)."""
    d = _to_f32(m_bits, KIND) - _to_f32(b_bits, KIND)
    return d, d.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _model_ptr(model_ptrs, i, KIND: tl.constexpr):
    """Model i's data, typed as its raw bits (int32 for fp32, int16 for 16-bit)."""
    address = tl.load(model_ptrs + i)
    if KIND == 0:
        return address.to(tl.pointer_type(tl.int32))
    else:
        return address.to(tl.pointer_type(tl.int16))


@triton.jit
def _select(key, valid, kind, threshold, take, row, offsets_ptr, nblocks):
    """Threshold selection of one tile (``_SEL_*`` kinds; ranks continue across programs)."""
    t = threshold.to(tl.int32)
    if kind == 1:
        sel = key >= t
    elif kind == 2:
        sel = key > t
    elif kind == 3:
        equal = valid & (key == t)
        before = tl.load(offsets_ptr + row * nblocks + tl.program_id(0))
        rank = before + (tl.cumsum(equal.to(tl.int32), axis=0) - 1).to(tl.int64)
        sel = (key > t) | (equal & (rank < take))
    else:
        sel = key < 0  # nothing
    return sel


@triton.jit
def _sparsified(d, key, valid, i, mode, icfg_ptr, p, offsets_ptr, nblocks, seed_lo, seed_hi,
                DENSITY_RESCALE: tl.constexpr, BLOCK: tl.constexpr):
    """Model i's sparsified delta before any norm rescale (mode ZERO, MAGNITUDE or RANDOM).

    ``d * keep`` (mergekit's ``delta * mask``: inf * 0 is NaN), or ``keep ?
    d / p : 0`` for the density rescale, as the CPU kernel's sparsify_block.
    """
    row = icfg_ptr + i * 10
    if mode == 2:
        keep = _select(key, valid, tl.load(row + 1), tl.load(row + 2), tl.load(row + 3),
                       tl.load(row + 4), offsets_ptr, nblocks)
        drop = _select(key, valid, tl.load(row + 5), tl.load(row + 6), tl.load(row + 7),
                       tl.load(row + 8), offsets_ptr, nblocks)
        keep = keep & (drop == 0)
    elif mode == 3:
        first_block = tl.program_id(0).to(tl.int64) * (BLOCK // 4)
        words = philox_words_tile(first_block, seed_lo, seed_hi, i, BLOCK // 4)
        keep = uniform_from_word(words) < p
    else:
        keep = key < 0  # ZERO: nothing
    if DENSITY_RESCALE:
        masked = tl.where(keep, tl.math.div_rn(d, p), 0.0)
    else:
        masked = d * keep.to(tl.float32)
    if mode == 1:
        masked = tl.zeros_like(d)
    return masked


@triton.jit
def _agrees(x, NEGATIVE: tl.constexpr):
    """1.0 where x is nonzero with the sign bit of the elected sign (+1 or -1), else 0.0."""
    u = x.to(tl.int32, bitcast=True)
    nonzero = (u & 0x7FFFFFFF) != 0
    if NEGATIVE:
        same = u < 0
    else:
        same = u >= 0
    return (nonzero & same).to(tl.float32)


# ---- pass 1 and 2: histograms and equal-key counts of the deltas -------------------------


@triton.jit(do_not_specialize=["prefix"])
def _delta_histogram_kernel(b_ptr, m_ptr, hist_ptr, n, prefix, KIND: tl.constexpr,
                            LEVEL: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = offs < n
    _, key = _delta(tl.load(b_ptr + offs, mask=valid, other=0),
                    tl.load(m_ptr + offs, mask=valid, other=0), KIND)
    if LEVEL == 0:
        bin_index = key >> 16
    else:
        valid = valid & ((key >> 16) == prefix)
        bin_index = key & 0xFFFF
    tl.atomic_add(hist_ptr + bin_index, tl.full([BLOCK], 1, tl.int64), mask=valid, sem="relaxed")


@triton.jit(do_not_specialize=["threshold"])
def _delta_equal_count_kernel(b_ptr, m_ptr, count_ptr, n, threshold, KIND: tl.constexpr,
                              BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = offs < n
    _, key = _delta(tl.load(b_ptr + offs, mask=valid, other=0),
                    tl.load(m_ptr + offs, mask=valid, other=0), KIND)
    equal = valid & (key == threshold)
    tl.store(count_ptr + tl.program_id(0), tl.sum(equal.to(tl.int32), axis=0).to(tl.int64))


# ---- pass 3: norms ------------------------------------------------------------------------


@triton.jit(do_not_specialize=["i", "seed_lo", "seed_hi"])
def _norm_kernel(b_ptr, m_ptr, part_ptr, n, i, icfg_ptr, fcfg_ptr, offsets_ptr, nblocks,
                 seed_lo, seed_hi, KIND: tl.constexpr, NORM: tl.constexpr,
                 DENSITY_RESCALE: tl.constexpr, BLOCK: tl.constexpr):
    # part[2 * program] = norm part of d, part[2 * program + 1] = of the sparsified d (fp64)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = offs < n
    d, key = _delta(tl.load(b_ptr + offs, mask=valid, other=0),
                    tl.load(m_ptr + offs, mask=valid, other=0), KIND)
    d = tl.where(valid, d, 0.0)
    mode = tl.load(icfg_ptr + i * 10)
    p = tl.load(fcfg_ptr + i * 3 + 1)
    masked = _sparsified(d, key, valid, i, mode, icfg_ptr, p, offsets_ptr, nblocks, seed_lo,
                         seed_hi, DENSITY_RESCALE, BLOCK)
    a = tl.abs(d).to(tl.float64)
    b = tl.abs(masked).to(tl.float64)
    if NORM == 1:
        pa = tl.sum(a, axis=0)
        pb = tl.sum(b, axis=0)
    elif NORM == 2:
        pa = tl.sum(a * a, axis=0)
        pb = tl.sum(b * b, axis=0)
    else:
        pa = tl.max(a, axis=0)
        pb = tl.max(b, axis=0)
    tl.store(part_ptr + 2 * tl.program_id(0), pa)
    tl.store(part_ptr + 2 * tl.program_id(0) + 1, pb)


# ---- pass 4: the merge ----------------------------------------------------------------------


@triton.jit(do_not_specialize=["nmodels", "seed_lo", "seed_hi", "divisor", "lambda_"])
def _merge_kernel(b_ptr, model_ptrs, out_ptr, n, nmodels, icfg_ptr, fcfg_ptr, offsets_ptr,
                  nblocks, seed_lo, seed_hi, divisor, lambda_, KIND: tl.constexpr,
                  OUT_KIND: tl.constexpr, CONSENSUS: tl.constexpr, SIGN_COUNT: tl.constexpr,
                  NORMALIZE: tl.constexpr, APPLY_LAMBDA: tl.constexpr,
                  DENSITY_RESCALE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = offs < n
    b_bits = tl.load(b_ptr + offs, mask=valid, other=0)
    bf = _to_f32(b_bits, KIND)
    zero = tl.zeros([BLOCK], tl.float32)
    votes = zero  # consensus: sum of terms (or of their signs)
    mixed = zero  # non-consensus: sum of terms
    pos_sum = zero  # consensus: sums of the terms agreeing with +1 / -1 ...
    neg_sum = zero
    pos_div = zero  # ... and of their weights
    neg_div = zero
    # Model i + 1's tile is loaded before model i's arithmetic (software pipelining: two
    # tiles in flight per program, so fewer programs per SM suffice to cover DRAM latency).
    m_next = tl.load(_model_ptr(model_ptrs, 0, KIND) + offs, mask=valid, other=0)
    for i in range(nmodels):
        m_bits = m_next
        following = tl.minimum(i + 1, nmodels - 1)
        m_next = tl.load(_model_ptr(model_ptrs, following, KIND) + offs,
                         mask=valid & (offs * 0 + i + 1 < nmodels), other=0)
        d, key = _delta(b_bits, m_bits, KIND)
        mode = tl.load(icfg_ptr + i * 10)
        w = tl.load(fcfg_ptr + i * 3)
        if mode == 0:
            x = d * w
        else:
            p = tl.load(fcfg_ptr + i * 3 + 1)
            masked = _sparsified(d, key, valid, i, mode, icfg_ptr, p, offsets_ptr, nblocks,
                                 seed_lo, seed_hi, DENSITY_RESCALE, BLOCK)
            if tl.load(icfg_ptr + i * 10 + 9) != 0:
                x = (masked * tl.load(fcfg_ptr + i * 3 + 2)) * w
            else:
                x = masked * w
        first = i == 0
        if CONSENSUS:
            if SIGN_COUNT:
                vote = (x > 0).to(tl.float32) - (x < 0).to(tl.float32)
            else:
                vote = x
            keep_pos = _agrees(x, False)
            keep_neg = _agrees(x, True)
            votes = tl.where(first, vote, votes + vote)
            pos_sum = tl.where(first, x * keep_pos, pos_sum + x * keep_pos)
            neg_sum = tl.where(first, x * keep_neg, neg_sum + x * keep_neg)
            if NORMALIZE:
                pos_div = tl.where(first, w * keep_pos, pos_div + w * keep_pos)
                neg_div = tl.where(first, w * keep_neg, neg_div + w * keep_neg)
        else:
            mixed = tl.where(first, x, mixed + x)
    if CONSENSUS:
        elected_pos = votes >= 0  # a zero sum elects +1; NaN elects -1
        mixed = tl.where(elected_pos, pos_sum, neg_sum)
        if NORMALIZE:
            div = tl.where(elected_pos, pos_div, neg_div)
            mixed = tl.math.div_rn(mixed, tl.where(div == 0, 1.0, div))
    elif NORMALIZE:
        mixed = tl.math.div_rn(mixed, tl.zeros_like(mixed) + tl.cast(divisor, tl.float32))
    if APPLY_LAMBDA:
        mixed = mixed * tl.cast(lambda_, tl.float32)
    tl.store(out_ptr + offs, _from_f32(bf + mixed, OUT_KIND), mask=valid)


@triton.jit
def _linear_kernel(model_ptrs, out_ptr, n, nmodels, weights_ptr, divisor, KIND: tl.constexpr,
                   OUT_KIND: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK: tl.constexpr):
    """linear: acc = fma(fp32(m_i), w_i, acc) from +0 in model order (mergekit's
    addcmul_), divided by the fp32 weight sum when normalizing, rounded once."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = offs < n
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(nmodels):
        m = _to_f32(tl.load(_model_ptr(model_ptrs, i, KIND) + offs, mask=valid, other=0), KIND)
        acc = tl.fma(m, tl.load(weights_ptr + i), acc)
    if NORMALIZE:
        acc = tl.math.div_rn(acc, tl.zeros_like(acc) + tl.cast(divisor, tl.float32))
    tl.store(out_ptr + offs, _from_f32(acc, OUT_KIND), mask=valid)


# ---- host: selection -------------------------------------------------------------------------


def _check_pair(base: torch.Tensor, model: torch.Tensor) -> int:
    kind = _kind(base)
    if model.dtype != base.dtype:
        raise TypeError("model and base dtypes differ")
    if model.numel() != base.numel():
        raise ValueError("model and base sizes differ")
    if model.device != base.device:
        raise ValueError(f"model is on {model.device}, base on {base.device}")
    return kind


def _histogram(b_bits, m_bits, kind, level, prefix, block):
    bins = 1 << (15 if level == 0 else 16)
    hist = torch.zeros(bins, dtype=torch.int64, device=b_bits.device)
    n = b_bits.numel()
    if n == 0 or (level == 1 and not 0 <= prefix <= 0x7FFF):
        return hist
    _delta_histogram_kernel[(triton.cdiv(n, block),)](b_bits, m_bits, hist, n, int(prefix),
                                                      KIND=kind, LEVEL=level, BLOCK=block,
                                                      **_LAUNCH)
    return hist


def merge_delta_histogram(base: torch.Tensor, model: torch.Tensor, level: int, prefix: int, *,
                          block_size: int | None = None) -> torch.Tensor:
    """int64 radix histogram (as ``radix_histogram`` of an fp32 tensor) of the magnitude keys
    of ``fp32(model) - fp32(base)``, formed in the kernel (no delta is stored)."""
    kind = _check_pair(base, model)
    if level not in (0, 1):
        raise ValueError(f"fp32 deltas have radix levels 0 and 1, got level={level}")
    return _histogram(_bits(base.contiguous()), _bits(model.contiguous()), kind, int(level),
                      int(prefix), _block(block_size))


def _topk(b_bits, m_bits, kind, ks, block) -> list[tuple[int, int]]:
    """(threshold_key, take_equal) per k of the delta's top-k; take_equal -1: every equal key.

    Raises ValueError on a NaN delta (as topk_mask), whatever the ks.
    """
    n = b_bits.numel()
    level0 = _histogram(b_bits, m_bits, kind, 0, 0, block)
    level1: dict[int, torch.Tensor] = {}

    def level1_of(prefix: int) -> torch.Tensor:
        if prefix not in level1:
            level1[prefix] = _histogram(b_bits, m_bits, kind, 1, prefix, block)
        return level1[prefix]

    if has_nan(torch.float32, level0, level1_of):
        raise ValueError("topk_mask: x contains NaN; magnitudes of NaN have no order")
    out = []
    for k in ks:
        if k <= 0:
            out.append((KEY_NONE, 0))
        elif k >= n:
            out.append((0, -1))
        else:
            bucket, above = locate(level0, k)
            h1 = level1_of(bucket)
            low, above_low = locate(h1, k - above)
            take = k - above - above_low
            out.append(((bucket << 16) | low, -1 if take >= int(h1[low]) else take))
    return out


def merge_delta_topk(base: torch.Tensor, model: torch.Tensor, ks, *,
                     block_size: int | None = None) -> list[tuple[int, int]]:
    """``(threshold_key, take_equal)`` of the top-k of ``fp32(model) - fp32(base)`` for each k
    (``take_equal`` -1: every equal key); ValueError on NaN."""
    kind = _check_pair(base, model)
    n = base.numel()
    for k in ks:
        if not 0 <= k <= n:
            raise ValueError(f"k must be in [0, {n}]")
    return _topk(_bits(base.contiguous()), _bits(model.contiguous()), kind, [int(k) for k in ks],
                 _block(block_size))


# ---- host: the op ------------------------------------------------------------------------------


def _selection(threshold: tuple[int, int]) -> tuple[list[int], bool]:
    """([kind, key, take], ranked) of one (key, take_equal) threshold, as the CPU's sel_state."""
    key, take = threshold
    if key > KEY_MAX:
        return [_SEL_NONE, 0, 0], False
    if take < 0:
        return [_SEL_GE, key, 0], False
    if take == 0:
        return [_SEL_GT, key, 0], False
    return [_SEL_RANKED, key, take], True


def _fp32_sum_in_order(values) -> torch.Tensor:
    total = torch.tensor(values[0], dtype=torch.float32)
    for v in values[1:]:
        total = total + torch.tensor(v, dtype=torch.float32)
    return total


def merge_sign_elect(base: torch.Tensor, models, method: str, weights, densities, gammas,
                     lambda_: float, normalize: bool, rescale: str, sign_method: str, seed: int,
                     thresholds, out_dtype: str, *, block_size: int | None = None
                     ) -> torch.Tensor:
    """Fused merge of the sign-elect / task-arithmetic family (options resolved per model).

    Arguments as ``deltaops._C.merge_sign_elect`` (csrc/cpu/merge_cpu.h):
    ``weights``, ``densities``, ``gammas`` one value per model; ``rescale`` ""
    (none), "l1", "l2", "linf" or "density"; ``thresholds`` empty or 4 ints per
    model (keep_key, keep_take, drop_key, drop_take; keep_key < 0: select from
    the density; take < 0: every equal key; drop_key < 0: no drop);
    ``out_dtype`` "float32", "bfloat16" or "float16".
    """
    if out_dtype not in _OUT_KIND:
        raise TypeError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    out = torch.empty(base.shape, dtype=_OUT_DTYPE[out_dtype], device=base.device)
    merge_sign_elect_out_(base, models, method, weights, densities, gammas, lambda_, normalize,
                          rescale, sign_method, seed, thresholds, out, block_size=block_size)
    return out


def _check_out(out: torch.Tensor, base: torch.Tensor, models) -> None:
    """As the CPU kernel's check_out: base's shape and device, contiguous, a float
    dtype, and either disjoint from each input or that input itself."""
    if out.dtype not in _OUT_DTYPE.values():
        raise TypeError(f"out must be float32, bfloat16 or float16, got {out.dtype}")
    if out.shape != base.shape or out.device != base.device or not out.is_contiguous():
        raise ValueError("out must be a contiguous tensor of base's shape on base's device")
    start, end = out.data_ptr(), out.data_ptr() + out.nbytes
    for t in (base, *models):
        t_start = t.data_ptr()
        same = t_start == start and t.dtype == out.dtype
        if start < t_start + t.nbytes and t_start < end and not same:
            raise ValueError("out partially overlaps an input; it may only be an input itself")


def merge_sign_elect_out_(base: torch.Tensor, models, method: str, weights, densities, gammas,
                          lambda_: float, normalize: bool, rescale: str, sign_method: str,
                          seed: int, thresholds, out: torch.Tensor, *,
                          block_size: int | None = None) -> None:
    """:func:`merge_sign_elect` written into ``out`` (its dtype is the output dtype).

    ``out`` may be ``base`` or a model: each program loads its block of every
    input before it stores that block of ``out``. Nothing is written before
    every check and selection pass is done.
    """
    kind = _kind(base)
    models = list(models)
    nmodels = len(models)
    if nmodels == 0:
        raise ValueError("models must hold at least one tensor")
    if len(weights) != nmodels or len(densities) != nmodels or len(gammas) != nmodels:
        raise ValueError("merge_sign_elect: one weight, density and gamma per model")
    thresholds = list(thresholds)
    if thresholds and len(thresholds) != 4 * nmodels:
        raise ValueError("merge_sign_elect: thresholds must hold 4 ints per model")
    if sign_method not in ("sum", "count"):
        raise ValueError(f"sign_method must be 'sum' or 'count'; got '{sign_method}'")
    if seed < 0:
        raise ValueError("seed must be in [0, 2**63)")
    for m in models:
        _check_pair(base, m)
        if m.shape != base.shape:
            raise ValueError("models must have base's shape")
    _check_out(out, base, models)
    if method not in TASK_ARITHMETIC or method.startswith("della"):
        raise ValueError(f"merge_sign_elect: unsupported method {method}")
    if rescale not in ("", "l1", "l2", "linf", "density"):
        raise ValueError(f"unknown rescale {rescale}")
    spec = TASK_ARITHMETIC[method]
    n = base.numel()
    if n == 0:
        return
    block = _block(block_size)
    nblocks = triton.cdiv(n, block)
    seed_lo, seed_hi = split_seed(seed)
    b_bits = _bits(base.contiguous())
    m_bits = [_bits(m.contiguous()) for m in models]
    kind_of = spec.sparsification  # None, "magnitude", "random", "magnitude_outliers"
    if kind_of is None:
        rescale = ""

    # per-model configuration, as the CPU kernel's ModelCfg
    icfg = [[0] * _ICFG for _ in range(nmodels)]
    fcfg = [[0.0] * _FCFG for _ in range(nmodels)]
    counted: list[tuple[int, int]] = []  # (model, key) of every ranked threshold
    for i in range(nmodels):
        density = float(densities[i])
        fcfg[i][_F_W] = float(weights[i])
        fcfg[i][_F_P] = density
        has_thr = bool(thresholds) and thresholds[4 * i] >= 0
        if kind_of is None:
            continue
        if not has_thr and density >= 1:
            continue  # DENSE
        if not has_thr and density <= 0:
            icfg[i][_I_MODE] = _ZERO
            continue
        if kind_of == "random":
            icfg[i][_I_MODE] = _RANDOM
            continue
        icfg[i][_I_MODE] = _MAGNITUDE
        drop = (KEY_NONE, 0)
        if has_thr:
            keep = (thresholds[4 * i], thresholds[4 * i + 1])
            if thresholds[4 * i + 2] >= 0:
                drop = (thresholds[4 * i + 2], thresholds[4 * i + 3])
        elif kind_of == "magnitude":
            (keep,) = _topk(b_bits, m_bits[i], kind, [magnitude_k(density, n)], block)
        else:
            n_drop, n_keep = outlier_band(density, float(gammas[i]), n)
            keep, drop = _topk(b_bits, m_bits[i], kind, [n_drop + n_keep, n_drop], block)
        if rescale == "density" and density <= 0:
            raise ValueError(f"rescale='density' needs density > 0 (model {i})")
        for first, threshold in ((_I_KEEP_KIND, keep), (_I_DROP_KIND, drop)):
            fields, ranked = _selection(threshold)
            icfg[i][first:first + 3] = fields
            if ranked:
                icfg[i][first + 3] = len(counted)
                counted.append((i, fields[1]))

    # pass 2: rank offsets of the equal keys, one row per ranked threshold
    device = base.device
    grid = (nblocks,)
    if counted:
        counts = torch.empty((len(counted), nblocks), dtype=torch.int64, device=device)
        for row, (i, key) in enumerate(counted):
            _delta_equal_count_kernel[grid](b_bits, m_bits[i], counts[row], n, key, KIND=kind,
                                            BLOCK=block, **_LAUNCH)
        offsets = (torch.cumsum(counts, 1) - counts).contiguous()
    else:
        offsets = torch.zeros(1, dtype=torch.int64, device=device)

    density_rescale = rescale == "density"
    icfg_t = torch.tensor(icfg, dtype=torch.int64).to(device)
    fcfg_t = torch.tensor(fcfg, dtype=torch.float32).to(device)

    # pass 3: norm rescale factors (mergekit's rescaled_masked_tensor)
    if rescale in _NORMS:
        for i in range(nmodels):
            if icfg[i][_I_MODE] not in (_MAGNITUDE, _RANDOM):
                continue
            part = torch.empty(2 * nblocks, dtype=torch.float64, device=device)
            _norm_kernel[grid](b_bits, m_bits[i], part, n, i, icfg_t, fcfg_t, offsets, nblocks,
                               seed_lo, seed_hi, KIND=kind, NORM=_NORMS[rescale],
                               DENSITY_RESCALE=False, BLOCK=block, **_LAUNCH)
            part = part.view(nblocks, 2).cpu()
            if rescale == "linf":
                before, after = (float(v) for v in part.max(0).values)
            else:
                before, after = (math.fsum(part[:, c].tolist()) for c in (0, 1))
            if rescale == "l2":
                before, after = math.sqrt(before), math.sqrt(after)
            fb = torch.tensor(before, dtype=torch.float32)
            fa = torch.tensor(after, dtype=torch.float32)
            if fb < 1e-7 or fa < 1e-7:
                continue  # rescale_to_norm leaves the masked delta as it is
            icfg[i][_I_SCALE] = 1
            fcfg[i][_F_FACTOR] = float(fb / fa)
        icfg_t = torch.tensor(icfg, dtype=torch.int64).to(device)
        fcfg_t = torch.tensor(fcfg, dtype=torch.float32).to(device)

    divisor = _fp32_sum_in_order([float(w) for w in weights])
    if abs(divisor) < 1e-8:  # an fp32 compare, as the reference and the CPU kernel
        divisor = torch.ones((), dtype=torch.float32)
    divisor = float(divisor)
    lambda32 = float(torch.tensor(float(lambda_), dtype=torch.float32))
    model_ptrs = torch.tensor([t.data_ptr() for t in m_bits], dtype=torch.int64).to(device)
    _merge_kernel[grid](b_bits, model_ptrs, _bits(out), n, nmodels, icfg_t, fcfg_t, offsets,
                        nblocks, seed_lo, seed_hi, divisor, lambda32, KIND=kind,
                        OUT_KIND=_out_kind(out),
                        CONSENSUS=spec.consensus,
                        SIGN_COUNT=sign_method == "count", NORMALIZE=bool(normalize),
                        APPLY_LAMBDA=float(lambda_) != 1.0, DENSITY_RESCALE=density_rescale,
                        BLOCK=block, **_LAUNCH)


# ---- host: linear -------------------------------------------------------------------------------


def _out_kind(out: torch.Tensor) -> int:
    return _OUT_KIND[str(out.dtype).replace("torch.", "")]


def merge_linear(models, weights, normalize: bool, out_dtype: str, *,
                 block_size: int | None = None) -> torch.Tensor:
    """merge_tensors' linear method (as ``deltaops._C.merge_linear``): a new tensor."""
    models = list(models)
    if not models:
        raise ValueError("models must hold at least one tensor")
    if out_dtype not in _OUT_KIND:
        raise TypeError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    out = torch.empty(models[0].shape, dtype=_OUT_DTYPE[out_dtype], device=models[0].device)
    merge_linear_out_(models, weights, normalize, out, block_size=block_size)
    return out


def merge_linear_out_(models, weights, normalize: bool, out: torch.Tensor, *,
                      block_size: int | None = None) -> None:
    """:func:`merge_linear` written into ``out`` (its dtype is the output dtype; it may
    be one of the models: each program loads every model's block before storing)."""
    models = list(models)
    if not models:
        raise ValueError("models must hold at least one tensor")
    if len(weights) != len(models):
        raise ValueError("merge_linear: one weight per model")
    first = models[0]
    kind = _kind(first)
    for m in models:
        _check_pair(first, m)
        if m.shape != first.shape:
            raise ValueError("models must share one shape")
    _check_out(out, first, models[1:])
    n = first.numel()
    if n == 0:
        return
    # the divisor as the reference takes it: torch's fp32 sum of the weights
    divisor = float(torch.tensor([float(w) for w in weights], dtype=torch.float32).sum())
    device = first.device
    m_bits = [_bits(m.contiguous()) for m in models]
    model_ptrs = torch.tensor([t.data_ptr() for t in m_bits], dtype=torch.int64).to(device)
    weights_t = torch.tensor([float(w) for w in weights], dtype=torch.float32).to(device)
    block = _block(block_size)
    _linear_kernel[(triton.cdiv(n, block),)](model_ptrs, _bits(out), n, len(models), weights_t,
                                             divisor, KIND=kind, OUT_KIND=_out_kind(out),
                                             NORMALIZE=bool(normalize), BLOCK=block, **_LAUNCH)


# ---- ahead-of-time compilation (CI without a GPU) -------------------------------------------------


def compile_for_gpu(arch: int, block: int = DEFAULT_BLOCK) -> dict:
    """Compile every kernel of this module to a cubin for ``sm_<arch>`` without a GPU.

    Proves that the kernels lower through Triton's NVIDIA backend (the
    interpreter does not: pointer casts, runtime branches around ``tl.cumsum``,
    fp64 reductions); used by tests/test_merge_triton.py. Returns
    ``{name: compiled kernel}`` (``.asm["cubin"]``, ``.metadata``).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    pair = {"b_ptr": "*i16", "m_ptr": "*i16"}
    seeds = {"seed_lo": "u32", "seed_hi": "u32"}
    jobs = {
        "histogram_level0": (_delta_histogram_kernel,
                             {**pair, "hist_ptr": "*i64", "n": "i32", "prefix": "i32"},
                             {"KIND": 1, "LEVEL": 0}),
        "histogram_level1_fp32": (_delta_histogram_kernel,
                                  {"b_ptr": "*i32", "m_ptr": "*i32", "hist_ptr": "*i64",
                                   "n": "i64", "prefix": "i32"}, {"KIND": 0, "LEVEL": 1}),
        "equal_count": (_delta_equal_count_kernel,
                        {**pair, "count_ptr": "*i64", "n": "i32", "threshold": "i32"},
                        {"KIND": 2}),
        "norm_l1": (_norm_kernel,
                    {**pair, "part_ptr": "*fp64", "n": "i32", "i": "i32", "icfg_ptr": "*i64",
                     "fcfg_ptr": "*fp32", "offsets_ptr": "*i64", "nblocks": "i32", **seeds},
                    {"KIND": 1, "NORM": 1, "DENSITY_RESCALE": False}),
    }
    merge_args = {"b_ptr": "*i16", "model_ptrs": "*i64", "out_ptr": "*i16", "n": "i32",
                  "nmodels": "i32", "icfg_ptr": "*i64", "fcfg_ptr": "*fp32",
                  "offsets_ptr": "*i64", "nblocks": "i32", **seeds, "divisor": "fp32",
                  "lambda_": "fp32"}
    flags = {"SIGN_COUNT": False, "NORMALIZE": True, "APPLY_LAMBDA": True,
             "DENSITY_RESCALE": True}
    jobs["merge_ties_bf16"] = (_merge_kernel, merge_args,
                               {"KIND": 1, "OUT_KIND": 1, "CONSENSUS": True, **flags})
    jobs["merge_count_fp16_to_fp32"] = (_merge_kernel, {**merge_args, "out_ptr": "*i32"},
                                        {"KIND": 2, "OUT_KIND": 0, "CONSENSUS": True,
                                         **flags, "SIGN_COUNT": True})
    jobs["merge_linear_fp32"] = (_merge_kernel,
                                 {**merge_args, "b_ptr": "*i32", "out_ptr": "*i32"},
                                 {"KIND": 0, "OUT_KIND": 0, "CONSENSUS": False, **flags})
    jobs["linear_bf16_to_fp32"] = (_linear_kernel,
                                   {"model_ptrs": "*i64", "out_ptr": "*i32", "n": "i32",
                                    "nmodels": "i32", "weights_ptr": "*fp32", "divisor": "fp32"},
                                   {"KIND": 1, "OUT_KIND": 0, "NORMALIZE": True})
    compiled = {}
    for name, (fn, signature, constexprs) in jobs.items():
        constexprs = {**constexprs, "BLOCK": block}
        signature = {**signature, **{k: "constexpr" for k in constexprs}}
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled[name] = triton.compile(source, target=target, options=dict(_LAUNCH))
    return compiled
