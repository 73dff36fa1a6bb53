"""The vectorized CPU paths of the low-bit family against the reference, bit for bit.

deltaops._C runs the quantizers and applies with AVX-512 kernels where the
CPU has them (kernel table "avx512") and with the portable loops otherwise
("avx2"). These tests run both tables, with 1 and 2 threads, on the cases
the vector paths handle apart: 16-element units and their partial tail,
units whose elements belong to two groups or two rows, groups that cross
the 8192/16384-element chunks, rows that start inside a byte, the exact-mean
window (values far below a block's largest, all-subnormal blocks), rounding
ties of x / s, the ternary threshold next to s / 2, fp16 rounding of applied
weights, NaN weights, and the errors (NaN/inf, overflowing groups).
"""

from fractions import Fraction

import numpy as np
import pytest
import torch

import deltaops
from deltaops.ops import quant as qops
from deltaops.reference import quant as ref

from backend_harness import cpu_kernel_tables, skip_unless_usable
from tolerances import assert_bitwise_equal

C = pytest.importorskip("deltaops._C")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(params=cpu_kernel_tables())
def isa(request):
    """The kernel table under test; the test itself runs on one thread (the
    reference too), and on_cpu runs each kernel call with 1 and 2 threads."""
    skip_unless_usable("cpu")
    old = torch.get_num_threads()
    C._set_isa(request.param)
    torch.set_num_threads(1)
    yield request.param
    torch.set_num_threads(old)
    C._set_isa("auto")


def _threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


def on_cpu(op, *args, inplace=False):
    """op(*args) on the cpu backend with 1 and with 2 threads: the results must be
    the same bits; returns them (for in-place ops, the mutated first argument)."""
    results = []
    for threads in (1, 2):
        call_args = [a.clone() if inplace and isinstance(a, torch.Tensor) else a for a in args]
        with deltaops.use_backend("cpu"):
            out = _threads(threads, lambda: op(*call_args))
        results.append(call_args[0] if inplace else out)
    same(results[1], results[0], "1 vs 2 threads")
    return results[0]


def same(actual, expected, what=""):
    if isinstance(expected, (tuple, list)):
        for a, e in zip(actual, expected):
            assert_bitwise_equal(a, e, what)
    else:
        assert_bitwise_equal(actual, expected, what)


