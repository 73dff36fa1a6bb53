"""The Triton kernel of the fused merge (deltaops.triton_kernels.merge) against the CPU
kernel and the reference.

``deltaops.merge_tensors`` under ``use_backend("triton")`` runs the custom op
``deltaops::merge_sign_elect`` on the Triton kernel; here on CPU tensors under
``TRITON_INTERPRET=1`` (small shapes: the interpreter is slow).

Exactness: bit-identical to ``deltaops._C.merge_sign_elect`` and to
:func:`deltaops.reference.merge.merge_tensors` for every fused method, dtype
and option (NaN positions equal, payload free), with one exception: a norm
rescale (``l1``/``l2``, the default of dare_*) takes its factor from sums of
the elements whose order differs (reference: torch fp32 reductions; CPU:
fp64 sums per 16384-element chunk; Triton: fp64 sums per program, added
exactly), so those results are compared within :data:`tolerances.ULPS`
(4 ulp fp32, 1 ulp bf16/fp16) with |base| >= 1, so that no cancellation
magnifies the factor's last bit. ``linf`` (a max) is exact.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import deltaops
from deltaops import backends
from deltaops.ops import merge as ops_merge
from deltaops.reference import merge as ref

from backend_harness import run_on, skip_unless_usable
from tolerances import ULPS, assert_bitwise_equal, assert_within_ulps

METHODS = ops_merge.GPU_FUSED_METHODS  # della* run the reference on triton
CONSENSUS = ("ties", "dare_ties", "breadcrumbs_ties")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SEED = 1234

# The interpreter computes in numpy, which warns on IEEE overflow / inf - inf.
pytestmark = pytest.mark.filterwarnings(
    "ignore:overflow encountered:RuntimeWarning",
    "ignore:invalid value encountered:RuntimeWarning",
    "ignore:divide by zero encountered:RuntimeWarning",
)


@pytest.fixture(autouse=True)
def _triton_backend():
    skip_unless_usable("triton")


def _triton_merge():
    from deltaops.triton_kernels import merge

    return merge


def inputs(shape, n, dtype, *, seed=0, scale=0.02):
    """|base| in [1, 2); deltas ~ scale, some exactly zero, some of equal magnitude."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    base = (sign * (1 + torch.rand(shape, generator=g))).to(dtype)
    models = []
    for _ in range(n):
        d = torch.randn(shape, generator=g) * scale
        d = torch.where(torch.rand(shape, generator=g) < 0.1, 0.0, d)      # unchanged elements
        d = torch.where(torch.rand(shape, generator=g) < 0.1, -scale, d)   # equal magnitudes
        models.append((base.float() + d).to(dtype))
    return base, models


def norm_rescaled(method, options) -> bool:
    rescale = options.get("rescale")
    if rescale is None:
        rescale = method in ("dare_ties", "dare_linear")
    density = options.get("density", 1.0)
    all_dense_or_zero = all(d in (0.0, 1.0) for d in
                            (density if isinstance(density, (list, tuple)) else [density]))
    return rescale in ("l1", "l2", True) and not all_dense_or_zero


def check(base, models, method, what, **options):
    """Triton against the CPU kernel and the reference (bit for bit, or ulps for l1/l2)."""
    expected = ref.merge_tensors(base, models, method, **options)
    actual = run_on("triton", deltaops.merge_tensors, base, models, method, **options)
    cpu = run_on("cpu", deltaops.merge_tensors, base, models, method, **options)
    if norm_rescaled(method, options):
        assert_within_ulps(actual, expected, ULPS[expected.dtype], f"{what} vs reference")
        assert_within_ulps(actual, cpu, ULPS[expected.dtype], f"{what} vs cpu")
    else:
        assert_bitwise_equal(actual, expected, f"{what} vs reference")
        assert_bitwise_equal(actual, cpu, f"{what} vs cpu")
    return actual


