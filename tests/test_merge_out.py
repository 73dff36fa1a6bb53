"""``deltaops.merge_tensors(..., out=)``: the merge written into a caller's buffer.

The result in ``out`` is bit-identical to the allocating call on every backend
(reference, cpu, and triton under ``TRITON_INTERPRET=1``), ``out`` may be the
base or one of the models (an in-place merge), and every bad ``out`` is
rejected before anything is written to it.
"""

from __future__ import annotations

import pytest
import torch

import deltaops
from deltaops.reference import merge as ref

from backend_harness import run_on, skip_unless_usable
from tolerances import assert_bitwise_equal

# one method of each kernel path: the dense register mix, magnitude trims with
# sign election, random drops, the outlier band, linear, and a reference-only method
CASES = [
    ("task_arithmetic", {"lambda_": 0.7}),
    ("ties", {"density": 0.4}),
    ("dare_linear", {"density": 0.5, "seed": 3, "rescale": "density"}),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.1}),
    ("linear", {}),
    ("della", {"density": 0.5, "epsilon": 0.1, "seed": 3}),
]
BACKENDS = ["reference", "cpu", "triton"]


def inputs(shape, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) + 2.0).to(dtype)
    models = [(base.float() + torch.randn(shape, generator=g) * 0.05).to(dtype) for _ in range(n)]
    return base, models


def weights(n):
    return [0.4 + 0.3 * i for i in range(n)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method,opts", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype,out_dtype", [(torch.bfloat16, torch.bfloat16),
                                             (torch.float16, torch.float32),
                                             (torch.float32, torch.bfloat16)], ids=str)
def test_out_matches_the_allocating_call(backend, method, opts, dtype, out_dtype):
    skip_unless_usable(backend)
    base, models = inputs((7, 300), 3, dtype)
    w = weights(3)
    expected = run_on(backend, deltaops.merge_tensors, base, models, method, weights=w,
                      out_dtype=out_dtype, **opts)
    out = torch.full(base.shape, float("nan"), dtype=out_dtype)
    got = run_on(backend, deltaops.merge_tensors, base, models, method, weights=w, out=out, **opts)
    assert got is out
    assert_bitwise_equal(out, expected, f"{method} out= on {backend}")
    # out_dtype may be given too, if it names out's dtype
    out2 = torch.empty(base.shape, dtype=out_dtype)
    run_on(backend, deltaops.merge_tensors, base, models, method, weights=w, out=out2,
           out_dtype=out_dtype, **opts)
    assert_bitwise_equal(out2, expected, f"{method} out= and out_dtype on {backend}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method,opts", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("target", ["base", "models[1]"])
def test_in_place_into_an_input(backend, method, opts, target):
    """out=base (or a model): each element is written after its inputs are read."""
    skip_unless_usable(backend)
    # several CPU chunks (16384 elements) and Triton blocks, so passes cross them
    base, models = inputs((3, 20011) if backend != "triton" else (5, 300), 3, torch.bfloat16,
                          seed=5)
    w = weights(3)
    expected = run_on(backend, deltaops.merge_tensors, base, models, method, weights=w, **opts)
    out = base if target == "base" else models[1]
    got = run_on(backend, deltaops.merge_tensors, base, models, method, weights=w, out=out, **opts)
    assert got is out
    assert_bitwise_equal(out, expected, f"{method} in place into {target} on {backend}")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("method", ["ties", "linear", "della"])
def test_bad_out_is_rejected_before_any_write(backend, method):
    skip_unless_usable(backend)
    base, models = inputs((6, 10), 2, torch.bfloat16)
    opts = {"density": 0.5, "seed": 1} if method != "linear" else {}
    cases = [
        ("a list", TypeError, "out must be a torch.Tensor"),
        (torch.empty(base.shape, dtype=torch.float64), TypeError, "out has dtype"),
        (torch.empty((10, 6), dtype=base.dtype), ValueError, "shape"),
        (torch.empty((10, 6), dtype=base.dtype).t(), ValueError, "contiguous"),
    ]
    # memory that partially overlaps an input: a window of base shifted by one element
    storage = torch.empty(base.numel() + 1, dtype=base.dtype)
    storage[: base.numel()] = base.view(-1)
    shifted_base = storage[: base.numel()].view(base.shape)
    window = storage[1:].view(base.shape)
    cases.append((window, ValueError, "partially overlaps base"))
    for out, error, pattern in cases:
        before = out.clone() if isinstance(out, torch.Tensor) else None
        with pytest.raises(error, match=pattern):
            run_on(backend, deltaops.merge_tensors, shifted_base, models, method, out=out, **opts)
        if before is not None:
            assert_bitwise_equal(out, before, f"{method}: out written before the error")
    # out_dtype naming another dtype than out's
    out = torch.zeros(base.shape, dtype=torch.float32)
    with pytest.raises(TypeError, match="out_dtype"):
        run_on(backend, deltaops.merge_tensors, base, models, method, out=out,
               out_dtype=torch.bfloat16, **opts)
    assert not out.any()
    # an error of the merge itself (a NaN delta) leaves out untouched too
    if method != "linear":
        models[1][0, 0] = float("nan")
        out = torch.zeros(base.shape, dtype=base.dtype)
        with pytest.raises(ValueError, match="NaN"):
            run_on(backend, deltaops.merge_tensors, base, models, "ties", density=0.5, out=out)
        assert not out.any()


def test_kernel_entry_points_check_out():
    """deltaops._C's out ops check out themselves (callers may skip the Python layer)."""
    skip_unless_usable("cpu")
    import deltaops._C as C

    base, models = inputs((4, 8), 2, torch.float32)
    storage = torch.empty(33)
    storage[:32] = base.view(-1)
    base = storage[:32].view(4, 8)
    args = (base, models, "ties", [1.0, 1.0], [0.5, 0.5], [0.01, 0.01], 1.0, True, "", "sum", 0, [])
    with pytest.raises(ValueError, match="shape"):
        C.merge_sign_elect_out_(*args, torch.empty(3, 8))
    with pytest.raises(ValueError, match="partially overlaps"):
        C.merge_sign_elect_out_(*args, storage[1:].view(4, 8))
    with pytest.raises(TypeError):
        C.merge_linear_out_(models, [1.0, 1.0], True, torch.empty(4, 8, dtype=torch.float64))
    out = torch.empty(4, 8, dtype=torch.bfloat16)
    C.merge_linear_out_(models, [1.0, 1.0], True, out)
    assert_bitwise_equal(out, ref.merge_tensors(base, models, "linear", weights=[1.0, 1.0],
                                                out_dtype=torch.bfloat16), "merge_linear_out_")
