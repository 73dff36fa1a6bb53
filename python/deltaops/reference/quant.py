"""Pure-torch reference of the low-bit delta family (1-bit, ternary, 2/3/4/8-bit): the specification.

Every backend (C++ CPU, Triton, CUDA) is tested against these functions bit
for bit (codes, scales, zero points, packed bytes, applied weights).

Layout shared by the family
---------------------------
A tensor of shape ``(..., K)`` is seen as ``rows = numel // K`` rows of ``K``
elements (the input dimension is the last one; a 1-D tensor is one row).
Codes are unsigned integers of ``bits`` bits stored by :func:`pack_bits` in
flat (row-major) order, so a row may start inside a byte.

Scales ``s`` (fp32) and zero points ``z`` (uint8) have shape ``(R, G)``:
``R`` is 1 (one set shared by every row) or ``rows``; ``G`` is
``ceil(K / group_size)`` groups along a row (the last group of a row may be
shorter; groups never span rows). Element ``(r, c)`` uses
``s[r if R > 1 else 0, c // group_size]``.

Dequantized value (fp32, one rounding):

* ``bits == 1`` (sign, BitDelta): ``dq = +s`` if the code is 1 else ``-s``.
* otherwise (ternary, uniform): ``dq = fp32(q - z) * s`` (``q - z`` is an
  exact small integer, so the only rounding is the product).

Applying: ``w = round_w(fp32(w) + fp32(fp32(alpha) * dq))``, the
``apply_delta_`` rule of :mod:`deltaops.reference.sparse` (no fused
multiply-add, one rounding to the weight's dtype).

Means without a summation order
-------------------------------
BitDelta's scale and BitNet's absmean need ``mean |x|``. A floating-point sum
depends on its order, which would make codes differ between backends. The
family defines the mean from the exact sum: ``S = sum |x|`` as an exact
rational (each ``|x|`` is ``m * 2^(e - 150)`` with ``m`` its 24-bit fp32
significand), ``mean = fp32(fp64(S) / fp64(n))`` with ``fp64(S)`` the
round-to-nearest-even double of ``S`` and an empty tensor's mean 0. Kernels
add integer significands into one bin per exponent (order-free integer
sums) and convert once; see :func:`exact_abs_sums` and
:func:`abs_mean_from_bins`.

ComPEFT's ``std`` is defined the same way: the correctly rounded (nearest
even) fp32 of the exact Bessel-corrected standard deviation, from exact
sums of ``x`` and ``x^2`` (:func:`exact_std`). Kernels sum in fp64 instead
and report a bound on their rounding error (:func:`compeft_quantize`'s
moments); :func:`std_from_moments` turns that into an interval and returns
the fp32 value only when the whole interval rounds to it, so the fast path
gives the exact answer or none, and the exact sums decide the rest.

Rounding
--------
``rne(y)`` is round half to even (``torch.round``); every quantizer clamps
``y`` to ``[-512, 512]`` before rounding (this changes no result, since the
codes are clamped to a smaller range afterwards, and it keeps ``inf`` out of
the integer conversion). Divisions are correctly rounded fp32 divisions.
NaN and inf inputs raise ``ValueError``.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from .sparse import SUPPORTED_DTYPES, apply_dense_, topk_mask

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

SUPPORTED_BITS = (1, 2, 3, 4, 8)
UNIFORM_BITS = (2, 3, 4, 8)
ABSMEAN_EPS = 1e-5  # BitNet b1.58's lower bound on the absmean scale
PRE_CLAMP = 512.0
TERNARY_ZERO = 1  # ternary codes are q + 1: 0 -> -1, 1 -> 0, 2 -> +1

# ---- bit packing ------------------------------------------------------------------


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes that ``numel`` codes of ``bits`` bits take: ``ceil(numel * bits / 8)``."""
    return (numel * bits + 7) // 8


