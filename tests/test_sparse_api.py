"""The public sparse API: argument errors, undo, SparseDelta, backend choice, torch.library."""

import os

import pytest
import torch

import deltaops
from deltaops import backends
from deltaops.ops import sparse as ops
from deltaops.ops._registry import OPS
from deltaops.reference import sparse as ref

from tolerances import assert_bitwise_equal


def weight_and_delta(shape=(16, 24), dtype=torch.bfloat16):
    return torch.randn(shape).to(dtype), (torch.randn(shape) * 1e-2).to(dtype)


# ---- bad input: clear errors, weight untouched -------------------------------------


@pytest.mark.parametrize("density", [-0.1, 1.5, float("nan"), float("inf")])
def test_density_outside_unit_interval(density):
    x = torch.randn(10)
    for call in (lambda: deltaops.topk_mask(x, density), lambda: deltaops.dare(x, density, seed=0),
                 lambda: deltaops.sparsify(x, density),
                 lambda: deltaops.SparseDelta.from_dense(x, density)):
        with pytest.raises(ValueError, match="density must be in"):
            call()


def test_topk_mask_argument_errors():
    x = torch.randn(10)
    with pytest.raises(TypeError, match="exactly one"):
        deltaops.topk_mask(x)
    with pytest.raises(TypeError, match="exactly one"):
        deltaops.topk_mask(x, 0.5, k=3)
    with pytest.raises(ValueError, match=r"k must be an int in \[0, 10\]"):
        deltaops.topk_mask(x, k=11)
    with pytest.raises(TypeError, match="x has dtype int64"):
        deltaops.topk_mask(torch.arange(10), 0.5)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        deltaops.topk_mask([1.0, 2.0], 0.5)


def test_seed_and_stream_errors():
    x = torch.randn(10)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
        deltaops.dare(x, 0.5, seed=-1)
    with pytest.raises(TypeError, match="seed must be an int"):
        deltaops.dare(x, 0.5, seed=1.5)
    with pytest.raises(ValueError, match="stream"):
        deltaops.dare(x, 0.5, seed=0, stream=2**32)


def test_sparsify_argument_errors():
    x = torch.randn(10)
    with pytest.raises(ValueError, match="method must be one of"):
        deltaops.sparsify(x, 0.5, "nope")
    with pytest.raises(ValueError, match="rescale must be one of"):
        deltaops.sparsify(x, 0.5, rescale="l3")
    with pytest.raises(ValueError, match="epsilon"):
        deltaops.sparsify(x, 0.5, "della", epsilon=0.6)
    with pytest.raises(ValueError, match="gamma must be in"):
        deltaops.sparsify(x, 0.5, "magnitude_outliers", gamma=2.0)


@pytest.mark.parametrize("case", ["shape", "weight dtype", "delta dtype", "alpha", "int weight",
                                  "sparse shape", "not a delta"])
def test_apply_delta_errors_leave_weight_untouched(case):
    weight, delta = weight_and_delta()
    before = weight.clone()
    expected = {
        "shape": (ValueError, r"delta has shape \(16, 23\), expected weight's shape \(16, 24\)"),
        "weight dtype": (TypeError, "weight has dtype float64"),
        "delta dtype": (TypeError, "delta has dtype int32"),
        "alpha": (ValueError, "alpha must be finite"),
        "int weight": (TypeError, "weight has dtype int8"),
        "sparse shape": (ValueError, r"the delta was made for \(4, 4\)"),
        "not a delta": (TypeError, "delta must be a tensor or a deltaops delta format"),
    }[case]
    target = weight
    with pytest.raises(expected[0], match=expected[1]):
        if case == "shape":
            deltaops.apply_delta_(weight, delta[:, :23])
        elif case == "weight dtype":
            target = weight.double()
            deltaops.apply_delta_(target, delta)
        elif case == "delta dtype":
            deltaops.apply_delta_(weight, delta.int())
        elif case == "alpha":
            deltaops.apply_delta_(weight, delta, float("nan"))
        elif case == "int weight":
            target = weight.to(torch.int8)
            deltaops.apply_delta_(target, delta)
        elif case == "sparse shape":
            deltaops.apply_delta_(weight, deltaops.SparseDelta.from_dense(torch.randn(4, 4), 0.5))
        else:
            deltaops.apply_delta_(weight, [1, 2, 3])
    assert_bitwise_equal(weight, before, "weight after a rejected apply")


