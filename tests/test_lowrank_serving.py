"""Multi-LoRA shrink / expand: every backend against the per-token reference and an fp64 product,
mixed adapters in one batch, id -1 = no adapter, ranks 8 .. 128, errors before any write."""

import pytest
import torch

import deltaops
from deltaops.reference import lowrank as ref

from backend_harness import run_on, skip_unless_usable
from lowrank_bounds import assert_within_accumulation_bound
from tolerances import assert_bitwise_equal

BACKENDS = ["reference", "cpu", "triton"]
IDS = [2, -1, 0, 0, 1, -1, 2, 1, 0]  # mixed adapters, two tokens without one


def serving_tensors(rank, x_dtype=torch.bfloat16, stack_dtype=torch.bfloat16, fan_in=40, fan_out=52,
                    adapters=3, ids=IDS, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = len(ids)
    x = torch.randn(tokens, fan_in, generator=g).to(x_dtype)
    a_stack = (torch.randn(adapters, rank, fan_in, generator=g) / fan_in ** 0.5).to(stack_dtype)
    b_stack = (torch.randn(adapters, fan_out, rank, generator=g) * 0.1).to(stack_dtype)
    y = torch.randn(tokens, fan_out, generator=g).to(x_dtype)
    return x, a_stack, b_stack, y, torch.tensor(ids, dtype=torch.int64)


def exact_shrink(x, a_stack, ids, scale):
    s = float(torch.tensor(scale, dtype=torch.float32))
    exact = torch.zeros(x.shape[0], a_stack.shape[1], dtype=torch.float64)
    magnitude = torch.zeros_like(exact)
    for t, adapter in enumerate(ids.tolist()):
        if adapter >= 0:
            exact[t] = s * (a_stack[adapter].double() @ x[t].double())
            magnitude[t] = abs(s) * (a_stack[adapter].double().abs() @ x[t].double().abs())
    return exact, magnitude


def exact_expand(y, inter, b_stack, ids):
    exact, magnitude = y.double().clone(), y.double().abs()
    for t, adapter in enumerate(ids.tolist()):
        if adapter >= 0:
            exact[t] += b_stack[adapter].double() @ inter[t].double()
            magnitude[t] += b_stack[adapter].double().abs() @ inter[t].double().abs()
    return exact, magnitude


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rank", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("x_dtype,stack_dtype", [(torch.bfloat16, torch.bfloat16),
                                                 (torch.float16, torch.float32),
                                                 (torch.float32, torch.bfloat16)])
