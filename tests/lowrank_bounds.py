"""Error bounds of the low-rank family (documented in reference/lowrank.py and the README).

A backend's result must lie within

    ulps * ulp_dtype(exact) + (terms + 2) * 2^-24 * magnitude

of the fp64 ``exact`` value, where ``magnitude`` is the sum of the absolute
values of everything added (``|w| + |scale| sum_k |B_ok A_ki|`` for a merge):
the first term is the final rounding to the output dtype, the second the fp32
accumulation of ``terms`` products in an order the spec leaves free. Where
nothing cancels, the second term is below one ulp of bf16/fp16 for the ranks
tested, so bf16 and fp16 results are within 1 ulp of the exact sum.
"""

import torch

FP32_UNIT = 2.0 ** -24


def ulp_of(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at fp64 ``values`` (eps * |x|, at least the subnormal step)."""
    info = torch.finfo(dtype)
    return info.eps * values.abs().clamp_min(info.tiny)


def assert_within_accumulation_bound(got: torch.Tensor, exact: torch.Tensor, magnitude: torch.Tensor,
                                     terms: int, ulps: float = 1.0, what: str = "") -> None:
    got64 = got.double().cpu()
    exact, magnitude = exact.double().cpu(), magnitude.double().cpu()
    bound = ulps * ulp_of(exact, got.dtype) + (terms + 2) * FP32_UNIT * magnitude
    error = (got64 - exact).abs()
    excess = error > bound
    if bool(excess.any()):
        first = int(excess.reshape(-1).nonzero()[0])
        raise AssertionError(
            f"{what}: {int(excess.sum())} of {excess.numel()} elements beyond the bound; first at "
            f"flat index {first}: got {got64.reshape(-1)[first].item()!r}, exact "
            f"{exact.reshape(-1)[first].item()!r}, bound {bound.reshape(-1)[first].item()!r}")