def check_bits(bits: int, allowed=SUPPORTED_BITS) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in allowed:
        raise ValueError(f"bits must be one of {', '.join(map(str, allowed))}; got {bits!r}")
    return bits


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (uint8, any shape, flat order) into a little-endian bit stream.

    Code ``i`` occupies stream bits ``[i * bits, (i + 1) * bits)``, its least
    significant bit first; stream bit ``j`` is bit ``j % 8`` (value
    ``1 << (j % 8)``) of byte ``j // 8``. For ``bits`` in 1, 2, 4, 8 no code
    crosses a byte; 3-bit codes do (8 codes fill 3 bytes). The last byte is
    padded with zero bits. Returns ``ceil(numel * bits / 8)`` uint8 bytes.
    Codes must be below ``2 ** bits`` (``ValueError`` otherwise).
    """
    check_bits(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    flat = codes.reshape(-1)
    if flat.numel() and int(flat.max()) >= (1 << bits):
        bad = int(torch.nonzero(flat >= (1 << bits))[0, 0])
        raise ValueError(f"code {int(flat[bad])} at flat index {bad} does not fit in {bits} bits")
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((flat.reshape(-1, 1) >> shifts) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=codes.device)
    return (stream.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def validate_packed(packed: torch.Tensor, bits: int, numel: int, name: str = "packed") -> None:
    """``ValueError`` unless ``packed`` is uint8 with the right byte count and zero padding bits."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8, got {packed.dtype}")
    expected = packed_nbytes(numel, bits)
    if packed.numel() != expected:
        raise ValueError(f"{name} has {packed.numel()} bytes; {numel} codes of {bits} bits "
                         f"need {expected}")
    used = (numel * bits) % 8
    if used and int(packed.reshape(-1)[-1]) >> used:
        raise ValueError(f"padding bits of the last byte of {name} must be zero "
                         f"(byte {int(packed.reshape(-1)[-1]):#04x}, {used} valid bits)")


def unpack_bits(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: ``numel`` uint8 codes (flat). The layout is validated first."""
    check_bits(bits)
    validate_packed(packed, bits, numel)
    bit_shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.reshape(-1, 1) >> bit_shifts) & 1).reshape(-1)[: numel * bits]
    weights = (1 << torch.arange(bits, dtype=torch.int32, device=packed.device)).to(torch.uint8)
    return (stream.reshape(numel, bits) * weights).sum(dim=1, dtype=torch.uint8)


# ---- shape helpers --------------------------------------------------------------------


def rows_and_cols(shape) -> tuple[int, int]:
    """``(rows, K)`` of a tensor of ``shape`` (input dimension last; at least 1-D)."""
    if len(shape) == 0:
        raise ValueError("low-bit deltas need a tensor with at least one dimension")
    cols = int(shape[-1])
    numel = math.prod(int(s) for s in shape)
    return (numel // cols if cols else 0), cols


def num_groups(cols: int, group_size: int) -> int:
    return (cols + group_size - 1) // group_size if cols else 0


def resolve_group_size(group_size: int, cols: int) -> int:
    """``-1`` (one group per row) becomes ``max(cols, 1)``; others must be positive."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size == -1:
        return max(cols, 1)
    if group_size <= 0:
        raise ValueError(f"group_size must be positive or -1, got {group_size}")
    return group_size


def check_finite(x: torch.Tensor, name: str = "x") -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype}; expected one of {SUPPORTED_DTYPES}")
    bad = ~torch.isfinite(x.reshape(-1))
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name} contains NaN or inf (first at flat index {first}: "
                         f"{x.reshape(-1)[first].item()}); low-bit quantizers need finite values")


# ---- exact means ---------------------------------------------------------------------------


