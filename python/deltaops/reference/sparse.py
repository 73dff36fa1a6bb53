"""Pure-torch reference of the sparse-delta family: the specification.

Every backend (C++ CPU, Triton, CUDA) is tested against these functions, and
benchmarks import them from here. They favour obviousness over speed.

Conventions shared by the whole family
--------------------------------------
* Supported element types: float32, bfloat16, float16.
* Magnitude key: the bit pattern of ``|x|`` read as an unsigned integer
  (``bits & 0x7FFF`` for 16-bit floats, ``bits & 0x7FFFFFFF`` for fp32). It
  orders like ``|x|``; NaN keys sort above inf.
* Top-k by magnitude keeps exactly ``k`` elements; among equal magnitudes the
  lowest flat (row-major) index wins, so results are deterministic and equal
  on every backend.
* Arithmetic is fp32 with the rounding points spelled out below, then one
  rounding (nearest, ties to even) to the output dtype.
* Random drops use Philox4x32-10 keyed by (seed, stream, flat index); see
  :mod:`deltaops.reference.philox`.
"""

from __future__ import annotations

import torch

from .philox import philox_uniform

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Number of histogram bins per radix level (see ``radix_histogram``).
HIST_BINS_16BIT = 1 << 15
HIST_BINS_FP32_LEVEL0 = 1 << 15
HIST_BINS_FP32_LEVEL1 = 1 << 16


def magnitude_keys(x: torch.Tensor) -> torch.Tensor:
    """int64 magnitude keys of ``x`` in flat order."""
    flat = x.contiguous().reshape(-1)
    if x.dtype == torch.float32:
        return flat.view(torch.int32).to(torch.int64) & 0x7FFFFFFF
    if x.dtype in (torch.bfloat16, torch.float16):
        return flat.view(torch.int16).to(torch.int64) & 0x7FFF
    raise TypeError(f"unsupported dtype {x.dtype}; expected one of {SUPPORTED_DTYPES}")


def nan_key_floor(dtype: torch.dtype) -> int:
    """Smallest magnitude key that encodes a NaN (all larger keys are NaN too)."""
    return {torch.float32: 0x7F800001, torch.bfloat16: 0x7F81, torch.float16: 0x7C01}[dtype]


def radix_histogram(x: torch.Tensor, level: int, prefix: int) -> torch.Tensor:
    """Histogram of magnitude keys, one radix level at a time (int64 counts).

    * bf16/fp16: ``level`` 0 only; 32768 bins, ``bin = key``.
    * fp32 level 0: 32768 bins, ``bin = key >> 16``.
    * fp32 level 1: 65536 bins, ``bin = key & 0xFFFF``, counting only the
      elements with ``key >> 16 == prefix``.

    Histograms add: summed over tensors (or processes) they select a k-th
    largest magnitude over all of them at once.
    """
    keys = magnitude_keys(x)
    if x.dtype != torch.float32:
        if level != 0:
            raise ValueError(f"16-bit inputs have one radix level, got level={level}")
        return torch.bincount(keys, minlength=HIST_BINS_16BIT)
    if level == 0:
        return torch.bincount(keys >> 16, minlength=HIST_BINS_FP32_LEVEL0)
    if level == 1:
        selected = keys[(keys >> 16) == prefix]
        return torch.bincount(selected & 0xFFFF, minlength=HIST_BINS_FP32_LEVEL1)
    raise ValueError(f"fp32 inputs have radix levels 0 and 1, got level={level}")


