"""The fused merge on CUDA tensors: the ``cuda`` backend (deltaops._C_cuda.merge_sign_elect,
merge_linear and their ``out=`` forms) and the ``triton`` backend (compiled, with ``TRITON_INTERPRET=0``) against the CPU kernel.

Runs only where torch sees a GPU (skipped on the CPU development machines,
where tests/test_merge_triton.py covers the Triton kernel under the
interpreter and .ci/cuda_build.sh proves the CUDA kernel compiles). Exactness
as there: bit-identical, except ``l1``/``l2`` norm rescales within
:data:`tolerances.ULPS`.
"""

from __future__ import annotations

import os

import pytest
import torch

import deltaops
from deltaops import backends
from deltaops.ops import merge as ops_merge

from backend_harness import run_on
from tolerances import ULPS, assert_bitwise_equal, assert_within_ulps
from test_merge_triton import SEED, inputs, method_options, norm_rescaled

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GPU_BACKENDS = ["cuda", "triton"]


def usable(backend: str) -> None:
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compiled Triton on the GPU needs TRITON_INTERPRET=0")
    if not backends.get(backend).usable:
        pytest.skip(f"backend {backend} unavailable: {backends.get(backend).reason}")


def check_gpu(backend, base, models, method, what, **options):
    expected = run_on("cpu", deltaops.merge_tensors, base, models, method, **options)
    actual = run_on(backend, deltaops.merge_tensors, base.cuda(), [m.cuda() for m in models],
                    method, **options).cpu()
    if norm_rescaled(method, options):
        assert_within_ulps(actual, expected, ULPS[expected.dtype], what)
    else:
        assert_bitwise_equal(actual, expected, what)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("method", ops_merge.GPU_FUSED_METHODS)
def test_methods_match_cpu(backend, method, n, dtype):
    usable(backend)
    base, models = inputs((97, 1031), n, dtype, seed=n)  # several tiles, odd tail
    density = [0.3, 1.0, 0.0, 0.6, 0.2, 0.5, 0.9, 0.1][:n] if n > 1 else 0.4
    options = method_options(method, n, density, 0.7 if n % 2 else [1.0, -0.5] * (n // 2))
    check_gpu(backend, base, models, method, f"{backend} {method} n={n} {dtype}", **options)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties"])
def test_sign_count_and_rescales(backend, method):
    usable(backend)
    base, models = inputs((64, 3001), 4, torch.bfloat16, seed=7)
    for extra in ({"sign_method": "count"}, {"rescale": "linf"}, {"rescale": "density"},
                  {"rescale": "l2"}):
        opts = method_options(method, 4, 0.3, [1.0, -0.5, 0.75, 1.0])
        check_gpu(backend, base, models, method, f"{backend} {method} {extra}", **opts, **extra)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_thresholds_and_nan(backend):
    usable(backend)
    base, models = inputs((33, 4099), 3, torch.float16, seed=3)
    thresholds = [(0x3C000000, 1000), None, 0x3B000000]
    check_gpu(backend, base, models, "ties", f"{backend} thresholds", thresholds=thresholds)
    models[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        run_on(backend, deltaops.merge_tensors, base.cuda(), [m.cuda() for m in models], "ties",
               density=0.5)
    check_gpu(backend, base, models, "dare_linear", f"{backend} NaN dare", density=0.5,
              rescale="density", seed=SEED)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 3, 8])
def test_linear_matches_cpu(backend, n, dtype):
    usable(backend)
    base, models = inputs((97, 1031), n, dtype, seed=n)
    for weights, normalize, out_dtype in (([0.3 + 0.37 * i for i in range(n)], None, None),
                                          ([1.0, -0.25] * (n // 2) + [0.5] * (n % 2), False,
                                           torch.float32),
                                          (0.7, True, torch.bfloat16)):
        check_gpu(backend, base, models, "linear", f"{backend} linear n={n} {dtype}",
                  weights=weights, normalize=normalize, out_dtype=out_dtype)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "linear"])
def test_out_and_in_place(backend, method):
    """out= into a fresh buffer and into the base (or a model, for linear) on the GPU."""
    usable(backend)
    base, models = inputs((33, 4099), 3, torch.bfloat16, seed=5)
    opts = {"density": 0.4} if method == "ties" else {}
    expected = run_on("cpu", deltaops.merge_tensors, base, models, method, **opts)
    gpu_base, gpu_models = base.cuda(), [m.cuda() for m in models]
    out = torch.empty_like(gpu_base)
    run_on(backend, deltaops.merge_tensors, gpu_base, gpu_models, method, out=out, **opts)
    assert_bitwise_equal(out.cpu(), expected, f"{backend} {method} out=")
    target = gpu_models[0] if method == "linear" else gpu_base
    run_on(backend, deltaops.merge_tensors, gpu_base, gpu_models, method, out=target, **opts)
    assert_bitwise_equal(target.cpu(), expected, f"{backend} {method} in place")
