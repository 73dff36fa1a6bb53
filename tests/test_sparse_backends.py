"""Every kernel of the sparse family against the reference, bit for bit, on every backend here."""

import pytest
import torch

import deltaops
from deltaops.formats.sparse import SparseDelta
from deltaops.ops import sparse as ops

from backend_harness import KERNEL_BACKENDS, compare_with_reference, run_on, skip_unless_usable
from tolerances import assert_bitwise_equal

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# numel 0 and 1, primes, non-multiples of any block or vector width, 3-D.
SHAPES = [(0,), (1,), (7,), (13, 17), (61, 127), (3, 5, 67), (1031,)]


def make(shape, dtype, kind="normal"):
    """Deltas with the features that break kernels: ties, signed zeros, infinities."""
    numel = torch.Size(shape).numel()
    if kind == "normal":
        x = torch.randn(numel) * 1e-2
    elif kind == "ties":  # few distinct magnitudes: the tie rule decides most of the mask
        x = torch.randint(-6, 7, (numel,)).float() / 4
    elif kind == "special":
        x = torch.randn(numel)
        specials = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0, 1e-30, -65504.0])
        x[: min(numel, 6)] = specials[: min(numel, 6)]
        x = x[torch.randperm(numel)]
    else:
        raise ValueError(kind)
    return x.to(dtype).reshape(shape)


@KERNEL_BACKENDS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["normal", "ties", "special"])
def test_topk_mask(backend, dtype, shape, kind):
    x = make(shape, dtype, kind)
    for density in (0.0, 0.001, 0.2, 0.5, 0.999, 1.0):
        mask = compare_with_reference(backend, deltaops.topk_mask, x, density, what=f"density={density}")
        assert int(mask.sum()) == int(density * x.numel())


@KERNEL_BACKENDS
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_mask_transposed_input_uses_logical_order(backend, dtype):
    x = make((40, 23), dtype, "ties").t()
    assert not x.is_contiguous()
    compare_with_reference(backend, deltaops.topk_mask, x, 0.3)


@KERNEL_BACKENDS
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_mask_rejects_nan(backend, dtype):
    skip_unless_usable(backend)
    x = make((5, 9), dtype)
    x[3, 4] = float("nan")
    for density in (0.0, 0.5, 1.0):
        with pytest.raises(ValueError, match="NaN"):
            run_on(backend, deltaops.topk_mask, x, density)


@KERNEL_BACKENDS
def test_topk_mask_fp32_nan_with_low_payload_bits_only(backend):
    """A NaN whose payload lives in the low 16 bits shares the top bucket with +inf."""
    skip_unless_usable(backend)
    x = torch.tensor([1.0, float("inf"), 2.0])
    x.view(torch.int32)[2] = 0x7F800001
    with pytest.raises(ValueError, match="NaN"):
        run_on(backend, deltaops.topk_mask, x, 0.5)


@KERNEL_BACKENDS
@pytest.mark.parametrize("dtype", DTYPES)
def test_magnitude_histogram(backend, dtype):
    x = make((61, 127), dtype, "special")
    compare_with_reference(backend, deltaops.magnitude_histogram, x, 0, 0)
    if dtype == torch.float32:
        prefix = int(deltaops.reference.sparse.magnitude_keys(x)[5]) >> 16
        compare_with_reference(backend, deltaops.magnitude_histogram, x, 1, prefix)


@KERNEL_BACKENDS
@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_mask(backend, dtype):
    x = make((13, 101), dtype, "ties")
    keys = deltaops.reference.sparse.magnitude_keys(x)
    for threshold in (0, int(keys.median()), int(keys.max()), int(keys.max()) + 1):
        for take in (0, 1, 7, 10_000):
            compare_with_reference(backend, deltaops.threshold_mask, x, threshold, take)


@KERNEL_BACKENDS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dare(backend, dtype, shape):
    x = make(shape, dtype, "special")
    for density in (0.0, 0.1, 0.5, 1.0):
        for rescale in (True, False):
            compare_with_reference(backend, deltaops.dare, x, density, seed=1234, rescale=rescale,
                                   what=f"density={density} rescale={rescale}")


@KERNEL_BACKENDS
@pytest.mark.parametrize("dtype", DTYPES)
def test_dare_into_out_and_in_place(backend, dtype):
    x = make((37, 29), dtype, "special")
    expected = run_on("reference", deltaops.dare, x, 0.3, seed=77)
    for density in (0.0, 0.3):
        out = torch.full_like(x, 5.0)  # stale contents must be overwritten everywhere
        got = run_on(backend, deltaops.dare, x, density, seed=77, out=out)
        assert got is out
        assert_bitwise_equal(out, run_on("reference", deltaops.dare, x, density, seed=77),
                             f"out= density={density}")
    in_place = x.clone()
    run_on(backend, deltaops.dare, in_place, 0.3, seed=77, out=in_place)
    assert_bitwise_equal(in_place, expected, "out=delta")


@KERNEL_BACKENDS
def test_dare_out_errors_leave_out_untouched(backend):
    x = make((16, 8), torch.float32)
    for bad in (torch.zeros(16, 8, dtype=torch.bfloat16), torch.zeros(8, 16),
                torch.zeros(8, 16).t()):
        before = bad.clone()
        with pytest.raises(ValueError, match="out"):
            run_on(backend, deltaops.dare, x, 0.5, seed=1, out=bad)
        assert torch.equal(bad, before)


