"""The fused CPU merge kernel (deltaops._C.merge_sign_elect) against the reference.

``deltaops.merge_tensors`` routes task_arithmetic, ties, dare_ties,
dare_linear, breadcrumbs, breadcrumbs_ties, della and della_linear on CPU
tensors to the fused kernel (della in depth: test_merge_della.py);
:func:`deltaops.reference.merge.merge_tensors` is the specification.
Results are bit-exact, except with a norm rescale (``l1``/``l2``, the default
of dare_* and della*): the reference's norms are torch fp32 reductions whose summation
order is not pinned, the kernel's are double sums per fixed chunk, so the
scale factors may differ in the last fp32 bit; those results are compared
within :data:`tolerances.ULPS` (inputs keep |base| >= 1 so that no
cancellation magnifies the factor's last bit).
"""

from __future__ import annotations

import pytest
import torch

import deltaops
from deltaops import backends
from deltaops.ops import merge as ops_merge
from deltaops.reference import merge as ref

from backend_harness import run_on, skip_unless_usable
from tolerances import ULPS, assert_bitwise_equal, assert_within_ulps

METHODS = ops_merge.FUSED_METHODS
CONSENSUS = ("ties", "dare_ties", "breadcrumbs_ties", "della")
NORM_RESCALED = ("dare_ties", "dare_linear", "della", "della_linear")  # rescale defaults to l1
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SEED = 1234


@pytest.fixture(autouse=True)
def _cpu_backend():
    skip_unless_usable("cpu")


@pytest.fixture(params=[1, 2], ids=lambda t: f"threads{t}")
def threads(request):
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


def inputs(shape, n, dtype, *, seed=0, scale=0.02):
    """|base| in [1, 2); deltas ~ scale, some exactly zero, some repeated (ties in keys)."""
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    base = (sign * (1 + torch.rand(shape, generator=g))).to(dtype)
    models = []
    for i in range(n):
        d = torch.randn(shape, generator=g) * scale
        d = torch.where(torch.rand(shape, generator=g) < 0.1, 0.0, d)       # unchanged elements
        d = torch.where(torch.rand(shape, generator=g) < 0.1, scale, d)     # equal magnitudes
        models.append((base.float() + d).to(dtype))
    return base, models


def both(base, models, method, **options):
    expected = ref.merge_tensors(base, models, method, **options)
    actual = run_on("cpu", deltaops.merge_tensors, base, models, method, **options)
    return actual, expected


def check(base, models, method, what, **options):
    actual, expected = both(base, models, method, **options)
    rescale = options.get("rescale")
    norm = rescale in ("l1", "l2", True) or (rescale is None and method in NORM_RESCALED)
    density = options.get("density", 1.0)
    if norm and not (isinstance(density, float) and density in (0.0, 1.0)):
        assert_within_ulps(actual, expected, ULPS[expected.dtype], what)
    else:
        assert_bitwise_equal(actual, expected, what)


def test_kernel_is_registered():
    import deltaops._C as C

    for name in ("merge_sign_elect", "merge_delta_histogram", "merge_delta_topk"):
        assert hasattr(C, name), name
    assert backends.resolve("merge_sign_elect", "cpu") is C.merge_sign_elect


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("n", [1, 2, 3, 8])
@pytest.mark.parametrize("method", METHODS)
def test_methods_match_reference(method, n, density, dtype, threads):
    base, models = inputs((37, 53), n, dtype, seed=n)
    options = {"weights": [0.5 + 0.25 * i for i in range(n)]}
    if method != "task_arithmetic":
        options["density"] = density
    if method in ref.RANDOM_METHODS:
        options["seed"] = SEED
    check(base, models, method, f"{method} n={n} density={density} {dtype}", **options)