def threshold_mask(x: torch.Tensor, threshold_key: int, take_equal: int) -> torch.Tensor:
    """``key > T``, plus the first ``take_equal`` elements (in flat order) with ``key == T``."""
    keys = magnitude_keys(x)
    equal = keys == threshold_key
    rank_among_equal = torch.cumsum(equal.to(torch.int64), 0) - 1
    mask = (keys > threshold_key) | (equal & (rank_among_equal < take_equal))
    return mask.reshape(x.shape)


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest ``|x|``; ties go to the lowest flat index.

    Specification by stable sort (the kernels select by histogram instead).
    NaN has no magnitude order and is rejected.
    """
    if not 0 <= k <= x.numel():
        raise ValueError(f"k must be in [0, {x.numel()}], got {k}")
    if torch.isnan(x).any():
        raise ValueError("topk_mask: x contains NaN; magnitudes of NaN have no order")
    keys = magnitude_keys(x)
    order = torch.sort(keys, descending=True, stable=True).indices
    mask = torch.zeros(x.numel(), dtype=torch.bool, device=x.device)
    mask[order[:k]] = True
    return mask.reshape(x.shape)


def philox_uniform_like(x: torch.Tensor, seed: int, stream: int = 0) -> torch.Tensor:
    """fp32 uniforms in [0, 1), shaped like ``x``, keyed by (seed, stream, flat index)."""
    return philox_uniform(x.numel(), seed, stream, device=x.device).reshape(x.shape)


def dare(delta: torch.Tensor, density: float, seed: int, stream: int = 0,
         rescale: bool = True) -> torch.Tensor:
    """DARE drop-and-rescale (Yu et al. 2024, "Language Models are Super Mario").

    ``keep_i = u_i < fp32(density)`` with ``u_i`` the Philox uniform of element
    i; ``out_i = fp32(delta_i) / fp32(density)`` (correctly rounded fp32
    division, as PEFT's ``random_pruning`` divides) if kept and ``rescale``,
    ``delta_i`` if kept without rescale, ``+0.0`` if dropped; then rounded to
    ``delta.dtype``.
    """
    density32 = torch.tensor(density, dtype=torch.float32, device=delta.device)
    keep = philox_uniform_like(delta, seed, stream) < density32
    values = delta.float()
    if rescale:
        values = values / density32
    return torch.where(keep, values, torch.zeros((), device=delta.device)).to(delta.dtype)


def dare_out_(delta: torch.Tensor, density: float, seed: int, stream: int, rescale: bool,
              out: torch.Tensor) -> None:
    """:func:`dare` written into ``out`` (delta's dtype and shape; ``out`` may be ``delta``)."""
    out.copy_(dare(delta, density, seed, stream, rescale))


# ---- applying deltas -----------------------------------------------------------


def _apply_values(old: torch.Tensor, delta: torch.Tensor, alpha: float) -> torch.Tensor:
    """``round(fp32(old) + fp32(fp32(alpha) * fp32(delta)))``: no fused multiply-add."""
    alpha32 = torch.tensor(alpha, dtype=torch.float32, device=old.device)
    scaled = delta.float() * alpha32
    return (old.float() + scaled).to(old.dtype)


def apply_dense_(weight: torch.Tensor, delta: torch.Tensor, alpha: float) -> None:
    """In place ``weight += alpha * delta`` (same shape), fp32 math, one rounding."""
    weight.copy_(_apply_values(weight, delta, alpha))


def validate_coo_indices(indices: torch.Tensor, numel: int, nvalues: int | None = None) -> None:
    """Raise ``ValueError`` unless ``indices`` are strictly increasing and in ``[0, numel)``.

    ``nvalues``, if given, must equal ``indices.numel()``.
    """
    flat = indices.reshape(-1)
    if nvalues is not None and flat.numel() != nvalues:
        raise ValueError(f"{flat.numel()} indices but {nvalues} values")
    if flat.numel() == 0:
        return
    if flat.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32 or int64, got {flat.dtype}")
    low, high = int(flat.min()), int(flat.max())
    if low < 0 or high >= numel:
        bad = int(torch.nonzero((flat < 0) | (flat >= numel))[0, 0])
        raise ValueError(f"index {int(flat[bad])} at position {bad} is out of "
                         f"range [0, {numel})")
    if flat.numel() > 1:
        steps = flat[1:] > flat[:-1]
        if not bool(steps.all()):
            bad = int(torch.nonzero(~steps)[0, 0]) + 1
            raise ValueError(f"indices must be strictly increasing; index "
                             f"{int(flat[bad])} at position {bad} follows {int(flat[bad - 1])}")


def _popcount_u8(packed: torch.Tensor) -> torch.Tensor:
    """Per-byte popcount of a uint8 tensor (uint8 result, no wider temporaries)."""
    x = packed - ((packed >> 1) & 0x55)
    x = (x & 0x33) + ((x >> 2) & 0x33)
    return (x + (x >> 4)) & 0x0F


def validate_bitmask_layout(packed: torch.Tensor, numel: int) -> None:
    """``ValueError`` unless ``packed`` has ``ceil(numel / 8)`` bytes and zero padding bits."""
    flat = packed.reshape(-1)
    if flat.dtype != torch.uint8:
        raise ValueError(f"packed mask must be uint8, got {flat.dtype}")
    expected = (numel + 7) // 8
    if flat.numel() != expected:
        raise ValueError(f"packed mask has {flat.numel()} bytes; "
                         f"{numel} elements need {expected}")
    tail = numel % 8
    if tail and int(flat[-1]) >> tail:
        raise ValueError(f"padding bits of the last mask byte must be zero "
                         f"(byte {int(flat[-1]):#04x}, {tail} valid bits)")


def validate_bitmask(packed: torch.Tensor, numel: int, nvalues: int) -> None:
    """Layout check plus ``popcount(packed) == nvalues``, all with torch ops."""
    validate_bitmask_layout(packed, numel)
    count = int(_popcount_u8(packed.reshape(-1)).sum(dtype=torch.int64)) if numel else 0
    if count != nvalues:
        raise ValueError(f"mask has {count} set bits but {nvalues} values")


def apply_coo_(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
               alpha: float) -> None:
    """In place ``weight.flat[indices] += alpha * values``; indices strictly increasing.

    The indices are validated before anything is written.
    """
    validate_coo_indices(indices, weight.numel(), values.numel())
    flat = weight.reshape(-1).clone()
    index = indices.to(torch.int64)
    flat[index] = _apply_values(flat[index], values, alpha)
    weight.copy_(flat.reshape(weight.shape))


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean mask (flat order) into uint8, least significant bit first.

    Element ``i`` is bit ``i % 8`` of byte ``i // 8``; the last byte is padded
    with zero bits.
    """
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    return (flat.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: a flat bool tensor of ``numel`` elements."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:numel].to(torch.bool)


def apply_bitmask_(weight: torch.Tensor, packed_mask: torch.Tensor, values: torch.Tensor,
                   alpha: float) -> None:
    """In place add of ``values`` (in flat order of the set bits) where the mask is set.

    The mask is validated before anything is written.
    """
    validate_bitmask(packed_mask, weight.numel(), values.numel())
    mask = unpack_mask(packed_mask, weight.numel())
    indices = mask.nonzero().reshape(-1)
    apply_coo_(weight, indices, values, alpha)


# ---- sparsification (mergekit's sparsify semantics) ------------------------------


def magnitude_k(density: float, numel: int) -> int:
    """mergekit's ``magnitude``: ``max(1, int(density * numel))`` for density in (0, 1)."""
    if density >= 1:
        return numel
    if density <= 0 or numel == 0:
        return 0
    return max(1, int(density * numel))


def outlier_band(density: float, gamma: float, numel: int) -> tuple[int, int]:
    """mergekit's ``magnitude_outliers`` band: (number dropped from the top, number kept).

    ``target = int(density * n)``, ``top = int(gamma * n)``; the outlier drop
    shrinks when needed so that ``target`` elements remain.
    """
    target = int(density * numel)
    n_top = int(gamma * numel)
    n_bottom = max(0, numel - target - n_top)
    return numel - n_bottom - target, target


def della_keep_probability(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MAGPRUNE probabilities (Deep et al. 2024), per row as mergekit ranks them.

    Ranks run along dim 1 (a 1-D tensor is one row) in ascending magnitude,
    ``r = 1..n``, ties ordered as in top-k (the lower index ranks higher);
    ``p = fp32(density - epsilon) + fp32((r - 1) / (n - 1)) * fp32(2 * epsilon)``
    (a row of one element gets ``density``).
    """
    x = delta.unsqueeze(0) if delta.dim() < 2 else delta
    rows = x.movedim(1, -1)
    n = rows.shape[-1]
    keys = magnitude_keys(rows).reshape(rows.shape)
    position = torch.sort(keys, dim=-1, descending=True, stable=True).indices.argsort(dim=-1)
    if n > 1:
        rank_norm = (n - 1 - position).to(torch.float32) / float(n - 1)
    else:
        rank_norm = torch.full(rows.shape, 0.5, dtype=torch.float32, device=delta.device)
    low = torch.tensor(density - epsilon, dtype=torch.float32, device=delta.device)
    width = torch.tensor(2 * epsilon, dtype=torch.float32, device=delta.device)
    probability = low + rank_norm * width
    return probability.movedim(-1, 1).reshape(delta.shape)


def rescale_to_norm(original: torch.Tensor, masked: torch.Tensor, norm: str,
                    eps: float = 1e-7) -> torch.Tensor:
    """mergekit's ``rescaled_masked_tensor``: scale ``masked`` so its norm matches ``original``.

    Norms in fp32; no rescale when either norm is below ``eps``.
    """
    a, b = original.float(), masked.float()
    if norm == "l1":
        before, after = a.abs().sum(), b.abs().sum()
    elif norm == "l2":
        before, after = a.norm(), b.norm()
    elif norm == "linf":
        before, after = a.abs().max(), b.abs().max()
    else:
        raise ValueError(f"unknown norm {norm!r}")
    if before < eps or after < eps:
        return masked
    return (b * (before / after)).to(masked.dtype)


def sparsify(delta: torch.Tensor, density: float, method: str = "magnitude", *,
             seed: int = 0, rescale: str | None = None, gamma: float = 0.01,
             epsilon: float = 0.15) -> torch.Tensor:
    """Sparsify a delta, with mergekit's ``sparsify`` semantics for the shared names.

    Methods:
      * ``magnitude``: keep the ``magnitude_k(density, n)`` largest ``|x|``.
      * ``random``: keep each element with probability ``density`` (Philox,
        stream 0; mergekit's ``bernoulli``).
      * ``magnitude_outliers`` (Model Breadcrumbs, Davari & Belilovsky 2024):
        drop the top ``gamma`` fraction, keep the next ``int(density * n)``.
      * ``della`` (DELLA-Merging, Deep et al. 2024; mergekit's
        ``della_magprune``): keep with the rank-dependent probability of
        :func:`della_keep_probability`; requires ``density +- epsilon`` in (0, 1).

    ``rescale``: ``None``; ``"density"`` divides the kept values by their keep
    probability (DARE, PEFT; for ``della`` the per-element ``p``, as in the
    DELLA paper; for deterministic methods ``density``); ``"l1"``, ``"l2"``,
    ``"linf"`` restore the norm of the input (mergekit's ``rescale_norm``).

    ``density >= 1`` returns the input unchanged and ``density <= 0`` zeros,
    as mergekit does.
    """
    if density >= 1:
        return delta.clone()
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    numel = delta.numel()
    keep_probability = None
    if method == "magnitude":
        keep = topk_mask(delta, magnitude_k(density, numel))
    elif method == "random":
        keep = philox_uniform_like(delta, seed) < torch.tensor(density, dtype=torch.float32)
    elif method == "magnitude_outliers":
        n_drop, n_keep = outlier_band(density, gamma, numel)
        keep = topk_mask(delta, n_drop + n_keep) & ~topk_mask(delta, n_drop)
    elif method == "della":
        if not (0 < density - epsilon and density + epsilon < 1):
            raise ValueError("della: epsilon must leave density +- epsilon inside (0, 1)")
        keep_probability = della_keep_probability(delta, density, epsilon)
        keep = philox_uniform_like(delta, seed) < keep_probability
    else:
        raise ValueError(f"unknown sparsify method {method!r}")

    zero = torch.zeros((), dtype=delta.dtype, device=delta.device)
    masked = torch.where(keep, delta, zero)
    if rescale is None:
        return masked
    if rescale == "density":
        divisor = keep_probability if keep_probability is not None else torch.tensor(
            density, dtype=torch.float32, device=delta.device)
        return torch.where(keep, delta.float() / divisor, 0.0).to(delta.dtype)
    return rescale_to_norm(delta, masked, rescale)
