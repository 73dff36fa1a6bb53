"""The sparse family against the libraries that define its semantics: mergekit and PEFT.

Deterministic methods are compared directly on fp32 inputs with distinct
magnitudes (the peers break ties arbitrarily). Random methods are compared by
injecting deltaops' Philox draws into the peer's ``torch.bernoulli``, so the
peer's own arithmetic runs on the same keep decisions.
"""

import pytest
import torch

import deltaops

mergekit_sparsify = pytest.importorskip("mergekit.sparsify")
peft_merge_utils = pytest.importorskip("peft.utils.merge_utils")

SEED = 77


def distinct(shape, dtype=torch.float32):
    """Values with pairwise distinct magnitudes and no zeros."""
    numel = torch.Size(shape).numel()
    magnitudes = (torch.randperm(numel).float() + 1) / numel
    signs = torch.where(torch.rand(numel) < 0.5, -1.0, 1.0)
    return (magnitudes * signs).reshape(shape).to(dtype)


def same_values(actual, expected):
    """Equal as numbers (+0.0 == -0.0: the peers multiply by a 0/1 mask, deltaops selects)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual, expected), f"max |diff| {(actual.double() - expected.double()).abs().max()}"


def philox_bernoulli(probabilities):
    """``torch.bernoulli`` replaced by deltaops' keyed draws: keep iff u < p."""
    u = deltaops.random_uniform_like(probabilities.float(), seed=SEED)
    return (u < probabilities.float()).to(probabilities.dtype)


NORMS = [None, "l1", "l2", "linf"]
SHAPES = [(1,), (17,), (31, 29), (4, 8, 16)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.01, 0.2, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("norm", NORMS)
def test_magnitude_matches_mergekit(shape, density, norm):
    x = distinct(shape)
    rescale_norm = None if norm is None else mergekit_sparsify.RescaleNorm(norm)
    expected = mergekit_sparsify.magnitude(x, density, rescale_norm=rescale_norm)
    same_values(deltaops.sparsify(x, density, "magnitude", rescale=norm), expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density,gamma", [(0.2, 0.01), (0.3, 0.1), (0.9, 0.2), (0.5, 0.0), (0.1, 0.95)])
@pytest.mark.parametrize("norm", [None, "l1"])
def test_breadcrumbs_match_mergekit(shape, density, gamma, norm):
    x = distinct(shape)
    rescale_norm = None if norm is None else mergekit_sparsify.RescaleNorm(norm)
    expected = mergekit_sparsify.magnitude_outliers(x, density, rescale_norm=rescale_norm, gamma=gamma)
    actual = deltaops.sparsify(x, density, "magnitude_outliers", gamma=gamma, rescale=norm)
    same_values(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.1, 0.125, 0.5, 0.875, 0.9])
@pytest.mark.parametrize("norm", [None, "l1"])
def test_random_matches_mergekit_bernoulli(monkeypatch, dtype, density, norm):
    if float(torch.tensor(density, dtype=dtype)) != density:
        # mergekit draws bf16 tensors with a bf16 probability (0.9 -> 0.8984375);
        # deltaops always compares against fp32(density). A documented difference.
        pytest.skip("mergekit rounds the keep probability to the tensor's dtype")
    monkeypatch.setattr(mergekit_sparsify.torch, "bernoulli", philox_bernoulli)
    x = distinct((37, 23), dtype)
    rescale_norm = None if norm is None else mergekit_sparsify.RescaleNorm(norm)
    expected = mergekit_sparsify.bernoulli(x, density, rescale_norm=rescale_norm)
    monkeypatch.undo()
    actual = deltaops.sparsify(x, density, "random", seed=SEED, rescale=norm)
    if dtype == torch.float32 or norm is None:
        same_values(actual, expected)
    else:  # mergekit rescales bf16 with bf16 norms; deltaops computes them in fp32
        assert torch.equal(actual != 0, expected != 0)
        torch.testing.assert_close(actual, expected, rtol=2e-2, atol=0)


@pytest.mark.parametrize("shape", [(1, 50), (31, 29), (64,)])
@pytest.mark.parametrize("density,epsilon", [(0.5, 0.1), (0.3, 0.2), (0.8, 0.15)])
@pytest.mark.parametrize("norm", [None, "l1"])
def test_della_matches_mergekit_magprune(monkeypatch, shape, density, epsilon, norm):
    monkeypatch.setattr(mergekit_sparsify.torch, "bernoulli", philox_bernoulli)
    x = distinct(shape)
    rescale_norm = None if norm is None else mergekit_sparsify.RescaleNorm(norm)
    expected = mergekit_sparsify.della_magprune(x, density, epsilon, rescale_norm=rescale_norm)
    monkeypatch.undo()
    actual = deltaops.sparsify(x, density, "della", seed=SEED, epsilon=epsilon, rescale=norm)
    same_values(actual, expected)


def test_della_errors_like_mergekit():
    x = distinct((4, 4))
    with pytest.raises(ValueError):
        mergekit_sparsify.della_magprune(x, 0.5, 0.5)
    with pytest.raises(ValueError, match="epsilon"):
        deltaops.sparsify(x, 0.5, "della", epsilon=0.5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 1.0])
def test_topk_mask_matches_peft_magnitude_pruning(shape, density):
    x = distinct(shape)
    pruned = peft_merge_utils.magnitude_based_pruning(x, density)
    assert torch.equal(deltaops.topk_mask(x, density), pruned != 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("density", [0.1, 0.125, 0.3, 0.75])
@pytest.mark.parametrize("rescale", [True, False])
def test_dare_matches_peft_random_pruning(monkeypatch, dtype, density, rescale):
    if float(torch.tensor(density, dtype=dtype)) != density:
        pytest.skip("PEFT draws with the keep probability rounded to the tensor's dtype")
    monkeypatch.setattr(peft_merge_utils.torch, "bernoulli", philox_bernoulli)
    x = distinct((41, 19), dtype)
    expected = peft_merge_utils.random_pruning(x, density, rescale=rescale)
    monkeypatch.undo()
    same_values(deltaops.dare(x, density, seed=SEED, rescale=rescale), expected)