@pytest.mark.parametrize("method", CONSENSUS)
@pytest.mark.parametrize("n", [2, 3, 8])
def test_sign_count(method, n, threads):
    base, models = inputs((41, 29), n, torch.bfloat16, seed=7)
    opts = {"density": 0.4, "sign_method": "count", "weights": [1.0, -0.5, 0.75, 1.0, 0.2, 0.3, 0.4, 0.9][:n]}
    if method in ref.RANDOM_METHODS:
        opts["seed"] = SEED
    check(base, models, method, f"{method} count", **opts)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_options(method, dtype, threads):
    """normalize flipped, lambda_, out_dtype, negative and cancelling weights."""
    base, models = inputs((3, 7, 11), 3, dtype, seed=3)
    out_dtype = torch.float32 if dtype != torch.float32 else torch.bfloat16
    spec = ref.TASK_ARITHMETIC[method]
    for weights in ([1.0, -1.0, 0.5], [1.0, -1.0, 0.0], 0.7):
        opts = {"weights": weights, "lambda_": 0.8, "normalize": not spec.normalize,
                "out_dtype": out_dtype}
        if method != "task_arithmetic":
            opts["density"] = 0.5
        if method in ref.RANDOM_METHODS:
            opts["seed"] = SEED
        check(base, models, method, f"{method} weights={weights}", **opts)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("shape", [(1,), (37, 53), (5, 20011)], ids=str)
def test_linear_matches_reference(n, shape, dtype, threads):
    """linear (no base): fma accumulation in model order, torch's fp32 weight sum."""
    base, models = inputs(shape, n, dtype, seed=n)
    for weights, normalize, out_dtype in (([0.3 + 0.37 * i for i in range(n)], None, None),
                                          ([1.0, -0.25, 0.6, 0.1, 2.0, 0.7, 0.2, 0.9][:n], False,
                                           torch.float32),
                                          (0.7, True, torch.bfloat16)):
        check(base, models, "linear", f"linear n={n} {weights} {normalize}", weights=weights,
              normalize=normalize, out_dtype=out_dtype)
    import deltaops._C as C

    assert backends.resolve("merge_linear", "cpu") is C.merge_linear


def test_linear_errors_before_the_kernel():
    base, models = inputs((4, 4), 2, torch.float32)
    with pytest.raises(ValueError, match="sum of the weights"):
        deltaops.merge_tensors(base, models, "linear", weights=[1.0, -1.0])
    with pytest.raises(ValueError):
        deltaops.merge_tensors(base, [models[0], models[1][:2]], "linear")
    with pytest.raises(TypeError):
        deltaops.merge_tensors(base, [models[0], models[1].half()], "linear")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_across_chunks(method, dtype, threads):
    """Tensors of several 16384-element chunks: equal-key ranks cross chunk boundaries."""
    base, models = inputs((5, 20011), 3, dtype, seed=11, scale=0.01)
    opts = {"gamma": 0.05} if method.startswith("breadcrumbs") else {}
    check(base, models, method, f"{method} chunks {dtype}", density=0.3, **opts)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ties_thresholds(dtype, threads):
    """Whole-model thresholds: (key, take) pairs, bare keys, None entries."""
    shapes = [(13, 17), (5, 20011)]
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
        # a take_equal that splits the equal keys
        key = int(ref.magnitude_keys(models[1].float() - base.float()).median())
        check(base, models, "ties", "ties split", thresholds=[None, (key, 3), (ref.KEY_NONE, 0)])


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_thresholds(method, threads):
    base, models = inputs((7, 20011), 2, torch.bfloat16, seed=5)
    entries = []
    for i in range(2):
        delta = models[i].float() - base.float()
        n_drop, n_keep = ref.outlier_band(0.3, 0.05, delta.numel())
        drop = ref.topk_thresholds([delta], n_drop)[0]
        keep = ref.topk_thresholds([delta], n_drop + n_keep)[0]
        entries.append((drop, keep))
    check(base, models, method, "pairs", thresholds=entries)
    check(base, models, method, "no drop", thresholds=[(None, entries[0][1]), (None, entries[1][1][0])])


