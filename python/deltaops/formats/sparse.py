"""SparseDelta: a delta that keeps a fraction of its elements, in two layouts.

* ``coo``: sorted flat (row-major) indices, int32 when the tensor has fewer
  than 2**31 elements, else int64, plus the kept values.
* ``bitmask``: one keep bit per element, packed into uint8 least significant
  bit first (element ``i`` is bit ``i % 8`` of byte ``i // 8``), plus the kept
  values in flat order.

``coo`` is smaller below about 1/32 density (4 bytes per kept element against
1 bit per element); ``bitmask`` applies faster. Both save to safetensors with
the format name and version in the metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ..ops import _checks as check
from ..ops import sparse as ops
from ..reference.sparse import pack_mask, unpack_mask, validate_bitmask, validate_coo_indices

FORMAT_NAME = "deltaops.sparse"
FORMAT_VERSION = 1
LAYOUTS = ("coo", "bitmask")


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


@dataclass(eq=False)
class SparseDelta:
    """A sparse delta of ``shape``; see the module docstring for the layouts."""

    shape: torch.Size
    layout: str
    values: torch.Tensor
    indices: Optional[torch.Tensor] = None  # coo
    packed_mask: Optional[torch.Tensor] = None  # bitmask

    def __post_init__(self):
        self.shape = torch.Size(self.shape)
        check.one_of("layout", self.layout, LAYOUTS)
        check.tensor("values", self.values)
        if self.values.dim() != 1:
            raise ValueError(f"values must be 1-D, got shape {tuple(self.values.shape)}")
        numel = self.shape.numel()
        if self.layout == "coo":
            check.tensor("indices", self.indices, check.INDEX_DTYPES)
            if self.indices.dim() != 1:
                raise ValueError(f"indices must be 1-D, got shape {tuple(self.indices.shape)}")
            validate_coo_indices(self.indices, numel, self.values.numel())
        else:
            check.tensor("packed_mask", self.packed_mask, (torch.uint8,))
            validate_bitmask(self.packed_mask, numel, self.values.numel())

    # ---- construction ----------------------------------------------------------

    @classmethod
    def from_mask(cls, delta: torch.Tensor, keep: torch.Tensor, layout: str = "coo") -> "SparseDelta":
        """The elements of ``delta`` where ``keep`` is True."""
        check.one_of("layout", layout, LAYOUTS)
        check.same_shape("delta", delta, "keep", keep)
        flat_keep = keep.reshape(-1)
        values = delta.reshape(-1)[flat_keep]
        if layout == "coo":
            indices = flat_keep.nonzero().reshape(-1).to(_index_dtype(delta.numel()))
            return cls(delta.shape, layout, values, indices=indices)
        return cls(delta.shape, layout, values, packed_mask=pack_mask(flat_keep))

    @classmethod
    def from_dense(cls, delta: torch.Tensor, density: float, method: str = "magnitude", *,
                   layout: str = "coo", seed: Optional[int] = None, rescale: Optional[str] = None,
                   gamma: float = 0.01, epsilon: float = 0.15) -> "SparseDelta":
        """Sparsify ``delta`` with :func:`deltaops.sparsify` and keep the selected elements."""
        check.one_of("layout", layout, LAYOUTS)
        values, keep = ops.sparsify_with_mask(delta, density, method, seed=seed, rescale=rescale,
                                              gamma=gamma, epsilon=epsilon)
        return cls.from_mask(values, keep, layout)

    # ---- views -------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def density(self) -> float:
        numel = self.shape.numel()
        return self.nnz / numel if numel else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tensors (values plus indices or packed mask)."""
        layout_tensor = self.indices if self.layout == "coo" else self.packed_mask
        return sum(t.numel() * t.element_size() for t in (self.values, layout_tensor))

    def touched_indices(self) -> torch.Tensor:
        """Flat int64 indices of the stored elements, in increasing order."""
        if self.layout == "coo":
            return self.indices.to(torch.int64)
        return unpack_mask(self.packed_mask, self.shape.numel()).nonzero().reshape(-1)

    def to_dense(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        dense = torch.zeros(self.shape.numel(), dtype=dtype or self.dtype, device=self.device)
        dense[self.touched_indices()] = self.values.to(dense.dtype)
        return dense.reshape(self.shape)

    def to_layout(self, layout: str) -> "SparseDelta":
        check.one_of("layout", layout, LAYOUTS)
        if layout == self.layout:
            return self
        keep = torch.zeros(self.shape.numel(), dtype=torch.bool, device=self.device)
        keep[self.touched_indices()] = True
        if layout == "coo":
            indices = keep.nonzero().reshape(-1).to(_index_dtype(self.shape.numel()))
            return SparseDelta(self.shape, layout, self.values, indices=indices)
        return SparseDelta(self.shape, layout, self.values, packed_mask=pack_mask(keep))

    # ---- applying (the protocol deltaops.apply_delta_ uses) -------------------------

    def check_target(self, weight: torch.Tensor) -> None:
        if weight.shape != self.shape:
            raise ValueError(f"weight has shape {tuple(weight.shape)}, the delta was made for "
                             f"{tuple(self.shape)}")
        check.same_device(weight=weight, values=self.values)

    def apply_into_(self, weight: torch.Tensor, alpha: float) -> None:
        """``weight`` is contiguous and checked; kernels validate the layout before writing."""
        if self.layout == "coo":
            ops.apply_coo_op(weight, self.indices, self.values, alpha)
        else:
            ops.apply_bitmask_op(weight, self.packed_mask, self.values, alpha)

    def apply_(self, weight: torch.Tensor, alpha: float = 1.0, *, keep_original: bool = False):
        """``deltaops.apply_delta_(weight, self, alpha, keep_original=...)``."""
        return ops.apply_delta_(weight, self, alpha, keep_original=keep_original)

    # ---- safetensors -------------------------------------------------------------

    def save(self, path: str, metadata: Optional[dict] = None) -> None:
        tensors = {"values": self.values.contiguous()}
        if self.layout == "coo":
            tensors["indices"] = self.indices.contiguous()
        else:
            tensors["packed_mask"] = self.packed_mask.contiguous()
        header = dict(metadata or {})
        header.update({
            "format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
            "layout": self.layout, "shape": json.dumps(list(self.shape)),
        })
        save_file(tensors, path, metadata=header)

    @classmethod
    def load(cls, path: str, device: str = "cpu") -> "SparseDelta":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            header = handle.metadata() or {}
        if header.get("format") != FORMAT_NAME:
            raise ValueError(f"{path}: not a deltaops sparse delta (format={header.get('format')!r})")
        version = int(header.get("format_version", "0"))
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: sparse delta format version {version} is not supported "
                             f"(this deltaops reads version {FORMAT_VERSION})")
        tensors = load_file(path, device=device)
        shape = torch.Size(json.loads(header["shape"]))
        return cls(shape, header["layout"], tensors["values"], indices=tensors.get("indices"),
                   packed_mask=tensors.get("packed_mask"))