def test_shrink_then_expand_within_bound(backend, rank, x_dtype, stack_dtype):
    skip_unless_usable(backend)
    x, a_stack, b_stack, y, ids = serving_tensors(rank, x_dtype, stack_dtype)
    inter = run_on(backend, deltaops.lora_shrink, x, a_stack, ids, 0.5)
    assert inter.dtype == torch.float32 and inter.shape == (len(IDS), rank)
    exact, magnitude = exact_shrink(x, a_stack, ids, 0.5)
    assert_within_accumulation_bound(inter, exact, magnitude, x.shape[1], what=f"{backend} shrink")
    assert not bool(inter[ids == -1].any()), "tokens without an adapter give zero rows"

    out = y.clone()
    run_on(backend, deltaops.lora_expand, out, inter, b_stack, ids)
    exact, magnitude = exact_expand(y, inter, b_stack, ids)
    assert_within_accumulation_bound(out, exact, magnitude, rank, what=f"{backend} expand")
    assert_bitwise_equal(out[ids == -1], y[ids == -1], "rows of tokens without an adapter")


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_backends_agree_with_the_per_token_reference(backend):
    """The reference loops over tokens; kernels group nothing differently: compare directly."""
    skip_unless_usable(backend)
    x, a_stack, b_stack, y, ids = serving_tensors(24, torch.float32, torch.float32)
    expected = ref.lora_shrink(x, a_stack, ids, 2.0)
    got = run_on(backend, deltaops.lora_shrink, x, a_stack, ids, 2.0)
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)
    out, want = y.clone(), y.clone()
    run_on(backend, deltaops.lora_expand, out, expected, b_stack, ids)
    ref.lora_expand(want, expected, b_stack, ids)
    torch.testing.assert_close(out, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_tokens_without_adapter_and_empty_batches(backend):
    skip_unless_usable(backend)
    x, a_stack, b_stack, y, ids = serving_tensors(8, ids=[-1, -1, -1])
    inter = run_on(backend, deltaops.lora_shrink, x, a_stack, ids, 1.0)
    assert_bitwise_equal(inter, torch.zeros(3, 8))
    out = y.clone()
    run_on(backend, deltaops.lora_expand, out, inter, b_stack, ids)
    assert_bitwise_equal(out, y)
    x, a_stack, b_stack, y, ids = serving_tensors(8, ids=[])
    assert run_on(backend, deltaops.lora_shrink, x, a_stack, ids, 1.0).shape == (0, 8)
    run_on(backend, deltaops.lora_expand, y, torch.zeros(0, 8), b_stack, ids)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_ids_and_strided_inputs(backend):
    skip_unless_usable(backend)
    x, a_stack, b_stack, y, ids = serving_tensors(16, torch.float32, torch.float32)
    expected = run_on("reference", deltaops.lora_shrink, x, a_stack, ids, 1.0)
    got = run_on(backend, deltaops.lora_shrink, x.t().contiguous().t(), a_stack, ids.int(), 1.0)
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6)
    strided = y.t().contiguous().t()
    run_on(backend, deltaops.lora_expand, strided, expected, b_stack, ids.int())
    want = y.clone()
    ref.lora_expand(want, expected, b_stack, ids)
    torch.testing.assert_close(strided, want, rtol=2e-6, atol=2e-6)


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("case,error,message", [
    ("id too large", ValueError, r"token_lora_ids holds 3, out of range \[-1, 3\)"),
    ("id below -1", ValueError, r"token_lora_ids holds -2"),
    ("ids dtype", TypeError, "token_lora_ids has dtype float32"),
    ("ids length", ValueError, r"token_lora_ids has shape \(8,\); expected \(9,\)"),
    ("features", ValueError, r"lora_b_stack has shape \(3, 51, 8\); expected \(adapters, 52, r\)"),
    ("intermediate dtype", TypeError, "intermediate has dtype bfloat16"),
    ("intermediate shape", ValueError, r"intermediate has shape \(9, 7\); expected \(9, 8\)"),
])
def test_expand_errors_leave_y_untouched(backend, case, error, message):
    skip_unless_usable(backend)
    x, a_stack, b_stack, y, ids = serving_tensors(8)
    inter = torch.randn(len(IDS), 8)
    if case == "id too large":
        ids[4] = 3
    elif case == "id below -1":
        ids[4] = -2
    elif case == "ids dtype":
        ids = ids.float()
    elif case == "ids length":
        ids = ids[:8]
    elif case == "features":
        b_stack = b_stack[:, :51]
    elif case == "intermediate dtype":
        inter = inter.bfloat16()
    else:
        inter = inter[:, :7]
    before = y.clone()
    with pytest.raises(error, match=message):
        run_on(backend, deltaops.lora_expand, y, inter, b_stack, ids)
    assert_bitwise_equal(y, before)


def test_shrink_argument_errors():
    x, a_stack, _, _, ids = serving_tensors(8)
    with pytest.raises(ValueError, match=r"lora_a_stack has shape \(3, 8, 39\); expected"):
        deltaops.lora_shrink(x, a_stack[:, :, :39], ids)
    with pytest.raises(ValueError, match="lora_a_stack must be 3-D"):
        deltaops.lora_shrink(x, a_stack[0], ids)
    with pytest.raises(ValueError, match="scale must be finite"):
        deltaops.lora_shrink(x, a_stack, ids, float("inf"))
    with pytest.raises(ValueError, match=r"token_lora_ids holds 7"):
        deltaops.lora_shrink(x, a_stack, torch.full((len(IDS),), 7))


def test_cpu_kernels_check_ids_themselves():
    """What the ops layer skips under torch.compile, the CPU kernel still refuses."""
    skip_unless_usable("cpu")
    from deltaops import _C

    x, a_stack, b_stack, y, ids = serving_tensors(8)
    ids[2] = 5
    with pytest.raises(ValueError, match=r"token_lora_ids\[2\] = 5 is out of range \[-1, 3\)"):
        _C.lora_shrink(x, a_stack, ids, 1.0)
    before = y.clone()
    with pytest.raises(ValueError, match=r"token_lora_ids\[2\] = 5"):
        _C.lora_expand(y, torch.zeros(len(IDS), 8), b_stack, ids)
    assert_bitwise_equal(y, before)
    with pytest.raises(TypeError, match="intermediate has dtype float16"):
        _C.lora_expand(y, torch.zeros(len(IDS), 8).half(), b_stack, ids.clamp(max=0))
