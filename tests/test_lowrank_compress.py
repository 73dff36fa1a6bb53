"""deltaops.low_rank and LowRankDelta: optimal error for svd, randomized within 10% of optimal on
decaying spectra, the factors' layout, safetensors round trip, argument errors."""

import pytest
import torch

import deltaops
from deltaops.reference import lowrank as ref

from tolerances import assert_bitwise_equal


def decaying_delta(m, n, decay, seed=0, dtype=torch.float32):
    """``U diag(s) V^T`` with orthonormal U, V and singular values ``s_i = decay ** i``."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
    s = decay ** torch.arange(k, dtype=torch.float64)
    return ((u * s) @ v.t()).to(dtype), s


@pytest.mark.parametrize("m,n,rank", [(120, 80, 8), (64, 200, 16), (50, 50, 50), (33, 7, 3)])
def test_svd_error_is_the_eckart_young_optimum(m, n, rank):
    delta, s = decaying_delta(m, n, 0.9)
    lr = deltaops.low_rank(delta, rank, method="svd")
    optimum = ref.optimal_relative_error(s, rank)
    assert lr.relative_error == pytest.approx(optimum, rel=1e-3, abs=1e-6)
    assert lr.rank == rank and lr.shape == delta.shape and lr.method == "svd"
    assert lr.lora_B.shape == (m, rank) and lr.lora_A.shape == (rank, n)
    # A = Vh_r has orthonormal rows; B = U_r S_r has orthogonal columns of norms s_1 >= s_2 ...
    gram = lr.lora_A.double() @ lr.lora_A.double().t()
    assert torch.allclose(gram, torch.eye(rank, dtype=torch.float64), atol=1e-5)
    norms = lr.lora_B.double().norm(dim=0)
    assert torch.allclose(norms, s[:rank], rtol=1e-4, atol=1e-6)
    # relative_error is what the stored factors achieve
    direct = float((delta.double() - lr.to_dense(torch.float64)).norm() / delta.double().norm())
    assert lr.relative_error == pytest.approx(direct, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("decay", [0.97, 0.9, 0.7])
@pytest.mark.parametrize("m,n,rank", [(300, 200, 16), (150, 400, 32)])
def test_randomized_is_within_ten_percent_of_optimal(decay, m, n, rank):
    delta, s = decaying_delta(m, n, decay, seed=1)
    optimum = ref.optimal_relative_error(s, rank)
    lr = deltaops.low_rank(delta, rank, method="randomized", seed=3)
    assert lr.relative_error <= 1.10 * optimum + 1e-6
    assert lr.method == "randomized"


def test_randomized_on_a_noisy_low_rank_delta():
    """A realistic fine-tuning delta: low-rank signal plus noise (slow tail)."""
    g = torch.Generator().manual_seed(5)
    signal = torch.randn(256, 24, generator=g) @ torch.randn(24, 384, generator=g)
    delta = signal + 0.5 * torch.randn(256, 384, generator=g)
    best = deltaops.low_rank(delta, 24, method="svd")
    fast = deltaops.low_rank(delta, 24, method="randomized", seed=0)
    assert fast.relative_error <= 1.10 * best.relative_error


def test_randomized_is_repeatable_by_seed():
    delta, _ = decaying_delta(90, 70, 0.8)
    a = deltaops.low_rank(delta, 6, method="randomized", seed=11)
    b = deltaops.low_rank(delta, 6, method="randomized", seed=11)
    assert_bitwise_equal(a.lora_A, b.lora_A)
    assert_bitwise_equal(a.lora_B, b.lora_B)
    torch.manual_seed(2)
    c = deltaops.low_rank(delta, 6, method="randomized")
    torch.manual_seed(2)
    d = deltaops.low_rank(delta, 6, method="randomized")
    assert_bitwise_equal(c.lora_B, d.lora_B)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_factors_are_stored_in_the_delta_dtype_and_the_error_counts_the_rounding(dtype):
    delta, s = decaying_delta(64, 96, 0.85, dtype=dtype)
    lr = deltaops.low_rank(delta, 12)
    assert lr.lora_A.dtype == dtype and lr.lora_B.dtype == dtype
    assert lr.nbytes == 12 * (64 + 96) * 2
    direct = float((delta.double() - lr.lora_B.double() @ lr.lora_A.double()).norm()
                   / delta.double().norm())
    assert lr.relative_error == pytest.approx(direct, rel=1e-3)
    as_fp32 = deltaops.low_rank(delta, 12, dtype=torch.float32)
    assert as_fp32.lora_A.dtype == torch.float32 and as_fp32.relative_error <= lr.relative_error


def test_apply_adds_the_factorised_delta():
    delta, _ = decaying_delta(40, 60, 0.5)
    weight = torch.randn(40, 60).bfloat16()
    lr = deltaops.low_rank(delta, 40)
    merged = weight.clone()
    lr.apply_(merged, alpha=2.0)
    expected = weight.clone()
    deltaops.lora_merge_(expected, lr.lora_A, lr.lora_B, 2.0)
    assert_bitwise_equal(merged, expected)
    close = (weight.float() + 2 * delta).bfloat16()
    assert float((merged.float() - close.float()).abs().max()) <= 2 * 2 ** -7


def test_to_dense_rounds_once():
    delta, _ = decaying_delta(20, 30, 0.6)
    lr = deltaops.low_rank(delta, 5)
    assert_bitwise_equal(lr.to_dense(torch.bfloat16),
                         (lr.lora_B.float() @ lr.lora_A.float()).bfloat16())
    assert lr.to_dense().dtype == torch.float32


def test_zero_delta():
    lr = deltaops.low_rank(torch.zeros(10, 12), 3, method="randomized", seed=0)
    assert lr.relative_error == 0.0
    assert not bool(lr.to_dense().any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip(tmp_path, dtype):
    delta, _ = decaying_delta(30, 44, 0.8, dtype=dtype)
    lr = deltaops.low_rank(delta, 7, method="randomized", seed=1)
    path = str(tmp_path / "lr.safetensors")
    lr.save(path, metadata={"source": "test"})
    loaded = deltaops.LowRankDelta.load(path)
    assert_bitwise_equal(loaded.lora_A, lr.lora_A)
    assert_bitwise_equal(loaded.lora_B, lr.lora_B)
    assert loaded.relative_error == lr.relative_error and loaded.method == "randomized"
    given = deltaops.LowRankDelta(lr.lora_A, lr.lora_B)
    given.save(path)
    assert deltaops.LowRankDelta.load(path).relative_error is None


def test_load_refuses_other_files(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "x.safetensors")
    tensors = {"lora_A": torch.ones(2, 3), "lora_B": torch.ones(4, 2)}
    save_file(tensors, path, metadata={"format": "deltaops.sparse"})
    with pytest.raises(ValueError, match="not a deltaops low-rank delta"):
        deltaops.LowRankDelta.load(path)
    save_file(tensors, path, metadata={"format": "deltaops.lowrank", "format_version": "7"})
    with pytest.raises(ValueError, match="version 7 is not supported"):
        deltaops.LowRankDelta.load(path)
    save_file({"lora_A": torch.ones(2, 3)}, path,
              metadata={"format": "deltaops.lowrank", "format_version": "1"})
    with pytest.raises(ValueError, match="'lora_B' is missing"):
        deltaops.LowRankDelta.load(path)


def test_low_rank_argument_errors():
    delta = torch.randn(10, 6)
    with pytest.raises(ValueError, match=r"rank must be an int in \[1, 6\]"):
        deltaops.low_rank(delta, 7)
    with pytest.raises(ValueError, match="rank must be an int"):
        deltaops.low_rank(delta, 0)
    with pytest.raises(ValueError, match="method must be one of"):
        deltaops.low_rank(delta, 2, method="qr")
    with pytest.raises(ValueError, match="oversample must be a non-negative int"):
        deltaops.low_rank(delta, 2, method="randomized", oversample=-1)
    with pytest.raises(ValueError, match="delta must be 2-D"):
        deltaops.low_rank(torch.randn(3, 4, 5), 2)
    with pytest.raises(TypeError, match="delta has dtype float64"):
        deltaops.low_rank(delta.double(), 2)
    bad = delta.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        deltaops.low_rank(bad, 2)
    with pytest.raises(ValueError, match="dtype must be one of"):
        deltaops.low_rank(delta, 2, dtype=torch.int8)


def test_low_rank_delta_validates_its_factors():
    with pytest.raises(ValueError, match=r"lora_B has shape \(5, 3\); expected \(5, 2\)"):
        deltaops.LowRankDelta(torch.ones(2, 4), torch.ones(5, 3))
    with pytest.raises(TypeError, match="lora_A has dtype int64"):
        deltaops.LowRankDelta(torch.ones(2, 4, dtype=torch.int64), torch.ones(5, 2))