def method_options(method, n, density, weights):
    options = {"weights": weights}
    if method != "task_arithmetic":
        options["density"] = density
    if method.startswith("dare"):
        options["seed"] = SEED
    if method.startswith("breadcrumbs"):
        options["gamma"] = 0.05
    return options


# ---- routing -------------------------------------------------------------------------------


def test_triton_backend_runs_the_op():
    merge = _triton_merge()
    for name in merge.__all__:
        assert backends.get("triton").table[name] is getattr(merge, name)
    with deltaops.use_backend("triton"):
        assert backends.resolve("merge_sign_elect", "cpu") is merge.merge_sign_elect


def test_methods_without_a_triton_kernel_run_the_reference():
    """della has no Triton kernel: the triton backend runs its reference."""
    base, models = inputs((6, 7), 3, torch.bfloat16)
    opts = {"density": 0.5, "seed": SEED}
    expected = ref.merge_tensors(base, models, "della", **opts)
    assert_bitwise_equal(run_on("triton", deltaops.merge_tensors, base, models, "della", **opts),
                         expected, "della")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("block_size", [None, 64])
def test_linear_matches_cpu_and_reference(n, dtype, block_size):
    """linear's kernel (fma accumulation in model order, torch's fp32 weight sum as
    divisor, one rounding): bit-identical to the reference and the CPU kernel."""
    merge = _triton_merge()
    base, models = inputs((13, 37), n, dtype, seed=n)
    for weights, normalize, out_dtype in (([0.3 + 0.37 * i for i in range(n)], None, None),
                                          ([1.0, -0.25, 0.6, 0.1, 2.0][:n], False, torch.float32),
                                          (0.7, True, torch.bfloat16)):
        opts = {"weights": weights, "normalize": normalize, "out_dtype": out_dtype}
        expected = ref.merge_tensors(base, models, "linear", **opts)
        what = f"linear n={n} {dtype} {weights} {normalize}"
        assert_bitwise_equal(run_on("triton", deltaops.merge_tensors, base, models, "linear",
                                    **opts), expected, what)
        assert_bitwise_equal(run_on("cpu", deltaops.merge_tensors, base, models, "linear", **opts),
                             expected, what + " (cpu)")
        w, norm = ref.linear_options(n, weights, normalize)
        name = {None: dtype, torch.float32: torch.float32, torch.bfloat16: torch.bfloat16}
        direct = merge.merge_linear(models, w, norm, str(name[out_dtype]).replace("torch.", ""),
                                    block_size=block_size)
        assert_bitwise_equal(direct, expected, what + f" block {block_size}")
    with deltaops.use_backend("triton"):
        assert backends.resolve("merge_linear", "cpu") is merge.merge_linear


def test_cuda_backend_on_cpu_tensors_raises():
    base, models = inputs((4, 5), 2, torch.float32)
    with pytest.raises(backends.BackendUnavailableError, match="cuda"):
        run_on("cuda", deltaops.merge_tensors, base, models, "ties", density=0.5)


def test_triton_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    base, models = inputs((4, 5), 2, torch.float32)
    with pytest.raises(backends.BackendUnavailableError, match="TRITON_INTERPRET"):
        run_on("triton", deltaops.merge_tensors, base, models, "ties", density=0.5)


# ---- every method, dtype, N ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("method", METHODS)
def test_methods_match_cpu_and_reference(method, n, dtype):
    """Per-model densities mixing 0, 1 and fractions; scalar or per-model weights."""
    base, models = inputs((29, 37), n, dtype, seed=n)
    density = [0.3, 1.0, 0.0, 0.6][:n] if n > 1 else 0.4
    weights = 0.7 if n % 2 else [1.0, -0.5, 0.75, 0.25][:n]
    check(base, models, method, f"{method} n={n} {dtype}",
          **method_options(method, n, density, weights))


