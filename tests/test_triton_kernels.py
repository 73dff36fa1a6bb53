"""Kernel-level tests of the Triton sparse backend: tilings, counters, rounding corners.

tests/test_sparse_backends.py compares every backend through the public ops;
this file drives the Triton wrappers directly (block sizes, Philox counters past
2**32, FMA-sensitive and tie-rounding cases) against the reference, bit for bit.

Runs on CPU tensors under TRITON_INTERPRET=1 (set here before triton is
imported). Shapes are small: the interpreter is slow.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("triton needs TRITON_INTERPRET=1 on a machine without CUDA", allow_module_level=True)


def _load_triton_sparse():
    """deltaops.triton_kernels.sparse, from the install or straight from the source tree."""
    try:
        import deltaops.triton_kernels.sparse as module
        return module
    except ModuleNotFoundError:
        pass
    if os.path.join(ROOT, "python") not in sys.path:
        sys.path.insert(0, os.path.join(ROOT, "python"))
    import deltaops  # noqa: F401

    spec = importlib.util.spec_from_file_location(
        "deltaops.triton_kernels", os.path.join(ROOT, "triton_kernels", "__init__.py"),
        submodule_search_locations=[os.path.join(ROOT, "triton_kernels")])
    package = importlib.util.module_from_spec(spec)
    sys.modules["deltaops.triton_kernels"] = package
    spec.loader.exec_module(package)
    return package.sparse


T = _load_triton_sparse()
from deltaops.reference import philox as RP  # noqa: E402
from deltaops.reference import sparse as R  # noqa: E402
from deltaops.triton_kernels import philox as TP  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SIZES = (1, 2, 5, 8, 13, 97, 257)
BLOCKS = (8, 64)

# The interpreter computes in numpy, which warns on IEEE overflow / inf - inf.
pytestmark = pytest.mark.filterwarnings(
    "ignore:overflow encountered:RuntimeWarning",
    "ignore:invalid value encountered:RuntimeWarning",
    "ignore:divide by zero encountered:RuntimeWarning",
)


def _bits(t):
    return t.contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def assert_bits_equal(actual, expected):
    """Bit-identical, except that NaNs may differ in payload (and sign)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if actual.dtype in DTYPES:
        same = _bits(actual) == _bits(expected)
        both_nan = torch.isnan(actual) & torch.isnan(expected)
        bad = ~(same | both_nan)
    else:
        bad = actual != expected
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} differ, first at flat "
                           f"{int(torch.nonzero(bad.reshape(-1))[0, 0])}")


def _special(dtype):
    finfo = torch.finfo(dtype)
    values = [0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), finfo.max, -finfo.max,
              finfo.tiny, finfo.tiny / 4, -finfo.tiny / 8, finfo.eps, 2.5, -2.5, 3.0]
    return torch.tensor(values, dtype=torch.float32).to(dtype)


