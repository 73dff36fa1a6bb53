"""Delta formats of ``deltaops compress`` beyond sparse: sign, ternary, int4, int2, lowrank.

Each adapter follows the interface of :mod:`deltaops.checkpoint.compress`
(``name``, ``option_names``, ``defaults``, ``resolve(options, given)``,
``encode(delta, options, threshold)``, ``apply(weight, parts, meta)``) and
stores one tensor's delta as the parts of its in-memory format, so the
container holds exactly what that format would save on its own:

* ``sign``: :func:`deltaops.quantize_sign` -> :class:`deltaops.SignDelta`,
  parts ``packed`` (1 bit per element) and ``scales`` (fp32, one per tensor
  or per row with ``--granularity row``).
* ``ternary``: :func:`deltaops.quantize_ternary` -> :class:`deltaops.TernaryDelta`,
  parts ``packed`` (2 bits per element) and ``scales`` (one fp32);
  ``--method absmean`` (BitNet b1.58) or ``compeft`` (``--density``, ``--alpha``).
* ``int4`` / ``int2``: :func:`deltaops.quantize_uniform` with 4 / 2 bits ->
  :class:`deltaops.QuantizedDelta`, parts ``packed``, ``scales`` (fp32 per
  group) and, unless ``--symmetric``, ``zeros`` (uint8 per group);
  ``--group-size`` (default 128, ``-1`` one group per row).
* ``lowrank``: :func:`deltaops.low_rank` -> :class:`deltaops.LowRankDelta`,
  parts ``lora_A`` ``[r, in]`` and ``lora_B`` ``[out, r]`` in
  ``--values-dtype`` (default the model's); ``--rank`` (default 16, capped per
  tensor at ``min(out, in)``), ``--method svd`` or ``randomized`` (``--seed``).

The quantizers see the fp32 delta ``fp32(F) - fp32(B)``. ``apply`` rebuilds
the format object from its parts (which validates them) and runs its fused
path: :func:`deltaops.apply_delta_` (one unpack-scale-add pass, one rounding)
for the low-bit formats, :func:`deltaops.lora_merge_` (fp32 accumulation, no
full-size temporary) for lowrank. No dense delta is materialized.
"""

from __future__ import annotations

import math

import torch