@pytest.mark.parametrize("density", [0.0, 1.0])
@pytest.mark.parametrize("method", [m for m in METHODS if m != "task_arithmetic"])
def test_density_zero_and_one(method, density):
    base, models = inputs((13, 17), 3, torch.bfloat16, seed=5)
    check(base, models, method, f"{method} density={density}",
          **method_options(method, 3, density, [1.0, 0.5, -0.25]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", CONSENSUS)
def test_sign_count(method, dtype):
    base, models = inputs((23, 19), 4, dtype, seed=7)
    opts = method_options(method, 4, 0.5, [1.0, -0.5, 0.75, 1.0])
    check(base, models, method, f"{method} count", sign_method="count", **opts)


@pytest.mark.parametrize("method", METHODS)
def test_options(method):
    """normalize flipped, lambda_, out_dtype, cancelling and zero weights."""
    base, models = inputs((3, 7, 11), 3, torch.float16, seed=3)
    spec = ref.TASK_ARITHMETIC[method]
    for weights, out_dtype in (([1.0, -1.0, 0.5], torch.float32), ([1.0, -1.0, 0.0], torch.bfloat16),
                               (0.7, torch.float16)):
        opts = method_options(method, 3, 0.5, weights)
        opts.update(lambda_=0.8, normalize=not spec.normalize, out_dtype=out_dtype)
        check(base, models, method, f"{method} weights={weights} -> {out_dtype}", **opts)


@pytest.mark.parametrize("rescale", ["l1", "l2", "linf", "density", False])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "breadcrumbs"])
def test_rescale(method, rescale):
    base, models = inputs((19, 23), 3, torch.float32, seed=2)
    opts = method_options(method, 3, [0.3, 0.6, 0.9], 1.0)
    check(base, models, method, f"{method} rescale={rescale}", rescale=rescale, **opts)


def test_norm_rescale_factor_matches_cpu_closely():
    """The l1 factor comes from fp64 sums in both kernels: results within 1 ulp in fp32
    (the bound is 4 ulp against the reference's fp32 reductions)."""
    base, models = inputs((64, 65), 2, torch.float32, seed=8)
    opts = {"density": 0.4, "seed": SEED}
    t = run_on("triton", deltaops.merge_tensors, base, models, "dare_ties", **opts)
    c = run_on("cpu", deltaops.merge_tensors, base, models, "dare_ties", **opts)
    assert_within_ulps(t, c, 1, "dare_ties l1")


# ---- thresholds ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_thresholds(dtype):
    """Whole-model thresholds: (key, take) pairs, bare keys, None entries, a split take."""
    shapes = [(13, 17), (7, 61)]
    tensors = [inputs(s, 3, dtype, seed=s[0]) for s in shapes]
    per_model = []
    for i in range(3):
        deltas = [m[i].float() - b.float() for b, m in tensors]
        k = ref.magnitude_k(0.3, sum(d.numel() for d in deltas))
        per_model.append(ref.topk_thresholds(deltas, k))
    for t, (base, models) in enumerate(tensors):
        pairs = [per_model[i][t] for i in range(3)]
        check(base, models, "ties", "ties pairs", thresholds=pairs)
        check(base, models, "ties", "ties keys", thresholds=[pairs[0][0], None, pairs[2][0]],
              density=0.5)
        key = int(ref.magnitude_keys(models[1].float() - base.float()).median())
        check(base, models, "ties", "ties split", thresholds=[None, (key, 3), (ref.KEY_NONE, 0)])


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_thresholds(method):
    base, models = inputs((7, 97), 2, torch.bfloat16, seed=5)
    entries = []
    for i in range(2):
        delta = models[i].float() - base.float()
        n_drop, n_keep = ref.outlier_band(0.3, 0.05, delta.numel())
        drop = ref.topk_thresholds([delta], n_drop)[0]
        keep = ref.topk_thresholds([delta], n_drop + n_keep)[0]
        entries.append((drop, keep))
    check(base, models, method, "pairs", thresholds=entries)
    check(base, models, method, "no drop",
          thresholds=[(None, entries[0][1]), (None, entries[1][1][0])])


