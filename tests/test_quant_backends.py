"""The low-bit kernels (cpu, triton) against the reference: codes, scales, zeros, packed bytes
and applied weights bit for bit; delta_bmm within a stated bound.

Triton runs under TRITON_INTERPRET=1 on small shapes (the conftest sets it).
"""

from fractions import Fraction

import pytest
import torch

import deltaops
from deltaops.formats.quant import stack_deltas
from deltaops.ops import quant as qops
from deltaops.reference import quant as ref

from backend_harness import KERNEL_BACKENDS, compare_with_reference, run_on, skip_unless_usable
from tolerances import assert_bitwise_equal

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (shape) odd on purpose: numel not a multiple of 8, rows starting inside a byte, one element
SHAPES = [(1,), (13,), (7, 37), (5, 64), (3, 2, 19)]


def sample(shape, dtype, scale=1e-2):
    x = (torch.randn(shape) * scale).to(dtype)
    flat = x.view(-1)
    if flat.numel() > 4:
        flat[:3] = torch.tensor([0.0, -0.0, scale]).to(dtype)
    return x


@KERNEL_BACKENDS
@pytest.mark.parametrize("bits", ref.SUPPORTED_BITS)
@pytest.mark.parametrize("numel", [0, 1, 5, 8, 29, 1000])
def test_pack_and_unpack(backend, bits, numel):
    codes = torch.randint(0, 1 << bits, (numel,), dtype=torch.uint8)
    packed = compare_with_reference(backend, qops.pack_bits_op, codes, bits, what="pack")
    compare_with_reference(backend, qops.unpack_bits_op, packed, bits, numel, what="unpack")


@KERNEL_BACKENDS
def test_pack_and_unpack_errors(backend):
    skip_unless_usable(backend)
    with deltaops.use_backend(backend):
        with pytest.raises(ValueError, match="does not fit in 3 bits"):
            qops.pack_bits_op(torch.tensor([1, 9], dtype=torch.uint8), 3)
        with pytest.raises(ValueError, match="padding bits"):
            qops.unpack_bits_op(torch.tensor([0xFF], dtype=torch.uint8), 2, 3)
        with pytest.raises(ValueError, match="need 2"):
            qops.unpack_bits_op(torch.tensor([0], dtype=torch.uint8), 4, 3)


@KERNEL_BACKENDS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_compeft_pack(backend, dtype, shape):
    """ComPEFT's codes from a kept mask: zeros (both signs) kept and dropped, every
    length (tails of the 2-bit packing), bit-identical packed bytes."""
    x = sample(shape, dtype)
    g = torch.Generator().manual_seed(x.numel())
    keep = torch.rand(x.shape, generator=g) < 0.4
    if x.numel() > 4:
        keep.view(-1)[:2] = True  # the +0.0 and -0.0 of sample() kept: code 1
    compare_with_reference(backend, qops.compeft_pack_op, x, keep, what="compeft_pack")
    skip_unless_usable(backend)
    with deltaops.use_backend(backend), pytest.raises(ValueError, match="keep"):
        qops.compeft_pack_op(x, keep.reshape(-1)[: max(x.numel() - 1, 0)])


def assert_moments_within_their_bound(x, moments):
    """compeft_quantize's contract, checked in exact arithmetic: with h = moments[2]
    and g = h u / (1 - h u), |s1 - sum x| <= g sum |x| and |s2 - sum x^2| <= g sum x^2."""
    s1, s2, h = moments.tolist()
    assert h == int(h) and 0 <= h < 2 ** 40
    g = Fraction(int(h), 2 ** 53) / (1 - Fraction(int(h), 2 ** 53))
    i1, i2 = ref.exact_moment_sums(x)
    abs_sum, _ = ref.exact_moment_sums(x.abs())
    assert abs(Fraction(s1) - Fraction(i1, 2 ** 149)) <= g * Fraction(abs_sum, 2 ** 149)
    assert abs(Fraction(s2) - Fraction(i2, 2 ** 298)) <= g * Fraction(i2, 2 ** 298)


