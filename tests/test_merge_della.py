"""della and della_linear in the fused CPU merge kernel, against the reference.

``deltaops.merge_tensors(..., "della" | "della_linear")`` on CPU tensors runs
the della passes of csrc/cpu/merge_cpu.cpp: each row's magnitude ranks (dim 1;
a 1-D tensor is one row) come from a per-thread radix sort when the merge
reaches the row. :func:`deltaops.reference.merge.merge_tensors` (with
:func:`deltaops.reference.sparse.della_keep_probability`) is the
specification. Results are bit-exact, except with a norm rescale (``l1``, the
default of della*, ``l2``, ``linf``), whose factor comes from double sums per
fixed chunk in the kernel and from torch's fp32 reductions in the reference:
those are compared within :data:`tolerances.ULPS`, like the other
norm-rescaled methods in test_merge_kernels.py (inputs keep |base| >= 1).
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

METHODS = ("della", "della_linear")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SEED = 4321


# the CPU fixtures (autouse cpu skip, 1 and 2 threads) and the inputs of the other
# fused methods: |base| in [1, 2), deltas ~ scale, some exactly zero, some equal
from test_merge_kernels import _cpu_backend, inputs, threads  # noqa: E402,F401


def check(base, models, method, what, **options):
    options.setdefault("seed", SEED)
    expected = ref.merge_tensors(base, models, method, **options)
    actual = run_on("cpu", deltaops.merge_tensors, base, models, method, **options)
    rescale = options.get("rescale")
    density = options.get("density", 1.0)
    dense_or_zero = all(d in (0.0, 1.0) for d in (density if isinstance(density, list)
                                                   else [density]))
    if rescale in (None, True, "l1", "l2", "linf") and not dense_or_zero:
        assert_within_ulps(actual, expected, ULPS[expected.dtype], what)
    else:
        assert_bitwise_equal(actual, expected, what)
    return actual


def test_della_is_fused_on_cpu():
    import deltaops._C as C

    assert "della" in ops_merge.FUSED_METHODS and "della_linear" in ops_merge.FUSED_METHODS
    assert backends.resolve("merge_sign_elect", "cpu") is C.merge_sign_elect
    base, models = inputs((5, 9), 2, torch.float32)
    # the kernel itself, epsilons in the gammas slot: the reference op's result
    args = (base, models, "della", [1.0, 0.5], [0.5, 0.4], [0.1, 0.2], 1.0, True, "density",
            "sum", SEED, [])
    expected = ops_merge._merge_sign_elect(*args, "float32")
    assert_bitwise_equal(C.merge_sign_elect(*args, "float32"), expected, "kernel")
    assert_bitwise_equal(ref.merge_tensors(base, models, "della", weights=[1.0, 0.5],
                                           density=[0.5, 0.4], epsilon=[0.1, 0.2],
                                           rescale="density", seed=SEED), expected, "reference")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 2, 3, 8])
@pytest.mark.parametrize("method", METHODS)
def test_matches_reference(method, n, dtype, threads):
    base, models = inputs((37, 53), n, dtype, seed=n)
    w = [0.5 + 0.25 * i for i in range(n)]
    for rescale in ("density", False, None):
        check(base, models, method, f"{method} n={n} {dtype} rescale={rescale}", weights=w,
              density=0.4, epsilon=0.15, rescale=rescale)


# 1-D (one row), rows of one element, many short rows, a row longer than a chunk
# (16384) and several rows per chunk, 3-D and 4-D (ranks along dim 1, strided rows)
SHAPES = [(1,), (7,), (40000,), (1, 1), (300, 1), (1, 300), (500, 3), (3, 20011), (129, 130),
          (3, 7, 11), (2, 5, 3, 4), (4, 1, 6), (2, 3000, 3)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shapes(shape, dtype, threads):
    base, models = inputs(shape, 3, dtype, seed=len(shape))
    for method in METHODS:
        check(base, models, method, f"{method} {shape} density", weights=[1.0, -0.5, 0.75],
              density=0.3, epsilon=0.2, rescale="density")
        check(base, models, method, f"{method} {shape} none", density=[0.5, 0.3, 0.7],
              epsilon=0.1, rescale=False)
        check(base, models, method, f"{method} {shape} l1", density=0.5, epsilon=0.1)


@pytest.mark.parametrize("method", METHODS)
def test_density_and_epsilon_edges(method, threads):
    base, models = inputs((23, 31), 3, torch.bfloat16, seed=5)
    for density, epsilon in ((1.0, 0.15), (0.0, 0.15), ([0.0, 0.5, 1.0], 0.3), (0.5, 0.0),
                             (0.5, 0.4999), (0.5, -0.2), (0.01, 0.005), (0.99, 0.0099),
                             (1.0, 0.9), (0.0, 2.0), (0.2, [0.1, 0.0, 0.19])):
        for rescale in ("density", False, "l1"):
            check(base, models, method, f"{method} density={density} epsilon={epsilon} "
                  f"rescale={rescale}", density=density, epsilon=epsilon, rescale=rescale)


@pytest.mark.parametrize("rescale", ["l1", "l2", "linf", "density", False, True])
@pytest.mark.parametrize("method", METHODS)
def test_rescale(method, rescale, threads):
    base, models = inputs((19, 23), 3, torch.float32, seed=2)
    check(base, models, method, f"{method} rescale={rescale}", density=[0.3, 0.6, 0.8],
          epsilon=0.15, rescale=rescale)


@pytest.mark.parametrize("n", [2, 3, 8])
def test_sign_count(n, threads):
    base, models = inputs((41, 29), n, torch.bfloat16, seed=7)
    w = [1.0, -0.5, 0.75, 1.0, 0.2, 0.3, 0.4, 0.9][:n]
    for rescale in ("density", None):
        check(base, models, "della", f"della count n={n}", density=0.4, sign_method="count",
              weights=w, rescale=rescale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", METHODS)
def test_options(method, dtype, threads):
    """normalize flipped, lambda_, out_dtype, negative and cancelling weights."""
    base, models = inputs((3, 7, 11), 3, dtype, seed=3)
    out_dtype = torch.float32 if dtype != torch.float32 else torch.bfloat16
    spec = ref.TASK_ARITHMETIC[method]
    for weights in ([1.0, -1.0, 0.5], [1.0, -1.0, 0.0], 0.7):
        for rescale in ("density", None):
            check(base, models, method, f"{method} weights={weights}", weights=weights,
                  lambda_=0.8, normalize=not spec.normalize, out_dtype=out_dtype, density=0.5,
                  rescale=rescale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_equal_magnitudes_and_zero_rows(dtype, threads):
    """Ranks among equal keys (lower index ranks higher), rows of one repeated value,
    all-zero deltas (every key equal: no sort pass), one-, two- and three-pass sorts
    (keys differing in few bits, bf16 deltas, fp32 magnitudes from 1e-30 to 1e30)."""
    g = torch.Generator().manual_seed(8)
    base = torch.ones((6, 700)).to(dtype)
    levels = torch.tensor([0.0, 0.25, -0.25, 0.5, -0.125])
    models = [(base.float() + levels[torch.randint(0, 5, (6, 700), generator=g)]).to(dtype)
              for _ in range(3)]
    models[1][2] = base[2]                              # a zero row
    models[2][3] = (base[3].float() + 0.5).to(dtype)    # one key over the whole row
    for method in METHODS:
        check(base, models, method, f"{method} ties", density=0.5, epsilon=0.3,
              rescale="density")
    # rows of 5000: one radix pass when the keys differ in few bits, three otherwise
    base = torch.ones((2, 5000)).to(dtype)
    few = [(base.float() + levels[torch.randint(0, 5, (2, 5000), generator=g)]).to(dtype),
           (base.float() + torch.randn((2, 5000), generator=g) * 0.01).to(dtype)]
    for method in METHODS:
        check(base, few, method, f"{method} long rows", density=0.5, epsilon=0.3,
              rescale="density")
    if dtype == torch.float32:
        wide = torch.randn((4, 999), generator=g) * torch.pow(
            10.0, torch.randint(-30, 30, (4, 999), generator=g).float())
        zero = torch.zeros((4, 999))
        check(zero, [wide, -wide * 0.5], "della", "wide keys", density=0.5, epsilon=0.4,
              rescale="density")


def test_nan_and_inf_deltas_match_reference(threads):
    """della does not reject NaN (its key ranks above inf); the reference keeps it too."""
    base, models = inputs((4, 50), 2, torch.float32, seed=9)
    models[0][1, 3] = float("nan")
    models[1][2, 7] = float("inf")
    models[1][0, 0] = float("-inf")
    for method in METHODS:
        check(base, models, method, f"{method} nan", density=0.5, epsilon=0.1, rescale=False)
        check(base, models, method, f"{method} nan", density=0.5, epsilon=0.1,
              rescale="density")


def test_same_seed_same_result_any_threads():
    base, models = inputs((40, 2000), 3, torch.bfloat16, seed=10)
    outs = []
    old = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            for method in METHODS:
                outs.append(run_on("cpu", deltaops.merge_tensors, base, models, method,
                                   density=0.3, seed=SEED))
    finally:
        torch.set_num_threads(old)
    assert_bitwise_equal(outs[0], outs[2], "della")
    assert_bitwise_equal(outs[1], outs[3], "della_linear")
    other = run_on("cpu", deltaops.merge_tensors, base, models, "della", density=0.3,
                   seed=SEED + 1)
    assert not torch.equal(other, outs[0])


@pytest.mark.parametrize("method", METHODS)
def test_out_in_place(method, threads):
    base, models = inputs((9, 301), 3, torch.bfloat16, seed=12)
    opts = {"density": 0.4, "epsilon": 0.2, "seed": SEED, "rescale": "density"}
    expected = ref.merge_tensors(base, models, method, **opts)
    out = torch.full(base.shape, float("nan"), dtype=torch.bfloat16)
    assert run_on("cpu", deltaops.merge_tensors, base, models, method, out=out, **opts) is out
    assert_bitwise_equal(out, expected, "out")
    for target in ("base", "model"):
        b, ms = base.clone(), [m.clone() for m in models]
        out = b if target == "base" else ms[1]
        run_on("cpu", deltaops.merge_tensors, b, ms, method, out=out, **opts)
        assert_bitwise_equal(out, expected, f"out={target}")


def test_errors_before_any_write():
    import deltaops._C as C

    base, models = inputs((4, 5), 2, torch.float32)
    out = torch.full(base.shape, 7.0)
    for opts, match in (({"density": 0.1}, "epsilon=0.15 must leave density"),
                        ({"density": [0.5, 0.9], "epsilon": 0.1}, "model 1 has density=0.9"),
                        ({"density": 0.5, "gamma": 0.2}, "does not use gamma"),
                        ({"density": 0.5, "thresholds": [3, 3]}, "does not use thresholds")):
        for method in METHODS:
            with pytest.raises(ValueError, match=match):
                ref.merge_tensors(base, models, method, seed=1, **opts)
            with pytest.raises(ValueError, match=match):
                run_on("cpu", deltaops.merge_tensors, base, models, method, seed=1, out=out,
                       **opts)
            assert torch.equal(out, torch.full(base.shape, 7.0))
    # the kernel checks too, before writing
    args = (base, models, "della", [1.0, 1.0], [0.5, 0.1], [0.1, 0.15], 1.0, True, "", "sum", 1)
    with pytest.raises(ValueError, match="epsilon"):
        C.merge_sign_elect_out_(*args, [], out)
    with pytest.raises(ValueError, match="thresholds"):
        C.merge_sign_elect_out_(*args[:5], [0.1, 0.1], *args[6:], [5, -1, -1, 0, -1, 0, -1, 0],
                                out)
    assert torch.equal(out, torch.full(base.shape, 7.0))
    # a 0-d tensor has no dim 1: the reference's error, on every backend
    scalar = torch.tensor(1.5)
    with pytest.raises(IndexError):
        ref.merge_tensors(scalar, [scalar + 1], "della", density=0.5, seed=1)
    with pytest.raises(IndexError):
        run_on("cpu", deltaops.merge_tensors, scalar, [scalar + 1], "della", density=0.5, seed=1)
    with pytest.raises(ValueError, match="dimension"):
        C.merge_sign_elect(scalar, [scalar + 1], "della", [1.0], [0.5], [0.1], 1.0, True, "",
                           "sum", 1, [], "float32")


def test_empty():
    base, models = inputs((0, 3), 2, torch.float32)
    for method in METHODS:
        out = run_on("cpu", deltaops.merge_tensors, base, models, method, density=0.5, seed=1)
        assert out.shape == (0, 3)
    base, models = inputs((3, 0, 2), 2, torch.bfloat16)
    assert run_on("cpu", deltaops.merge_tensors, base, models, "della", density=0.5,
                  seed=1).shape == (3, 0, 2)


def test_other_backends_run_the_reference(monkeypatch):
    """The triton and cuda kernels have no della: merge_tensors never calls their op."""
    calls = []
    monkeypatch.setattr(ops_merge, "merge_sign_elect_op", lambda *a: calls.append(a))
    base, models = inputs((6, 7), 2, torch.bfloat16)
    for choice in ("triton", "cuda"):
        with deltaops.use_backend(choice):
            assert not ops_merge._use_fused("merge_sign_elect", "della", base)
            assert not ops_merge._use_fused("merge_sign_elect_out_", "della_linear", base)
    with deltaops.use_backend("cpu"):
        assert ops_merge._use_fused("merge_sign_elect", "della", base)
    assert not calls


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck(backend):
    """The custom ops with della (epsilons in the gammas slot) on the cpu kernel and the
    reference: schema, fake implementation, autograd registration."""
    x = torch.randn(9, 11).bfloat16()
    models = [x + 0.01 * torch.randn(9, 11).bfloat16(), x - 0.02 * torch.randn(9, 11).bfloat16()]
    for method in METHODS:
        args = (x, models, method, [1.0, 0.5], [0.5, 0.3], [0.1, 0.2], 1.0, True, "density",
                "sum", 3, [])
        with deltaops.use_backend(backend):
            torch.library.opcheck(ops_merge.merge_sign_elect_op, (*args, "float32"))
            torch.library.opcheck(ops_merge.merge_sign_elect_out_op,
                                  (*args, torch.empty(9, 11, dtype=torch.float32)))