@pytest.mark.parametrize("block_size", [8, 64, 4096])
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "dare_ties"])
def test_tiling_changes_nothing(method, block_size):
    """Equal-key ranks and Philox counters cross program boundaries at any tile size."""
    merge = _triton_merge()
    base, models = inputs((5, 211), 3, torch.bfloat16, seed=11, scale=0.01)
    args = (base, models, method, [1.0, 0.5, -0.75], [0.3, 0.5, 0.2], [0.05] * 3, 1.0, False,
            "density" if method == "dare_ties" else "", "sum", SEED, [], "bfloat16")
    import deltaops._C as C

    assert_bitwise_equal(merge.merge_sign_elect(*args, block_size=block_size),
                         C.merge_sign_elect(*args), f"block {block_size}")


# ---- special values --------------------------------------------------------------------------


def special_inputs(dtype, n=3, shape=(9, 13)):
    """inf and -inf in the models and the base (no NaN delta), +-0, zero deltas, huge deltas."""
    base, models = inputs(shape, n, dtype, seed=13)
    finfo = torch.finfo(dtype)
    base.view(-1)[:6] = torch.tensor([0.0, -0.0, -1.0, finfo.max, 1.0, float("inf")]).to(dtype)
    for i, m in enumerate(models):
        flat = m.view(-1)
        flat[:5] = base.view(-1)[:5]                       # zero deltas, +-0 bases
        flat[5] = 1.0                                      # -inf delta from an inf base
        flat[6 + i] = float("inf") if i % 2 == 0 else float("-inf")
        flat[10] = -finfo.max                              # a huge delta in every model
        flat[11 + i] = -0.0
    return base, models