@KERNEL_BACKENDS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_compeft_quantize(backend, dtype, shape):
    """ComPEFT's fused op: the codes of the top k bit for bit (zeros of both signs kept
    and dropped, every k from none to all), fp64 moments within their stated bound,
    and the scale they lead to equal to the exact one."""
    skip_unless_usable(backend)
    x = sample(shape, dtype)
    n = x.numel()
    for k in sorted({0, 1, n // 3, max(n - 1, 0), n}):
        packed, moments = run_on(backend, qops.compeft_quantize_op, x, k)
        assert_bitwise_equal(packed, ref.compeft_pack(x, ref.topk_mask(x, k)), f"k={k}")
        assert_moments_within_their_bound(x, moments)
        assert_bitwise_equal(ref.compeft_scale_from_moments(x, moments, 0.5), ref.compeft_scale(x, 0.5))
    with deltaops.use_backend(backend), pytest.raises(ValueError, match="NaN or inf .*flat index"):
        y = x.clone()
        y.view(-1)[-1] = float("nan")
        qops.compeft_quantize_op(y, n // 2)


@KERNEL_BACKENDS
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_sign_and_absmean(backend, dtype, shape):
    x = sample(shape, dtype)
    compare_with_reference(backend, qops.quantize_sign_op, x, False, what="sign tensor")
    compare_with_reference(backend, qops.quantize_sign_op, x, True, what="sign row")
    compare_with_reference(backend, qops.quantize_ternary_absmean_op, x, what="absmean")


@KERNEL_BACKENDS
def test_exact_mean_on_a_wide_dynamic_range(backend):
    x = torch.randn(40, 33) * torch.exp2(torch.randint(-60, 60, (40, 33)).float())
    x.view(-1)[:4] = torch.tensor([1e-45, 3e38, -2e-40, 0.0])
    compare_with_reference(backend, qops.quantize_sign_op, x, False, what="sign")
    compare_with_reference(backend, qops.quantize_sign_op, x, True, what="rows")
    compare_with_reference(backend, qops.quantize_ternary_absmean_op, x, what="absmean")


@KERNEL_BACKENDS
def test_absmean_ties_and_zero_input(backend):
    x = torch.tensor([0.5, -0.5, 1.5, -1.5, 0.25, 1.75, 2.5, -1.5, 0.0, 0.0])
    packed, _ = compare_with_reference(backend, qops.quantize_ternary_absmean_op, x)
    assert (ref.unpack_bits(packed, 2, 10).to(torch.int64) - 1).tolist() == [0, 0, 1, -1, 0, 1, 1, -1, 0, 0]
    compare_with_reference(backend, qops.quantize_ternary_absmean_op, torch.zeros(3, 9).bfloat16())


@KERNEL_BACKENDS
@pytest.mark.parametrize("bits", ref.UNIFORM_BITS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_uniform(backend, bits, symmetric, dtype):
    for shape, group_size in (((7, 37), 16), ((5, 64), 64), ((3, 2, 19), 5), ((13,), 13)):
        x = sample(shape, dtype)
        if len(shape) > 1:
            x.reshape(-1, shape[-1])[1] = 0  # all-zero groups
        compare_with_reference(backend, qops.quantize_uniform_op, x, bits, group_size, symmetric,
                               what=f"{shape} g{group_size}")


@KERNEL_BACKENDS
def test_quantize_uniform_ties(backend):
    x = torch.tensor([[0.0, 3.0, 0.5, 1.5, 2.5, 1.0, 0.5, 1.5, 2.5]])
    packed, _, _ = compare_with_reference(backend, qops.quantize_uniform_op, x, 2, 9, False)
    assert ref.unpack_bits(packed, 2, 9).tolist() == [0, 3, 0, 2, 2, 1, 0, 2, 2]


@KERNEL_BACKENDS
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_quantizers_reject_nan_and_inf(backend, bad):
    skip_unless_usable(backend)
    x = torch.randn(4, 10).bfloat16()
    x[3, 1] = bad
    with deltaops.use_backend(backend):
        for call in (lambda: qops.quantize_sign_op(x, False), lambda: qops.quantize_sign_op(x, True),
                     lambda: qops.quantize_ternary_absmean_op(x),
                     lambda: qops.quantize_uniform_op(x, 4, 4, False),
                     lambda: qops.compeft_quantize_op(x, 7)):
            with pytest.raises(ValueError, match="NaN or inf .*flat index 31"):
                call()


def formats_of(x):
    return [deltaops.quantize_sign(x), deltaops.quantize_sign(x, granularity="row"),
            deltaops.quantize_ternary(x), deltaops.quantize_ternary(x, method="compeft", density=0.2),
            deltaops.quantize_uniform(x, 2, group_size=16), deltaops.quantize_uniform(x, 3, group_size=5),
            deltaops.quantize_uniform(x, 4, group_size=-1, symmetric=True),
            deltaops.quantize_uniform(x, 8, group_size=32)]


@KERNEL_BACKENDS
@pytest.mark.parametrize("wdtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 37), (3, 2, 19), (1,)])
def test_apply_quantized(backend, wdtype, shape):
    x = sample(shape, torch.bfloat16)
    for delta in formats_of(x):
        weight = torch.randn(shape).to(wdtype)
        compare_with_reference(backend, qops.apply_quantized_op, weight, delta.packed, delta.scales,
                               delta.zeros, delta.bits, delta.group_size, -0.75, clone_args=True,
                               what=repr(delta))


@KERNEL_BACKENDS
def test_apply_validates_before_writing(backend):
    skip_unless_usable(backend)
    delta = deltaops.quantize_uniform(torch.randn(6, 20), 4, group_size=8)
    weight = torch.randn(6, 20).bfloat16()
    before = weight.clone()
    bad_scales = delta.scales.clone()
    bad_scales[-1, -1] = float("nan")
    bad_zeros = delta.zeros.clone()
    bad_zeros[0, 0] = 16
    bad_packed = delta.packed[:-1].clone()
    with deltaops.use_backend(backend):
        with pytest.raises(ValueError, match="scales contain NaN or inf"):
            qops.apply_quantized_op(weight, delta.packed, bad_scales, delta.zeros, 4, 8, 1.0)
        with pytest.raises(ValueError, match="zeros must be below"):
            qops.apply_quantized_op(weight, delta.packed, delta.scales, bad_zeros, 4, 8, 1.0)
        with pytest.raises(ValueError, match="packed has 59 bytes"):
            qops.apply_quantized_op(weight, bad_packed, delta.scales, delta.zeros, 4, 8, 1.0)
        with pytest.raises(ValueError, match="scales has shape"):
            qops.apply_quantized_op(weight, delta.packed, delta.scales[:, :2].contiguous(),
                                    delta.zeros[:, :2].contiguous(), 4, 8, 1.0)
    assert_bitwise_equal(weight, before)


def test_cpu_results_do_not_depend_on_the_thread_count():
    skip_unless_usable("cpu")
    x = (torch.randn(96, 1000) * 1e-2).bfloat16()
    old = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            with deltaops.use_backend("cpu"):
                s = deltaops.quantize_sign(x, granularity="row")
                t = deltaops.quantize_ternary(x)
                c = deltaops.quantize_ternary(x, method="compeft", density=0.3)
                u = deltaops.quantize_uniform(x, 3, group_size=100)
                w = torch.ones(96, 1000).bfloat16()
                u.apply_(w, 0.5)
            results.append([s.packed, s.scales, t.packed, t.scales, c.packed, c.scales, u.packed, u.scales,
                            w])
    finally:
        torch.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            assert_bitwise_equal(a, b)


# ---- delta_bmm ---------------------------------------------------------------------------------


def assert_matmul_close(actual, expected, x, dense_w, what=""):
    """|y - ref| <= 2 * K * eps32 * (|x| @ |W + D|^T) + 1 ulp of the output dtype.

    Both sides sum K fp32 products in different orders (fp32 error of each at
    most K * eps32 times the sum of magnitudes), then round once.
    """
    k = x.shape[-1]
    bound = (x.float().abs() @ dense_w.abs().t()) * (2 * k * torch.finfo(torch.float32).eps)
    bound = bound + expected.float().abs() * torch.finfo(expected.dtype).eps + torch.finfo(expected.dtype).tiny
    excess = (actual.float() - expected.float()).abs() > bound
    assert not bool(excess.any()), f"{what}: {int(excess.sum())} outputs beyond the bound"


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("kind", ["sign", "ternary", "uniform3", "uniform4"])
def test_delta_bmm_mixed_indices(backend, kind):
    skip_unless_usable(backend) if backend != "reference" else None
    n, k = 24, 37
    base = torch.randn(n, k).bfloat16()
    raw = [torch.randn(n, k) * 1e-1 for _ in range(3)]
    make = {"sign": lambda d: deltaops.quantize_sign(d, granularity="row"),
            "ternary": lambda d: deltaops.quantize_ternary(d),
            "uniform3": lambda d: deltaops.quantize_uniform(d, 3, group_size=8),
            "uniform4": lambda d: deltaops.quantize_uniform(d, 4, group_size=-1, symmetric=True)}[kind]
    deltas = [make(d) for d in raw]
    x = torch.randn(5, 3, k).bfloat16()
    indices = torch.tensor([2, 0, 2, 1, 0])
    y = run_on(backend, deltaops.delta_bmm, x, base, deltas, indices)
    assert y.shape == (5, 3, n) and y.dtype == torch.bfloat16
    for b in range(5):
        dense = base.float() + deltas[int(indices[b])].dequantize(torch.float32)
        expected = (x[b].float() @ dense.t()).bfloat16()
        assert_matmul_close(y[b], expected, x[b], dense, f"{kind} batch {b}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("kind", ["sign", "uniform3"])
def test_delta_bmm_on_the_gpu_across_tiles(backend, kind):
    """Shapes that cross the 64 x 64 output tiles and the 16-column k steps of the
    CUDA kernel (and Triton's blocks), mixed indices, against the dense product."""
    skip_unless_usable(backend)
    n, k, m = 70, 37, 67
    base = torch.randn(n, k).bfloat16()
    make = {"sign": lambda d: deltaops.quantize_sign(d, granularity="row"),
            "uniform3": lambda d: deltaops.quantize_uniform(d, 3, group_size=8)}[kind]
    x = torch.randn(3, m, k).bfloat16()
    indices = torch.tensor([1, 2, 1])
    with deltaops.use_backend(backend):
        deltas = [make(torch.randn(n, k, device="cuda") * 1e-1) for _ in range(3)]
        y = deltaops.delta_bmm(x.cuda(), base.cuda(), deltas, indices.cuda()).cpu()
        dq = [d.dequantize(torch.float32).cpu() for d in deltas]
    for b in range(3):
        dense = base.float() + dq[int(indices[b])]
        assert_matmul_close(y[b], (x[b].float() @ dense.t()).bfloat16(), x[b], dense,
                            f"{backend} {kind} batch {b}")


def test_delta_bmm_argument_errors():
    base = torch.randn(8, 16)
    deltas = [deltaops.quantize_ternary(torch.randn(8, 16))]
    x = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match=r"indices must be in \[0, 1\)"):
        deltaops.delta_bmm(x, base, deltas, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="indices must have shape"):
        deltaops.delta_bmm(x, base, deltas, torch.tensor([0]))
    with pytest.raises(ValueError, match="differs from deltas"):
        deltaops.delta_bmm(x, base, deltas + [deltaops.quantize_sign(torch.randn(8, 16))],
                           torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="has shape"):
        deltaops.delta_bmm(x, base, [deltaops.quantize_ternary(torch.randn(8, 15))], torch.tensor([0, 0]))
    stack = stack_deltas(deltas, (8, 16))
    assert stack[0].shape == (1, 32)  # 8 * 16 two-bit codes
