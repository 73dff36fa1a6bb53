"""Low-bit delta formats: SignDelta (1 bit), TernaryDelta (2-bit codes), QuantizedDelta (2/3/4/8 bits).

Each stores codes packed by :func:`deltaops.pack_bits` in flat (row-major)
order, fp32 scales of shape ``(R, G)`` (``R`` is 1 or the number of rows,
``G`` the groups along the input dimension, which is the last one) and, for
the group quantizer, uint8 zero points of the same shape. The dequantized
value and the apply rule are defined in :mod:`deltaops.reference.quant`:

* SignDelta (BitDelta): ``+s`` where the bit is 1, ``-s`` where it is 0;
  ``s`` per tensor ``(1, 1)`` or per row ``(rows, 1)``.
* TernaryDelta (BitNet b1.58 absmean, ComPEFT): codes ``q + 1`` with ``q``
  in {-1, 0, +1}, one scale ``(1, 1)``: ``dq = fp32(code - 1) * s``.
* QuantizedDelta: ``dq = fp32(q - z) * s`` per group.

``apply_(weight, alpha)`` is one fused unpack-scale-add pass (the
``apply_quantized_`` op); ``dequantize(dtype)`` is that pass into zeros.
Save and load go through safetensors with the format name, version and
kind in the metadata. SignDelta also imports and exports BitDelta's saved
masks (see :meth:`SignDelta.from_bitdelta`).
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..ops import _checks as check
from ..ops import quant as qops
from ..reference import quant as ref

FORMAT_NAME = "deltaops.quant"
FORMAT_VERSION = 1
KINDS = ("sign", "ternary", "uniform")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class LowBitDelta:
    """Shared storage and behaviour; use the subclasses."""

    kind = ""

    def __init__(self, shape, bits: int, group_size: int, packed: torch.Tensor,
                 scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype):
        self.shape = torch.Size(shape)
        self.rows, self.cols = ref.rows_and_cols(self.shape)
        self.bits = bits
        self.group_size = group_size
        check.tensor("packed", packed, (torch.uint8,))
        check.tensor("scales", scales, (torch.float32,))
        if dtype not in ref.SUPPORTED_DTYPES:
            raise TypeError(f"dtype must be one of {ref.SUPPORTED_DTYPES}, got {dtype}")
        self.packed = packed.contiguous().reshape(-1)
        self.scales = scales.contiguous()
        self.zeros = zeros.contiguous()
        self.dtype = dtype
        check.same_device(packed=self.packed, scales=self.scales, zeros=self.zeros)
        ref.validate_params(self.shape, self.packed, self.scales, self.zeros, bits, group_size)

    # ---- views -------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        return {"packed": self.packed, "scales": self.scales}

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors (what :meth:`save` writes, metadata aside)."""
        return sum(t.numel() * t.element_size() for t in self.stored_tensors().values())

    def codes(self) -> torch.Tensor:
        """The unpacked uint8 codes, shaped like the delta."""
        return qops.unpack_bits(self.packed, self.bits, self.shape.numel()).reshape(self.shape)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The delta in ``dtype`` (default: the dtype it was quantized from), one rounding of ``dq``.

        Computed as the fused apply into zeros, so ``-0.0`` values read as ``+0.0``.
        """
        out = torch.zeros(self.shape, dtype=dtype or self.dtype, device=self.device)
        self.apply_into_(out, 1.0)
        return out

    # ---- applying (the protocol deltaops.apply_delta_ uses) -----------------------------

    def check_target(self, weight: torch.Tensor) -> None:
        if weight.shape != self.shape:
            raise ValueError(f"weight has shape {tuple(weight.shape)}, the delta was made for "
                             f"{tuple(self.shape)}")
        check.same_device(weight=weight, packed=self.packed)

    def touched_indices(self) -> None:
        """Every element is touched (``DeltaUndo`` then saves the whole weight)."""
        return None

    def apply_into_(self, weight: torch.Tensor, alpha: float) -> None:
        """``weight`` is contiguous and checked; the kernels validate the stored tensors first."""
        qops.apply_quantized_op(weight, self.packed, self.scales, self.zeros, self.bits,
                                self.group_size, alpha)

    def apply_(self, weight: torch.Tensor, alpha: float = 1.0, *, keep_original: bool = False):
        """``deltaops.apply_delta_(weight, self, alpha, keep_original=...)``: one fused pass."""
        from ..ops.sparse import apply_delta_

        return apply_delta_(weight, self, alpha, keep_original=keep_original)

    # ---- safetensors ---------------------------------------------------------------------

    def metadata(self) -> dict[str, str]:
        return {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "kind": self.kind,
                "shape": json.dumps(list(self.shape)), "bits": str(self.bits),
                "group_size": str(self.group_size), "dtype": _dtype_name(self.dtype)}

    def save(self, path: str, metadata: Optional[dict] = None) -> None:
        header = dict(metadata or {})
        header.update(self.metadata())
        save_file({k: v.contiguous() for k, v in self.stored_tensors().items()}, path,
                  metadata=header)

    @classmethod
    def load(cls, path: str, device: str = "cpu") -> "LowBitDelta":
        """Load a delta saved by :meth:`save`; the subclass must match the saved kind."""
        delta = load_quantized(path, device)
        if cls is not LowBitDelta and not isinstance(delta, cls):
            raise ValueError(f"{path}: holds a {delta.kind} delta, not a {cls.kind} delta")
        return delta

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(shape={tuple(self.shape)}, bits={self.bits}, "
                f"group_size={self.group_size}, nbytes={self.nbytes})")


class SignDelta(LowBitDelta):
    """BitDelta: one sign bit per element (1 = positive) and fp32 scales ``(1, 1)`` or ``(rows, 1)``."""

    kind = "sign"

    def __init__(self, shape, packed: torch.Tensor, scales: torch.Tensor,
                 dtype: torch.dtype = torch.float32):
        _, cols = ref.rows_and_cols(torch.Size(shape))
        zeros = torch.zeros(0, dtype=torch.uint8, device=packed.device)
        super().__init__(shape, 1, max(cols, 1), packed, scales, zeros, dtype)

    @property
    def granularity(self) -> str:
        return "tensor" if self.scales.shape[0] == 1 and self.rows != 1 else "row"

    # ---- BitDelta interop ----------------------------------------------------------------

    @classmethod
    def from_bitdelta(cls, mask: torch.Tensor, coeff, dtype: torch.dtype = torch.float32) -> "SignDelta":
        """A BitDelta layer's saved ``mask`` and ``coeff`` as a SignDelta of shape ``(out, in)``.

        BitDelta stores the signs of an ``(out, in)`` delta transposed and
        packed into int32 words along the input dimension: ``mask`` has shape
        ``(in / 32, out)`` and bit ``j`` (least significant first) of
        ``mask[w, o]`` is 1 where element ``(o, 32 w + j)`` is positive
        (value ``+coeff``), 0 where it is negative (``-coeff``). ``coeff`` is
        one scalar per matrix, stored here as fp32.
        """
        check.tensor("mask", mask, (torch.int32,))
        if mask.dim() != 2:
            raise ValueError(f"mask must be 2-D (in / 32, out), got shape {tuple(mask.shape)}")
        coeff_t = torch.as_tensor(coeff).detach().reshape(-1)
        if coeff_t.numel() != 1:
            raise ValueError(f"coeff must be one scalar per matrix, got {coeff_t.numel()} values")
        if not bool(torch.isfinite(coeff_t).all()):
            raise ValueError("coeff must be finite")
        words, out_features = mask.shape
        unsigned = mask.to(torch.int64) & 0xFFFFFFFF
        shifts = torch.arange(32, dtype=torch.int64, device=mask.device)
        bits = (unsigned.unsqueeze(-1) >> shifts) & 1  # (in/32, out, 32)
        codes = bits.permute(1, 0, 2).reshape(out_features, words * 32).to(torch.uint8)
        packed = qops.pack_bits(codes, 1)
        scales = coeff_t.to(torch.float32).to(mask.device).reshape(1, 1)
        return cls((out_features, words * 32), packed, scales, dtype=dtype)

    def to_bitdelta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask, coeff)`` in BitDelta's layout (see :meth:`from_bitdelta`); per-tensor scale only."""
        if len(self.shape) != 2 or self.cols % 32:
            raise ValueError(f"BitDelta masks need a 2-D delta whose input dimension is a multiple "
                             f"of 32, got shape {tuple(self.shape)}")
        if self.scales.shape[0] != 1:
            raise ValueError("BitDelta keeps one coefficient per matrix; this delta has one per row")
        out_features, in_features = self.shape
        codes = self.codes().to(torch.int64).reshape(out_features, in_features // 32, 32)
        shifts = torch.arange(32, dtype=torch.int64, device=self.device)
        words = (codes << shifts).sum(dim=-1)  # (out, in/32), unsigned 32-bit values
        words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        return words.t().contiguous(), self.scales.reshape(()).clone()


class TernaryDelta(LowBitDelta):
    """Ternary codes ``q + 1`` (2 bits, ``q`` in {-1, 0, +1}) and one fp32 scale ``(1, 1)``."""

    kind = "ternary"

    def __init__(self, shape, packed: torch.Tensor, scale: torch.Tensor, *, method: str = "absmean",
                 dtype: torch.dtype = torch.float32):
        _, cols = ref.rows_and_cols(torch.Size(shape))
        zeros = torch.full((1, 1), ref.TERNARY_ZERO, dtype=torch.uint8, device=packed.device)
        self.method = method
        super().__init__(shape, 2, max(cols, 1), packed, scale.reshape(1, 1), zeros, dtype)

    def check_codes(self) -> None:
        """``ValueError`` if a code is 3 (no ternary value); run on load."""
        codes = self.codes().reshape(-1)
        if codes.numel() and int(codes.max()) > 2:
            first = int((codes > 2).nonzero()[0, 0])
            raise ValueError(f"ternary code 3 at flat index {first}; codes must be 0, 1 or 2")

    def metadata(self) -> dict[str, str]:
        return {**super().metadata(), "method": self.method}


class QuantizedDelta(LowBitDelta):
    """Uniform group quantization: codes of ``bits`` bits, scales and zero points per group."""

    kind = "uniform"

    def __init__(self, shape, bits: int, group_size: int, packed: torch.Tensor,
                 scales: torch.Tensor, zeros: torch.Tensor, *, symmetric: bool = False,
                 dtype: torch.dtype = torch.float32):
        ref.check_bits(bits, ref.UNIFORM_BITS)
        self.symmetric = bool(symmetric)
        check.tensor("zeros", zeros, (torch.uint8,))
        if self.symmetric and zeros.numel() and bool((zeros != (1 << (bits - 1))).any()):
            raise ValueError(f"symmetric deltas have every zero point at {1 << (bits - 1)}")
        super().__init__(shape, bits, group_size, packed, scales, zeros, dtype)

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        # symmetric zero points are the constant 2^(bits-1): not stored
        return {**super().stored_tensors(), **({} if self.symmetric else {"zeros": self.zeros})}

    def metadata(self) -> dict[str, str]:
        return {**super().metadata(), "symmetric": "1" if self.symmetric else "0"}


def load_quantized(path: str, device: str = "cpu") -> LowBitDelta:
    """Load any low-bit delta saved by ``save`` (its kind is in the metadata)."""
    with safe_open(path, framework="pt", device=str(device)) as handle:
        header = handle.metadata() or {}
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    if header.get("format") != FORMAT_NAME:
        raise ValueError(f"{path}: not a deltaops low-bit delta (format={header.get('format')!r})")
    version = int(header.get("format_version", "0"))
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: low-bit delta format version {version} is not supported "
                         f"(this deltaops reads version {FORMAT_VERSION})")
    kind = header.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{path}: unknown low-bit delta kind {kind!r}")
    shape = torch.Size(json.loads(header["shape"]))
    dtype = _DTYPES.get(header.get("dtype", "float32"))
    if dtype is None:
        raise ValueError(f"{path}: unknown dtype {header.get('dtype')!r}")
    packed, scales = tensors["packed"], tensors["scales"]
    if kind == "sign":
        return SignDelta(shape, packed, scales, dtype=dtype)
    if kind == "ternary":
        delta = TernaryDelta(shape, packed, scales, method=header.get("method", "absmean"), dtype=dtype)
        delta.check_codes()
        return delta
    bits, group_size = int(header["bits"]), int(header["group_size"])
    symmetric = header.get("symmetric") == "1"
    zeros = tensors.get("zeros")
    if zeros is None:
        if not symmetric:
            raise ValueError(f"{path}: an asymmetric delta needs its zero points")
        zeros = torch.full(scales.shape, 1 << (bits - 1), dtype=torch.uint8, device=scales.device)
    return QuantizedDelta(shape, bits, group_size, packed, scales, zeros, symmetric=symmetric,
                          dtype=dtype)