def _data(n, dtype, seed=0, special=True, nan=False):
    g = torch.Generator().manual_seed(seed * 1000 + n)
    x = (torch.randn(n, generator=g) * torch.exp2(torch.randint(-20, 20, (n,), generator=g).float()))
    x = x.to(dtype)
    if special and n > 4:
        s = _special(dtype)
        pos = torch.randperm(n, generator=g)[: min(n // 2, s.numel())]
        x[pos] = s[: pos.numel()]
    if nan and n > 0:
        x[n // 2] = float("nan")
    return x.to(DEVICE)


def _ties(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + 7 * n)
    return torch.randint(-4, 5, (n,), generator=g).to(dtype).to(DEVICE)


# ---- Philox ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n, block", [(n, b) for n in (0, 1, 3, 5, 13, 97) for b in BLOCKS]
                         + [(1031, 64), (1031, 1024)])
def test_philox_uniform(n, block):
    x = torch.empty(n, device=DEVICE)
    for seed, stream in ((0, 0), (1, 2**31), (0xDEADBEEF, 1), (2**40 + 12345, 2**32 - 1),
                         (2**63 - 1, 0), (5, 2**32 + 3)):
        got = T.philox_uniform_like(x, seed, stream, block_size=block)
        assert_bits_equal(got, R.philox_uniform_like(x, seed, stream))


@triton.jit(do_not_specialize=["first_block", "seed_lo", "seed_hi", "stream"])
def _words_kernel(out_ptr, first_block, seed_lo, seed_hi, stream, NBLOCKS: tl.constexpr):
    words = TP.philox_words_tile(first_block, seed_lo, seed_hi, stream, NBLOCKS)
    tl.store(out_ptr + tl.arange(0, 4 * NBLOCKS), words.to(tl.int64))


@pytest.mark.parametrize("first_block", (0, 2**31 - 1, 2**32 - 3, 2**32 + 5, 2**45 + 17, 2**61))
def test_philox_counter_high_word(first_block):
    """Element indices past 2**34 put bits in the counter's second word."""
    seed, stream, nblocks = 0x0123456789ABCDEF, 7, 4
    out = torch.empty(4 * nblocks, dtype=torch.int64, device=DEVICE)
    lo, hi = TP.split_seed(seed)
    _words_kernel[(1,)](out, first_block, lo, hi, stream, NBLOCKS=nblocks)
    block = torch.arange(first_block, first_block + nblocks, dtype=torch.int64)
    zeros = torch.zeros_like(block)
    words = RP.philox4x32_10(block & 0xFFFFFFFF, block >> 32, zeros + stream, zeros,
                             seed & 0xFFFFFFFF, seed >> 32)
    expected = torch.stack(words, dim=1).reshape(-1)
    assert torch.equal(out.cpu() & 0xFFFFFFFF, expected)


# ---- histogram / threshold / top-k ---------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", (0,) + SIZES)
def test_radix_histogram(dtype, n):
    for x in (_data(n, dtype, nan=True), _ties(n, dtype)):
        for block in BLOCKS:
            got = T.radix_histogram(x, 0, 0, block_size=block)
            assert got.dtype == torch.int64
            assert torch.equal(got, R.radix_histogram(x, 0, 0))
            if dtype == torch.float32:
                keys = R.magnitude_keys(x)
                prefixes = {int(p) for p in (keys >> 16).tolist()[:5]} | {0x7F80, 0x3F80, 0, 0x7FFF}
                for prefix in prefixes:
                    got = T.radix_histogram(x, 1, prefix, block_size=block)
                    assert torch.equal(got, R.radix_histogram(x, 1, prefix))


def test_radix_histogram_bad_level():
    with pytest.raises(ValueError):
        T.radix_histogram(torch.ones(4, dtype=torch.bfloat16, device=DEVICE), 1, 0)
    with pytest.raises(ValueError):
        T.radix_histogram(torch.ones(4, device=DEVICE), 2, 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", (0, 1, 13, 257))
def test_threshold_mask(dtype, n):
    for x in (_data(n, dtype), _ties(n, dtype)):
        keys = R.magnitude_keys(x)
        thresholds = {-1, 0, 0x7FFFFFFF + 3} | set(keys.tolist()[:3])
        for threshold in thresholds:
            equal = int((keys == threshold).sum())
            for take in {-2, 0, 1, equal // 2, equal, n + 5}:
                expected = R.threshold_mask(x, threshold, take)
                for block in (8, 32):
                    got = T.threshold_mask(x, threshold, take, block_size=block)
                    assert torch.equal(got, expected), (threshold, take, block)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", (1, 2, 13, 97, 211))
@pytest.mark.parametrize("ties", (False, True))
def test_topk_mask(dtype, n, ties):
    x = (_ties(n, dtype) if ties else _data(n, dtype)).reshape(-1, 1) if n % 2 else \
        (_ties(n, dtype) if ties else _data(n, dtype)).reshape(2, -1)
    ks = sorted({0, 1, n // 3, n - 1, n} & set(range(n + 1)))
    for k in ks:
        expected = R.topk_mask(x, k)
        results = [T.topk_mask(x, k, block_size=b) for b in BLOCKS]
        for got in results:
            assert got.shape == x.shape and got.dtype == torch.bool
            assert torch.equal(got, expected), (k,)
            assert int(got.sum()) == k


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_mask_inf_and_empty(dtype):
    x = torch.tensor([1.0, float("inf"), -float("inf"), 0.0, -0.0, 2.0, float("inf")]).to(dtype)
    for k in range(x.numel() + 1):
        assert torch.equal(T.topk_mask(x, k, block_size=8), R.topk_mask(x, k))
    empty = torch.empty(0, 3, dtype=dtype)
    assert T.topk_mask(empty, 0).shape == (0, 3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_mask_nan_raises(dtype):
    for n in (1, 9, 40):
        x = _data(n, dtype, nan=True)
        for k in (0, 1, n):
            with pytest.raises(ValueError):
                T.topk_mask(x, k, block_size=8)
    x = torch.tensor([1.0, float("-nan"), 3.0]).to(dtype)
    with pytest.raises(ValueError):
        T.topk_mask(x, 1)


def test_topk_mask_fp32_nan_in_inf_bucket():
    # NaN with a payload only in the low 16 bits shares the level-0 bucket with +inf
    x = torch.tensor([0x7F800001, 0x3F800000, 0x7F800000], dtype=torch.int32).view(torch.float32)
    with pytest.raises(ValueError):
        T.topk_mask(x, 1)


def test_topk_mask_bad_k():
    x = torch.ones(5, device=DEVICE)
    for k in (-1, 6):
        with pytest.raises(ValueError):
            T.topk_mask(x, k)


# ---- DARE -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", (0, 1, 13, 97, 1031))
def test_dare(dtype, n):
    x = _data(n, dtype, nan=True).reshape(-1, 1)
    for density in (0.0, 1e-9, 0.3, 1 / 3, 0.9, 1.0):
        for rescale in (True, False):
            for seed, stream in ((12345, 3), (2**62 + 1, 2**32 - 1)):
                expected = R.dare(x, density, seed, stream, rescale)
                for block in ((8, 64) if n < 1000 else (256,)):
                    got = T.dare(x, density, seed, stream, rescale, block_size=block)
                    assert_bits_equal(got, expected)


# ---- applying deltas ---------------------------------------------------------------------------

ALPHAS = (1.0, -3.7, 1e-30, 1e30, 1 / 3)


@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("d_dtype", DTYPES)
@pytest.mark.parametrize("n", (0, 1, 97, 257))
def test_apply_dense(w_dtype, d_dtype, n):
    w0 = _data(n, w_dtype, seed=1, nan=True).reshape(1, -1)
    d = _data(n, d_dtype, seed=2).reshape(1, -1)
    for alpha in ALPHAS:
        expected = w0.clone()
        R.apply_dense_(expected, d, alpha)
        for block in (8, 64):
            got = w0.clone()
            assert T.apply_dense_(got, d, alpha, block_size=block) is None
            assert_bits_equal(got, expected)


def test_apply_dense_no_fma():
    # alpha * d = 1 + 2^-11 + 2^-24 rounds (tie, even) to 1 + 2^-11; w + that = 0.
    # A fused multiply-add would give 2^-24.
    a = 1 + 2**-12
    w = torch.full((5,), -(1 + 2**-11), dtype=torch.float32, device=DEVICE)
    d = torch.full((5,), a, dtype=torch.float32, device=DEVICE)
    expected = w.clone()
    R.apply_dense_(expected, d, a)
    assert torch.equal(expected, torch.zeros(5))
    T.apply_dense_(w, d, a)
    assert_bits_equal(w, expected)


def test_apply_rounding_ties():
    # fp32 sums that sit exactly halfway between two bf16/fp16 values round to even
    for dtype in (torch.bfloat16, torch.float16):
        w = torch.tensor([1.0, 1.0, 3.0, -1.0, 0.0, 65504.0, 6e-8], dtype=dtype)
        step = 2**-8 if dtype == torch.bfloat16 else 2**-11
        d = torch.tensor([step, 3 * step, 3 * step * 2, -step, 2**-25, 16.0, 3e-8])
        expected = w.clone()
        R.apply_dense_(expected, d, 1.0)
        got = w.clone()
        T.apply_dense_(got, d, 1.0)
        assert_bits_equal(got, expected)


@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("v_dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("index_dtype", (torch.int32, torch.int64))
@pytest.mark.parametrize("n", (1, 13, 257))
def test_apply_coo(w_dtype, v_dtype, index_dtype, n):
    g = torch.Generator().manual_seed(n)
    w0 = _data(n, w_dtype, seed=3).reshape(-1, 1)
    for nnz in sorted({0, 1, n // 3, n}):
        indices = torch.randperm(n, generator=g)[:nnz].sort().values.to(index_dtype)
        values = _data(nnz, v_dtype, seed=4)
        for alpha in (1.0, -0.3):
            expected = w0.clone()
            R.apply_coo_(expected, indices, values, alpha)
            for block in (8, 64):
                got = w0.clone()
                T.apply_coo_(got, indices, values, alpha, block_size=block)
                assert_bits_equal(got, expected)


@pytest.mark.parametrize("index_dtype", (torch.int32, torch.int64))
def test_apply_coo_bad_indices(index_dtype):
    w0 = torch.arange(10, dtype=torch.float32, device=DEVICE)
    bad = ([1, 3, 3], [4, 2, 7], [-1, 2, 3], [0, 5, 10], [0, 1, 2**31 - 1])
    for indices in bad:
        w = w0.clone()
        with pytest.raises(ValueError, match="out of range|strictly increasing"):
            T.apply_coo_(w, torch.tensor(indices, dtype=index_dtype), torch.ones(3), 1.0)
        assert torch.equal(w, w0)
    with pytest.raises(ValueError):
        T.apply_coo_(w, torch.tensor([1, 2], dtype=index_dtype), torch.ones(3), 1.0)
    assert torch.equal(w, w0)


@pytest.mark.parametrize("w_dtype", DTYPES)
@pytest.mark.parametrize("v_dtype", (torch.float32, torch.float16))
@pytest.mark.parametrize("n", (0, 1, 7, 8, 9, 64, 257))
def test_apply_bitmask(w_dtype, v_dtype, n):
    g = torch.Generator().manual_seed(n + 11)
    w0 = _data(n, w_dtype, seed=5).reshape(-1)
    for p in (0.0, 0.3, 1.0):
        mask = torch.rand(n, generator=g) < p
        packed = R.pack_mask(mask)
        values = _data(int(mask.sum()), v_dtype, seed=6)
        expected = w0.clone()
        R.apply_bitmask_(expected, packed, values, 0.7)
        for block in BLOCKS:
            got = w0.clone()
            T.apply_bitmask_(got, packed, values, 0.7, block_size=block)
            assert_bits_equal(got, expected)


def test_apply_bitmask_bad_inputs():
    n = 13
    w0 = torch.arange(n, dtype=torch.bfloat16, device=DEVICE)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[[0, 4, 12]] = True
    packed = R.pack_mask(mask)
    cases = [
        (packed, torch.ones(2)),                                   # popcount 3 != 2
        (packed, torch.ones(4)),                                   # popcount 3 != 4
        (packed | torch.tensor([0, 0x20], dtype=torch.uint8), torch.ones(4)),  # padding bit
        (torch.cat([packed, packed.new_zeros(1)]), torch.ones(3)),  # wrong byte count
        (packed[:1], torch.ones(2)),
    ]
    for bad_packed, values in cases:
        w = w0.clone()
        with pytest.raises(ValueError, match="set bits|padding bits|elements need"):
            T.apply_bitmask_(w, bad_packed, values, 1.0)
        assert torch.equal(w, w0)
    T.validate_bitmask(packed, n, 3)
    with pytest.raises(ValueError):
        T.validate_bitmask(packed, n, 2)


def test_zero_numel_everywhere():
    for dtype in DTYPES:
        x = torch.empty(0, 4, dtype=dtype, device=DEVICE)
        assert torch.equal(T.radix_histogram(x, 0, 0), R.radix_histogram(x, 0, 0))
        assert T.threshold_mask(x, 3, 1).shape == (0, 4)
        assert T.topk_mask(x, 0).shape == (0, 4)
        assert T.philox_uniform_like(x, 1, 0).shape == (0, 4)
        assert T.dare(x, 0.5, 1, 0, True).shape == (0, 4)
        w = torch.empty(0, 4, dtype=dtype, device=DEVICE)
        T.apply_dense_(w, x, 1.0)
        T.apply_coo_(w, torch.empty(0, dtype=torch.int64), torch.empty(0), 1.0)
        T.apply_bitmask_(w, torch.empty(0, dtype=torch.uint8), torch.empty(0), 1.0)


def test_exports():
    assert set(T.__all__) == {"radix_histogram", "threshold_mask", "topk_mask",
                              "philox_uniform_like", "dare", "dare_out_", "apply_dense_",
                              "apply_coo_", "apply_bitmask_"}
    for name in T.__all__:
        assert callable(getattr(T, name))


def test_backend_table():
    from deltaops import backends

    table = backends.get("triton").table
    assert set(T.__all__) <= set(table), backends.get("triton").reason


def test_non_contiguous_weight_rejected():
    w = torch.zeros(4, 6, device=DEVICE).t()
    with pytest.raises(ValueError, match="contiguous"):
        T.apply_dense_(w, torch.ones(6, 4, device=DEVICE), 1.0)
