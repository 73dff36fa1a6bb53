"""Exact k-th-largest magnitude selection from radix histograms.

The bit pattern of ``|x|`` orders like ``|x|``, so a histogram over it gives
the k-th largest magnitude without sorting: one pass for bf16/fp16 (15-bit
keys), two for fp32 (high 16 bits, then the low 16 bits inside the chosen
bucket). The result is a threshold key ``T`` and ``take_equal``, the number of
elements with key ``T`` to keep (the first ones in flat order, which is the
top-k tie rule). Histograms add, so the same code selects over many tensors at
once (a whole-model threshold) when given their summed histograms.

Backends without a fused ``topk_mask`` kernel use :func:`topk_mask_by_histogram`
with their own ``radix_histogram`` and ``threshold_mask``.
"""

from __future__ import annotations

from typing import Callable

import torch

from .reference.sparse import nan_key_floor

Histogram = Callable[[torch.Tensor, int, int], torch.Tensor]


def locate(histogram: torch.Tensor, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest key (1-based ``k``) and the count above that bin."""
    counts = histogram.to(torch.int64).flip(0).cumsum(0)
    position = int(torch.searchsorted(counts, torch.tensor([k], device=counts.device))[0])
    bin_index = histogram.numel() - 1 - position
    above = int(counts[position]) - int(histogram[bin_index])
    return bin_index, above


def has_nan(dtype: torch.dtype, level0: torch.Tensor, level1_of: Callable[[int], torch.Tensor]) -> bool:
    """Whether the keys counted by these histograms include a NaN."""
    floor = nan_key_floor(dtype)
    if dtype != torch.float32:
        return bool(level0[floor:].sum() > 0)
    # fp32: bucket 0x7F80 holds +inf (low bits 0) and NaNs (low bits != 0).
    if level0[(floor >> 16) + 1:].sum() > 0:
        return True
    return bool(level0[floor >> 16] > 0 and level1_of(floor >> 16)[1:].sum() > 0)


def threshold_from_histograms(dtype: torch.dtype, k: int, level0: torch.Tensor,
                              level1_of: Callable[[int], torch.Tensor]) -> tuple[int, int]:
    """``(T, take_equal)`` for the k largest keys (``1 <= k <= count``).

    ``level1_of(prefix)`` returns the fp32 level-1 histogram of that prefix;
    it is not called for 16-bit dtypes.
    """
    bucket, above = locate(level0, k)
    if dtype != torch.float32:
        return bucket, k - above
    low, above_low = locate(level1_of(bucket), k - above)
    return (bucket << 16) | low, k - above - above_low


def topk_mask_by_histogram(radix_histogram: Histogram, threshold_mask, x: torch.Tensor,
                           k: int) -> torch.Tensor:
    """Top-k mask of ``x`` from a backend's histogram and threshold-mask kernels."""
    if x.numel() == 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    level0 = radix_histogram(x, 0, 0)

    def level1_of(prefix: int) -> torch.Tensor:
        return radix_histogram(x, 1, prefix)

    if has_nan(x.dtype, level0, level1_of):
        raise ValueError("topk_mask: x contains NaN; magnitudes of NaN have no order")
    if k == 0:
        return torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    if k == x.numel():
        return torch.ones(x.shape, dtype=torch.bool, device=x.device)
    threshold, take_equal = threshold_from_histograms(x.dtype, k, level0, level1_of)
    return threshold_mask(x, threshold, take_equal)
