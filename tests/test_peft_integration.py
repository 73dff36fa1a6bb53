"""deltaops.integrations.peft against the installed PEFT.

The deterministic functions are compared bit for bit on inputs with distinct
magnitudes (``torch.topk`` breaks ties arbitrarily; deltaops keeps the lowest
index). The DARE functions are compared by injecting deltaops' Philox draws
into PEFT's ``torch.bernoulli`` (one stream per task tensor, in PEFT's order),
so PEFT's own arithmetic runs on the same keep decisions.
"""

import warnings

import pytest
import torch

from deltaops.integrations import peft as ours

peft = pytest.importorskip("peft")
merge_utils = pytest.importorskip("peft.utils.merge_utils")

SEED = 1234


def distinct(shape, dtype=torch.float32, generator=None):
    """Values with pairwise distinct magnitudes and no zeros."""
    numel = torch.Size(shape).numel()
    magnitudes = (torch.randperm(numel, generator=generator).float() + 1) / numel
    signs = torch.where(torch.rand(numel, generator=generator) < 0.5, -1.0, 1.0)
    return (magnitudes * signs).reshape(shape).to(dtype)


def task_tensors(n, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [distinct(shape, dtype, g) for _ in range(n)]


def inject_philox(monkeypatch, n):
    """PEFT's bernoulli draws replaced by deltaops' keyed draws: PEFT prunes the n task
    tensors of a list in order, deltaops keys tensor i with stream i."""
    import deltaops

    calls = []

    def bernoulli(probabilities):
        u = deltaops.random_uniform_like(probabilities.float(), seed=SEED, stream=len(calls) % n)
        calls.append(1)
        return (u < probabilities.float()).to(probabilities.dtype)

    monkeypatch.setattr(merge_utils.torch, "bernoulli", bernoulli)


def assert_same(actual, expected):
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    assert actual.shape == expected.shape
    diff = (actual.double() - expected.double()).abs().max() if actual.numel() else 0
    assert torch.equal(actual, expected), f"max |diff| {diff}"


WEIGHTS = [[1.0], [0.7, 0.3], [1.0, -0.5, 0.25], [0.2, 0.9, 1.3, 0.4, 0.6]]
SHAPES = [(1,), (37,), (16, 9), (3, 5, 7)]


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_task_arithmetic_matches_peft(weights, shape, dtype):
    tensors = task_tensors(len(weights), shape, dtype)
    w = torch.tensor(weights)
    assert_same(ours.task_arithmetic(tensors, w), merge_utils.task_arithmetic(tensors, w))


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_magnitude_prune_matches_peft(weights, shape, density, dtype):
    tensors = task_tensors(len(weights), shape, dtype, seed=1)
    w = torch.tensor(weights)
    assert_same(ours.magnitude_prune(tensors, w, density),
                merge_utils.magnitude_prune(tensors, w, density))


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.0, 0.2, 0.7])
@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ties_matches_peft(weights, shape, density, method, dtype):
    tensors = task_tensors(len(weights), shape, dtype, seed=2)
    w = torch.tensor(weights)
    assert_same(ours.ties(tensors, w, density, method), merge_utils.ties(tensors, w, density, method))


@pytest.mark.parametrize("weights", WEIGHTS[1:])
@pytest.mark.parametrize("density", [0.125, 0.5, 0.75])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_dare_matches_peft_with_injected_draws(monkeypatch, weights, density, dtype, method):
    # densities exact in bf16: PEFT draws with the probability rounded to the dtype
    tensors = task_tensors(len(weights), (23, 11), dtype, seed=3)
    w = torch.tensor(weights)
    inject_philox(monkeypatch, len(tensors))
    expected_linear = merge_utils.dare_linear(tensors, w, density)
    inject_philox(monkeypatch, len(tensors))
    expected_ties = merge_utils.dare_ties(tensors, w, density, method)
    monkeypatch.undo()
    assert_same(ours.dare_linear(tensors, w, density, seed=SEED), expected_linear)
    assert_same(ours.dare_ties(tensors, w, density, method, seed=SEED), expected_ties)