@pytest.mark.parametrize("rescale", ["l1", "l2", "linf", "density", False])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear", "breadcrumbs"])
def test_rescale(method, rescale, threads):
    base, models = inputs((19, 23), 3, torch.float32, seed=2)
    opts = {"density": [0.3, 0.6, 0.9], "rescale": rescale}
    if method in ref.RANDOM_METHODS:
        opts["seed"] = SEED
    check(base, models, method, f"{method} rescale={rescale}", **opts)


def test_dare_same_seed_same_result_any_threads():
    base, models = inputs((3, 40000), 3, torch.bfloat16, seed=9)
    outs = []
    for t in (1, 2):
        torch.set_num_threads(t)
        outs.append(run_on("cpu", deltaops.merge_tensors, base, models, "dare_ties", density=0.3,
                           rescale="density", seed=SEED))
    assert_bitwise_equal(outs[0], outs[1])


def test_nan_delta_raises_like_reference():
    base, models = inputs((4, 5), 2, torch.float32)
    models[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ref.merge_tensors(base, models, "ties", density=0.5)
    with pytest.raises(ValueError, match="NaN"):
        run_on("cpu", deltaops.merge_tensors, base, models, "ties", density=0.5)


def test_empty_and_errors():
    base, models = inputs((0, 3), 2, torch.float32)
    out = run_on("cpu", deltaops.merge_tensors, base, models, "ties", density=0.5)
    assert out.shape == (0, 3)
    base, models = inputs((4, 5), 2, torch.float32)
    with pytest.raises(ValueError):
        run_on("cpu", deltaops.merge_tensors, base, models, "task_arithmetic", density=0.5)
    with pytest.raises(ValueError):
        run_on("cpu", deltaops.merge_tensors, base, models, "ties", sign_method="mass")
    with pytest.raises(TypeError):
        run_on("cpu", deltaops.merge_tensors, base, [models[0].half()], "ties")


def test_delta_histogram_and_topk_match_reference():
    import deltaops._C as C
    from deltaops.reference.sparse import radix_histogram

    for dtype in DTYPES:
        base, (model,) = inputs((31, 700), 1, dtype, seed=4)
        delta = model.float() - base.float()
        h0 = C.merge_delta_histogram(base, model, 0, 0)
        assert torch.equal(h0, radix_histogram(delta, 0, 0))
        prefix = int(h0.nonzero()[-1])
        assert torch.equal(C.merge_delta_histogram(base, model, 1, prefix),
                           radix_histogram(delta, 1, prefix))
        for k in (0, 1, 1000, delta.numel()):
            ((key, take),) = C.merge_delta_topk(base, model, [k])
            mask = ref.threshold_mask(delta, key, take if take >= 0 else delta.numel())
            assert torch.equal(mask, ref.topk_mask(delta, k)), (dtype, k)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "linear"])
def test_fp16_extremes(method, threads):
    """fp16 blocks go through F16C conversions (csrc/cpu/f16_blocks.h): results that
    overflow to inf, land on fp16 subnormals, round on ties or hit -0.0 match the
    reference's software rounding bit for bit (NaN payloads aside)."""
    g = torch.Generator().manual_seed(21)
    n = 3 * 1000 + 5  # vector blocks and scalar tails
    scale = torch.tensor([60000.0, 1e-5, 3e-7, 1.0, -0.0])[torch.randint(0, 5, (n,), generator=g)]
    base = (scale * (1 + torch.rand(n, generator=g) * 0.05)).to(torch.float16)
    models = [(base.float() + scale * torch.randn(n, generator=g) * 0.1).to(torch.float16)
              for _ in range(3)]
    opts = {"density": 0.5} if method == "ties" else {}
    if method == "dare_linear":
        opts = {"density": 0.5, "seed": SEED, "rescale": "density"}
    weights = [1.0, 0.75, 0.6]
    actual, expected = both(base, models, method, weights=weights, **opts)
    assert bool(torch.isinf(expected).any()) or method != "task_arithmetic"
    assert_bitwise_equal(actual, expected, f"fp16 extremes {method}")
