"""Triton backend of the low-bit delta family (sign, ternary, 2/3/4/8-bit groups).

Every function matches :mod:`deltaops.reference.quant` bit for bit (codes,
scales, zero points, packed bytes, applied weights); ``delta_bmm`` sums in
another order and agrees within the bound its tests state. Element math
mirrors ``csrc/include/deltaops/quant.h``:

* Codes are packed in units of eight (eight codes of ``BITS`` bits fill
  ``BITS`` whole bytes): a tile of ``[UNITS, 8]`` codes becomes one int64
  word per unit (disjoint bit fields, so their sum is their OR), stored
  byte by byte, least significant first.
* Rounding half to even is ``(y + 1.5 * 2^23) - 1.5 * 2^23`` on ``y``
  already clamped to ``[-512, 512]`` (exact there; kernels are launched
  with ``enable_fp_fusion=False`` so nothing is contracted or reassociated).
  Divisions are ``tl.math.div_rn``.
* The exact mean ``|x|``: a kernel adds the fp32 significands of ``|x|``
  into int64 bins per biased exponent (integer atomics: order-free), and
  the host converts them with the reference's own function.
* Floats enter and leave as raw bits through the sparse family's integer
  conversions (``_to_f32`` / ``_from_f32``), so results do not depend on the
  device's conversion instructions.

Arguments are validated with torch ops before any kernel writes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltaops.reference import quant as ref

from .sparse import _LAUNCH, _bits, _f32, _from_f32, _kind, _to_f32, topk_mask

__all__ = [
    "pack_bits",
    "unpack_bits",
    "quantize_sign",
    "quantize_ternary_absmean",
    "quantize_uniform",
    "compeft_pack",
    "compeft_quantize",
    "apply_quantized_",
    "delta_bmm",
]

UNITS = 128  # units of eight codes per program
BLOCK = 1024  # elements per program (element-wise kernels)
_MAGIC = 12582912.0  # 1.5 * 2^23: adding and subtracting it rounds half to even for |y| <= 2^22

# code sources of the encode kernel
_FROM_CODES, _FROM_SIGN, _FROM_GROUPS = 0, 1, 2


@triton.jit
def _rne_clamped(y):
    y = tl.minimum(tl.maximum(y, -512.0), 512.0)
    return (y + 12582912.0) - 12582912.0


@triton.jit(do_not_specialize=["n", "nbytes", "cols", "group_size", "groups"])
def _encode_kernel(src_ptr, scales_ptr, zeros_ptr, out_ptr, n, nbytes, cols, group_size, groups,
                   ROW_SCALES: tl.constexpr, SOURCE: tl.constexpr, KIND: tl.constexpr,
                   BITS: tl.constexpr, MAXQ: tl.constexpr, UNITS: tl.constexpr):
    unit = tl.program_id(0).to(tl.int64) * UNITS + tl.arange(0, UNITS).to(tl.int64)
    lane = tl.arange(0, 8).to(tl.int64)
    i = unit[:, None] * 8 + lane[None, :]
    valid = i < n
    if SOURCE == 0:
        code = tl.load(src_ptr + i, mask=valid, other=0).to(tl.int64)
    elif SOURCE == 1:
        x = _to_f32(tl.load(src_ptr + i, mask=valid, other=0), KIND)
        code = tl.where(x < 0.0, 0, 1).to(tl.int64)
    else:
        x = _to_f32(tl.load(src_ptr + i, mask=valid, other=0), KIND)
        row = i // cols
        g = (i - row * cols) // group_size
        if ROW_SCALES:
            k = row * groups + g
        else:
            k = g
        s = tl.load(scales_ptr + k, mask=valid, other=1.0)
        z = tl.load(zeros_ptr + k, mask=valid, other=0).to(tl.float32)
        maxq = MAXQ * 1.0
        q = _rne_clamped(tl.math.div_rn(x, tl.where(s > 0.0, s, 1.0))) + z
        q = tl.minimum(tl.maximum(q, 0.0), maxq)
        code = tl.where(s > 0.0, q, z).to(tl.int64)
    code = tl.where(valid, code, 0)
    word = tl.sum(code << (lane * BITS)[None, :], axis=1)
    for b in tl.static_range(BITS):
        at = unit * BITS + b
        tl.store(out_ptr + at, ((word >> (8 * b)) & 0xFF).to(tl.uint8), mask=at < nbytes)


def _encode(src: torch.Tensor, n: int, bits: int, source: int, *, kind: int = 0, cols: int = 1,
            group_size: int = 1, groups: int = 1, scales=None, zeros=None,
            row_scales: bool = False, maxq: int | None = None) -> torch.Tensor:
    nbytes = ref.packed_nbytes(n, bits)
    out = torch.empty(nbytes, dtype=torch.uint8, device=src.device)
    if n == 0:
        return out
    dummy = out
    grid = (triton.cdiv(triton.cdiv(n, 8), UNITS),)
    _encode_kernel[grid](src, dummy if scales is None else scales, dummy if zeros is None else zeros,
                         out, n, nbytes, max(cols, 1), group_size, groups, ROW_SCALES=row_scales,
                         SOURCE=source, KIND=kind, BITS=bits,
                         MAXQ=(1 << bits) - 1 if maxq is None else maxq, UNITS=UNITS, **_LAUNCH)
    return out


@triton.jit
def _read_codes(packed_ptr, i, valid, nbytes, BITS: tl.constexpr):
    """Codes ``i`` (int64 offsets) of the little-endian stream, as int32."""
    bit = i * BITS
    byte = bit >> 3
    lo = tl.load(packed_ptr + byte, mask=valid, other=0).to(tl.int32)
    hi = tl.load(packed_ptr + byte + 1, mask=valid & (byte + 1 < nbytes), other=0).to(tl.int32)
    return ((lo | (hi << 8)) >> (bit & 7).to(tl.int32)) & ((1 << BITS) - 1)


@triton.jit(do_not_specialize=["n", "nbytes"])
def _unpack_kernel(packed_ptr, out_ptr, n, nbytes, BITS: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = i < n
    tl.store(out_ptr + i, _read_codes(packed_ptr, i, valid, nbytes, BITS).to(tl.uint8), mask=valid)


@triton.jit(do_not_specialize=["n", "cols"])
def _abs_bins_kernel(x_ptr, bins_ptr, n, cols, PER_ROW: tl.constexpr, KIND: tl.constexpr,
                     BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = i < n
    x = _to_f32(tl.load(x_ptr + i, mask=valid, other=0), KIND)
    u = x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
    e = u >> 23
    m = (u & 0x7FFFFF) | tl.where(e > 0, 0x800000, 0).to(tl.uint32)
    if PER_ROW:
        base = (i // cols) * 256
    else:
        base = i * 0
    tl.atomic_add(bins_ptr + base + e.to(tl.int64), m.to(tl.int64), mask=valid)


def _abs_means(x: torch.Tensor, per_row: bool) -> torch.Tensor:
    rows, cols = ref.rows_and_cols(x.shape)
    nrows = rows if per_row else 1
    bins = torch.zeros(nrows * 256, dtype=torch.int64, device=x.device)
    n = x.numel()
    if n:
        _abs_bins_kernel[(triton.cdiv(n, BLOCK),)](_bits(x), bins, n, max(cols, 1), PER_ROW=per_row,
                                                   KIND=_kind(x), BLOCK=BLOCK, **_LAUNCH)
    count = cols if per_row else n
    table = bins.reshape(nrows, 256).cpu().tolist()
    return torch.tensor([ref.abs_mean_from_bins(b, count) for b in table], dtype=torch.float32,
                        device=x.device)


# ---- public functions (the triton backend's table) ----------------------------------------


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``ref.pack_bits``: codes checked (< 2**bits) with torch ops first."""
    ref.check_bits(bits)
    flat = codes.reshape(-1)
    if flat.numel() and int(flat.max()) >= (1 << bits):
        bad = int(torch.nonzero(flat >= (1 << bits))[0, 0])
        raise ValueError(f"code {int(flat[bad])} at flat index {bad} does not fit in {bits} bits")
    return _encode(flat, flat.numel(), bits, _FROM_CODES)