@pytest.mark.parametrize("weights", [[1.0, -0.5, 0.75], -0.5], ids=["mixed", "negative"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_inf_and_zero_deltas(method, dtype, weights):
    """Negative weights make every term of a zero delta -0: the sums must start from the
    first term (not from +0), or base -0 + sum gives +0 where the reference has -0."""
    base, models = special_inputs(dtype)
    opts = method_options(method, 3, [0.5, 1.0, 0.4], weights)
    if method.startswith("dare"):
        opts["rescale"] = "density"  # l1 of an inf delta is inf: no rescale, nothing to bound
    check(base, models, method, f"{method} special {dtype}", **opts)


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_ties", "dare_linear"])
def test_nan_inputs_propagate(method):
    base, models = special_inputs(torch.float32)
    models[1].view(-1)[20] = float("nan")
    base.view(-1)[21] = float("nan")
    base.view(-1)[22] = float("inf")
    for m in models:
        m.view(-1)[22] = float("inf")                      # inf - inf: a NaN delta
    opts = method_options(method, 3, 0.5, 1.0)
    if method.startswith("dare"):
        opts["rescale"] = "density"
    out = check(base, models, method, f"{method} NaN", **opts)
    assert torch.isnan(out.view(-1)[21])


def test_nan_with_thresholds_given():
    base, models = special_inputs(torch.bfloat16)
    models[0].view(-1)[30] = float("nan")
    check(base, models, "ties", "NaN, thresholds", thresholds=[0x3C000000, None, (0x3C000000, 2)],
          density=1.0)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_nan_delta_raises_like_reference(method):
    base, models = inputs((4, 5), 2, torch.float32)
    models[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ref.merge_tensors(base, models, method, density=0.5)
    with pytest.raises(ValueError, match="NaN"):
        run_on("triton", deltaops.merge_tensors, base, models, method, density=0.5)


# ---- the op's own arguments, histograms ------------------------------------------------------


def test_empty_and_errors():
    merge = _triton_merge()
    base, models = inputs((0, 3), 2, torch.float32)
    assert run_on("triton", deltaops.merge_tensors, base, models, "ties", density=0.5).shape == (0, 3)
    base, models = inputs((4, 5), 2, torch.float32)
    ok = (base, models, "ties", [1.0, 1.0], [0.5, 0.5], [0.01, 0.01], 1.0, True, "", "sum", 0, [],
          "float32")

    def call(**change):
        names = ("base", "models", "method", "weights", "densities", "gammas", "lambda_",
                 "normalize", "rescale", "sign_method", "seed", "thresholds", "out_dtype")
        args = dict(zip(names, ok))
        args.update(change)
        return merge.merge_sign_elect(*[args[k] for k in names])

    for change, error in (({"models": []}, ValueError), ({"weights": [1.0]}, ValueError),
                          ({"thresholds": [1, 2, 3]}, ValueError),
                          ({"sign_method": "mass"}, ValueError), ({"seed": -1}, ValueError),
                          ({"models": [models[0].half(), models[1]]}, TypeError),
                          ({"models": [models[0][:2], models[1]]}, ValueError),
                          ({"out_dtype": "int8"}, TypeError), ({"method": "della"}, ValueError),
                          ({"rescale": "l3"}, ValueError),
                          ({"densities": [0.0, 0.5], "rescale": "density",
                            "thresholds": [5, -1, -1, 0, -1, 0, -1, 0]}, ValueError)):
        with pytest.raises(error):
            call(**change)
    with pytest.raises(ValueError):
        run_on("triton", deltaops.merge_tensors, base, models, "task_arithmetic", density=0.5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_delta_histogram_and_topk_match_cpu(dtype):
    import deltaops._C as C

    merge = _triton_merge()
    base, (model,) = inputs((31, 70), 1, dtype, seed=4)
    h0 = merge.merge_delta_histogram(base, model, 0, 0)
    assert torch.equal(h0, C.merge_delta_histogram(base, model, 0, 0))
    prefix = int(h0.nonzero()[-1])
    assert torch.equal(merge.merge_delta_histogram(base, model, 1, prefix),
                       C.merge_delta_histogram(base, model, 1, prefix))
    ks = [0, 1, 700, 1000, base.numel()]
    assert merge.merge_delta_topk(base, model, ks) == C.merge_delta_topk(base, model, ks)


def test_opcheck_on_triton():
    x = torch.randn(9, 11).bfloat16()
    args = (x, [x + 0.01, x - 0.02], "ties", [1.0, 0.5], [0.5, 0.3], [0.01, 0.01], 1.0, True, "",
            "sum", 0, [], "float32")
    with deltaops.use_backend("triton"):
        torch.library.opcheck(ops_merge.merge_sign_elect_op, args)
        torch.library.opcheck(ops_merge.merge_sign_elect_out_op, (*args[:-1], torch.empty(9, 11)))
        models = [x + 0.01, x - 0.02, x]
        torch.library.opcheck(ops_merge.merge_linear_op, (models, [1.0, 0.5, 0.25], True,
                                                          "bfloat16"))
        torch.library.opcheck(ops_merge.merge_linear_out_op, (models, [1.0, 0.5, 0.25], True,
                                                              torch.empty_like(x)))


# ---- the kernels compile for the GPU -----------------------------------------------------------


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia import compiler as nv  # noqa: F401
    except ImportError:
        return False
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return os.path.exists(path)


@pytest.mark.skipif(not _ptxas_available(), reason="triton's NVIDIA backend (ptxas) is missing")
@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_for_gpu(arch):
    """Ahead-of-time compile (no GPU needed) of every kernel to a cubin for sm_80 / sm_90.

    In a subprocess without TRITON_INTERPRET: under the interpreter the kernels
    are not compiled at all (the interpreter accepts code a GPU compile rejects).
    """
    code = ("from deltaops.triton_kernels.merge import compile_for_gpu\n"
            f"compiled = compile_for_gpu({arch})\n"
            "for name, kernel in compiled.items():\n"
            "    assert kernel.asm['cubin'], name\n"
            "    print(name, len(kernel.asm['cubin']))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "merge_ties_bf16" in done.stdout and "norm_l1" in done.stdout, done.stdout
