"""The low-bit reference (deltaops.reference.quant) against independent oracles, and its formats.

Oracles here are written differently from the reference (Python loops over
numpy float32 scalars, math.fsum, BitNet's and BitDelta's own formulas), so a
mistake in the vectorized reference shows up as a mismatch.
"""

import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch

import deltaops
from deltaops.reference import quant as ref
from deltaops.reference.sparse import topk_mask

from tolerances import assert_bitwise_equal

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---- pack_bits / unpack_bits --------------------------------------------------------


def pack_oracle(codes: list[int], bits: int) -> list[int]:
    stream = 0
    for i, c in enumerate(codes):
        stream |= c << (i * bits)
    nbytes = (len(codes) * bits + 7) // 8
    return [(stream >> (8 * b)) & 0xFF for b in range(nbytes)]


def test_worked_examples_of_the_readme():
    assert ref.pack_bits(torch.tensor([1, 2, 3, 0, 1], dtype=torch.uint8), 2).tolist() == [0x39, 0x01]
    assert ref.pack_bits(torch.tensor([5, 3, 6], dtype=torch.uint8), 3).tolist() == [0x9D, 0x01]
    assert ref.pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.uint8), 1).tolist() == [0x0D, 0x01]
    assert ref.pack_bits(torch.tensor([0xA, 0x3, 0xF], dtype=torch.uint8), 4).tolist() == [0x3A, 0x0F]


@pytest.mark.parametrize("bits", ref.SUPPORTED_BITS)
@pytest.mark.parametrize("numel", [0, 1, 3, 7, 8, 13, 64, 101])
def test_pack_matches_oracle_and_round_trips(bits, numel):
    codes = torch.randint(0, 1 << bits, (numel,), dtype=torch.uint8)
    packed = ref.pack_bits(codes, bits)
    assert packed.tolist() == pack_oracle(codes.tolist(), bits)
    assert_bitwise_equal(ref.unpack_bits(packed, bits, numel), codes, "round trip")
    assert_bitwise_equal(deltaops.unpack_bits(deltaops.pack_bits(codes, bits), bits, numel), codes)