def test_sparse_delta_validates_what_it_is_given():
    values = torch.ones(3)
    with pytest.raises(ValueError, match="strictly increasing"):
        deltaops.SparseDelta((10,), "coo", values, indices=torch.tensor([0, 2, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"index 10 at position 2 is out of range \[0, 10\)"):
        deltaops.SparseDelta((10,), "coo", values, indices=torch.tensor([0, 2, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="2 indices but 3 values"):
        deltaops.SparseDelta((10,), "coo", values, indices=torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(TypeError, match="indices has dtype float32"):
        deltaops.SparseDelta((10,), "coo", values, indices=torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="10 elements need 2"):
        deltaops.SparseDelta((10,), "bitmask", values, packed_mask=torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="layout must be one of"):
        deltaops.SparseDelta((10,), "csr", values)


# ---- exact undo ------------------------------------------------------------------


@pytest.mark.parametrize("layout", [None, "coo", "bitmask"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_keep_original_reverts_bit_for_bit(layout, dtype):
    weight, delta = weight_and_delta(dtype=dtype)
    before = weight.clone()
    patch = delta if layout is None else deltaops.SparseDelta.from_dense(delta, 0.3, layout=layout)
    undo = deltaops.apply_delta_(weight, patch, 3.0, keep_original=True)
    assert not torch.equal(weight, before)
    undo.revert()
    assert_bitwise_equal(weight, before, "reverted weight")
    with pytest.raises(RuntimeError, match="already"):
        undo.revert()
    if layout is not None:  # only the touched elements are saved
        assert undo.saved.numel() == patch.nnz


def test_keep_original_on_a_transposed_weight():
    weight, delta = weight_and_delta()
    weight = weight.t()
    before = weight.clone()
    undo = deltaops.apply_delta_(weight, deltaops.SparseDelta.from_dense(delta.t(), 0.5), 1.0,
                                 keep_original=True)
    undo.revert()
    assert_bitwise_equal(weight, before)


def test_apply_without_keep_original_returns_none():
    weight, delta = weight_and_delta()
    assert deltaops.apply_delta_(weight, delta) is None


# ---- SparseDelta -----------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["coo", "bitmask"])
@pytest.mark.parametrize("method", ["magnitude", "random", "magnitude_outliers", "della"])
def test_sparse_delta_matches_sparsify(layout, method):
    delta = torch.randn(30, 50).bfloat16()
    sparse = deltaops.SparseDelta.from_dense(delta, 0.2, method, layout=layout, seed=4, rescale="l1")
    dense = deltaops.sparsify(delta, 0.2, method, seed=4, rescale="l1")
    assert_bitwise_equal(sparse.to_dense(), dense)
    assert sparse.dtype == torch.bfloat16 and sparse.shape == delta.shape
    other = sparse.to_layout("bitmask" if layout == "coo" else "coo")
    assert_bitwise_equal(other.to_dense(), dense)


def test_sparse_delta_sizes():
    delta = torch.randn(100, 80).bfloat16()
    coo = deltaops.SparseDelta.from_dense(delta, 0.1, layout="coo")
    bitmask = coo.to_layout("bitmask")
    assert coo.nnz == 800 and coo.indices.dtype == torch.int32
    assert coo.nbytes == 800 * (2 + 4)
    assert bitmask.nbytes == 800 * 2 + 8000 // 8
    assert coo.density == pytest.approx(0.1)


@pytest.mark.parametrize("layout", ["coo", "bitmask"])
def test_sparse_delta_save_load(tmp_path, layout):
    delta = torch.randn(7, 13, 3).half()
    sparse = deltaops.SparseDelta.from_dense(delta, 0.3, layout=layout)
    path = str(tmp_path / "delta.safetensors")
    sparse.save(path, metadata={"source": "test"})
    loaded = deltaops.SparseDelta.load(path)
    assert loaded.layout == layout and loaded.shape == sparse.shape
    assert_bitwise_equal(loaded.to_dense(), sparse.to_dense())


def test_sparse_delta_load_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "x.safetensors")
    save_file({"values": torch.ones(2)}, path, metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="not a deltaops sparse delta"):
        deltaops.SparseDelta.load(path)
    save_file({"values": torch.ones(2)}, path,
              metadata={"format": "deltaops.sparse", "format_version": "99"})
    with pytest.raises(ValueError, match="version 99 is not supported"):
        deltaops.SparseDelta.load(path)


# ---- semantics worth pinning -------------------------------------------------------------


def test_topk_tie_rule_lowest_index_wins():
    x = torch.tensor([1.0, -2.0, 2.0, 1.0, -1.0, 2.0])
    assert deltaops.topk_mask(x, k=2).tolist() == [False, True, True, False, False, False]
    assert deltaops.topk_mask(x, k=4).tolist() == [True, True, True, False, False, True]


def test_sparsify_keeps_at_least_one_like_mergekit():
    x = torch.randn(10)
    assert int((deltaops.sparsify(x, 0.01) != 0).sum()) == 1
    assert int(deltaops.topk_mask(x, 0.01).sum()) == 0  # topk_mask: exactly int(density * n)


def test_dare_statistics_and_rescale():
    x = torch.ones(200_000)
    out = deltaops.dare(x, 0.3, seed=11)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.005
    assert torch.all(out[kept] == torch.tensor(1.0) / torch.tensor(0.3))
    assert not torch.equal(kept, deltaops.dare(x, 0.3, seed=12) != 0)
    assert not torch.equal(kept, deltaops.dare(x, 0.3, seed=11, stream=1) != 0)


def test_sparsify_seed_none_follows_torch_manual_seed():
    x = torch.randn(1000)
    torch.manual_seed(3)
    a = deltaops.sparsify(x, 0.5, "random")
    torch.manual_seed(3)
    b = deltaops.sparsify(x, 0.5, "random")
    assert torch.equal(a, b)


def test_della_probabilities_span_density_plus_minus_epsilon():
    x = torch.randn(4, 101)
    p = ref.della_keep_probability(x, 0.5, 0.2)
    row_order = x[0].abs().argsort()
    assert p[0, row_order[0]].item() == pytest.approx(0.3)
    assert p[0, row_order[-1]].item() == pytest.approx(0.7)
    assert torch.all(p[0, row_order].diff() > 0)


# ---- backend choice --------------------------------------------------------------------


def test_asking_for_a_missing_backend_says_why():
    x = torch.randn(10)
    with deltaops.use_backend("cuda"):
        with pytest.raises(deltaops.BackendUnavailableError, match="does not run on cpu tensors"):
            deltaops.topk_mask(x, 0.5)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with deltaops.use_backend("triton"):
        with pytest.raises(deltaops.BackendUnavailableError, match="TRITON_INTERPRET=1"):
            deltaops.topk_mask(torch.randn(10), 0.5)


def test_environment_variable_selects_and_context_manager_wins(monkeypatch):
    monkeypatch.setenv("DELTAOPS_BACKEND", "reference")
    assert backends.selected() == "reference"
    with deltaops.use_backend("cpu"):
        assert backends.selected() == "cpu"
    monkeypatch.setenv("DELTAOPS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="DELTAOPS_BACKEND='fastest'"):
        deltaops.topk_mask(torch.randn(4), 0.5)
    with pytest.raises(ValueError, match="unknown backend"):
        with deltaops.use_backend("gpu"):
            pass


def test_auto_prefers_the_cpu_kernel_and_falls_back_to_the_reference():
    chosen = backends.resolve("dare", "cpu")
    if backends.get("cpu").usable:
        assert chosen is backends.get("cpu").table["dare"]
    else:
        assert chosen is backends.get("reference").table["dare"]


def test_cpu_backend_is_built_where_required():
    """CI sets DELTAOPS_REQUIRE=cpu,triton: a broken build must fail here, not fall back."""
    for name in [b for b in os.environ.get("DELTAOPS_REQUIRE", "").split(",") if b]:
        assert backends.get(name).usable, backends.get(name).reason


# ---- torch.library: opcheck and torch.compile ---------------------------------------------


def op_samples():
    x = torch.randn(9, 11).bfloat16()
    f = torch.randn(9, 11)
    weight = torch.randn(9, 11).half()
    yield "radix_histogram", (x, 0, 0)
    yield "radix_histogram", (f, 1, int(ref.magnitude_keys(f)[0]) >> 16)
    yield "threshold_mask", (x, 0x3F00, 3)
    yield "topk_mask", (f, 20)
    yield "philox_uniform_like", (x, 5, 1)
    yield "dare", (x, 0.4, 5, 0, True)
    yield "dare_out_", (x, 0.4, 5, 0, True, torch.empty_like(x))
    yield "apply_dense_", (weight, x, 0.5)
    yield "apply_coo_", (weight, torch.tensor([1, 5, 90], dtype=torch.int32), torch.randn(3), 1.0)
    yield "apply_bitmask_", (weight, ref.pack_mask(torch.arange(99) % 7 == 0), torch.randn(15), 1.0)
    yield "merge_sign_elect", (x, [x + 0.01, x - 0.02], "ties", [1.0, 0.5], [0.5, 0.3], [0.01, 0.01],
                               1.0, True, "", "sum", 0, [], "float32")
    yield "merge_sign_elect_out_", (x, [x + 0.01, x - 0.02], "ties", [1.0, 0.5], [0.5, 0.3],
                                    [0.01, 0.01], 1.0, True, "", "sum", 0, [], torch.empty_like(f))
    yield "merge_linear", ([x + 0.01, x - 0.02, x], [1.0, 0.5, 0.25], True, "bfloat16")
    yield "merge_linear_out_", ([x + 0.01, x - 0.02, x], [1.0, 0.5, 0.25], True, torch.empty_like(x))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name,args", list(op_samples()), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(backend, name, args):
    if not backends.get(backend).usable:
        pytest.skip(backends.get(backend).reason)
    with deltaops.use_backend(backend):
        torch.library.opcheck(OPS[name], args)


def test_every_public_op_is_opchecked():
    from deltaops.ops.quant import OP_NAMES as QUANT_OPS  # opchecked in test_quant_api.py
    from test_lowrank_merge import op_samples as lowrank_op_samples  # opchecked there

    covered = {name for name, _ in op_samples()} | {name for name, _ in lowrank_op_samples()}
    assert covered == set(OPS) - set(QUANT_OPS)


def test_torch_compile_fullgraph():
    def merge_step(weight, delta):
        mask = deltaops.topk_mask(delta, 0.25)
        dropped = deltaops.dare(delta, 0.5, seed=3)
        kept = torch.where(mask, dropped, torch.zeros((), dtype=delta.dtype))
        deltaops.apply_delta_(weight, kept, 0.5)
        return weight

    weight, delta = weight_and_delta((32, 48), torch.float32)
    expected = merge_step(weight.clone(), delta)
    compiled = torch.compile(merge_step, fullgraph=True, backend="aot_eager")
    assert_bitwise_equal(compiled(weight.clone(), delta), expected)


def test_info_reports_every_backend():
    from deltaops.info import report

    text = report()
    for name in backends.BACKENDS:
        assert f"\n{name}" in text
    assert "torch" in text and "threads" in text
