"""Public ops of the low-bit delta family: validate, then call ``torch.ops.deltaops``.

Semantics are defined in :mod:`deltaops.reference.quant`; this module checks
arguments (raising before anything is written) and routes to the custom ops,
whose kernels are chosen by :mod:`deltaops.backends`. The quantizers return
the format objects of :mod:`deltaops.formats.quant`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..reference import quant as ref
from . import _checks as check
from ._registry import define

# ---- the custom ops ------------------------------------------------------------------


def _pack_bits(codes: Tensor, bits: int) -> Tensor:
    return ref.pack_bits(codes, bits)


def _unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    return ref.unpack_bits(packed, bits, numel)


def _quantize_sign(x: Tensor, per_row: bool) -> tuple[Tensor, Tensor]:
    return ref.quantize_sign(x, per_row)


def _quantize_ternary_absmean(x: Tensor) -> tuple[Tensor, Tensor]:
    return ref.quantize_ternary_absmean(x)


def _quantize_uniform(x: Tensor, bits: int, group_size: int,
                      symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    return ref.quantize_uniform(x, bits, group_size, symmetric)


def _compeft_pack(x: Tensor, keep: Tensor) -> Tensor:
    return ref.compeft_pack(x, keep)


def _compeft_quantize(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    return ref.compeft_quantize(x, k)


def _apply_quantized_(weight: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, bits: int,
                      group_size: int, alpha: float) -> None:
    ref.apply_quantized_(weight, packed, scales, zeros, bits, group_size, alpha)


def _delta_bmm(x: Tensor, base_weight: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor,
               bits: int, group_size: int, indices: Tensor) -> Tensor:
    return ref.delta_bmm(x, base_weight, packed, scales, zeros, bits, group_size, indices)


def _packed_like(x: Tensor, bits: int) -> Tensor:
    return x.new_empty(ref.packed_nbytes(x.numel(), bits), dtype=torch.uint8)


def _quantize_sign_fake(x, per_row):
    rows, _ = ref.rows_and_cols(x.shape)
    return _packed_like(x, 1), x.new_empty((rows if per_row else 1, 1), dtype=torch.float32)


def _quantize_ternary_fake(x):
    return _packed_like(x, 2), x.new_empty((1, 1), dtype=torch.float32)


def _quantize_uniform_fake(x, bits, group_size, symmetric):
    rows, cols = ref.rows_and_cols(x.shape)
    groups = ref.num_groups(cols, ref.resolve_group_size(group_size, cols))
    return (_packed_like(x, bits), x.new_empty((rows, groups), dtype=torch.float32),
            x.new_empty((rows, groups), dtype=torch.uint8))


def _delta_bmm_fake(x, base_weight, packed, scales, zeros, bits, group_size, indices):
    return x.new_empty((x.shape[0], x.shape[1], base_weight.shape[0]))


pack_bits_op = define("pack_bits", _pack_bits, lambda codes, bits: _packed_like(codes, bits))
unpack_bits_op = define("unpack_bits", _unpack_bits,
                        lambda packed, bits, numel: packed.new_empty(numel, dtype=torch.uint8))
quantize_sign_op = define("quantize_sign", _quantize_sign, _quantize_sign_fake)
quantize_ternary_absmean_op = define("quantize_ternary_absmean", _quantize_ternary_absmean,
                                     _quantize_ternary_fake)
quantize_uniform_op = define("quantize_uniform", _quantize_uniform, _quantize_uniform_fake)
compeft_pack_op = define("compeft_pack", _compeft_pack, lambda x, keep: _packed_like(x, 2))
compeft_quantize_op = define("compeft_quantize", _compeft_quantize,
                             lambda x, k: (_packed_like(x, 2), x.new_empty(3, dtype=torch.float64)))
apply_quantized_op = define("apply_quantized_", _apply_quantized_, lambda *args: None,
                            mutates_args=("weight",))
delta_bmm_op = define("delta_bmm", _delta_bmm, _delta_bmm_fake)

# The custom ops of this family (tests opcheck each of them).
OP_NAMES = ("pack_bits", "unpack_bits", "quantize_sign", "quantize_ternary_absmean",
            "quantize_uniform", "compeft_pack", "compeft_quantize", "apply_quantized_",
            "delta_bmm")

# ---- public API --------------------------------------------------------------------------

GRANULARITIES = ("tensor", "row")
TERNARY_METHODS = ("absmean", "compeft")


def _bits(bits) -> int:
    return ref.check_bits(bits)


def _quantizable(name: str, x) -> Tensor:
    check.tensor(name, x)
    if x.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension (the input dimension is the last)")
    return x.contiguous()


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes (< ``2**bits``, flat order) into bytes, least significant bit first.

    Code ``i`` takes stream bits ``[i*bits, (i+1)*bits)``; stream bit ``j`` is
    bit ``j % 8`` of byte ``j // 8`` (README: "Bit order of low-bit codes").
    ``bits`` in 1, 2, 3, 4, 8. Returns ``ceil(numel * bits / 8)`` uint8.
    """
    check.tensor("codes", codes, (torch.uint8,))
    return pack_bits_op(codes.contiguous(), _bits(bits))


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: ``numel`` uint8 codes; byte count and padding bits checked."""
    check.tensor("packed", packed, (torch.uint8,))
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    return unpack_bits_op(packed.contiguous().reshape(-1), _bits(bits), numel)


def quantize_sign(delta: Tensor, *, granularity: str = "tensor"):
    """BitDelta's 1-bit delta: ``alpha * sign(delta)``, ``alpha = mean |delta|`` per tensor or row.

    Zero (and -0.0) maps to +1. The mean is the exact-sum mean of
    :mod:`deltaops.reference.quant`, so codes and scales are the same on
    every backend. Returns a :class:`deltaops.SignDelta`. Source: Liu et al.
    2024, "BitDelta: Your Fine-Tune May Only Be Worth One Bit".
    """
    from ..formats.quant import SignDelta

    x = _quantizable("delta", delta)
    check.one_of("granularity", granularity, GRANULARITIES)
    packed, scales = quantize_sign_op(x, granularity == "row")
    return SignDelta(x.shape, packed, scales, dtype=x.dtype)


def quantize_ternary(delta: Tensor, *, method: str = "absmean", density: Optional[float] = None,
                     alpha: float = 1.0):
    """Ternary delta ``s * q``, ``q`` in {-1, 0, +1}: BitNet b1.58's absmean or ComPEFT.

    * ``absmean`` (Ma et al. 2024): ``s = max(mean |x|, 1e-5)``,
      ``q = clamp(round_half_even(x / s), -1, 1)``; ``density``/``alpha`` unused.
    * ``compeft`` (Yadav et al. 2023): keep the top ``int(density * numel)``
      magnitudes (ties to the lowest flat index), ``q = sign(x)`` there and 0
      elsewhere; ``s = alpha * std(delta)`` (Bessel-corrected, over the
      unpruned delta; the fp32 nearest the exact value, so every backend
      gives the same bits).

    Returns a :class:`deltaops.TernaryDelta` (2-bit codes ``q + 1``).
    """
    from ..formats.quant import TernaryDelta

    x = _quantizable("delta", delta)
    check.one_of("method", method, TERNARY_METHODS)
    if method == "absmean":
        if density is not None:
            raise ValueError("density applies to method='compeft' only")
        packed, scale = quantize_ternary_absmean_op(x)
        return TernaryDelta(x.shape, packed, scale, method=method, dtype=x.dtype)
    if density is None:
        raise ValueError("method='compeft' needs density (the fraction of elements kept)")
    density = check.fraction("density", density)
    alpha = check.finite_float("alpha", alpha)
    # codes (top-k by magnitude, sign + 1 where kept) and fp64 moments in one op; the
    # scale is the exact fp32 std, decided by the moments' error bound or the exact sums
    packed, moments = compeft_quantize_op(x, int(density * x.numel()))
    return TernaryDelta(x.shape, packed, ref.compeft_scale_from_moments(x, moments, alpha),
                        method=method, dtype=x.dtype)


def quantize_uniform(x: Tensor, bits: int, *, group_size: int = 128, symmetric: bool = False):
    """Uniform group quantization to 2, 3, 4 or 8 bits along the input (last) dimension.

    Groups of ``group_size`` consecutive elements of a row (``-1``: one group
    per row; the last group of a row is shorter when it does not divide it).
    Per group (fp32 math, correctly rounded division, ``rne`` = round half
    to even):

    * asymmetric: ``s = (max(hi, 0) - min(lo, 0)) / (2^b - 1)``,
      ``z = clamp(rne(-min(lo, 0) / s), 0, 2^b - 1)``;
    * symmetric: ``s = max |x| / (2^(b-1) - 1)``, ``z = 2^(b-1)``;
    * codes ``q = clamp(rne(x / s) + z, 0, 2^b - 1)`` (``q = z`` if ``s == 0``).

    Dequantization: ``dq = fp32(q - z) * s``. Returns a
    :class:`deltaops.QuantizedDelta`; NaN/inf in ``x`` raise ``ValueError``.
    """
    from ..formats.quant import QuantizedDelta

    x = _quantizable("x", x)
    bits = ref.check_bits(bits, ref.UNIFORM_BITS)
    _, cols = ref.rows_and_cols(x.shape)
    gs = ref.resolve_group_size(group_size, cols)
    packed, scales, zeros = quantize_uniform_op(x, bits, gs, bool(symmetric))
    return QuantizedDelta(x.shape, bits, gs, packed, scales, zeros, symmetric=bool(symmetric),
                          dtype=x.dtype)


def delta_bmm(x: Tensor, base_weight: Tensor, deltas: Sequence, indices: Tensor) -> Tensor:
    """``y[b] = x[b] @ (W + delta[indices[b]])^T`` without materializing a dense delta.

    ``x``: ``(B, M, K)``; ``base_weight``: ``(N, K)``; ``deltas``: a list of
    ``T`` :class:`SignDelta`/:class:`TernaryDelta`/:class:`QuantizedDelta` of
    shape ``(N, K)`` and one kind (same bits, group size and scale layout);
    ``indices``: ``(B,)`` int32/int64 in ``[0, T)``. Output ``(B, M, N)`` in
    ``x``'s dtype, fp32 accumulation (see :func:`deltaops.reference.quant.delta_bmm`).
    """
    from ..formats.quant import stack_deltas

    check.tensor("x", x)
    check.tensor("base_weight", base_weight)
    check.tensor("indices", indices, check.INDEX_DTYPES)
    if x.dim() != 3:
        raise ValueError(f"x must be (B, M, K), got shape {tuple(x.shape)}")
    if base_weight.dim() != 2 or base_weight.shape[1] != x.shape[2]:
        raise ValueError(f"base_weight must be (N, {x.shape[2]}), got {tuple(base_weight.shape)}")
    if indices.shape != (x.shape[0],):
        raise ValueError(f"indices must have shape ({x.shape[0]},), got {tuple(indices.shape)}")
    packed, scales, zeros, bits, group_size = stack_deltas(deltas, tuple(base_weight.shape))
    check.same_device(x=x, base_weight=base_weight, indices=indices, deltas=packed)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= packed.shape[0]):
        raise ValueError(f"indices must be in [0, {packed.shape[0]}), got values in "
                         f"[{int(indices.min())}, {int(indices.max())}]")
    return delta_bmm_op(x.contiguous(), base_weight.contiguous(), packed, scales, zeros, bits,
                        group_size, indices.contiguous())
