"""Tolerance table: how close each kind of result must be to the reference, and why.

* ``exact``: masks, selections, histograms, keep decisions, packed codes and
  every op whose arithmetic is pinned by the spec (the sparse family rounds
  at the same points on every backend: no FMA, correctly rounded fp32
  division, one round-to-nearest-even to the output dtype). Compared bit for
  bit, NaN equal to NaN whatever its payload.
* ``ulps(n)``: fused float arithmetic whose summation order may legitimately
  differ between backends (reductions inside merges, matmuls); bounded in
  units in the last place of the output dtype, never a loose atol.
"""

import torch

EXACT = "exact"

# Output ulp bounds for arithmetic whose order is not pinned (used by later families).
ULPS = {torch.float32: 4, torch.bfloat16: 1, torch.float16: 1}


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a tensor's bits (bool and integer tensors as they are)."""
    if t.dtype in (torch.float32,):
        return t.view(torch.int32)
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16)
    return t


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Same dtype, shape and bits; NaNs must sit in the same places (payload free)."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    if actual.is_floating_point():
        nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
        assert torch.equal(nan_a, nan_e), f"{what}: NaN positions differ"
        actual = torch.where(nan_a, torch.zeros((), dtype=actual.dtype), actual)
        expected = torch.where(nan_e, torch.zeros((), dtype=expected.dtype), expected)
    differ = bits(actual).reshape(-1) != bits(expected).reshape(-1)
    if bool(differ.any()):
        first = int(differ.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(differ.sum())} of {differ.numel()} elements differ; first at flat index "
            f"{first}: got {actual.reshape(-1)[first].item()!r}, expected {expected.reshape(-1)[first].item()!r}")


def assert_within_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: int, what: str = "") -> None:
    """|actual - expected| <= ulps * ulp(expected) in the output dtype."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a, e = actual.double().cpu(), expected.double().cpu()
    ulp = torch.finfo(expected.dtype).eps * e.abs().clamp_min(torch.finfo(expected.dtype).tiny)
    excess = (a - e).abs() > ulps * ulp
    excess &= ~(torch.isnan(a) & torch.isnan(e)) & (a != e)
    assert not bool(excess.any()), f"{what}: {int(excess.sum())} elements beyond {ulps} ulp"