from ..formats.lowrank import LowRankDelta
from ..formats.quant import QuantizedDelta, SignDelta, TernaryDelta
from ..ops.lowrank import low_rank
from ..ops.quant import quantize_sign, quantize_ternary, quantize_uniform
from ..ops.sparse import apply_delta_
from .io import CheckpointError


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _int(name: str, value, low: int, allow_minus_one: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or \
            not (value >= low or (allow_minus_one and value == -1)):
        extra = " or -1" if allow_minus_one else ""
        raise CheckpointError(f"{_flag(name)} must be an int >= {low}{extra}, got {value!r}")
    return value


def _choice(name: str, value, allowed) -> str:
    if value not in allowed:
        raise CheckpointError(f"{_flag(name)} must be one of {', '.join(allowed)}; got {value!r}")
    return value


class SignFormat:
    """BitDelta: 1 bit per element and an fp32 scale per tensor (or per row)."""

    name = "sign"
    option_names = ("granularity",)
    defaults = {"granularity": "tensor"}

    def resolve(self, options: dict, given: dict) -> dict:
        _choice("granularity", options["granularity"], ("tensor", "row"))
        return options

    def encode(self, delta: torch.Tensor, options: dict, threshold=None):
        signs = quantize_sign(delta, granularity=options["granularity"])
        return {"packed": signs.packed, "scales": signs.scales}, {"granularity": options["granularity"]}

    def apply(self, weight: torch.Tensor, parts: dict, meta: dict) -> None:
        apply_delta_(weight, SignDelta(weight.shape, parts["packed"], parts["scales"]))


class TernaryFormat:
    """Ternary codes (2 bits) and one fp32 scale: BitNet b1.58 absmean or ComPEFT."""

    name = "ternary"
    option_names = ("method", "density", "alpha")
    defaults = {"method": "absmean"}

    def resolve(self, options: dict, given: dict) -> dict:
        method = _choice("method", options["method"], ("absmean", "compeft"))
        if method == "absmean":
            extra = [k for k in ("density", "alpha") if k in given]
            if extra:
                raise CheckpointError(f"{', '.join(map(_flag, extra))} applies to --method compeft "
                                      f"only (absmean has no options)")
            return {"method": method}
        density = options.get("density", 0.1)
        if isinstance(density, bool) or not isinstance(density, (int, float)) or \
                not 0.0 <= density <= 1.0:
            raise CheckpointError(f"--density must be in [0, 1], got {density!r}")
        alpha = options.get("alpha", 1.0)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise CheckpointError(f"--alpha must be a finite number, got {alpha!r}")
        return {"method": method, "density": float(density), "alpha": float(alpha)}

    def encode(self, delta: torch.Tensor, options: dict, threshold=None):
        if options["method"] == "absmean":
            ternary = quantize_ternary(delta, method="absmean")
        else:
            ternary = quantize_ternary(delta, method="compeft", density=options["density"],
                                       alpha=options["alpha"])
        return {"packed": ternary.packed, "scales": ternary.scales}, {"method": options["method"]}

    def apply(self, weight: torch.Tensor, parts: dict, meta: dict) -> None:
        ternary = TernaryDelta(weight.shape, parts["packed"], parts["scales"],
                               method=meta.get("method", "absmean"))
        ternary.check_codes()  # code 3 has no ternary value: a corrupt part
        apply_delta_(weight, ternary)


class UniformFormat:
    """Uniform group quantization to ``bits`` bits (``int4``, ``int2``)."""

    option_names = ("group_size", "symmetric")
    defaults = {"group_size": 128, "symmetric": False}

    def __init__(self, bits: int):
        self.bits = bits
        self.name = f"int{bits}"

    def resolve(self, options: dict, given: dict) -> dict:
        group_size = _int("group_size", options["group_size"], 1, allow_minus_one=True)
        return {"group_size": group_size, "symmetric": bool(options["symmetric"])}

    def encode(self, delta: torch.Tensor, options: dict, threshold=None):
        q = quantize_uniform(delta, self.bits, group_size=options["group_size"],
                             symmetric=options["symmetric"])
        return q.stored_tensors(), {"bits": q.bits, "group_size": q.group_size,
                                    "symmetric": q.symmetric}

    def apply(self, weight: torch.Tensor, parts: dict, meta: dict) -> None:
        bits, group_size = int(meta["bits"]), int(meta["group_size"])
        if bits != self.bits:
            raise CheckpointError(f"an {self.name} entry records {bits} bits")
        scales = parts["scales"]
        zeros = parts.get("zeros")
        if zeros is None:
            if not meta["symmetric"]:
                raise CheckpointError(f"an asymmetric {self.name} entry needs its zero points")
            # symmetric zero points are the constant 2^(bits-1), not stored (as QuantizedDelta.save)
            zeros = torch.full(scales.shape, 1 << (bits - 1), dtype=torch.uint8, device=scales.device)
        apply_delta_(weight, QuantizedDelta(weight.shape, bits, group_size, parts["packed"], scales,
                                            zeros, symmetric=bool(meta["symmetric"])))


class LowRankFormat:
    """Truncated SVD (or randomized SVD) factors ``lora_B @ lora_A`` of each delta."""

    name = "lowrank"
    option_names = ("rank", "method", "values_dtype", "seed")
    defaults = {"rank": 16, "method": "svd", "values_dtype": None, "seed": 0}

    def resolve(self, options: dict, given: dict) -> dict:
        _int("rank", options["rank"], 1)
        _choice("method", options["method"], ("svd", "randomized"))
        if "seed" in given and options["method"] != "randomized":
            raise CheckpointError("--seed applies to --method randomized only")
        _int("seed", options["seed"], 0)
        return options

    def encode(self, delta: torch.Tensor, options: dict, threshold=None):
        # the input dimension is the last one (as the low-bit formats): [out, in] for a matrix
        matrix = delta.reshape(-1, delta.shape[-1])
        rank = min(options["rank"], *matrix.shape)
        extra = {"seed": options["seed"]} if options["method"] == "randomized" else {}
        factors = low_rank(matrix, rank, method=options["method"], dtype=options["values_dtype"],
                           **extra)
        return ({"lora_A": factors.lora_A, "lora_B": factors.lora_B},
                {"rank": rank, "method": options["method"],
                 "relative_error": float(factors.relative_error)})

    def apply(self, weight: torch.Tensor, parts: dict, meta: dict) -> None:
        factors = LowRankDelta(parts["lora_A"], parts["lora_B"])
        factors.apply_(weight.view(-1, weight.shape[-1]))


FORMATS = {f.name: f for f in (SignFormat(), TernaryFormat(), UniformFormat(4), UniformFormat(2),
                               LowRankFormat())}
