"""The low-bit family through torch.library: opcheck of every op on every backend, torch.compile."""

import pytest
import torch

import deltaops
from deltaops import backends
from deltaops.ops import quant as qops
from deltaops.ops._registry import OPS
from deltaops.reference import quant as ref

from tolerances import assert_bitwise_equal


def op_samples():
    x = (torch.randn(9, 21) * 1e-2).bfloat16()
    weight = torch.randn(9, 21).half()
    u = deltaops.quantize_uniform(x, 3, group_size=8)
    s = deltaops.quantize_sign(x, granularity="row")
    t = deltaops.quantize_ternary(x)
    yield "pack_bits", (torch.randint(0, 8, (29,), dtype=torch.uint8), 3)
    yield "unpack_bits", (u.packed, 3, x.numel())
    yield "quantize_sign", (x, True)
    yield "quantize_ternary_absmean", (x, )
    yield "quantize_uniform", (x, 4, 8, False)
    yield "compeft_pack", (x, torch.rand(9, 21) < 0.3)
    yield "compeft_quantize", (x, 50)
    yield "apply_quantized_", (weight, u.packed, u.scales, u.zeros, 3, 8, 0.5)
    yield "apply_quantized_", (weight, s.packed, s.scales, s.zeros, 1, 21, 1.0)
    yield "apply_quantized_", (weight, t.packed, t.scales, t.zeros, 2, 21, -1.0)
    xs = torch.randn(3, 2, 21).bfloat16()
    from deltaops.formats.quant import stack_deltas

    stack = stack_deltas([t, deltaops.quantize_ternary(-x)], (9, 21))
    yield "delta_bmm", (xs, weight.bfloat16(), *stack, torch.tensor([1, 0, 1]))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("name,args", list(op_samples()), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(backend, name, args):
    status = backends.get(backend)
    if not status.usable:
        pytest.skip(status.reason)
    if name not in status.table:
        pytest.skip(f"{backend} has no {name} kernel")
    with deltaops.use_backend(backend):
        torch.library.opcheck(OPS[name], args)


def test_every_quant_op_is_opchecked():
    assert {name for name, _ in op_samples()} == set(qops.OP_NAMES)
    assert set(qops.OP_NAMES) <= set(OPS)


def test_torch_compile_fullgraph():
    def quantize_and_apply(weight, delta):
        packed, scales, zeros = torch.ops.deltaops.quantize_uniform(delta, 4, 16, False)
        torch.ops.deltaops.apply_quantized_(weight, packed, scales, zeros, 4, 16, 0.5)
        sign_packed, sign_scales = torch.ops.deltaops.quantize_sign(delta, False)
        torch.ops.deltaops.apply_quantized_(weight, sign_packed, sign_scales,
                                            torch.zeros(0, dtype=torch.uint8), 1, 48, 0.25)
        return weight

    weight, delta = torch.randn(32, 48), torch.randn(32, 48) * 1e-2
    expected = quantize_and_apply(weight.clone(), delta)
    compiled = torch.compile(quantize_and_apply, fullgraph=True, backend="aot_eager")
    assert_bitwise_equal(compiled(weight.clone(), delta), expected)


def test_apply_delta_accepts_every_format_and_undoes():
    x = torch.randn(12, 40) * 1e-2
    for delta in (deltaops.quantize_sign(x), deltaops.quantize_ternary(x),
                  deltaops.quantize_uniform(x, 8, group_size=32)):
        w = torch.randn(12, 40).bfloat16()
        before = w.clone()
        undo = deltaops.apply_delta_(w, delta, 2.0, keep_original=True)
        expected = (before.float() + delta.dequantize(torch.float32) * 2.0).bfloat16()
        assert_bitwise_equal(w, expected)
        undo.revert()
        assert_bitwise_equal(w, before)
        # a transposed (non-contiguous) weight of the right shape
        wt = torch.randn(40, 12).bfloat16().t()
        ref_w = wt.contiguous().clone()
        delta.apply_(wt, 0.5)
        ref.apply_quantized_(ref_w, delta.packed, delta.scales, delta.zeros, delta.bits,
                             delta.group_size, 0.5)
        assert_bitwise_equal(wt.contiguous(), ref_w)