def compeft_pack(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``ref.compeft_pack``, composed: the int8 codes by torch ops, packed by the
    encode kernel (no kernel of its own yet)."""
    ref.check_keep(x, keep)
    codes = torch.sign(x.reshape(-1)).to(torch.int8)
    codes.mul_(keep.reshape(-1)).add_(ref.TERNARY_ZERO)
    flat = codes.view(torch.uint8)
    return _encode(flat, flat.numel(), 2, _FROM_CODES)


def compeft_quantize(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``ref.compeft_quantize``, composed: this backend's top-k mask and pack,
    the moments summed by torch (``ref.fp64_moments``)."""
    ref.check_finite(x)
    return compeft_pack(x, topk_mask(x, k)), ref.fp64_moments(x)


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    ref.check_bits(bits)
    ref.validate_packed(packed, bits, numel)
    out = torch.empty(numel, dtype=torch.uint8, device=packed.device)
    if numel:
        _unpack_kernel[(triton.cdiv(numel, BLOCK),)](packed.reshape(-1), out, numel, packed.numel(),
                                                     BITS=bits, BLOCK=BLOCK, **_LAUNCH)
    return out


def quantize_sign(x: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ref.check_finite(x)
    rows, _ = ref.rows_and_cols(x.shape)
    scales = _abs_means(x, per_row).reshape(rows if per_row else 1, 1)
    return _encode(_bits(x), x.numel(), 1, _FROM_SIGN, kind=_kind(x)), scales


def quantize_ternary_absmean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ref.check_finite(x)
    _, cols = ref.rows_and_cols(x.shape)
    mean = _abs_means(x, False)
    s = torch.maximum(mean, torch.tensor(ref.ABSMEAN_EPS, dtype=torch.float32, device=x.device))
    zeros = torch.full((1,), ref.TERNARY_ZERO, dtype=torch.uint8, device=x.device)
    packed = _encode(_bits(x), x.numel(), 2, _FROM_GROUPS, kind=_kind(x), cols=cols,
                     group_size=max(cols, 1), groups=1, scales=s, zeros=zeros, maxq=2)
    return packed, s.reshape(1, 1)


@triton.jit(do_not_specialize=["cols", "group_size", "groups"])
def _group_params_kernel(x_ptr, scales_ptr, zeros_ptr, bad_ptr, cols, group_size, groups,
                         SYMMETRIC: tl.constexpr, KIND: tl.constexpr, BITS: tl.constexpr,
                         TILE: tl.constexpr):
    gid = tl.program_id(0).to(tl.int64)
    row = gid // groups
    g = gid - row * groups
    start = g * group_size
    end = tl.minimum(start + group_size, cols)
    lo = tl.full([TILE], float("inf"), tl.float32)
    hi = tl.full([TILE], float("-inf"), tl.float32)
    amax = tl.zeros([TILE], tl.float32)
    for t in range(start, end, TILE):
        c = t + tl.arange(0, TILE).to(tl.int64)
        valid = c < end
        x = _to_f32(tl.load(x_ptr + row * cols + c, mask=valid, other=0), KIND)
        lo = tl.where(valid, tl.minimum(lo, x), lo)
        hi = tl.where(valid, tl.maximum(hi, x), hi)
        amax = tl.where(valid, tl.maximum(amax, tl.abs(x)), amax)
    lo_g = tl.min(lo, axis=0)
    hi_g = tl.max(hi, axis=0)
    amax_g = tl.max(amax, axis=0)
    maxq = (1 << BITS) - 1.0
    if SYMMETRIC:
        s = tl.math.div_rn(amax_g, (1 << (BITS - 1)) - 1.0)
        s = tl.where(s > 0.0, s, 0.0)
        z = (1 << (BITS - 1)) * 1.0
    else:
        lo_g = tl.minimum(lo_g, 0.0)
        hi_g = tl.maximum(hi_g, 0.0)
        s = tl.math.div_rn(hi_g - lo_g, maxq)
        s = tl.where(s > 0.0, s, 0.0)
        zq = _rne_clamped(tl.math.div_rn(-lo_g, tl.where(s > 0.0, s, 1.0)))
        z = tl.where(s > 0.0, tl.minimum(tl.maximum(zq, 0.0), maxq), 0.0)
    tl.store(scales_ptr + gid, s)
    tl.store(zeros_ptr + gid, z.to(tl.uint8))
    overflow = (s.to(tl.uint32, bitcast=True) & 0x7FFFFFFF) >= 0x7F800000
    tl.store(bad_ptr + gid, overflow.to(tl.int8))


def quantize_uniform(x: torch.Tensor, bits: int, group_size: int,
                     symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ref.check_bits(bits, ref.UNIFORM_BITS)
    ref.check_finite(x)
    rows, cols = ref.rows_and_cols(x.shape)
    gs = ref.resolve_group_size(group_size, cols)
    groups = ref.num_groups(cols, gs)
    scales = torch.zeros(rows, groups, dtype=torch.float32, device=x.device)
    zeros = torch.zeros(rows, groups, dtype=torch.uint8, device=x.device)
    if rows * groups:
        bad = torch.zeros(rows * groups, dtype=torch.int8, device=x.device)
        tile = min(1024, triton.next_power_of_2(gs))
        _group_params_kernel[(rows * groups,)](_bits(x), scales, zeros, bad, cols, gs, groups,
                                               SYMMETRIC=bool(symmetric), KIND=_kind(x), BITS=bits,
                                               TILE=tile, **_LAUNCH)
        if bool(bad.any()):
            raise ValueError("x: the value range of a quantization group overflows fp32")
    packed = _encode(_bits(x), x.numel(), bits, _FROM_GROUPS, kind=_kind(x), cols=cols,
                     group_size=gs, groups=groups, scales=scales, zeros=zeros, row_scales=True)
    return packed, scales, zeros


@triton.jit
def _dequant(packed_ptr, scales_ptr, zeros_ptr, i, valid, nbytes, cols, group_size, groups,
             ROW_SCALES: tl.constexpr, BITS: tl.constexpr):
    """fp32 dq of elements ``i`` (module docstring of deltaops.reference.quant)."""
    code = _read_codes(packed_ptr, i, valid, nbytes, BITS)
    row = i // cols
    g = (i - row * cols) // group_size
    if ROW_SCALES:
        k = row * groups + g
    else:
        k = g
    s = tl.load(scales_ptr + k, mask=valid, other=0.0)
    if BITS == 1:
        dq = tl.where(code != 0, s, -s)
    else:
        z = tl.load(zeros_ptr + k, mask=valid, other=0).to(tl.int32)
        dq = (code - z).to(tl.float32) * s
    return dq


@triton.jit(do_not_specialize=["n", "nbytes", "cols", "group_size", "groups", "alpha"])
def _apply_kernel(w_ptr, packed_ptr, scales_ptr, zeros_ptr, n, nbytes, cols, group_size, groups,
                  alpha, ROW_SCALES: tl.constexpr, BITS: tl.constexpr, KIND: tl.constexpr,
                  BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    valid = i < n
    dq = _dequant(packed_ptr, scales_ptr, zeros_ptr, i, valid, nbytes, cols, group_size, groups,
                  ROW_SCALES, BITS)
    alpha32 = tl.cast(alpha, tl.float32)
    w = _to_f32(tl.load(w_ptr + i, mask=valid, other=0), KIND)
    scaled = alpha32 * dq
    tl.store(w_ptr + i, _from_f32(w + scaled, KIND), mask=valid)


def apply_quantized_(weight: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor, bits: int, group_size: int, alpha: float) -> None:
    """In place ``weight += alpha * dq``; the stored tensors are validated first."""
    kind = _kind(weight)
    if not weight.is_contiguous():
        raise ValueError("apply_quantized_: weight must be contiguous to be updated in place")
    ref.validate_params(weight.shape, packed, scales, zeros, bits, group_size)
    rows, cols = ref.rows_and_cols(weight.shape)
    n = weight.numel()
    if n == 0:
        return
    groups = ref.num_groups(cols, group_size)
    zeros_arg = zeros if bits > 1 else scales
    _apply_kernel[(triton.cdiv(n, BLOCK),)](
        _bits(weight), packed.reshape(-1), scales, zeros_arg, n, packed.numel(), cols, group_size,
        groups, _f32(alpha), ROW_SCALES=scales.shape[0] > 1, BITS=bits, KIND=kind, BLOCK=BLOCK,
        **_LAUNCH)


@triton.jit(do_not_specialize=["m", "n", "k", "nbytes", "group_size", "groups"])
def _delta_bmm_kernel(x_ptr, w_ptr, packed_ptr, scales_ptr, zeros_ptr, index_ptr, y_ptr,
                      m, n, k, nbytes, group_size, groups, R: tl.constexpr,
                      X_KIND: tl.constexpr, W_KIND: tl.constexpr, BITS: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    rm = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rn = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    t = tl.load(index_ptr + b).to(tl.int64)
    stream = packed_ptr + t * nbytes
    scales_t = scales_ptr + t * R * groups
    zeros_t = zeros_ptr + t * R * groups
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        x_valid = (rm[:, None] < m) & (rk[None, :] < k)
        x = _to_f32(tl.load(x_ptr + (b * m + rm[:, None]) * k + rk[None, :], mask=x_valid, other=0),
                    X_KIND)
        w_valid = (rn[:, None] < n) & (rk[None, :] < k)
        i = rn[:, None] * k + rk[None, :]  # flat index into the (N, K) delta
        w = _to_f32(tl.load(w_ptr + i, mask=w_valid, other=0), W_KIND)
        dq = _dequant(stream, scales_t, zeros_t, i, w_valid, nbytes, k, group_size, groups,
                      R > 1, BITS)
        merged = tl.where(w_valid, w + dq, 0.0)  # one tile of W + delta, never stored
        acc += tl.dot(x, tl.trans(merged), input_precision="ieee")
    y_valid = (rm[:, None] < m) & (rn[None, :] < n)
    tl.store(y_ptr + (b * m + rm[:, None]) * n + rn[None, :], acc, mask=y_valid)


def delta_bmm(x: torch.Tensor, base_weight: torch.Tensor, packed: torch.Tensor,
              scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
              indices: torch.Tensor) -> torch.Tensor:
    """``y[b] = x[b] @ (W + delta[indices[b]])^T``: tiles of ``W + delta`` decoded in registers."""
    batch, m, k = x.shape
    n = base_weight.shape[0]
    t_count = packed.shape[0]
    for t in range(t_count):
        ref.validate_params((n, k), packed[t], scales[t], zeros[t], bits, group_size)
    idx = indices.to(torch.int64)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= t_count):
        raise ValueError(f"indices must be in [0, {t_count})")
    y32 = torch.empty(batch, m, n, dtype=torch.float32, device=x.device)
    if y32.numel() == 0:
        return y32.to(x.dtype)
    groups = ref.num_groups(k, group_size)
    block_m, block_n, block_k = 16, 16, 32
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), batch)
    zeros_arg = zeros.contiguous() if bits > 1 else scales.contiguous()
    _delta_bmm_kernel[grid](_bits(x.contiguous()), _bits(base_weight.contiguous()),
                            packed.contiguous(), scales.contiguous(), zeros_arg, idx, y32, m, n, k,
                            packed.shape[1], group_size, groups, R=scales.shape[1],
                            X_KIND=_kind(x), W_KIND=_kind(base_weight), BITS=bits,
                            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **_LAUNCH)
    return y32.to(x.dtype)
