"""Route PEFT's LoRA merge and unmerge through :func:`deltaops.lora_merge_`.

``patch()`` replaces ``peft.tuners.lora.layer.Linear.merge`` and ``.unmerge``
(the methods behind ``merge_and_unload``, ``merge_adapter`` and
``unmerge_adapter`` for linear and GPT-2 ``Conv1D`` targets); ``unpatch()``
puts PEFT's own methods back. ``deltaops.integrations.peft.patch_peft`` calls
them.

What changes for a vanilla LoRA adapter on a float32 / bfloat16 / float16
weight: ``W += scaling * B @ A`` (``fan_in_fan_out`` honoured) is one fused
pass with fp32 accumulation and one rounding per element, instead of PEFT's
full-size fp32 product, its rounding to the weight's dtype and a second
rounding in the add (so results may differ from PEFT's in the last bit:
deltaops' are within 1 ulp of the exact sum where nothing cancels, PEFT's
within 1.5). ``safe_merge`` still merges into a copy and checks it for NaN /
inf before swapping it in; ``lora_bias`` is added exactly as PEFT adds it.
Everything else (DoRA and the other LoRA variants, other dtypes, factors on
another device than the weight) falls through to PEFT's own code, per adapter.
"""

from __future__ import annotations

import warnings

import torch

from ..ops.lowrank import lora_merge_
from ..reference.lowrank import SUPPORTED_DTYPES

_ORIGINALS: dict[str, object] = {}


def _linear_class():
    from peft.tuners.lora.layer import Linear

    return Linear


def _fused(layer, adapter: str) -> bool:
    """Whether this adapter of this layer is a plain LoRA deltaops can merge."""
    if adapter in getattr(layer, "lora_variant", {}):
        return False
    weight = layer.get_base_layer().weight
    lora_A, lora_B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    scaling = layer.scaling[adapter]
    return (weight.dim() == 2 and all(t.dtype in SUPPORTED_DTYPES for t in (weight, lora_A, lora_B))
            and lora_A.device == weight.device == lora_B.device
            and isinstance(scaling, (int, float)) and not isinstance(scaling, bool))


def _add_bias(layer, adapter: str, sign: float) -> None:
    if not layer.lora_bias[adapter]:
        return
    base = layer.get_base_layer()
    if getattr(base, "bias", None) is None:
        raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer "
                           "has no bias.")
    base.bias.data += sign * layer.lora_B[adapter].bias * layer.scaling[adapter]


def _merge(self, safe_merge: bool = False, adapter_names=None) -> None:
    """``peft.tuners.lora.layer.Linear.merge`` through deltaops.lora_merge_ (see the module doc)."""
    from peft.tuners.tuners_utils import check_adapters_to_merge

    adapter_names = check_adapters_to_merge(self, adapter_names)
    for adapter in adapter_names or []:
        if adapter not in self.lora_A.keys():
            continue
        if not _fused(self, adapter):
            _ORIGINALS["merge"](self, safe_merge=safe_merge, adapter_names=[adapter])
            continue
        base = self.get_base_layer()
        lora_A = self.lora_A[adapter].weight.detach()
        lora_B = self.lora_B[adapter].weight.detach()
        scaling = float(self.scaling[adapter])
        if safe_merge:
            merged = base.weight.data.clone()
            lora_merge_(merged, lora_A, lora_B, scaling, fan_in_fan_out=self.fan_in_fan_out)
            if not bool(torch.isfinite(merged).all()):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} "
                                 f"seems to be broken")
            new_bias = None
            if self.lora_bias[adapter]:
                if getattr(base, "bias", None) is None:
                    raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because "
                                       "the base layer has no bias.")
                new_bias = base.bias + self.lora_B[adapter].bias * self.scaling[adapter]
                if not bool(torch.isfinite(new_bias).all()):
                    raise ValueError(f"NaNs detected in the merged weights. The adapter "
                                     f"{adapter} seems to be broken")
            base.weight.data = merged
            if new_bias is not None:
                base.bias.data = new_bias.to(merged.dtype)
        else:
            lora_merge_(base.weight.data, lora_A, lora_B, scaling, fan_in_fan_out=self.fan_in_fan_out)
            _add_bias(self, adapter, 1.0)
        self.merged_adapters.append(adapter)


def _unmerge(self) -> None:
    """``peft.tuners.lora.layer.Linear.unmerge`` through deltaops (merge with ``-scaling``)."""
    if not self.merged:
        warnings.warn("Already unmerged. Nothing to do.")
        return
    while len(self.merged_adapters) > 0:
        adapter = self.merged_adapters[-1]
        if adapter in self.lora_A.keys() and not _fused(self, adapter):
            # PEFT's own unmerge, for this adapter only: it pops the last merged adapter.
            rest = self.merged_adapters[:-1]
            self.merged_adapters = [adapter]
            try:
                _ORIGINALS["unmerge"](self)
            finally:
                self.merged_adapters = rest
            continue
        self.merged_adapters.pop()
        if adapter not in self.lora_A.keys():
            continue
        weight = self.get_base_layer().weight
        lora_A = self.lora_A[adapter].weight.detach()
        lora_B = self.lora_B[adapter].weight.detach()
        lora_merge_(weight.data, lora_A, lora_B, -float(self.scaling[adapter]),
                    fan_in_fan_out=self.fan_in_fan_out)
        _add_bias(self, adapter, -1.0)


def patch() -> None:
    """Route ``Linear.merge`` / ``Linear.unmerge`` of PEFT's LoRA through deltaops (idempotent)."""
    linear = _linear_class()
    if _ORIGINALS:
        return
    _ORIGINALS["merge"] = linear.merge
    _ORIGINALS["unmerge"] = linear.unmerge
    linear.merge = _merge
    linear.unmerge = _unmerge


def unpatch() -> None:
    """Put PEFT's own ``Linear.merge`` / ``Linear.unmerge`` back (idempotent)."""
    if not _ORIGINALS:
        return
    linear = _linear_class()
    linear.merge = _ORIGINALS.pop("merge")
    linear.unmerge = _ORIGINALS.pop("unmerge")


def is_patched() -> bool:
    return bool(_ORIGINALS)