@KERNEL_BACKENDS
def test_dare_keys_on_seed_and_stream(backend):
    x = make((1031,), torch.float32)
    for seed, stream in ((0, 0), (2**63 - 1, 0), (0x1234_5678_9ABC, 3), (7, 2**32 - 1)):
        compare_with_reference(backend, deltaops.dare, x, 0.3, seed=seed, stream=stream)
        compare_with_reference(backend, deltaops.random_uniform_like, x, seed=seed, stream=stream)


@KERNEL_BACKENDS
def test_dare_passes_nan_through_where_kept(backend):
    x = make((64,), torch.bfloat16)
    x[::3] = float("nan")
    compare_with_reference(backend, deltaops.dare, x, 0.5, seed=9)


WEIGHT_DELTA_DTYPES = [(w, d) for w in DTYPES for d in DTYPES]


@KERNEL_BACKENDS
@pytest.mark.parametrize("weight_dtype,delta_dtype", WEIGHT_DELTA_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_apply_dense(backend, weight_dtype, delta_dtype, shape):
    weight = make(shape, weight_dtype, "special")
    delta = make(shape, delta_dtype, "normal")
    for alpha in (1.0, -0.5, 0.3):
        compare_with_reference(backend, deltaops.apply_delta_, weight, delta, alpha,
                               clone_args=True, what=f"alpha={alpha}")


@KERNEL_BACKENDS
def test_apply_dense_to_transposed_weight(backend):
    weight = make((33, 20), torch.bfloat16).t()
    delta = make((20, 33), torch.float32)
    compare_with_reference(backend, deltaops.apply_delta_, weight, delta, 0.7, clone_args=True)


@KERNEL_BACKENDS
@pytest.mark.parametrize("layout", ["coo", "bitmask"])
@pytest.mark.parametrize("weight_dtype,delta_dtype", WEIGHT_DELTA_DTYPES)
@pytest.mark.parametrize("shape", [(1,), (13, 17), (3, 5, 67), (1031,)])
def test_apply_sparse(backend, layout, weight_dtype, delta_dtype, shape):
    weight = make(shape, weight_dtype, "special")
    for density in (0.0, 0.1, 1.0):
        sparse = SparseDelta.from_dense(make(shape, delta_dtype), density, layout=layout)
        compare_with_reference(backend, deltaops.apply_delta_, weight, sparse, -0.25,
                               clone_args=True, what=f"density={density}")


@KERNEL_BACKENDS
def test_apply_coo_int64_indices(backend):
    weight = make((97, 13), torch.bfloat16)
    indices = torch.tensor([0, 5, 6, 700, 97 * 13 - 1], dtype=torch.int64)
    values = make((5,), torch.float32)
    compare_with_reference(backend, ops.apply_coo_op, weight, indices, values, 2.0, clone_args=True)


BAD_COO = {
    "unsorted": ([3, 1, 5], "strictly increasing"),
    "duplicate": ([1, 4, 4], "strictly increasing"),
    "negative": ([-1, 2, 3], r"\[0, 40\)"),
    "past the end": ([1, 2, 40], r"\[0, 40\)"),
}


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("case", sorted(BAD_COO))
def test_apply_coo_rejects_bad_indices_before_writing(backend, index_dtype, case):
    """The kernels validate indices themselves: the op is reachable without SparseDelta."""
    skip_unless_usable(backend)
    indices, message = BAD_COO[case]
    weight = make((40,), torch.bfloat16)
    before = weight.clone()
    with pytest.raises(ValueError, match=message):
        run_on(backend, ops.apply_coo_op, weight, torch.tensor(indices, dtype=index_dtype),
               torch.ones(3), 1.0)
    assert_bitwise_equal(weight, before, "weight after a rejected apply")


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_apply_bitmask_rejects_bad_masks_before_writing(backend):
    skip_unless_usable(backend)
    weight = make((20,), torch.float16)
    before = weight.clone()
    too_few_values = torch.tensor([0b1011, 0, 0], dtype=torch.uint8)  # 3 bits set
    with pytest.raises(ValueError, match="3 set bits"):
        run_on(backend, ops.apply_bitmask_op, weight, too_few_values, torch.ones(2), 1.0)
    padding_set = torch.tensor([1, 0, 0b0001_0000], dtype=torch.uint8)  # bit 20 is past the end
    with pytest.raises(ValueError, match="padding"):
        run_on(backend, ops.apply_bitmask_op, weight, padding_set, torch.ones(2), 1.0)
    assert_bitwise_equal(weight, before, "weight after a rejected apply")


METHODS = ["magnitude", "random", "magnitude_outliers", "della"]


@KERNEL_BACKENDS
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rescale", [None, "density", "l1"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparsify(backend, method, rescale, dtype):
    x = make((37, 41), dtype, "ties")
    for density in (0.0, 0.3, 1.0):
        compare_with_reference(backend, deltaops.sparsify, x, density, method, seed=5,
                               rescale=rescale, gamma=0.05, epsilon=0.1)


@pytest.mark.parametrize("op", ["topk", "dare", "apply"])
def test_cpu_results_do_not_depend_on_thread_count(op):
    skip_unless_usable("cpu")
    x = make(((1 << 19) + 3,), torch.bfloat16, "ties")  # large enough to be split across threads
    weight = make(((1 << 19) + 3,), torch.bfloat16)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            with deltaops.use_backend("cpu"):
                if op == "topk":
                    results.append(deltaops.topk_mask(x, 0.25))
                elif op == "dare":
                    results.append(deltaops.dare(x, 0.25, seed=3))
                else:
                    w = weight.clone()
                    deltaops.apply_delta_(w, SparseDelta.from_dense(x, 0.3, layout="bitmask"))
                    results.append(w)
    finally:
        torch.set_num_threads(threads)
    for r in results[1:]:
        assert_bitwise_equal(r, results[0], f"{op} with another thread count")
