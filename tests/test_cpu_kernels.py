"""Kernel-level tests of deltaops._C (the C++ CPU kernels) against the reference, bit for bit.

Run directly against the extension (not through the ops layer), on both
kernel tables (AVX-512 and the AVX2 baseline, where the CPU runs them) and
with 1 and 2 threads.
"""

import pytest
import torch

from deltaops.reference import sparse as R
from backend_harness import cpu_kernel_tables
from tolerances import assert_bitwise_equal

C = pytest.importorskip("deltaops._C")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SIZES = (0, 1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 63, 64, 65, 127, 1000, 4099, 65536 + 13,
         2 * 65536 + 1021)


@pytest.fixture(params=[(isa, nt) for isa in cpu_kernel_tables() for nt in (1, 2)],
                ids=lambda p: f"{p[0]}-t{p[1]}")
def env(request):
    isa, threads = request.param
    old_threads = torch.get_num_threads()
    C._set_isa(isa)
    torch.set_num_threads(threads)
    yield isa
    torch.set_num_threads(old_threads)
    C._set_isa("auto")


def make(n, dtype, kind="randn", gen=None, nan=False):
    gen = gen or torch.Generator().manual_seed(n * 7 + DTYPES.index(dtype))
    if kind == "ties":
        x = torch.randint(-6, 7, (n,), generator=gen).to(dtype)
    elif kind == "special":
        x = torch.randn(n, generator=gen).to(dtype)
        specials = [float("inf"), float("-inf"), -0.0, 0.0, 1e-40, -1e-42, 6e-8, -3e-8, 1e-30,
                    65504.0, -65520.0, 3.0e38]
        if nan:
            specials.append(float("nan"))
        for j in range(0, n, 3):
            x[j] = specials[(j // 3) % len(specials)]
    else:
        x = torch.randn(n, generator=gen).to(dtype)
    return x


def shaped(x):
    """Give a flat tensor a 2-D shape when its size allows (checks reshape handling)."""
    n = x.numel()
    return x.reshape(n // 5, 5) if n and n % 5 == 0 else x


# ---- histograms -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["randn", "ties", "special"])
def test_radix_histogram(env, dtype, n, kind):
    x = shaped(make(n, dtype, kind, nan=True))
    assert torch.equal(C.radix_histogram(x, 0, 0), R.radix_histogram(x, 0, 0))
    if dtype == torch.float32:
        keys = R.magnitude_keys(x)
        prefixes = {0, 0x7F80, 0x3F80, 32767}
        if n:
            prefixes |= {int(keys[0] >> 16), int(keys[n // 2] >> 16)}
        for prefix in prefixes:
            assert torch.equal(C.radix_histogram(x, 1, prefix), R.radix_histogram(x, 1, prefix)), prefix
        with pytest.raises(ValueError):
            C.radix_histogram(x, 2, 0)
    else:
        with pytest.raises(ValueError):
            C.radix_histogram(x, 1, 0)


# ---- threshold / top-k masks ------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["randn", "ties", "special"])
def test_threshold_mask(env, dtype, n, kind):
    x = shaped(make(n, dtype, kind, nan=True))
    keys = R.magnitude_keys(x)
    thresholds = {0, 1, 0x7F800000, 0x7FFF, 2**40}
    if n:
        thresholds |= {int(keys[n // 3]), int(keys[-1])}
    for t in thresholds:
        equal = int((keys == t).sum())
        for take in {0, 1, equal // 2, max(equal - 1, 0), equal, equal + 5}:
            assert_bitwise_equal(C.threshold_mask(x, t, take), R.threshold_mask(x, t, take),
                                 f"t={t} take={take}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", ["randn", "ties", "special"])
def test_topk_mask(env, dtype, n, kind):
    x = shaped(make(n, dtype, kind))
    for k in sorted({0, 1, n // 5, n // 2, max(n - 1, 0), n}):
        if k > n:
            continue
        assert_bitwise_equal(C.topk_mask(x, k), R.topk_mask(x, k), f"k={k}")
    with pytest.raises(ValueError):
        C.topk_mask(x, n + 1)
    with pytest.raises(ValueError):
        C.topk_mask(x, -1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_mask_nan_raises(env, dtype):
    for n in (1, 17, 70000):
        x = make(n, dtype)
        x[n // 2] = float("nan")
        for k in (0, 1, n):
            with pytest.raises(ValueError, match="NaN"):
                C.topk_mask(x, k)
    # fp32 NaN patterns right next to inf (same level-0 bucket)
    if dtype == torch.float32:
        x = torch.tensor([float("inf"), 1.0, 2.0])
        x.view(torch.int32)[1] = 0x7F800001
        with pytest.raises(ValueError):
            C.topk_mask(x, 1)
        x.view(torch.int32)[1] = -0x0080_0000 + 1  # 0xFF800001: negative NaN
        with pytest.raises(ValueError):
            C.topk_mask(x, 1)


def test_topk_mask_fp32_close_keys(env):
    # many keys in one level-0 bucket, ties in the level-1 bin
    x = (1.0 + torch.randint(0, 50, (100003,)).float() * 2**-23) * torch.randint(0, 2, (100003,)).float().mul(2).sub(1)
    for k in (1, 77, 50000, 100002):
        assert_bitwise_equal(C.topk_mask(x, k), R.topk_mask(x, k), f"k={k}")


# ---- Philox / DARE ------------------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("seed,stream", [(0, 0), (1234, 7), (2**63 - 1, 2**32 - 1), (2**40 + 3, 1)])
def test_philox_uniform_like(env, n, seed, stream):
    x = shaped(torch.empty(n, dtype=torch.bfloat16))
    assert_bitwise_equal(C.philox_uniform_like(x, seed, stream), R.philox_uniform_like(x, seed, stream))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("density", [0.0, 1e-3, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("rescale", [True, False])
def test_dare(env, dtype, n, density, rescale):
    for kind in ("randn", "special"):
        d = shaped(make(n, dtype, kind, nan=True))
        for seed, stream in ((3, 0), (2**62 + 5, 9)):
            assert_bitwise_equal(C.dare(d, density, seed, stream, rescale),
                                 R.dare(d, density, seed, stream, rescale),
                                 f"{kind} seed={seed} stream={stream}")


# ---- applying deltas ------------------------------------------------------------------------

ALPHAS = (1.0, 0.5, -1.3, 0.0, 3.0e38)


@pytest.mark.parametrize("wdtype", DTYPES)
@pytest.mark.parametrize("ddtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_apply_dense(env, wdtype, ddtype, n):
    for kind in ("randn", "special"):
        w = shaped(make(n, wdtype, kind, nan=True))
        d = make(n, ddtype, kind, gen=torch.Generator().manual_seed(99)).reshape(w.shape)
        for alpha in ALPHAS:
            a, b = w.clone(), w.clone()
            C.apply_dense_(a, d, alpha)
            R.apply_dense_(b, d, alpha)
            assert_bitwise_equal(a, b, f"{kind} alpha={alpha}")


def _sorted_subset(n, density, gen):
    keep = torch.rand(n, generator=gen) < density
    return keep.nonzero().reshape(-1)


@pytest.mark.parametrize("wdtype", DTYPES)
@pytest.mark.parametrize("vdtype", DTYPES)
@pytest.mark.parametrize("itype", [torch.int32, torch.int64])
@pytest.mark.parametrize("n", SIZES)
def test_apply_coo(env, wdtype, vdtype, itype, n):
    gen = torch.Generator().manual_seed(n)
    w = shaped(make(n, wdtype, "special", nan=True))
    for density in (0.0, 0.2, 1.0):
        idx = _sorted_subset(n, density, gen).to(itype)
        v = make(idx.numel(), vdtype, "special", gen=gen)
        for alpha in (1.0, -0.7):
            a, b = w.clone(), w.clone()
            C.apply_coo_(a, idx, v, alpha)
            R.apply_coo_(b, idx, v, alpha)
            assert_bitwise_equal(a, b, f"density={density} alpha={alpha}")


@pytest.mark.parametrize("itype", [torch.int32, torch.int64])
@pytest.mark.parametrize("n", [1, 10, 200003])
def test_apply_coo_bad_indices(env, itype, n):
    w = make(n, torch.bfloat16)
    before = w.clone()
    good = torch.arange(0, n, 3, dtype=itype)
    cases = []  # (message fragment, indices)
    if good.numel() >= 2:
        unsorted = good.clone()
        unsorted[[0, -1]] = unsorted[[-1, 0]]
        cases.append(("strictly increasing", unsorted))
        dup = good.clone()
        dup[-1] = dup[-2]
        cases.append(("strictly increasing", dup))
        swap = good.clone()
        swap[[len(swap) // 2, len(swap) // 2 + 1]] = swap[[len(swap) // 2 + 1, len(swap) // 2]]
        cases.append(("strictly increasing", swap))
    neg = good.clone()
    neg[0] = -1
    cases.append(("out of range", neg))
    high = good.clone()
    high[-1] = n
    cases.append(("out of range", high))
    huge = good.clone()
    huge[len(huge) // 2] = 2**31 - 1
    cases.append(("out of range", huge))
    for message, idx in cases:
        values = torch.ones(idx.numel(), dtype=torch.bfloat16)
        with pytest.raises(ValueError, match=message) as got:
            C.apply_coo_(w, idx, values, 1.0)
        assert torch.equal(w.view(torch.int16), before.view(torch.int16)), "weight was written"
        with pytest.raises(ValueError) as expected:
            R.apply_coo_(w.clone(), idx, values, 1.0)
        assert str(got.value) == str(expected.value)
    with pytest.raises(ValueError):
        C.apply_coo_(w, good, torch.ones(good.numel() + 1), 1.0)


@pytest.mark.parametrize("wdtype", DTYPES)
@pytest.mark.parametrize("vdtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_apply_bitmask(env, wdtype, vdtype, n):
    gen = torch.Generator().manual_seed(n + 1)
    w = shaped(make(n, wdtype, "special", nan=True))
    # 0.05: sparse tiles; 0.1 and 0.12: tiles on both sides of the kernels'
    # sparse/dense switch (10%); 0.5, 1.0: dense tiles
    for density in (0.0, 0.05, 0.1, 0.12, 0.5, 1.0):
        mask = torch.rand(n, generator=gen) < density
        packed = R.pack_mask(mask)
        v = make(int(mask.sum()), vdtype, "special", gen=gen)
        for alpha in (1.0, -0.7):
            a, b = w.clone(), w.clone()
            C.apply_bitmask_(a, packed, v, alpha)
            R.apply_bitmask_(b, packed, v, alpha)
            assert_bitwise_equal(a, b, f"density={density} alpha={alpha}")


@pytest.mark.parametrize("n", [1, 13, 16, 200003])
def test_apply_bitmask_bad(env, n):
    w = make(n, torch.float32)
    before = w.clone()
    mask = torch.rand(n) < 0.5
    mask[0] = True
    packed = R.pack_mask(mask)
    kept = int(mask.sum())
    with pytest.raises(ValueError, match="set bits but"):
        C.apply_bitmask_(w, packed, torch.ones(kept + 1), 1.0)
    with pytest.raises(ValueError, match="set bits but"):
        C.apply_bitmask_(w, packed, torch.ones(kept - 1), 1.0)
    with pytest.raises(ValueError, match="bytes"):
        C.apply_bitmask_(w, torch.cat([packed, packed[:1]]), torch.ones(kept), 1.0)
    if n % 8:
        bad = packed.clone()
        bad[-1] |= 0x80
        with pytest.raises(ValueError, match="padding"):
            C.apply_bitmask_(w, bad, torch.ones(kept + 1), 1.0)
    assert torch.equal(w.view(torch.int32), before.view(torch.int32)), "weight was written"


def test_errors_are_typed(env):
    x = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(TypeError):
        C.topk_mask(x, 1)
    with pytest.raises(ValueError, match="int32 or int64"):
        C.apply_coo_(torch.zeros(4), torch.zeros(1, dtype=torch.int16), torch.zeros(1), 1.0)
    with pytest.raises(ValueError, match="uint8"):
        C.apply_bitmask_(torch.zeros(4), torch.zeros(1, dtype=torch.int8), torch.zeros(0), 1.0)


@pytest.mark.parametrize("n", [1, 13, 16, 70001])
def test_bitmask_messages_match_reference(env, n):
    w = torch.zeros(n)
    packed = R.pack_mask(torch.arange(n) % 3 == 0)
    kept = int((torch.arange(n) % 3 == 0).sum())
    bad_padding = packed.clone()
    bad_padding[-1] |= 0x80
    cases = [(packed, torch.ones(kept + 2)), (packed[:-1], torch.ones(kept)),
             (torch.cat([packed, packed[:1]]), torch.ones(kept))]
    if n % 8:
        cases.append((bad_padding, torch.ones(kept + 1)))
    for p, v in cases:
        with pytest.raises(ValueError) as got:
            C.apply_bitmask_(w, p, v, 1.0)
        with pytest.raises(ValueError) as expected:
            R.apply_bitmask_(w.clone(), p, v, 1.0)
        assert str(got.value) == str(expected.value)
    assert not bool(w.any())


def test_large_mixed_against_reference(env):
    """A bf16 tensor with chunk-crossing ties: every op, both thread counts via the fixture."""
    n = 5 * 65536 + 321
    x = torch.randint(-3, 4, (n,)).to(torch.bfloat16) * 0.25
    for k in (1, n // 7, n // 2, n - 3):
        assert_bitwise_equal(C.topk_mask(x, k), R.topk_mask(x, k), f"k={k}")
    t = int(R.magnitude_keys(x)[5])
    equal = int((R.magnitude_keys(x) == t).sum())
    for take in (1, equal // 3, equal - 1):
        assert_bitwise_equal(C.threshold_mask(x, t, take), R.threshold_mask(x, t, take))


def _reference_uniform_range(first, count, seed, stream):
    from deltaops.reference.philox import philox4x32_10
    mask32 = 0xFFFFFFFF
    index = torch.arange(first, first + count, dtype=torch.int64)
    block = index >> 2
    zeros = torch.zeros_like(block)
    words = philox4x32_10(block & mask32, block >> 32, zeros + (stream & mask32), zeros,
                          seed & mask32, seed >> 32)
    lane = index & 3
    out = words[0]
    for j in (1, 2, 3):
        out = torch.where(lane == j, words[j], out)
    return (out >> 8).to(torch.float32) * (2.0**-24)


@pytest.mark.parametrize("first,count", [(0, 1000), (2**34 - 4 * 300 - 3, 2500), (2**34 - 1, 9),
                                         (2**40 + 3, 777), (2**35 + 64, 4096), (5 * 2**32 - 2, 3)])
def test_philox_high_counter_words(env, first, count):
    for seed, stream in ((0, 0), (2**63 - 1, 2**32 - 1), (987654321, 5)):
        assert_bitwise_equal(C._philox_uniform_range(first, count, seed, stream),
                             _reference_uniform_range(first, count, seed, stream), f"first={first}")


def test_shapes_and_aliasing(env):
    x = torch.tensor(-2.5, dtype=torch.bfloat16)  # 0-d
    assert C.topk_mask(x, 1).shape == ()
    assert bool(C.topk_mask(x, 1)) and not bool(C.topk_mask(x, 0))
    assert C.threshold_mask(x, 0, 0).shape == ()
    assert C.dare(x, 0.5, 1, 0, True).shape == ()
    assert C.philox_uniform_like(x, 1, 0).shape == ()
    for dtype in DTYPES:
        w = make(1031, dtype, "special", nan=True).reshape(1031, 1)
        a, b = w.clone(), w.clone()
        C.apply_dense_(a, a, 0.75)  # weight and delta are the same tensor
        R.apply_dense_(b, b.clone(), 0.75)
        assert_bitwise_equal(a, b)
    y = torch.randn(3, 4, 5).to(torch.float16)
    assert C.topk_mask(y, 7).shape == (3, 4, 5)
    assert C.dare(y, 0.5, 1, 0, False).shape == (3, 4, 5)