def test_dare_seed_from_torch_generator_is_repeatable():
    tensors = task_tensors(3, (64, 8), torch.float32)
    w = torch.tensor([0.5, 0.3, 0.2])
    torch.manual_seed(5)
    first = ours.dare_ties(tensors, w, 0.3)
    torch.manual_seed(5)
    assert torch.equal(first, ours.dare_ties(tensors, w, 0.3))
    kept = (first != 0).float().mean().item()
    assert 0.2 < kept < 0.7  # elements kept by at least one of three at density 0.3: ~0.66


def test_density_one_keeps_everything_and_warns_like_peft():
    tensors = task_tensors(2, (9, 4), torch.float32)
    w = torch.tensor([0.6, 0.4])
    with pytest.warns(UserWarning, match="no pruning"):
        actual = ours.dare_linear(tensors, w, 1.0, seed=SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = merge_utils.dare_linear(tensors, w, 1.0)
    assert_same(actual, expected)


def test_bad_arguments_raise_clear_errors():
    tensors = task_tensors(2, (4, 4), torch.float32)
    w = torch.tensor([0.5, 0.5])
    with pytest.raises(ValueError, match="Density should be >= 0"):
        ours.ties(tensors, w, -0.1)
    with pytest.raises(ValueError, match="one value per task tensor"):
        ours.ties(tensors, torch.tensor([1.0, 2.0, 3.0]), 0.5)
    with pytest.raises(ValueError, match=r"task_tensors\[1\]"):
        ours.task_arithmetic([tensors[0], tensors[1][:2]], w)
    with pytest.raises(ValueError, match="non-empty"):
        ours.task_arithmetic([], w)
    with pytest.raises(TypeError, match=r"task_tensors\[0\]"):
        ours.task_arithmetic([torch.ones(3, dtype=torch.int32)], torch.tensor([1.0]))
    with pytest.raises(RuntimeError, match="Unimplemented mask method"):
        ours.ties(tensors, w, 0.5, "median")
    nan = tensors[0].clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ours.ties([nan, tensors[1]], w, 0.5)


# ---- add_weighted_adapter on a tiny LoRA model, patched and unpatched --------------------------


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(24, 24)
        self.v = torch.nn.Linear(24, 16)

    def forward(self, x):
        return self.v(self.q(x))


def tiny_lora_model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(Tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"],
                                              init_lora_weights=False), adapter_name="first")
    model.add_adapter("second", LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"],
                                      init_lora_weights=False))
    model.add_adapter("third", LoraConfig(r=4, lora_alpha=16, target_modules=["q", "v"],
                                      init_lora_weights=False))
    return model


def combined_adapter(model, combination_type, name):
    model.add_weighted_adapter(["first", "second", "third"], [0.6, 0.3, -0.4], name,
                               combination_type=combination_type, density=0.4)
    return {key: value.detach().clone() for key, value in model.state_dict().items()
            if f".{name}." in key}


@pytest.mark.parametrize("combination_type",
                         ["linear", "ties", "magnitude_prune", "dare_linear", "dare_ties"])
def test_add_weighted_adapter_patched_equals_unpatched(monkeypatch, combination_type):
    model = tiny_lora_model()
    random = combination_type.startswith("dare")
    if random:
        inject_philox(monkeypatch, 3)
    expected = combined_adapter(model, combination_type, "peft_own")
    if random:
        monkeypatch.undo()
        # deltaops draws one seed per call from torch's generator: pin it to SEED
        monkeypatch.setattr("deltaops.integrations.peft._draw_seed", lambda: SEED)
    ours.patch_peft()
    try:
        assert ours.is_patched()
        lora_model = pytest.importorskip("peft.tuners.lora.model")
        assert merge_utils.ties is ours.ties and lora_model.dare_ties is ours.dare_ties
        actual = combined_adapter(model, combination_type, "deltaops")
    finally:
        ours.unpatch_peft()
    assert not ours.is_patched() and merge_utils.ties is not ours.ties
    assert len(actual) == len(expected) > 0
    for key, value in expected.items():
        other = actual[key.replace(".peft_own.", ".deltaops.")]
        assert_same(other, value)