def fp32_fields(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(negative, e, m)`` of x's values as fp32, flat: the sign, the biased
    exponent ``e`` and the significand ``m`` with its implicit bit (none for
    ``e = 0``), int64; ``|x| = m * 2^(max(e, 1) - 150)``."""
    bits = x.float().reshape(-1).view(torch.int32).to(torch.int64)
    exponent = (bits >> 23) & 0xFF
    return bits < 0, exponent, (bits & 0x7FFFFF) | torch.where(exponent > 0, 0x800000, 0)


def exact_abs_sums(x: torch.Tensor, per_row: bool) -> torch.Tensor:
    """Per-exponent integer sums of the fp32 significands of ``|x|``: int64 ``(R, 256)``.

    ``bins[r, e]`` sums ``m`` over the elements of row ``r`` (or all, ``R = 1``)
    whose fp32 bit pattern has biased exponent ``e``, ``m`` the significand
    with its implicit bit (none for ``e = 0``). Integer sums: no order.
    """
    rows, cols = rows_and_cols(x.shape)
    _, exponent, significand = fp32_fields(x)
    nrows = rows if per_row else 1
    row_of = (torch.arange(exponent.numel(), device=x.device) // max(cols, 1)) if per_row else \
        torch.zeros_like(exponent)
    bins = torch.zeros(nrows * 256, dtype=torch.int64, device=x.device)
    bins.scatter_add_(0, row_of * 256 + exponent, significand)
    return bins.reshape(nrows, 256)


def abs_mean_from_bins(bins: list[int], count: int) -> float:
    """``fp32(fp64(S) / count)`` for ``S = sum_e bins[e] * 2^(max(e, 1) - 150)`` (0 if count is 0).

    ``fp64(S)``: Python's ``float(int)`` rounds to nearest, ties to even.
    """
    if count == 0:
        return 0.0
    total = 0
    for e, m in enumerate(bins):
        if m:
            total += int(m) << (max(e, 1) - 1)
    as_double = math.ldexp(float(total), -149)
    return float(torch.tensor(as_double / count, dtype=torch.float64).to(torch.float32))


def exact_abs_mean(x: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """fp32 ``mean |x|`` (one per row, or one ``(1,)``) from the exact sum (module docstring)."""
    rows, cols = rows_and_cols(x.shape)
    bins = exact_abs_sums(x, per_row).cpu().tolist()
    count = cols if per_row else rows * cols
    means = [abs_mean_from_bins(b, count) for b in bins]
    return torch.tensor(means, dtype=torch.float32, device=x.device)


def rne(y: torch.Tensor) -> torch.Tensor:
    """Round half to even after the pre-clamp to ``[-512, 512]`` (fp32 in, fp32 out)."""
    return torch.round(y.clamp(-PRE_CLAMP, PRE_CLAMP))


# ---- quantizers ---------------------------------------------------------------------------


def quantize_sign(x: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """BitDelta's 1-bit quantizer (Liu et al. 2024, "BitDelta: Your Fine-Tune May Only Be Worth One Bit").

    ``code = 1`` where ``x >= 0`` (zero, and -0.0, map to +1), else 0;
    ``s = mean |x|`` per tensor (shape ``(1, 1)``) or per row (``(rows, 1)``),
    exact-sum mean of the module docstring. Value: ``s`` for code 1, ``-s``
    for code 0. Returns ``(pack_bits(codes, 1), s)``.
    """
    check_finite(x)
    rows, _ = rows_and_cols(x.shape)
    codes = (~(x.reshape(-1) < 0)).to(torch.uint8)
    scales = exact_abs_mean(x, per_row).reshape(rows if per_row else 1, 1)
    return pack_bits(codes, 1), scales


def quantize_ternary_absmean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58's absmean ternary quantizer (Ma et al. 2024, "The Era of 1-bit LLMs").

    ``s = max(mean |x|, fp32(1e-5))`` (exact-sum mean), ``q = clamp(rne(x / s), -1, 1)``
    with ``x / s`` a correctly rounded fp32 division; code ``q + 1`` (2 bits).
    Returns ``(pack_bits(codes, 2), s)`` with ``s`` of shape ``(1, 1)``.
    """
    check_finite(x)
    mean = exact_abs_mean(x, False)
    eps = torch.tensor(ABSMEAN_EPS, dtype=torch.float32, device=x.device)
    s = torch.maximum(mean, eps)
    q = rne(x.float().reshape(-1) / s).clamp(-1, 1)
    codes = (q + TERNARY_ZERO).to(torch.uint8)
    return pack_bits(codes, 2), s.reshape(1, 1)


def compeft_codes(x: torch.Tensor, density: float) -> torch.Tensor:
    """ComPEFT's ternary codes (Yadav et al. 2023, "ComPEFT"): uint8, flat.

    Keep the top ``k = int(density * numel)`` magnitudes (ties to the lowest
    flat index, :func:`deltaops.reference.sparse.topk_mask`); a kept element
    gets code ``sign(x) + 1`` (``torch.sign``: 0 for a zero), the others 1.
    """
    check_finite(x)
    return _compeft_code_values(x, topk_mask(x, int(density * x.numel())))


def _compeft_code_values(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """uint8 ``sign(x) + 1`` where ``keep``, 1 elsewhere (flat)."""
    sign = torch.sign(x.reshape(-1)).to(torch.int64)
    return torch.where(keep.reshape(-1), sign + 1, TERNARY_ZERO).to(torch.uint8)


def compeft_pack(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The packed 2-bit ComPEFT codes of finite ``x`` given its kept mask: code
    ``sign(x) + 1`` where ``keep`` (``torch.sign``: 0 for a zero), 1 elsewhere
    (:func:`compeft_codes` with the top-k mask already chosen)."""
    check_keep(x, keep)
    return pack_bits(_compeft_code_values(x, keep), 2)


def check_keep(x: torch.Tensor, keep: torch.Tensor) -> None:
    """compeft_pack's mask: bool, one entry per element of ``x``."""
    if keep.dtype != torch.bool or keep.numel() != x.numel():
        raise ValueError(f"keep must be a bool tensor of x's {x.numel()} elements, got "
                         f"{keep.dtype} with {keep.numel()}")


def compeft_quantize(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ComPEFT's codes and the moments its scale needs, in one op.

    Returns ``(packed, moments)``: ``packed`` is
    ``compeft_pack(x, topk_mask(x, k))`` (the top ``k`` magnitudes, ties to
    the lowest flat index, get code ``sign(x) + 1``, the rest 1) and
    ``moments`` is fp64 ``[s1, s2, h]``: ``s1`` and ``s2`` are ``sum x`` and
    ``sum x^2`` added in fp64 in any order in which every term passes through
    at most ``h`` additions, so ``|s1 - sum x| <= g * sum |x|`` and
    ``|s2 - sum x^2| <= g * sum x^2`` with ``g = h u / (1 - h u)``,
    ``u = 2^-53`` (Higham, "Accuracy and Stability of Numerical Algorithms",
    eq. 4.4). Every ``x`` and ``x^2`` of an fp32, bf16 or fp16 tensor is exact
    in fp64, so the additions are the only roundings. Here torch sums
    (:func:`fp64_moments`); a kernel reports its own ``h``. NaN and inf raise
    ``ValueError``.
    """
    check_finite(x)
    return compeft_pack(x, topk_mask(x, k)), fp64_moments(x)


def fp64_moments(x: torch.Tensor) -> torch.Tensor:
    """``[sum x, sum x^2, h]`` in fp64 by torch (:func:`compeft_quantize`'s moments).

    Torch's order of additions is its own, but any order over ``m`` terms
    passes each through at most ``m - 1`` additions. Summing rows of ``w``
    (about ``sqrt(n)``, zero-padded) and then the ``r`` row sums bounds it by
    ``h = w + r`` (about ``2 sqrt(n)`` instead of ``n``), tight enough for
    :func:`std_from_moments` to decide almost always on any device.
    """
    flat = x.reshape(-1).double()
    n = flat.numel()
    width = 1 << math.isqrt(max(n - 1, 0)).bit_length()  # a power of two >= sqrt(n)
    rows = -(-n // width)
    table = torch.nn.functional.pad(flat, (0, rows * width - n)).reshape(rows, width)
    return torch.stack([table.sum(dim=1).sum(), (table * table).sum(dim=1).sum(),
                        torch.tensor(float(width + rows), dtype=torch.float64, device=x.device)])


# ---- ComPEFT's standard deviation, exactly -------------------------------------------------

_FP32_MANTISSA = 24
_FP32_MIN_EXPONENT = -126  # of the smallest normal
_EXACT_CHUNK = 1 << 22  # elements per pass of exact_moment_sums (bounds its scratch memory)


def exact_moment_sums(x: torch.Tensor) -> tuple[int, int]:
    """``(I1, I2)`` with ``sum x = I1 * 2^-149`` and ``sum x^2 = I2 * 2^-298`` exactly.

    Each element is ``m * 2^(e - 150)`` (``m`` its fp32 significand with the
    implicit bit, ``e = max(biased exponent, 1)``), so the sums are integer
    sums per exponent: ``m`` (signed) for ``I1`` and, for ``I2``, ``m^2``
    split as ``mh^2 2^24 + 2 mh ml 2^12 + ml^2`` (``m = mh 2^12 + ml``) so that
    every bin fits int64. Integer bins have no summation order.
    """
    flat = x.reshape(-1)
    i1 = i2 = 0
    for start in range(0, flat.numel(), _EXACT_CHUNK):
        negative, exponent, m = fp32_fields(flat[start:start + _EXACT_CHUNK])
        exponent = exponent.clamp(min=1)
        high, low = m >> 12, m & 0xFFF
        columns = torch.stack([torch.where(negative, -m, m), high * high, high * low, low * low])
        bins = torch.zeros(4, 256, dtype=torch.int64, device=x.device)
        bins.index_add_(1, exponent, columns)
        for e, (s, hh, hl, ll) in enumerate(zip(*bins.cpu().tolist())):
            if e == 0:  # empty: exponents were clamped to 1
                continue
            i1 += s << (e - 1)
            i2 += ((hh << 24) + (hl << 13) + ll) << (2 * e - 2)
    return i1, i2


def round_sqrt_to_fp32(num: int, den: int) -> float:
    """The fp32 nearest ``sqrt(num / den)`` (ties to even; subnormals and
    overflow to inf included), as a Python float; ``num >= 0``, ``den > 0``.

    Integer arithmetic only: ``r = isqrt(N // D)`` with ``N / D = 4^s num / den``
    scaled so that ``r`` has about 60 bits, a sticky bit for the discarded
    fraction, then the round to 24 (fewer for subnormals) significant bits.
    """
    if num == 0:
        return 0.0
    shift = (122 - (num.bit_length() - den.bit_length())) // 2
    big_num, big_den = (num << (2 * shift), den) if shift >= 0 else (num, den << (-2 * shift))
    quotient, remainder = divmod(big_num, big_den)
    root = math.isqrt(quotient)
    sticky = remainder != 0 or root * root != quotient  # sqrt(num/den) * 2^shift > root
    exponent = root.bit_length() - 1 - shift  # of the leading bit of the result
    precision = _FP32_MANTISSA - max(0, _FP32_MIN_EXPONENT - exponent)
    drop = root.bit_length() - precision  # >= 30: root has >= 58 bits
    kept, rest, half = root >> drop, root & ((1 << drop) - 1), 1 << (drop - 1)
    if rest > half or (rest == half and (sticky or kept & 1)):
        kept += 1
    if kept.bit_length() + drop - shift > 128:  # above fp32's largest finite value
        return math.inf
    return math.ldexp(kept, drop - shift)


def exact_std(x: torch.Tensor) -> float:
    """The fp32 (as a Python float) nearest the exact ``std(x)`` with Bessel's
    correction, ``sqrt((n sum x^2 - (sum x)^2) / (n (n - 1)))``; 0 for ``n < 2``."""
    n = x.numel()
    if n < 2:
        return 0.0
    i1, i2 = exact_moment_sums(x)
    return round_sqrt_to_fp32(n * i2 - i1 * i1, (n * (n - 1)) << 298)


def _sqrt_upper(value: Fraction) -> Fraction:
    """A rational upper bound of ``sqrt(value)`` (``value`` a non-negative Fraction),
    within a relative 2^-60 of it."""
    if value == 0:
        return Fraction(0)
    shift = max(0, 64 - (value.numerator.bit_length() - value.denominator.bit_length()) // 2)
    scaled = -(-(value.numerator << (2 * shift)) // value.denominator)  # ceil
    return Fraction(math.isqrt(scaled) + 1, 1 << shift)


def std_from_moments(n: int, s1: float, s2: float, depth: float):
    """The exact fp32 ``std`` from fp64 moments with error bound ``depth``
    (:func:`compeft_quantize`), or ``None`` when their interval does not decide it.

    With ``g = h u / (1 - h u)``: ``sum x^2`` lies in ``[s2 / (1 + g), s2 / (1 - g)]``,
    ``sum |x| <= sqrt(n sum x^2)`` (Cauchy-Schwarz) bounds the error of ``s1``,
    and the variance's interval follows in exact rational arithmetic. Rounding
    ``sqrt`` to fp32 is monotone, so when both ends round to the same fp32,
    so does the exact value.
    """
    if n < 2:
        return 0.0
    if not all(math.isfinite(v) for v in (s1, s2, depth)) or depth < 0 or depth != int(depth):
        return None
    hu = Fraction(int(depth), 1 << 53)
    if hu >= Fraction(1, 2):
        return None
    g = hu / (1 - hu)
    sum1, sum2 = Fraction(s1), Fraction(s2)
    sq_lo, sq_hi = sum2 / (1 + g), sum2 / (1 - g)
    err1 = g * _sqrt_upper(n * sq_hi)
    lo1, hi1 = sum1 - err1, sum1 + err1
    mean_sq_hi = max(lo1 * lo1, hi1 * hi1)
    mean_sq_lo = Fraction(0) if lo1 <= 0 <= hi1 else min(lo1 * lo1, hi1 * hi1)
    var_lo = max(n * sq_lo - mean_sq_hi, Fraction(0))
    var_hi = n * sq_hi - mean_sq_lo
    den = n * (n - 1)
    low = round_sqrt_to_fp32(var_lo.numerator, var_lo.denominator * den)
    high = round_sqrt_to_fp32(var_hi.numerator, var_hi.denominator * den)
    return low if low == high else None


def _scale_tensor(std: float, alpha: float, device) -> torch.Tensor:
    alpha32 = torch.tensor(alpha, dtype=torch.float32, device=device)
    return (alpha32 * torch.tensor(std, dtype=torch.float32, device=device)).reshape(1, 1)


def compeft_scale(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """ComPEFT's magnitude: ``fp32(fp32(alpha) * std32)``, shape ``(1, 1)``.

    ``std32`` is the fp32 nearest the exact standard deviation of the unpruned
    delta with Bessel's correction (:func:`exact_std`; ``torch.std`` in fp64,
    rounded to fp32, agrees except where fp64's own rounding errors show).
    One element: std 0.
    """
    return _scale_tensor(exact_std(x), alpha, x.device)


def compeft_scale_from_moments(x: torch.Tensor, moments: torch.Tensor, alpha: float) -> torch.Tensor:
    """:func:`compeft_scale` from :func:`compeft_quantize`'s moments when they
    decide it (:func:`std_from_moments`), else from the exact sums."""
    s1, s2, depth = moments.tolist()
    std = std_from_moments(x.numel(), s1, s2, depth)
    return _scale_tensor(exact_std(x) if std is None else std, alpha, x.device)


def uniform_params(values: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each group: fp32 ``values`` of shape ``(..., group)`` (finite).

    * asymmetric (GPTQ's min-max with 0 in range): ``lo = min(min x, 0)``,
      ``hi = max(max x, 0)``, ``s = (hi - lo) / (2^b - 1)``,
      ``z = clamp(rne(-lo / s), 0, 2^b - 1)``.
    * symmetric: ``s = max |x| / (2^(b-1) - 1)``, ``z = 2^(b-1)``.

    ``s == 0`` (an all-zero group, or one whose range underflows; stored as
    ``+0.0``): ``z`` is 0
    (asymmetric) or ``2^(b-1)`` and every code is ``z``, so the group
    dequantizes to zeros. A range that overflows fp32 raises ``ValueError``.
    """
    maxq = (1 << bits) - 1
    if symmetric:
        amax = values.abs().amax(dim=-1)
        scale = amax / float((1 << (bits - 1)) - 1)
        zero = torch.full_like(scale, float(1 << (bits - 1)))
    else:
        lo = values.amin(dim=-1).clamp(max=0.0)
        hi = values.amax(dim=-1).clamp(min=0.0)
        scale = (hi - lo) / float(maxq)
        zero = torch.where(scale > 0, rne(-lo / scale).clamp(0, maxq), 0.0)
    scale = torch.where(scale > 0, scale, 0.0)  # +0.0 for all-zero groups, whatever their signs
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("x: the value range of a quantization group overflows fp32")
    return scale, zero


def quantize_uniform(x: torch.Tensor, bits: int, group_size: int,
                     symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uniform group quantization to ``bits`` in {2, 3, 4, 8} along the input (last) dimension.

    Groups of ``group_size`` consecutive elements of a row (``-1``: the whole
    row; a shorter last group when it does not divide the row). Parameters
    per group: :func:`uniform_params`. Codes:
    ``q = clamp(rne(x / s) + z, 0, 2^b - 1)`` (``x / s`` a correctly rounded
    fp32 division; ``q = z`` when ``s == 0``). Dequantization:
    ``dq = fp32(q - z) * s``. Returns ``(pack_bits(q, bits), s, z)`` with
    ``s`` fp32 and ``z`` uint8, both ``(rows, G)``.
    """
    check_bits(bits, UNIFORM_BITS)
    check_finite(x)
    rows, cols = rows_and_cols(x.shape)
    gs = resolve_group_size(group_size, cols)
    groups = num_groups(cols, gs)
    maxq = (1 << bits) - 1
    if rows * cols == 0:
        empty = torch.zeros(rows, groups, device=x.device)
        return (pack_bits(torch.zeros(0, dtype=torch.uint8, device=x.device), bits), empty,
                empty.to(torch.uint8))
    # Pad each row to whole groups with zeros: padding never changes min/max (0 is in range
    # for the asymmetric rule) nor max |x|, and the padded codes are dropped.
    padded = torch.zeros(rows, groups * gs, dtype=torch.float32, device=x.device)
    padded[:, :cols] = x.float().reshape(rows, cols)
    grouped = padded.reshape(rows, groups, gs)
    scale, zero = uniform_params(grouped, bits, symmetric)
    s = scale.unsqueeze(-1)
    z = zero.unsqueeze(-1)
    y = torch.where(s > 0, grouped / torch.where(s > 0, s, 1.0), 0.0)
    q = (rne(y) + z).clamp(0, maxq)
    codes = q.reshape(rows, groups * gs)[:, :cols].to(torch.uint8)
    return pack_bits(codes, bits), scale, zero.to(torch.uint8)


# ---- dequantizing and applying -----------------------------------------------------------


def validate_params(shape, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    bits: int, group_size: int) -> None:
    """``ValueError``/``TypeError`` unless the stored tensors fit a delta of ``shape``."""
    check_bits(bits)
    rows, cols = rows_and_cols(shape)
    validate_packed(packed, bits, rows * cols)
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    groups = num_groups(cols, group_size)
    if scales.dtype != torch.float32:
        raise TypeError(f"scales must be float32, got {scales.dtype}")
    if scales.dim() != 2 or scales.shape[1] != groups or scales.shape[0] not in (1, rows):
        raise ValueError(f"scales has shape {tuple(scales.shape)}; expected (1, {groups}) or "
                         f"({rows}, {groups}) for a delta of shape {tuple(shape)} with "
                         f"group_size {group_size}")
    if not bool(torch.isfinite(scales).all()):
        raise ValueError("scales contain NaN or inf")
    if bits > 1:
        if zeros.dtype != torch.uint8:
            raise TypeError(f"zeros must be uint8, got {zeros.dtype}")
        if zeros.shape != scales.shape:
            raise ValueError(f"zeros has shape {tuple(zeros.shape)}, expected scales' shape "
                             f"{tuple(scales.shape)}")
        if zeros.numel() and int(zeros.max()) >= (1 << bits):
            raise ValueError(f"zeros must be below 2**{bits}, got {int(zeros.max())}")


def dequantize_f32(shape, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   bits: int, group_size: int) -> torch.Tensor:
    """fp32 dequantized delta of ``shape`` (module docstring): the spec of every apply."""
    validate_params(shape, packed, scales, zeros, bits, group_size)
    rows, cols = rows_and_cols(shape)
    codes = unpack_bits(packed, bits, rows * cols).reshape(rows, cols).to(torch.int32)
    col_group = torch.arange(cols, device=packed.device) // group_size
    s = scales[:, col_group].expand(rows, cols)
    if bits == 1:
        dq = torch.where(codes == 1, s, -s)
    else:
        z = zeros[:, col_group].to(torch.int32).expand(rows, cols)
        dq = (codes - z).to(torch.float32) * s
    return dq.reshape(shape)


def apply_quantized_(weight: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor, bits: int, group_size: int, alpha: float) -> None:
    """In place ``weight += alpha * dq``: fp32 math, one rounding (:func:`apply_dense_`)."""
    dq = dequantize_f32(weight.shape, packed, scales, zeros, bits, group_size)
    apply_dense_(weight, dq, alpha)


# ---- serving many deltas of one base ----------------------------------------------------------


def delta_bmm(x: torch.Tensor, base_weight: torch.Tensor, packed: torch.Tensor,
              scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
              indices: torch.Tensor) -> torch.Tensor:
    """``y[b] = x[b] @ (W + delta[indices[b]])^T`` for a stack of ``T`` low-bit deltas.

    ``x``: ``(B, M, K)``; ``base_weight``: ``(N, K)``; ``packed``: ``(T, bytes)``
    (each delta's codes, :func:`pack_bits` of an ``(N, K)`` delta);
    ``scales``/``zeros``: ``(T, R, G)``; ``indices``: ``(B,)`` int in ``[0, T)``.
    Computed as ``x W^T + x D^T`` with each term an fp32 matmul of fp32
    operands (``D`` the fp32 dequantized delta), then summed in fp32 and
    rounded once to ``x``'s dtype. Kernels need not materialize ``D``;
    their sums run in another order, so results agree within a few ulps of
    the output, not bit for bit.
    """
    batch = x.shape[0]
    n, k = base_weight.shape
    out = torch.empty(x.shape[0], x.shape[1], n, dtype=x.dtype, device=x.device)
    base = x.float() @ base_weight.float().t()
    for b in range(batch):
        t = int(indices[b])
        delta = dequantize_f32((n, k), packed[t], scales[t], zeros[t], bits, group_size)
        out[b] = (base[b] + x[b].float() @ delta.t()).to(x.dtype)
    return out
