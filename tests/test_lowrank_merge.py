"""LoRA merge / unmerge (deltaops.lora_merge_, lora_unmerge_): every backend against an fp64
product within the documented bound, errors before any write, exact undo, drift, torch.library."""

import pytest
import torch

import deltaops
from deltaops.ops._registry import OPS
from deltaops.reference import lowrank as ref

from backend_harness import run_on, skip_unless_usable
from lowrank_bounds import assert_within_accumulation_bound, ulp_of
from tolerances import assert_bitwise_equal

BACKENDS = ["reference", "cpu", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (out, in, rank): odd shapes, ranks 1 .. 256, shapes that cross the CPU kernel's
# 6 x 16 micro-tiles and its column panels (65536 / r columns).
CASES = [(1, 1, 1), (3, 517, 2), (37, 53, 7), (129, 67, 16), (7, 300, 64), (33, 270, 256),
         (64, 48, 128)]


def lora_tensors(out, fan_in, rank, dtype, factor_dtype=None, fan_in_fan_out=False, seed=0):
    """Weight ~ N(0, 1), A ~ N(0, 1) / sqrt(in), B ~ N(0, 0.1): a delta of about a tenth of W."""
    g = torch.Generator().manual_seed(seed)
    factor_dtype = factor_dtype or dtype
    shape = (fan_in, out) if fan_in_fan_out else (out, fan_in)
    weight = torch.randn(shape, generator=g).to(dtype)
    lora_A = (torch.randn(rank, fan_in, generator=g) / fan_in ** 0.5).to(factor_dtype)
    lora_B = (torch.randn(out, rank, generator=g) * 0.1).to(factor_dtype)
    return weight, lora_A, lora_B


def check_merge(backend, weight, lora_A, lora_B, scale, fan_in_fan_out, what=""):
    exact, magnitude = ref.lora_merged_exact(weight, lora_A, lora_B, scale, fan_in_fan_out)
    got = weight.clone()
    run_on(backend, deltaops.lora_merge_, got, lora_A, lora_B, scale, fan_in_fan_out=fan_in_fan_out)
    assert_within_accumulation_bound(got, exact, magnitude, lora_A.shape[0], what=what)
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("out,fan_in,rank", CASES)
def test_merge_within_bound_of_fp64(backend, dtype, fan_in_fan_out, out, fan_in, rank):
    skip_unless_usable(backend)
    if backend == "triton" and out * fan_in > 20000:
        pytest.skip("the Triton interpreter is slow: small shapes only")
    weight, lora_A, lora_B = lora_tensors(out, fan_in, rank, dtype, fan_in_fan_out=fan_in_fan_out)
    check_merge(backend, weight, lora_A, lora_B, 1.75, fan_in_fan_out,
                f"{backend} {dtype} fifo={fan_in_fan_out} {out}x{fan_in} r{rank}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_dtype,factor_dtype", [(torch.bfloat16, torch.float32),
                                                       (torch.float32, torch.bfloat16),
                                                       (torch.float16, torch.bfloat16)])
def test_merge_mixed_dtypes(backend, weight_dtype, factor_dtype):
    skip_unless_usable(backend)
    weight, lora_A, lora_B = lora_tensors(29, 41, 8, weight_dtype, factor_dtype)
    check_merge(backend, weight, lora_A, lora_B, -0.5, False)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_merge_with_one_factor_of_mixed_type(backend):
    skip_unless_usable(backend)
    weight, lora_A, lora_B = lora_tensors(19, 23, 4, torch.float16, fan_in_fan_out=True)
    check_merge(backend, weight, lora_A.bfloat16(), lora_B.float(), 3.0, True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_results_are_one_rounding_of_the_exact_sum(backend):
    """No cancellation here: each result is the exact sum rounded, give or take one ulp of bf16,
    while PEFT's two roundings (product to bf16, then bf16 add) land further away."""
    skip_unless_usable(backend)
    weight, lora_A, lora_B = lora_tensors(64, 96, 16, torch.bfloat16)
    weight = weight.abs() + 1  # |w| in [1, ...): w + delta never cancels
    exact, _ = ref.lora_merged_exact(weight, lora_A, lora_B, 1.0)
    got = weight.clone()
    run_on(backend, deltaops.lora_merge_, got, lora_A, lora_B, 1.0)
    error_ulps = ((got.double() - exact) / ulp_of(exact, torch.bfloat16)).abs()
    assert float(error_ulps.max()) <= 1.0
    peft = weight + ((lora_B.float() @ lora_A.float()) * 1.0).to(torch.bfloat16)
    peft_ulps = ((peft.double() - exact) / ulp_of(exact, torch.bfloat16)).abs()
    assert float(error_ulps.mean()) < float(peft_ulps.mean())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_unmerge_is_merge_with_negated_scale(backend, dtype):
    skip_unless_usable(backend)
    weight, lora_A, lora_B = lora_tensors(21, 34, 5, dtype)
    a, b = weight.clone(), weight.clone()
    run_on(backend, deltaops.lora_unmerge_, a, lora_A, lora_B, 0.75)
    run_on(backend, deltaops.lora_merge_, b, lora_A, lora_B, -0.75)
    assert_bitwise_equal(a, b, "unmerge vs merge(-scale)")
    exact, magnitude = ref.lora_merged_exact(weight, lora_A, lora_B, -0.75)
    assert_within_accumulation_bound(a, exact, magnitude, 5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_merge_then_unmerge_drift_is_bounded_by_one_ulp_of_the_merged_weight(dtype):
    """The documented drift bound: |unmerge(merge(w)) - w| <= ulp(merged w) + accumulation error
    (two roundings of half an ulp each). Most elements come back exactly (README: measured)."""
    weight, lora_A, lora_B = lora_tensors(128, 256, 16, dtype)
    merged = weight.clone()
    deltaops.lora_merge_(merged, lora_A, lora_B, 2.0)
    back = merged.clone()
    deltaops.lora_unmerge_(back, lora_A, lora_B, 2.0)
    _, magnitude = ref.lora_merged_exact(weight, lora_A, lora_B, 2.0)
    drift = (back.double() - weight.double()).abs()
    bound = ulp_of(merged.double(), dtype) + 2 * 18 * 2.0 ** -24 * magnitude
    assert bool((drift <= bound).all())
    assert float((back != weight).float().mean()) < 0.5  # most come back bit for bit


@pytest.mark.parametrize("dtype", DTYPES)
def test_keep_original_undo_is_exact(dtype):
    weight, lora_A, lora_B = lora_tensors(40, 24, 4, dtype)
    before = weight.clone()
    undo = deltaops.lora_merge_(weight, lora_A, lora_B, 4.0, keep_original=True)
    assert isinstance(undo, deltaops.DeltaUndo) and not torch.equal(weight, before)
    assert undo.nbytes == weight.numel() * weight.element_size()  # the weight's dtype, not fp32
    deltaops.lora_unmerge_(weight, lora_A, lora_B, 4.0, undo=undo)
    assert_bitwise_equal(weight, before, "exact undo")
    with pytest.raises(RuntimeError, match="already"):
        undo.revert()
    assert deltaops.lora_merge_(weight, lora_A, lora_B) is None


def test_undo_for_another_weight_is_refused():
    weight, lora_A, lora_B = lora_tensors(8, 8, 2, torch.bfloat16)
    undo = deltaops.lora_merge_(weight.clone(), lora_A, lora_B, keep_original=True)
    with pytest.raises(ValueError, match="another weight"):
        deltaops.lora_unmerge_(weight, lora_A, lora_B, undo=undo)
    with pytest.raises(TypeError, match="undo must be a DeltaUndo"):
        deltaops.lora_unmerge_(weight, lora_A, lora_B, undo="nope")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_weight(backend):
    skip_unless_usable(backend)
    weight, lora_A, lora_B = lora_tensors(24, 40, 3, torch.bfloat16)
    view = weight.t().contiguous().t()  # [24, 40] with column-major strides
    check_merge(backend, view, lora_A, lora_B, 1.0, False)
    expected = weight.clone()
    run_on(backend, deltaops.lora_merge_, expected, lora_A, lora_B)
    run_on(backend, deltaops.lora_merge_, view, lora_A.t().contiguous().t(), lora_B)
    assert_bitwise_equal(view.contiguous(), expected, "strided weight and factor")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out,fan_in,rank", [(0, 5, 2), (5, 0, 2), (4, 6, 0)])
def test_empty_shapes_and_rank_zero(backend, out, fan_in, rank):
    skip_unless_usable(backend)
    weight, lora_A, lora_B = lora_tensors(out, fan_in, rank, torch.float16)
    before = weight.clone()
    run_on(backend, deltaops.lora_merge_, weight, lora_A, lora_B, 2.0)
    assert_bitwise_equal(weight, before)


def test_cpu_result_does_not_depend_on_threads_or_tiling():
    skip_unless_usable("cpu")
    weight, lora_A, lora_B = lora_tensors(301, 517, 32, torch.bfloat16)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            w = weight.clone()
            deltaops.lora_merge_(w, lora_A, lora_B, 0.3)
            results.append(w)
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        assert_bitwise_equal(other, results[0], "thread count")
    # the transposed problem (fan_in_fan_out) multiplies the same numbers in the same order
    wt = weight.t().contiguous()
    deltaops.lora_merge_(wt, lora_A, lora_B, 0.3, fan_in_fan_out=True)
    exact, magnitude = ref.lora_merged_exact(weight, lora_A, lora_B, 0.3)
    assert_within_accumulation_bound(wt.t(), exact, magnitude, 32)


def test_nan_and_inf_propagate_like_the_reference():
    weight, lora_A, lora_B = lora_tensors(6, 20, 2, torch.bfloat16)
    weight[0, 0] = float("nan")
    weight[1, 1] = float("inf")
    lora_A[0, 3] = float("nan")
    got, expected = weight.clone(), weight.clone()
    deltaops.lora_merge_(got, lora_A, lora_B)
    ref.lora_merge_(expected, lora_A, lora_B, 1.0, False)
    assert torch.equal(torch.isnan(got), torch.isnan(expected))
    assert torch.equal(torch.isinf(got), torch.isinf(expected))


# ---- bad input: clear errors, before any write -----------------------------------------


@pytest.mark.parametrize("case,error,message", [
    ("weight shape", ValueError, r"weight has shape \(8, 11\); expected \(8, 12\)"),
    ("fifo shape", ValueError, r"expected \(12, 8\), the \[in, out\] \(fan_in_fan_out=True\)"),
    ("rank mismatch", ValueError, r"lora_B has shape \(8, 3\); expected \(8, 4\)"),
    ("weight dtype", TypeError, "weight has dtype float64"),
    ("factor dtype", TypeError, "lora_A has dtype int64"),
    ("scale nan", ValueError, "scale must be finite"),
    ("scale type", TypeError, "scale must be a float"),
    ("fifo type", TypeError, "fan_in_fan_out must be a bool"),
    ("1-D factor", ValueError, "lora_A must be 2-D"),
    ("not a tensor", TypeError, "lora_B must be a torch.Tensor"),
])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_errors_leave_the_weight_untouched(case, error, message, backend):
    weight, lora_A, lora_B = lora_tensors(8, 12, 4, torch.bfloat16)
    target, args, kwargs = weight, [lora_A, lora_B, 1.0], {}
    if case == "weight shape":
        target = weight[:, :11]
    elif case == "fifo shape":
        kwargs["fan_in_fan_out"] = True
    elif case == "rank mismatch":
        args[1] = lora_B[:, :3]
    elif case == "weight dtype":
        target = weight.double()
    elif case == "factor dtype":
        args[0] = torch.ones(4, 12, dtype=torch.int64)
    elif case == "scale nan":
        args[2] = float("nan")
    elif case == "scale type":
        args[2] = "2"
    elif case == "fifo type":
        kwargs["fan_in_fan_out"] = 1
    elif case == "1-D factor":
        args[0] = lora_A.reshape(-1)
    else:
        args[1] = [[1.0]]
    before = target.clone()
    for fn in (deltaops.lora_merge_, deltaops.lora_unmerge_):
        with pytest.raises(error, match=message):
            run_on(backend, fn, target, *args, **kwargs)
    assert_bitwise_equal(target, before, f"weight after a rejected {case}")


def test_cpu_kernel_checks_its_own_arguments():
    """The extension is callable directly (the backend table): it validates before writing too."""
    skip_unless_usable("cpu")
    from deltaops import _C

    weight, lora_A, lora_B = lora_tensors(8, 12, 4, torch.float32)
    before = weight.clone()
    with pytest.raises(ValueError, match=r"weight has shape \(8, 12\); expected \(12, 8\)"):
        _C.lora_merge_(weight, lora_A, lora_B, 1.0, True)
    with pytest.raises(ValueError, match="lora_B has shape"):
        _C.lora_merge_(weight, lora_A, lora_B[:, :2], 1.0, False)
    with pytest.raises(TypeError, match="lora_A has dtype int32"):
        _C.lora_merge_(weight, lora_A.int(), lora_B, 1.0, False)
    with pytest.raises(ValueError, match="scale must be finite"):
        _C.lora_merge_(weight, lora_A, lora_B, float("inf"), False)
    assert_bitwise_equal(weight, before)


# ---- LowRankDelta applies through the merge --------------------------------------------------


def test_low_rank_delta_apply_is_lora_merge():
    weight, lora_A, lora_B = lora_tensors(30, 20, 4, torch.bfloat16)
    delta = deltaops.LowRankDelta(lora_A, lora_B)
    a, b, c = weight.clone(), weight.clone(), weight.clone()
    delta.apply_(a, 0.5)
    deltaops.lora_merge_(b, lora_A, lora_B, 0.5)
    deltaops.apply_delta_(c, delta, 0.5)
    assert_bitwise_equal(a, b)
    assert_bitwise_equal(c, b)
    undo = delta.apply_(a, 1.0, keep_original=True)
    undo.revert()
    assert_bitwise_equal(a, b)
    with pytest.raises(ValueError, match="weight has shape"):
        deltaops.apply_delta_(weight.t(), delta)


# ---- torch.library -----------------------------------------------------------------------


def op_samples():
    weight, lora_A, lora_B = lora_tensors(6, 10, 3, torch.bfloat16)
    x = torch.randn(4, 10)
    ids = torch.tensor([0, -1, 1, 0])
    return [
        ("lora_merge_", (weight, lora_A, lora_B, 0.5, False)),
        ("lora_merge_", (weight.t().contiguous(), lora_A, lora_B, 0.5, True)),
        ("lora_shrink", (x, torch.randn(2, 3, 10), ids, 0.5)),
        ("lora_expand", (torch.randn(4, 6).half(), torch.randn(4, 3), torch.randn(2, 6, 3), ids)),
    ]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name,args", op_samples())
def test_opcheck(backend, name, args):
    skip_unless_usable(backend)
    with deltaops.use_backend(backend):
        torch.library.opcheck(OPS[name], args)


def test_every_lowrank_op_is_opchecked():
    assert {name for name, _ in op_samples()} == {"lora_merge_", "lora_shrink", "lora_expand"}


def test_torch_compile_fullgraph():
    weight, lora_A, lora_B = lora_tensors(16, 24, 4, torch.bfloat16)
    x = torch.randn(3, 24)
    a_stack, b_stack = torch.randn(2, 4, 24), torch.randn(2, 16, 4)
    ids = torch.tensor([1, -1, 0])

    def step(w, y):
        deltaops.lora_merge_(w, lora_A, lora_B, 2.0)
        deltaops.lora_expand(y, deltaops.lora_shrink(x, a_stack, ids, 0.5), b_stack, ids)
        return w, y

    expected = step(weight.clone(), torch.zeros(3, 16))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(weight.clone(), torch.zeros(3, 16))
    assert_bitwise_equal(got[0], expected[0])
    assert_bitwise_equal(got[1], expected[1])