def stack_deltas(deltas: Sequence[LowBitDelta], shape: tuple) -> tuple:
    """Stack ``T`` deltas of one kind and ``shape`` for ``delta_bmm``: (packed, scales, zeros, bits, group_size)."""
    if len(deltas) == 0:
        raise ValueError("deltas must hold at least one delta")
    first = deltas[0]
    for i, d in enumerate(deltas):
        if not isinstance(d, LowBitDelta):
            raise TypeError(f"deltas[{i}] must be a SignDelta, TernaryDelta or QuantizedDelta, "
                            f"got {type(d).__name__}")
        if tuple(d.shape) != tuple(shape):
            raise ValueError(f"deltas[{i}] has shape {tuple(d.shape)}, expected {tuple(shape)}")
        if (d.bits, d.group_size, d.scales.shape, d.zeros.shape) != \
                (first.bits, first.group_size, first.scales.shape, first.zeros.shape):
            raise ValueError(f"deltas[{i}] differs from deltas[0] in bits, group size or scale "
                             f"layout; delta_bmm needs one kind")
    packed = torch.stack([d.packed for d in deltas])
    scales = torch.stack([d.scales for d in deltas])
    zeros = torch.stack([d.zeros for d in deltas])
    return packed, scales, zeros, first.bits, first.group_size
