"""deltaops.integrations.peft_lora: PEFT's LoRA merge / unmerge routed through lora_merge_, on tiny
LoRA models built here; patched and unpatched results agree within the documented bound."""

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
from peft.tuners.lora.layer import Linear as LoraLinear  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

from deltaops.integrations import peft_lora  # noqa: E402
from deltaops.reference import lowrank as ref  # noqa: E402

from lowrank_bounds import assert_within_accumulation_bound, ulp_of  # noqa: E402
from tolerances import assert_bitwise_equal  # noqa: E402


class TinyLinear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(32, 48)
        self.v = torch.nn.Linear(48, 20, bias=False)

    def forward(self, x):
        return self.v(torch.relu(self.q(x)))


class TinyConv1D(torch.nn.Module):
    """GPT-2 style: Conv1D stores its weight [in, out] (PEFT's fan_in_fan_out)."""

    def __init__(self):
        super().__init__()
        self.c_attn = Conv1D(36, 24)  # nf=36 outputs, nx=24 inputs
        self.c_proj = Conv1D(24, 36)

    def forward(self, x):
        return self.c_proj(torch.relu(self.c_attn(x)))


def lora_model(kind="linear", dtype=torch.bfloat16, adapter_dtype=None, seed=0, **config):
    torch.manual_seed(seed)
    base = TinyLinear() if kind == "linear" else TinyConv1D()
    base = base.to(dtype)
    targets = ["q", "v"] if kind == "linear" else ["c_attn", "c_proj"]
    options = dict(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False,
                   fan_in_fan_out=kind == "conv1d")
    options.update(config)
    model = peft.get_peft_model(base, peft.LoraConfig(**options),
                                autocast_adapter_dtype=adapter_dtype is None)
    if adapter_dtype is not None:
        for module in model.modules():
            if isinstance(module, LoraLinear):
                for name in module.lora_A:
                    module.lora_A[name].to(adapter_dtype)
                    module.lora_B[name].to(adapter_dtype)
    return model


def lora_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


@pytest.fixture
def patched():
    peft_lora.patch()
    yield
    peft_lora.unpatch()


def merged_weights(model):
    merged = model.merge_and_unload()
    return {name: p.detach().clone() for name, p in merged.named_parameters()}


def exact_merges(model):
    """fp64 exact merged weight and the accumulation magnitude of every LoRA layer."""
    out = {}
    for name, layer in lora_layers(model).items():
        weight = layer.get_base_layer().weight.detach()
        lora_A = layer.lora_A["default"].weight.detach()
        lora_B = layer.lora_B["default"].weight.detach()
        key = name.removeprefix("base_model.model.") + ".weight"
        out[key] = (weight.dtype, lora_A.shape[0],
                    *ref.lora_merged_exact(weight, lora_A, lora_B, layer.scaling["default"],
                                           layer.fan_in_fan_out))
    return out


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, None),
                                                 (torch.bfloat16, torch.bfloat16),
                                                 (torch.float16, torch.float16),
                                                 (torch.float32, None)])
def test_merge_and_unload_patched_agrees_with_unpatched(kind, dtype, adapter_dtype):
    model = lora_model(kind, dtype, adapter_dtype)
    twin = copy.deepcopy(model)
    exact = exact_merges(model)
    peft_lora.patch()
    try:
        assert peft_lora.is_patched() and LoraLinear.merge is peft_lora._merge
        ours = merged_weights(model)
    finally:
        peft_lora.unpatch()
    assert not peft_lora.is_patched() and LoraLinear.merge is not peft_lora._merge
    theirs = merged_weights(twin)
    assert set(ours) == set(theirs)
    for name in ours:
        if name not in exact:  # biases and untouched parameters: the same
            assert_bitwise_equal(ours[name], theirs[name], name)
            continue
        weight_dtype, rank, value, magnitude = exact[name]
        assert_within_accumulation_bound(ours[name], value, magnitude, rank, what=name)
        # PEFT rounds the delta to the adapter's dtype, then the sum to the weight's: within half
        # an ulp of each (+ accumulation) of the exact sum; deltaops within one ulp of the sum.
        gap = (ours[name].double() - theirs[name].double()).abs()
        bound = (2 * ulp_of(value, weight_dtype) + ulp_of(magnitude, weight_dtype)
                 + 2 * (rank + 2) * 2.0 ** -24 * magnitude)
        assert bool((gap <= bound).all()), name


def test_merge_adapter_then_unmerge_adapter(patched):
    model = lora_model("linear", torch.bfloat16, torch.bfloat16)
    layers = lora_layers(model)
    before = {n: l.get_base_layer().weight.detach().clone() for n, l in layers.items()}
    x = torch.randn(5, 32).bfloat16()
    with torch.no_grad():
        adapted = model(x)
        model.merge_adapter()
        assert all(layer.merged for layer in layers.values())
        merged_out = model(x)
        model.unmerge_adapter()
    assert not any(layer.merged for layer in layers.values())
    torch.testing.assert_close(merged_out, adapted, rtol=0.05, atol=0.05)
    for name, layer in layers.items():
        back = layer.get_base_layer().weight.detach()
        merged = before[name].double()  # drift bound: one ulp of the (merged) weight, give or take
        drift = (back.double() - before[name].double()).abs()
        assert bool((drift <= 2 * ulp_of(merged, torch.bfloat16) + 1e-3).all()), name
    with pytest.warns(UserWarning, match="Already unmerged"):
        next(iter(layers.values())).unmerge()


def test_safe_merge_and_lora_bias(patched):
    model = lora_model("linear", torch.float32, lora_bias=True, target_modules=["q"])
    twin = copy.deepcopy(model)
    ours = model.merge_and_unload(safe_merge=True)
    peft_lora.unpatch()
    theirs = twin.merge_and_unload(safe_merge=True)
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_safe_merge_refuses_a_broken_adapter(patched):
    model = lora_model("linear", torch.float32)
    layer = lora_layers(model)["base_model.model.q"]
    weight = layer.get_base_layer().weight
    before = weight.detach().clone()
    with torch.no_grad():
        layer.lora_A["default"].weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaNs detected in the merged weights"):
        layer.merge(safe_merge=True)
    assert_bitwise_equal(weight.detach(), before, "weight after a refused safe merge")
    assert not layer.merged


def test_dora_falls_through_to_peft(patched):
    model = lora_model("linear", torch.float32, use_dora=True)
    twin = copy.deepcopy(model)
    ours = model.merge_and_unload()
    peft_lora.unpatch()
    theirs = twin.merge_and_unload()
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert_bitwise_equal(a.detach(), b.detach(), name)


def test_patch_is_idempotent():
    original = LoraLinear.merge
    peft_lora.patch()
    peft_lora.patch()
    peft_lora.unpatch()
    peft_lora.unpatch()
    assert LoraLinear.merge is original