def test_pack_and_unpack_errors():
    with pytest.raises(ValueError, match="does not fit in 2 bits"):
        deltaops.pack_bits(torch.tensor([0, 4], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="bits must be one of"):
        deltaops.pack_bits(torch.tensor([0], dtype=torch.uint8), 5)
    with pytest.raises(TypeError, match="codes has dtype int64"):
        deltaops.pack_bits(torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="has 1 bytes; 5 codes of 2 bits need 2"):
        deltaops.unpack_bits(torch.tensor([1], dtype=torch.uint8), 2, 5)
    with pytest.raises(ValueError, match="padding bits"):
        deltaops.unpack_bits(torch.tensor([0, 0xFF], dtype=torch.uint8), 3, 3)
    with pytest.raises(ValueError, match="numel must be"):
        deltaops.unpack_bits(torch.tensor([0], dtype=torch.uint8), 2, -1)


# ---- exact means ----------------------------------------------------------------------------


def fsum_mean(values: torch.Tensor) -> float:
    """fp32(fp64(exact sum) / n): math.fsum is the correctly rounded double of the exact sum."""
    flat = values.float().abs().reshape(-1).double().tolist()
    if not flat:
        return 0.0
    return float(np.float32(math.fsum(flat) / len(flat)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_mean_matches_fsum_and_ignores_order(dtype):
    # a wide dynamic range, where a float sum would depend on its order
    x = (torch.randn(37, 53) * torch.exp2(torch.randint(-30, 10, (37, 53)).float())).to(dtype)
    x = torch.where(torch.isfinite(x), x, torch.zeros((), dtype=dtype))
    x.view(-1)[:5] = torch.tensor([0.0, -0.0, 1e-40, -3e-39, 1e-45]).to(dtype)
    mean = ref.exact_abs_mean(x)
    assert mean.item() == fsum_mean(x)
    shuffled = x.reshape(-1)[torch.randperm(x.numel())].reshape(x.shape)
    assert_bitwise_equal(ref.exact_abs_mean(shuffled), mean, "order")
    rows = ref.exact_abs_mean(x, per_row=True)
    assert rows.tolist() == [fsum_mean(r) for r in x]


def test_exact_mean_of_large_values_and_empty():
    x = torch.tensor([3.0e38, 3.0e38, -3.0e38])
    assert ref.exact_abs_mean(x).item() == fsum_mean(x)
    assert ref.exact_abs_mean(torch.zeros(0, 4)).tolist() == [0.0]


# ---- sign (BitDelta) -----------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["tensor", "row"])
def test_sign_codes_scales_and_zero_maps_to_plus(granularity):
    x = torch.randn(5, 19).to(torch.bfloat16)
    x[0, :3] = torch.tensor([0.0, -0.0, -1e-3])
    delta = deltaops.quantize_sign(x, granularity=granularity)
    codes = delta.codes()
    assert codes[0, :3].tolist() == [1, 1, 0]
    assert_bitwise_equal(codes, (x >= 0).to(torch.uint8))
    if granularity == "tensor":
        assert delta.scales.shape == (1, 1) and delta.scales.item() == fsum_mean(x)
    else:
        assert delta.scales.reshape(-1).tolist() == [fsum_mean(r) for r in x]
    s = delta.scales.expand(5, 1).float()
    expected = torch.where(x >= 0, s, -s)
    assert_bitwise_equal(delta.dequantize(torch.float32), expected)


def bitdelta_pack_oracle(signs: torch.Tensor) -> torch.Tensor:
    """BitDelta's layout by loops: (in/32, out) int32, bit j of word w = sign of (o, 32w + j)."""
    out_f, in_f = signs.shape
    words = torch.zeros(in_f // 32, out_f, dtype=torch.int64)
    for o in range(out_f):
        for i in range(in_f):
            if signs[o, i]:
                words[i // 32, o] |= 1 << (i % 32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def test_bitdelta_mask_import_and_export():
    x = torch.randn(6, 96)
    delta = deltaops.quantize_sign(x)
    mask, coeff = delta.to_bitdelta()
    assert mask.dtype == torch.int32 and mask.shape == (3, 6)
    assert_bitwise_equal(mask, bitdelta_pack_oracle(x >= 0), "mask")
    assert coeff.item() == delta.scales.item()
    back = deltaops.SignDelta.from_bitdelta(mask, coeff)
    assert_bitwise_equal(back.packed, delta.packed)
    # BitDelta's own dequantization: (bit * 2 - 1) * coeff
    bits = ((mask.to(torch.int64) & 0xFFFFFFFF).unsqueeze(-1) >> torch.arange(32)) & 1
    expected = ((bits.permute(1, 0, 2).reshape(6, 96) * 2 - 1).float() * coeff)
    assert_bitwise_equal(back.dequantize(torch.float32), expected)
    with pytest.raises(ValueError, match="multiple of 32"):
        deltaops.quantize_sign(torch.randn(4, 40)).to_bitdelta()
    with pytest.raises(ValueError, match="one per row"):
        deltaops.quantize_sign(torch.randn(4, 32), granularity="row").to_bitdelta()
    with pytest.raises(ValueError, match="one scalar"):
        deltaops.SignDelta.from_bitdelta(mask, torch.ones(2))


# ---- ternary ------------------------------------------------------------------------------


def bitnet_b158(w: torch.Tensor) -> torch.Tensor:
    """BitNet b1.58's weight quantizer as the paper writes it (integer q)."""
    scale = w.abs().mean().clamp(min=1e-5)
    return (w / scale).round().clamp(-1, 1)


def test_absmean_on_rounding_ties():
    # mean |x| is exactly 1, so x / s == x: values sit on the .5 ties
    x = torch.tensor([0.5, -0.5, 1.5, -1.5, 0.25, 1.75, 2.5, -1.5, 0.0, 0.0])
    assert ref.exact_abs_mean(x).item() == 1.0
    delta = deltaops.quantize_ternary(x)
    q = delta.codes().to(torch.int64) - 1
    assert q.tolist() == [0, 0, 1, -1, 0, 1, 1, -1, 0, 0]
    assert q.tolist() == bitnet_b158(x).to(torch.int64).tolist()
    assert delta.scales.item() == 1.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_absmean_matches_bitnet_and_clamps_scale(dtype):
    x = torch.randn(31, 45).to(dtype)
    q = deltaops.quantize_ternary(x).codes().to(torch.int64) - 1
    assert torch.equal(q, bitnet_b158(x.float()).to(torch.int64))
    zero = deltaops.quantize_ternary(torch.zeros(3, 5, dtype=dtype))
    assert zero.scales.item() == float(np.float32(1e-5))
    assert zero.codes().eq(1).all()


def test_compeft_codes_and_scale():
    x = (torch.randn(24, 40) * 1e-3).to(torch.bfloat16)  # many equal magnitudes
    density = 0.25
    delta = deltaops.quantize_ternary(x, method="compeft", density=density, alpha=2.0)
    keep = topk_mask(x, int(density * x.numel()))
    expected = torch.where(keep, torch.sign(x.float()).to(torch.int64) + 1, 1).to(torch.uint8)
    assert_bitwise_equal(delta.codes(), expected)
    # ComPEFT's scale: alpha * std of the unpruned delta, Bessel-corrected (torch.std)
    assert delta.scales.item() == float(np.float32(np.float32(2.0) * np.float32(x.double().std().item())))
    with pytest.raises(ValueError, match="needs density"):
        deltaops.quantize_ternary(x, method="compeft")
    with pytest.raises(ValueError, match="density applies"):
        deltaops.quantize_ternary(x, density=0.5)


# ---- ComPEFT's exact standard deviation ---------------------------------------------------


def _fp32_neighbours(value: float) -> tuple[Fraction, Fraction]:
    below = np.nextafter(np.float32(value), np.float32(0))
    above = np.nextafter(np.float32(value), np.float32(np.inf))
    return Fraction(float(below)), Fraction(float(above))


def assert_nearest_fp32_sqrt(value: float, num: int, den: int):
    """value is the fp32 nearest sqrt(num / den): its square root lies between the
    midpoints to its neighbours (checked on squares, exactly)."""
    assert float(np.float32(value)) == value
    target = Fraction(num, den)
    below, above = _fp32_neighbours(value)
    here = Fraction(value)
    assert ((below + here) / 2) ** 2 <= target <= ((here + above) / 2) ** 2, (num, den, value)


def test_round_sqrt_to_fp32_is_correctly_rounded():
    rng = random.Random(7)
    for _ in range(3000):
        num = rng.getrandbits(rng.randint(1, 320)) << rng.randint(0, 8)
        den = rng.getrandbits(rng.randint(1, 320)) or 1
        value = ref.round_sqrt_to_fp32(num, den)
        if value == math.inf:
            assert Fraction(num, den) >= Fraction(2 ** 128 - 2 ** 103) ** 2
        elif value == 0.0:
            assert Fraction(num, den) <= Fraction(1, 2 ** 300)
        else:
            assert_nearest_fp32_sqrt(value, num, den)
    # exact squares, subnormal results and the ties between subnormals
    assert ref.round_sqrt_to_fp32(9, 4) == 1.5
    assert ref.round_sqrt_to_fp32(1, 2 ** 298) == 2.0 ** -149  # the smallest subnormal
    assert ref.round_sqrt_to_fp32(1, 2 ** 300) == 0.0  # 2^-150: a tie, to even (zero)
    assert ref.round_sqrt_to_fp32(9, 2 ** 302) == 2.0 ** -149  # 1.5 * 2^-150 rounds up
    assert ref.round_sqrt_to_fp32(1, 2 ** 200) == 2.0 ** -100
    assert ref.round_sqrt_to_fp32(2 ** 256, 1) == math.inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_exact_std_is_torch_std_rounded_to_fp32(dtype):
    """On ordinary data torch's fp64 std, rounded to fp32, is the exact value's nearest fp32."""
    g = torch.Generator().manual_seed(3)
    for n, scale, offset in ((2, 1.0, 0.0), (17, 1e-3, 0.0), (1000, 1.0, 3.0), (4099, 1e-2, -1e-2)):
        x = (torch.randn(n, generator=g) * scale + offset).to(dtype)
        assert ref.exact_std(x) == float(x.double().std().float())
    assert ref.exact_std(torch.ones(1, dtype=dtype)) == 0.0
    assert ref.exact_std(torch.full((5,), 3.0, dtype=dtype)) == 0.0


def test_exact_std_against_rational_arithmetic():
    """The definition itself: sqrt((n sum x^2 - (sum x)^2) / (n (n - 1))) over the exact
    values, rounded once; values spanning subnormals to 1e30 and a large mean."""
    cases = [
        torch.tensor([1e30, -1e30, 1.0, 2.0 ** -140, 3.5]),
        torch.tensor([2.0 ** -149, 0.0, 2.0 ** -148]),
        torch.tensor([1e8 + 1, 1e8 - 1, 1e8, 1e8 + 3]),
        torch.randn(300, generator=torch.Generator().manual_seed(5)) * 1e-20 + 7.0,
    ]
    for x in cases:
        values = [Fraction(v) for v in x.double().tolist()]
        n = len(values)
        num = n * sum(v * v for v in values) - sum(values) ** 2
        var = num / (n * (n - 1))
        assert_nearest_fp32_sqrt(ref.exact_std(x), var.numerator, var.denominator)


def test_std_from_moments_is_exact_or_undecided():
    x = (torch.randn(50_000, generator=torch.Generator().manual_seed(9)) * 1e-3).bfloat16()
    exact = ref.exact_std(x)
    moments = ref.fp64_moments(x)
    assert ref.std_from_moments(x.numel(), *moments.tolist()) == exact
    # a bound too loose to decide, or inconsistent input: no answer rather than a wrong one
    s1, s2, _ = moments.tolist()
    assert ref.std_from_moments(x.numel(), s1, s2, 2.0 ** 52) is None
    assert ref.std_from_moments(x.numel(), s1, float("nan"), 10.0) is None
    # a mean far above the spread: fp64's one-pass moments cancel, the interval is wide
    shifted = (torch.randn(4096, generator=torch.Generator().manual_seed(2)) + 3e6).float()
    moments = ref.fp64_moments(shifted)
    assert ref.std_from_moments(shifted.numel(), *moments.tolist()) is None
    assert_bitwise_equal(ref.compeft_scale_from_moments(shifted, moments, 1.0), ref.compeft_scale(shifted, 1.0))


# ---- uniform group quantization -----------------------------------------------------------


def uniform_oracle(x: torch.Tensor, bits: int, group_size: int, symmetric: bool):
    """Per-group loops in numpy float32: (codes, scales, zeros) as nested lists."""
    rows = x.float().reshape(-1, x.shape[-1]).numpy()
    cols = rows.shape[1]
    gs = cols if group_size == -1 else group_size
    maxq = (1 << bits) - 1
    f32 = np.float32
    all_codes, all_scales, all_zeros = [], [], []
    for row in rows:
        codes, scales, zeros = [], [], []
        for start in range(0, cols, gs):
            group = [f32(v) for v in row[start:start + gs]]
            if symmetric:
                s = f32(max(abs(v) for v in group) / f32((1 << (bits - 1)) - 1))
                z = 1 << (bits - 1)
            else:
                lo, hi = min(min(group), f32(0)), max(max(group), f32(0))
                s = f32(f32(hi - lo) / f32(maxq))
                z = 0 if s == 0 else int(min(max(np.rint(f32(-lo / s)), 0), maxq))
            for v in group:
                q = z if s == 0 else int(min(max(np.rint(min(max(f32(v / s), -512), 512)) + z, 0), maxq))
                codes.append(q)
            scales.append(float(s))
            zeros.append(z)
        all_codes.append(codes)
        all_scales.append(scales)
        all_zeros.append(zeros)
    return all_codes, all_scales, all_zeros


@pytest.mark.parametrize("bits", ref.UNIFORM_BITS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("shape,group_size", [((5, 32), 8), ((3, 37), 16), ((4, 19), -1), ((23,), 5)])
def test_uniform_matches_oracle(bits, symmetric, shape, group_size):
    x = torch.randn(shape).to(torch.bfloat16)
    if len(shape) == 2:
        x[0] = 0  # an all-zero row: all-zero groups
    delta = deltaops.quantize_uniform(x, bits, group_size=group_size, symmetric=symmetric)
    codes, scales, zeros = uniform_oracle(x, bits, group_size, symmetric)
    assert delta.codes().reshape(-1, shape[-1]).tolist() == codes
    assert delta.scales.tolist() == scales
    assert delta.zeros.tolist() == zeros
    if len(shape) == 2:
        assert delta.dequantize(torch.float32)[0].eq(0).all()


def test_uniform_rounding_ties():
    # asymmetric 2 bits over [0, 3]: s = 1, z = 0, so x / s sits on ties at .5
    x = torch.tensor([[0.0, 3.0, 0.5, 1.5, 2.5, 1.0]])
    delta = deltaops.quantize_uniform(x, 2, group_size=-1)
    assert delta.scales.tolist() == [[1.0]] and delta.zeros.tolist() == [[0]]
    assert delta.codes().tolist() == [[0, 3, 0, 2, 2, 1]]


def test_uniform_dequantization_formula():
    x = torch.randn(6, 40)
    delta = deltaops.quantize_uniform(x, 4, group_size=16)
    q = delta.codes().to(torch.int32)
    cols = torch.arange(40) // 16
    expected = (q - delta.zeros[:, cols].to(torch.int32)).float() * delta.scales[:, cols]
    assert_bitwise_equal(delta.dequantize(torch.float32), expected)
    err = (expected - x).norm() / x.norm()
    assert err < 0.15


# ---- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_and_inf_rejected(bad):
    x = torch.randn(4, 8)
    x[2, 3] = bad
    for call in (lambda: deltaops.quantize_sign(x), lambda: deltaops.quantize_ternary(x),
                 lambda: deltaops.quantize_ternary(x, method="compeft", density=0.5),
                 lambda: deltaops.quantize_uniform(x, 4, group_size=4)):
        with pytest.raises(ValueError, match="NaN or inf .*flat index 19"):
            call()


def test_argument_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="bits must be one of 2, 3, 4, 8"):
        deltaops.quantize_uniform(x, 1)
    with pytest.raises(ValueError, match="group_size must be positive"):
        deltaops.quantize_uniform(x, 4, group_size=0)
    with pytest.raises(ValueError, match="granularity must be one of"):
        deltaops.quantize_sign(x, granularity="column")
    with pytest.raises(ValueError, match="method must be one of"):
        deltaops.quantize_ternary(x, method="round")
    with pytest.raises(ValueError, match="at least one dimension"):
        deltaops.quantize_sign(torch.tensor(1.0))
    with pytest.raises(TypeError, match="delta has dtype int64"):
        deltaops.quantize_sign(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="overflows fp32"):
        deltaops.quantize_uniform(torch.tensor([3e38, -3e38]), 4)


def test_apply_checks_before_writing():
    w = torch.randn(4, 8).to(torch.bfloat16)
    before = w.clone()
    delta = deltaops.quantize_uniform(torch.randn(4, 8), 4, group_size=4)
    with pytest.raises(ValueError, match="weight has shape"):
        deltaops.apply_delta_(torch.randn(4, 9), delta)
    with pytest.raises(ValueError, match="alpha must be finite"):
        deltaops.apply_delta_(w, delta, float("nan"))
    bad = delta.scales.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="scales contain NaN or inf"):
        ref.apply_quantized_(w, delta.packed, bad, delta.zeros, 4, 4, 1.0)
    assert_bitwise_equal(w, before)


# ---- formats: apply, undo, sizes, save / load ---------------------------------------------------


def all_formats(x):
    return [deltaops.quantize_sign(x), deltaops.quantize_sign(x, granularity="row"),
            deltaops.quantize_ternary(x), deltaops.quantize_ternary(x, method="compeft", density=0.3),
            deltaops.quantize_uniform(x, 2, group_size=8), deltaops.quantize_uniform(x, 3, group_size=-1),
            deltaops.quantize_uniform(x, 4, group_size=16, symmetric=True),
            deltaops.quantize_uniform(x, 8, group_size=7)]


@pytest.mark.parametrize("wdtype", DTYPES)
def test_apply_is_the_dense_apply_of_the_fp32_dequantization(wdtype):
    x = (torch.randn(9, 35) * 1e-2).to(torch.bfloat16)
    for delta in all_formats(x):
        w = torch.randn(9, 35).to(wdtype)
        expected = w.clone()
        dq = ref.dequantize_f32(delta.shape, delta.packed, delta.scales, delta.zeros, delta.bits,
                                delta.group_size)
        expected = (expected.float() + dq * torch.tensor(0.75, dtype=torch.float32)).to(wdtype)
        undo = delta.apply_(w, 0.75, keep_original=True)
        assert_bitwise_equal(w, expected, repr(delta))
        undo.revert()


def test_sizes():
    x = torch.randn(64, 256).to(torch.bfloat16)
    dense = x.numel() * 2
    sizes = {repr(d): d.nbytes for d in all_formats(x)}
    assert deltaops.quantize_sign(x).nbytes == 64 * 256 // 8 + 4
    assert deltaops.quantize_ternary(x).nbytes == 64 * 256 // 4 + 4
    assert deltaops.quantize_uniform(x, 4, group_size=128).nbytes == 64 * 128 + 64 * 2 * 5
    assert deltaops.quantize_uniform(x, 4, group_size=128, symmetric=True).nbytes == 64 * 128 + 64 * 2 * 4
    assert all(size < dense for size in sizes.values()), sizes


def test_save_and_load_round_trip(tmp_path):
    x = torch.randn(10, 24).to(torch.float16)
    for i, delta in enumerate(all_formats(x)):
        path = str(tmp_path / f"d{i}.safetensors")
        delta.save(path)
        back = deltaops.load_quantized(path)
        assert type(back) is type(delta) and back.shape == delta.shape and back.dtype == torch.float16
        assert_bitwise_equal(back.dequantize(), delta.dequantize(), repr(delta))
        assert type(delta).load(path).nbytes == delta.nbytes
    with pytest.raises(ValueError, match="not a sign delta"):
        deltaops.SignDelta.load(str(tmp_path / "d2.safetensors"))


def test_load_rejects_bad_files(tmp_path):
    from safetensors.torch import save_file

    delta = deltaops.quantize_ternary(torch.randn(4, 8))
    path = str(tmp_path / "t.safetensors")
    meta = delta.metadata()
    save_file(delta.stored_tensors(), path, metadata={**meta, "format_version": "9"})
    with pytest.raises(ValueError, match="version 9 is not supported"):
        deltaops.load_quantized(path)
    save_file({"packed": torch.full_like(delta.packed, 0xFF), "scales": delta.scales}, path,
              metadata=meta)
    with pytest.raises(ValueError, match="ternary code 3"):
        deltaops.load_quantized(path)
    save_file(delta.stored_tensors(), path, metadata={"format": "other"})
    with pytest.raises(ValueError, match="not a deltaops low-bit delta"):
        deltaops.load_quantized(path)