def sample(shape, dtype, seed=0, scale=1e-2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    flat = x.view(-1)
    if flat.numel() > 8:  # zeros of both signs, a repeated value, one element far below the rest
        flat[:4] = torch.tensor([0.0, -0.0, scale, scale])
        flat[-1] = scale * 2.0 ** -30
    return x.to(dtype)


# (shape, group_size): units across groups and rows, groups across chunks, tails
UNIFORM_CASES = [
    ((3, 40000), 128),   # groups cross the 8192-element chunks (40000 % 8192 != 0)
    ((5, 8200), -1),     # one group per row, longer than a chunk
    ((37, 1001), 7),     # groups of 7: every unit spans several groups; odd numel
    ((9, 4096 + 24), 100),
    ((70000,), 16384 + 3),
    ((2, 3, 515), 16),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", ref.UNIFORM_BITS)
def test_uniform_large_and_odd_shapes(isa, dtype, bits):
    for k, (shape, gs) in enumerate(UNIFORM_CASES):
        x = sample(shape, dtype, seed=k)
        rows = x.reshape(-1, shape[-1])
        rows[1 % rows.shape[0], : min(300, shape[-1])] = 0  # all-zero groups
        if dtype != torch.float16:
            rows[0, 5:9] *= 1e30  # a group with a huge range
        g = ref.resolve_group_size(gs, shape[-1])
        for symmetric in (False, True):
            expected = ref.quantize_uniform(x, bits, g, symmetric)
            actual = on_cpu(qops.quantize_uniform_op, x, bits, g, symmetric)
            same(actual, expected, f"{isa} {shape} g{gs} sym={symmetric}")


def test_uniform_rounding_ties(isa):
    # s = 1 (range [0, 15], 4 bits) and s = 3 (range [0, 45]): x / s = k + 0.5 exactly,
    # rounded half to even, in every lane position of a unit and in the tail
    for top, step in ((15.0, 1.0), (45.0, 3.0)):
        ties = torch.arange(0, 15, dtype=torch.float32) * step + 0.5 * step
        group = torch.cat([torch.tensor([0.0, top]), ties, ties.flip(0), ties[:7]])
        x = group.repeat(3, 1)
        x[2] = -x[2].flip(0)  # zero point at the top
        for dtype in DTYPES:
            xd = x.to(dtype)
            expected = ref.quantize_uniform(xd, 4, group.numel(), False)
            same(on_cpu(qops.quantize_uniform_op, xd, 4, group.numel(), False), expected, f"ties {top}")
            same(on_cpu(qops.quantize_uniform_op, xd, 4, 16, True), ref.quantize_uniform(xd, 4, 16, True))


def test_uniform_subnormal_scales(isa):
    # groups whose spread / (2^b - 1) is a subnormal, or rounds to 0 (s == 0: every code is z):
    # the fast path's codes convert x / s to integers, which needs s rounded to nearest
    tiny = 2.0 ** -149
    g = torch.Generator().manual_seed(5)
    spreads = torch.tensor([1, 2, 3, 7, 15, 16, 255, 1000, 2 ** 20], dtype=torch.float64) * tiny
    x = (torch.rand(len(spreads), 256, generator=g, dtype=torch.float64) - 0.3) * spreads[:, None]
    x = x.to(torch.float32)  # subnormal fp32 values (and zeros)
    for bits in ref.UNIFORM_BITS:
        for symmetric in (False, True):
            same(on_cpu(qops.quantize_uniform_op, x, bits, 64, symmetric),
                 ref.quantize_uniform(x, bits, 64, symmetric), f"{isa} {bits} bits sym={symmetric}")


def test_uniform_overflowing_group_and_nonfinite(isa):
    x = torch.zeros(4, 20000)
    x[3, 19000] = 3e38
    x[3, 19001] = -3e38
    with pytest.raises(ValueError, match="overflows fp32"):
        on_cpu(qops.quantize_uniform_op, x, 4, 128, False)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = sample((3, 20000), torch.bfloat16)
        y[2, 1234] = bad
        for call in (lambda: qops.quantize_uniform_op(y, 3, 128, False),
                     lambda: qops.quantize_sign_op(y, False), lambda: qops.quantize_sign_op(y, True),
                     lambda: qops.quantize_ternary_absmean_op(y)):
            with deltaops.use_backend("cpu"), pytest.raises(ValueError, match="flat index 41234"):
                call()


@pytest.mark.parametrize("dtype", DTYPES)
def test_sign_and_absmean_large_and_odd_shapes(isa, dtype):
    # rows that start inside a byte (cols % 8 != 0), chunk-crossing rows, tails
    for k, shape in enumerate([(3, 40001), (64, 2049), (5, 16384), (300001,), (7, 9)]):
        x = sample(shape, dtype, seed=10 + k)
        for per_row in (False, True):
            same(on_cpu(qops.quantize_sign_op, x, per_row), ref.quantize_sign(x, per_row),
                 f"{isa} sign {shape} rows={per_row}")
        same(on_cpu(qops.quantize_ternary_absmean_op, x), ref.quantize_ternary_absmean(x),
             f"{isa} absmean {shape}")


def absmean_cases(dtype):
    """Tensors above the size where the CPU kernel reads a bf16 delta once (2^17
    elements), one per path: the band of threshold keys from a sample, codes
    fixed up, chunks rewritten, the band missed."""
    n = 300_007
    g = torch.Generator().manual_seed(13)
    normal = torch.randn(n, generator=g) * 1e-3
    yield "normal", normal.to(dtype)
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    # half the elements at 1/3 and half at 1: the threshold (mean / 2) is next to
    # 1/3, so every chunk has more band elements than it keeps aside
    yield "half at the threshold", (torch.where(torch.rand(n, generator=g) < 0.5, 1.0, 1.0 / 3.0) * signs).to(dtype)
    misleading = normal.clone()
    misleading[torch.arange(65536) * n // 65536] = 1.0  # the sampled elements: a mean far too large
    yield "sample misses", misleading.to(dtype)
    yield "zeros (s = 1e-5)", torch.zeros(n, dtype=dtype)
    rows = torch.randn(300, 1001, generator=g) * torch.exp(torch.rand(300, 1, generator=g) * 2.3) * 1e-4
    yield "row scales", rows.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_absmean_on_large_tensors(isa, vbmi2, dtype):
    """BitNet absmean's one-read path (bf16) and the two-pass one: codes and scale
    bit for bit against the reference, 1 and 2 threads alike."""
    for name, x in absmean_cases(dtype):
        same(on_cpu(qops.quantize_ternary_absmean_op, x), ref.quantize_ternary_absmean(x), f"{isa} {name}")


def test_exact_mean_windows(isa):
    # per 2048-element block: values 2^-40 below the block's largest (below the
    # exponent windows, 24 for fp32 and 20 for bf16), blocks of subnormals only,
    # a block of zeros, and magnitudes up to 3.2e38 (the sum of a block passes
    # 2^59 units only if the window rule is wrong)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6 * 2048 + 77, generator=g)
    x[:2048] *= torch.exp2(torch.randint(-60, 1, (2048,), generator=g).float())
    x[2048:4096] = torch.randint(-(1 << 23), 1 << 23, (2048,), generator=g).float() * 2.0 ** -149
    x[4096:6144] = 0.0
    x[6144:8192] = (torch.rand(2048, generator=g) + 1) * 1.6e38  # finite in bf16 too
    x[8192:] *= 2.0 ** -40
    x[8192] = 1.0
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        same(on_cpu(qops.quantize_sign_op, xd, False), ref.quantize_sign(xd, False), "sign")
        same(on_cpu(qops.quantize_sign_op, xd.reshape(-1, 5), True), ref.quantize_sign(xd.reshape(-1, 5), True))
        same(on_cpu(qops.quantize_ternary_absmean_op, xd[:6144]), ref.quantize_ternary_absmean(xd[:6144]))


def _toward_zero(v: float, dtype) -> float:
    """``v`` (positive) rounded toward zero to ``dtype``."""
    r = torch.tensor(v, dtype=torch.float64).to(dtype)
    while float(r) > v:
        r = torch.nextafter(r, torch.zeros((), dtype=dtype))
    return float(r)


def _split_exactly(total: Fraction, dtype) -> list[float]:
    """Values of ``dtype`` whose exact sum is ``total`` > 0 (a few pieces, each exact)."""
    pieces = []
    rest = total
    while rest != 0:
        piece = _toward_zero(float(rest), dtype)
        pieces.append(piece)
        rest -= Fraction(piece)
    return pieces


@pytest.mark.parametrize("dtype", DTYPES)
def test_ternary_threshold_next_to_half_the_scale(isa, dtype):
    # The absmean scale s is made exact by construction (64 elements whose
    # magnitudes sum to exactly 64 * s); the elements under test sit at
    # s / 2 and a few ulps of the dtype either side, where q = rne(fl(x / s))
    # flips (the bf16 kernel compares 16-bit patterns against the fp32 threshold).
    g = np.random.default_rng(7)
    low, high = (-15, 20) if dtype == torch.float32 else (-8, 8)
    for trial in range(12):
        s = float(torch.tensor(g.uniform(1.0, 2.0) * 2.0 ** int(g.integers(low, high))).to(dtype))
        half = torch.tensor(s / 2, dtype=dtype)
        candidates = [half]
        up = down = half
        for _ in range(4):
            up = torch.nextafter(up, torch.tensor(float("inf"), dtype=dtype))
            down = torch.nextafter(down, torch.zeros((), dtype=dtype))
            candidates += [up, down]
        for c in candidates:
            c = float(c)
            pieces = _split_exactly(Fraction(s) * 8 - 2 * Fraction(c), dtype)
            assert len(pieces) <= 6
            values = [c, -c] + pieces
            values += [0.0] * (8 - len(values)) + [s] * 56
            x = torch.tensor(values, dtype=dtype)
            assert sum(Fraction(abs(v)) for v in x.tolist()) == Fraction(s) * 64
            expected = ref.quantize_ternary_absmean(x)
            assert float(expected[1]) == s
            same(on_cpu(qops.quantize_ternary_absmean_op, x), expected, f"s={s!r} c={c!r}")


@pytest.mark.parametrize("wdtype", DTYPES)
def test_apply_large_and_odd_shapes(isa, wdtype):
    g = torch.Generator().manual_seed(3)
    for k, (shape, gs) in enumerate([((3, 40000), 128), ((37, 1001), 7), ((70001,), -1), ((9, 4120), 100)]):
        x = sample(shape, torch.bfloat16, seed=20 + k)
        deltas = [deltaops.quantize_sign(x), deltaops.quantize_sign(x, granularity="row"),
                  deltaops.quantize_ternary(x)]
        deltas += [deltaops.quantize_uniform(x, b, group_size=gs, symmetric=(b == 4)) for b in ref.UNIFORM_BITS]
        weight = (torch.randn(shape, generator=g) * 0.02).to(wdtype)
        flat = weight.view(-1)
        flat[:6] = torch.tensor([float("nan"), float("-inf"), 0.0, -0.0, 1e-7, -1e-7]).to(wdtype)
        if wdtype != torch.float32:  # sums that round to inf or to subnormals in the 16-bit types
            big = torch.finfo(wdtype).max
            flat[6:10] = torch.tensor([big, -big, torch.finfo(wdtype).tiny, 0.5]).to(wdtype)
        # whole 16-element units of subnormal weights, which alpha = 1e-36 keeps subnormal
        # (the stores' rounding of subnormal fp32 sums)
        tiny = torch.finfo(wdtype).tiny
        flat[32:96] = (torch.randn(64, generator=g) * tiny / 4).to(wdtype)
        for delta in deltas:
            for alpha in (-0.75, 1e4, 1e-36):
                w_ref = weight.clone()
                ref.apply_quantized_(w_ref, delta.packed, delta.scales, delta.zeros, delta.bits,
                                     delta.group_size, alpha)
                w_cpu = on_cpu(qops.apply_quantized_op, weight, delta.packed, delta.scales, delta.zeros,
                               delta.bits, delta.group_size, alpha, inplace=True)
                same(w_cpu, w_ref, f"{isa} {delta!r} alpha={alpha}")


def test_fast_paths_do_not_depend_on_the_thread_count():
    skip_unless_usable("cpu")
    x = sample((40, 2501), torch.bfloat16, seed=2)
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 5):
            torch.set_num_threads(threads)
            with deltaops.use_backend("cpu"):
                s = deltaops.quantize_sign(x, granularity="row")
                t = deltaops.quantize_ternary(x)
                u = deltaops.quantize_uniform(x, 3, group_size=100)
                w = torch.ones(40, 2501).bfloat16()
                u.apply_(w, 0.5)
                t.apply_(w, 0.25)
            results.append([s.packed, s.scales, t.packed, t.scales, u.packed, u.scales, u.zeros, w])
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            assert_bitwise_equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compeft_codes_match_the_reference(dtype):
    x = sample((33, 129), dtype, seed=4)
    x.view(-1)[10:20] = 0.0
    x.view(-1)[20:25] = -0.0
    for density in (0.0, 0.1, 0.3, 1.0):
        delta = deltaops.quantize_ternary(x, method="compeft", density=density, alpha=0.5)
        assert_bitwise_equal(delta.packed, ref.pack_bits(ref.compeft_codes(x, density), 2))
        assert_bitwise_equal(delta.scales, ref.compeft_scale(x, 0.5))
    empty = deltaops.quantize_ternary(torch.zeros(0, 5, dtype=dtype), method="compeft", density=0.5)
    assert empty.packed.numel() == 0
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[32, 100] = bad
        with pytest.raises(ValueError, match="NaN or inf .*flat index 4228"):
            deltaops.quantize_ternary(y, method="compeft", density=0.2)


def compeft_cases(dtype):
    """Tensors above the size where the CPU kernel picks its band of keys from a
    sample (2^17 elements), one per path of that kernel."""
    n = 300_007  # 5 chunks of 2^16, the last partial; not a multiple of 4 (a partial byte)
    g = torch.Generator().manual_seed(11)
    normal = (torch.randn(n, generator=g) * 1e-3).to(dtype)
    yield "normal", normal
    # few distinct magnitudes: most of each chunk in the band, so chunks are rewritten from x
    yield "heavy ties", (torch.randint(-3, 4, (n,), generator=g) * 0.25).to(dtype)
    # the sampled elements (index j * n // 2^16) unlike the rest: the band misses the
    # threshold and the kernel falls back to the full top-k
    misleading = (torch.randn(n, generator=g) * 1e-3).to(dtype)
    misleading[torch.arange(65536) * n // 65536] = 1e-7
    yield "sample misses", misleading
    # rows of very different scales (the real-shaped delta of bench/quant.py in small)
    rows = torch.randn(300, 1001, generator=g) * torch.exp(torch.rand(300, 1, generator=g) * 2.3) * 1e-4
    yield "row scales", rows.to(dtype)


def cpu_has_vbmi2() -> bool:
    try:
        return C._set_vbmi2(True)
    except ValueError:
        return False


@pytest.fixture(params=[True, False], ids=["vbmi2", "no-vbmi2"])
def vbmi2(request, isa):
    """The avx512 table's ComPEFT and absmean scans with AVX512-VBMI2 compresses and
    with the code written for CPUs without them (both run where the CPU has VBMI2)."""
    if request.param and (isa != "avx512" or not cpu_has_vbmi2()):
        pytest.skip("needs the avx512 table on a CPU with AVX512-VBMI2")
    if not request.param and isa != "avx512":
        yield False  # the portable table has no VBMI2 code: run it once
        return
    has = cpu_has_vbmi2()
    C._set_vbmi2(request.param)
    yield request.param
    C._set_vbmi2(has)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compeft_quantize_on_large_tensors(isa, vbmi2, dtype):
    """The CPU kernel's paths for fp32 and the 16-bit types (sampled band, codes fixed
    up after the threshold is known, chunks rewritten, full top-k when the band misses)
    and the portable one: codes bit for bit against the reference, 1 and 2 threads alike,
    the scale exact."""
    for name, x in compeft_cases(dtype):
        n = x.numel()
        for k in (1, n // 10, n // 2, n - 1, n):
            packed, moments = on_cpu(qops.compeft_quantize_op, x, k)
            assert_bitwise_equal(packed, ref.compeft_pack(x, ref.topk_mask(x, k)), f"{name} k={k}")
            assert_bitwise_equal(ref.compeft_scale_from_moments(x, moments, 1.0), ref.compeft_scale(x, 1.0),
                                 f"{name} scale")
    x = next(compeft_cases(dtype))[1].clone()
    x[200_000] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf .*flat index 200000"):
        on_cpu(qops.compeft_quantize_op, x, 100)
    with deltaops.use_backend("cpu"), pytest.raises(ValueError, match=r"k must be in \[0, 300007\]"):
        qops.compeft_quantize_op(x, 300_008)
