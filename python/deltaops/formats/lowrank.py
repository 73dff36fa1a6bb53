"""LowRankDelta: a delta ``[out, in]`` stored as ``lora_B @ lora_A`` (PEFT's layout).

``lora_B`` ``[out, r]`` holds ``U_r diag(S_r)`` and ``lora_A`` ``[r, in]`` holds
``Vh_r`` when made by :func:`deltaops.low_rank`; any pair of factors works.
Applying it is a LoRA merge (:func:`deltaops.lora_merge_`: fp32 accumulation,
one rounding, no full-size temporary). Saved to safetensors as the tensors
``lora_A`` and ``lora_B`` with the format name and version, the method and the
achieved relative error in the metadata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from ..ops import _checks as check
from ..ops import lowrank as ops

FORMAT_NAME = "deltaops.lowrank"
FORMAT_VERSION = 1


@dataclass(eq=False)
class LowRankDelta:
    """``delta ~= lora_B @ lora_A``; ``relative_error`` is ``||delta - B A||_F / ||delta||_F``
    of the stored factors when known (None for factors given directly)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    relative_error: Optional[float] = None
    method: str = ""

    def __post_init__(self):
        check.tensor("lora_A", self.lora_A)
        check.tensor("lora_B", self.lora_B)
        if self.lora_A.dim() != 2 or self.lora_B.dim() != 2:
            raise ValueError(f"lora_A and lora_B must be 2-D, got shapes {tuple(self.lora_A.shape)} "
                             f"and {tuple(self.lora_B.shape)}")
        if self.lora_B.shape[1] != self.lora_A.shape[0]:
            raise ValueError(f"lora_B has shape {tuple(self.lora_B.shape)}; expected "
                             f"({self.lora_B.shape[0]}, {self.lora_A.shape[0]}) to match lora_A's "
                             f"rank {self.lora_A.shape[0]}")
        check.same_device(lora_A=self.lora_A, lora_B=self.lora_B)

    # ---- views -----------------------------------------------------------------

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.lora_B.shape[0], self.lora_A.shape[1]))

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.lora_A.dtype

    @property
    def device(self) -> torch.device:
        return self.lora_A.device

    @property
    def nbytes(self) -> int:
        """Bytes of the stored factors: ``r * (out + in) * element size``."""
        return sum(t.numel() * t.element_size() for t in (self.lora_A, self.lora_B))

    def to_dense(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``fp32(B) @ fp32(A)`` rounded once to ``dtype`` (default: the factors' dtype)."""
        return (self.lora_B.float() @ self.lora_A.float()).to(dtype or self.dtype)

    # ---- applying ----------------------------------------------------------------
    # check_target / apply_into_ / touched_indices are the protocol of
    # deltaops.apply_delta_, so apply_delta_(weight, low_rank_delta) works too.

    def check_target(self, weight: torch.Tensor) -> None:
        ops.check_lora(weight, self.lora_A, self.lora_B, 1.0, False)

    def apply_into_(self, weight: torch.Tensor, alpha: float) -> None:
        ops.lora_merge_op(weight, self.lora_A, self.lora_B, alpha, False)

    def touched_indices(self) -> None:
        return None  # every element

    def apply_(self, weight: torch.Tensor, alpha: float = 1.0, *, keep_original: bool = False):
        """In place ``weight += alpha * B @ A`` through :func:`deltaops.lora_merge_`."""
        return ops.lora_merge_(weight, self.lora_A, self.lora_B, alpha, keep_original=keep_original)

    # ---- safetensors -------------------------------------------------------------

    def save(self, path: str, metadata: Optional[dict] = None) -> None:
        header = dict(metadata or {})
        header.update({"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION),
                       "method": self.method,
                       "relative_error": "" if self.relative_error is None
                       else repr(float(self.relative_error))})
        save_file({"lora_A": self.lora_A.contiguous(), "lora_B": self.lora_B.contiguous()}, path,
                  metadata=header)

    @classmethod
    def load(cls, path: str, device: str = "cpu") -> "LowRankDelta":
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            header = handle.metadata() or {}
        if header.get("format") != FORMAT_NAME:
            raise ValueError(f"{path}: not a deltaops low-rank delta (format={header.get('format')!r})")
        version = int(header.get("format_version", "0"))
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: low-rank delta format version {version} is not supported "
                             f"(this deltaops reads version {FORMAT_VERSION})")
        tensors = load_file(path, device=device)
        for name in ("lora_A", "lora_B"):
            if name not in tensors:
                raise ValueError(f"{path}: the tensor {name!r} is missing")
        error = header.get("relative_error", "")
        relative_error = float(error) if error else None
        if relative_error is not None and not math.isfinite(relative_error):
            relative_error = None
        return cls(tensors["lora_A"], tensors["lora_B"], relative_error=relative_error,
                   method=header.get("method", ""))

