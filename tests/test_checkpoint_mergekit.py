"""``deltaops merge`` against ``mergekit-yaml`` (mergekit 0.1.5) on a generated family.

A base and three fp32 fine-tunes (Llama layout, 3 layers, sharded) are merged
from the same YAML by mergekit's own command (its click entry point, called
in this process so that mergekit and transformers are imported once) and by
``deltaops merge``; every output tensor is compared.

* Deterministic methods: bit-identical, except, for the magnitude methods,
  at elements whose delta magnitude *equals* a model's k-th largest (a tie at
  the trim threshold): mergekit's sort breaks such ties arbitrarily, deltaops
  keeps the lowest index (DESIGN.md). Those positions are counted and must be
  a tiny share.
* Random methods (dare_*, della*): bit-matching mergekit's torch RNG is not a
  goal (deltaops draws with Philox by element index, so results do not depend
  on threads or devices). Compared instead: the share of elements the merge
  changes and the norm of the merged delta, per tensor, within sampling
  tolerance; and deltaops against itself (same seed, same bytes).
"""

from __future__ import annotations

import os

import pytest
import torch
import yaml

from deltaops.checkpoint.family import make_family
from deltaops.checkpoint.io import ModelFolder
from deltaops.cli import main as deltaops_main
from deltaops.reference.sparse import magnitude_k, magnitude_keys, outlier_band

mergekit_run_yaml = pytest.importorskip("mergekit.scripts.run_yaml")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    return make_family(str(root), params=200_000, dtype=torch.float32, shard_size=300_000)


def _write_config(tmp_path, family, method, models, parameters=None, base=True, **extra):
    base_path, fts = family[0], family[1:]
    config = {"merge_method": method,
              "models": [{"model": path, **({"parameters": p} if p else {})}
                         for path, p in zip(fts if models is None else [family[i] for i in models[0]],
                                            models[1] if models is not None else [None] * 3)]}
    if base:
        config["base_model"] = base_path
    if parameters:
        config["parameters"] = parameters
    config.update(extra)
    path = tmp_path / f"{method}.yml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _run_both(tmp_path, config_path, seed=0):
    mk_out, do_out = str(tmp_path / "mergekit"), str(tmp_path / "deltaops")
    mergekit_run_yaml.main([config_path, mk_out, "--no-copy-tokenizer", "--no-write-model-card",
                            "--quiet", "--random-seed", str(seed)], standalone_mode=False)
    deltaops_main(["merge", config_path, do_out, "--quiet", "--seed", str(seed),
                   "--shard-size", "250KB"])
    return ModelFolder(mk_out), ModelFolder(do_out)


def _threshold_ties(base, models, ks) -> torch.Tensor:
    """Elements where some model's |delta| equals its k-th largest for one of its k's."""
    tie = torch.zeros(base.numel(), dtype=torch.bool)
    for model, model_ks in zip(models, ks):
        keys = magnitude_keys(model.float() - base.float())
        ordered = torch.sort(keys, descending=True).values
        for k in model_ks:
            if 0 < k < keys.numel():
                tie |= keys == ordered[k - 1]
    return tie.reshape(base.shape)


def _compare(mk: ModelFolder, do: ModelFolder, family, ks_of=None) -> int:
    """Bit-compare every tensor; return how many elements were excused as threshold ties."""
    assert sorted(mk.tensors) == sorted(do.tensors)
    inputs = [ModelFolder(p) for p in family]
    excused = 0
    for name in mk.tensors:
        a, b = mk.read(name), do.read(name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        differ = a.view(torch.int32) != b.view(torch.int32)
        if differ.any() and ks_of is not None:
            base, models = inputs[0].read(name), [f.read(name) for f in inputs[1:]]
            tie = _threshold_ties(base, models, ks_of(base.numel()))
            assert not (differ & ~tie).any(), f"{name}: differs away from threshold ties"
            excused += int(differ.sum())
        else:
            assert not differ.any(), f"{name}: {int(differ.sum())} of {a.numel()} elements differ"
    total = sum(i.numel for i in mk.tensors.values())
    assert excused <= total * 1e-3
    return excused


WEIGHTS_3 = [{"weight": 1.0}, {"weight": [0.2, 0.8]},
             {"weight": [{"filter": "mlp", "value": 0.3}, {"value": 0.7}]}]


def test_linear(tmp_path, family):
    config = _write_config(tmp_path, family, "linear", None, base=False)
    models = [(p, w) for p, w in zip(family[1:], WEIGHTS_3)]
    config_data = yaml.safe_load(open(config))
    config_data["models"] = [{"model": p, "parameters": w} for p, w in models]
    open(config, "w").write(yaml.safe_dump(config_data))
    _compare(*_run_both(tmp_path, config), family)


def test_task_arithmetic_with_gradients_filters_and_lambda(tmp_path, family):
    config = _write_config(tmp_path, family, "task_arithmetic", ([1, 2, 3], WEIGHTS_3),
                           parameters={"lambda": 0.8})
    _compare(*_run_both(tmp_path, config), family)


def test_task_arithmetic_bf16_out_dtype(tmp_path, family):
    # dtype float32 arithmetic (exact in both), rounded once to the bf16 output.
    config = _write_config(tmp_path, family, "task_arithmetic", ([1, 2, 3], WEIGHTS_3),
                           dtype="float32", out_dtype="bfloat16")
    mk, do = _run_both(tmp_path, config)
    for name in mk.tensors:
        assert torch.equal(mk.read(name).view(torch.int16), do.read(name).view(torch.int16)), name
        assert do.read(name).dtype == torch.bfloat16


def test_ties(tmp_path, family):
    densities = [0.5, 0.3, 0.7]
    params = [dict(w, density=d) for w, d in zip(WEIGHTS_3, densities)]
    config = _write_config(tmp_path, family, "ties", ([1, 2, 3], params),
                           parameters={"normalize": True})
    _compare(*_run_both(tmp_path, config), family,
             ks_of=lambda n: [[magnitude_k(d, n)] for d in densities])


def test_ties_density_gradient(tmp_path, family):
    params = [{"weight": 1.0, "density": [0.2, 0.9]}, {"weight": 1.0, "density": 0.5},
              {"weight": 0.5, "density": [{"filter": "attn", "value": 0.3}, {"value": 0.6}]}]
    config = _write_config(tmp_path, family, "ties", ([1, 2, 3], params))
    mk, do = _run_both(tmp_path, config)
    # Ties at the threshold are excused for any k the gradient can give.
    _compare(mk, do, family, ks_of=lambda n: [[magnitude_k(d / 100, n) for d in range(1, 101)]] * 3)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs(tmp_path, family, method):
    params = [{"weight": 1.0, "density": 0.5, "gamma": 0.02}, {"weight": 0.5, "density": 0.3},
              {"weight": 0.7, "density": 0.8, "gamma": 0.05}]
    config = _write_config(tmp_path, family, method, ([1, 2, 3], params))

    def ks(n):
        out = []
        for p in params:
            drop, keep = outlier_band(p["density"], p.get("gamma", 0.01), n)
            out.append([drop, drop + keep])
        return out

    _compare(*_run_both(tmp_path, config), family, ks_of=ks)


def test_slerp_with_t_gradient_and_filters(tmp_path, family):
    models = ([0, 1], [None, None])
    config = _write_config(tmp_path, family, "slerp", models, parameters={
        "t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]},
              {"filter": "mlp", "value": [1.0, 0.3]}, {"value": 0.5}]})
    _compare(*_run_both(tmp_path, config), family)


def test_model_stock(tmp_path, family):
    config = _write_config(tmp_path, family, "model_stock", None)
    _compare(*_run_both(tmp_path, config), family)


def test_sce(tmp_path, family):
    config = _write_config(tmp_path, family, "sce", None, parameters={"select_topk": 0.5})
    _compare(*_run_both(tmp_path, config), family)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_methods_statistically(tmp_path, family, method):
    params = [{"weight": 0.5, "density": 0.5}, {"weight": 0.3, "density": 0.6},
              {"weight": 0.2, "density": 0.4}]
    if method.startswith("della"):
        params = [dict(p, epsilon=0.1) for p in params]
    config = _write_config(tmp_path, family, method, ([1, 2, 3], params))
    mk, do = _run_both(tmp_path, config, seed=1)
    base = ModelFolder(family[0])
    for name in mk.tensors:
        b = base.read(name).float()
        a_delta, d_delta = mk.read(name).float() - b, do.read(name).float() - b
        if b.numel() < 4096:
            continue
        changed_mk = (a_delta != 0).float().mean()
        changed_do = (d_delta != 0).float().mean()
        # Both keep each element with the same probability: the changed share agrees within
        # sampling noise (n >= 4096: sd of a share < 0.008).
        assert abs(changed_mk - changed_do) < 0.04, (name, changed_mk, changed_do)
        ratio = d_delta.norm() / a_delta.norm()
        assert 0.85 < ratio < 1.15, (name, float(ratio))
    # Same seed, same bytes; another seed, other bytes.
    again = str(tmp_path / "again")
    other = str(tmp_path / "other")
    deltaops_main(["merge", config, again, "--quiet", "--seed", "1", "--shard-size", "250KB"])
    deltaops_main(["merge", config, other, "--quiet", "--seed", "2", "--shard-size", "250KB"])
    for shard in sorted(f for f in os.listdir(again) if f.endswith(".safetensors")):
        with open(os.path.join(again, shard), "rb") as x, open(os.path.join(tmp_path / "deltaops", shard), "rb") as y:
            assert x.read() == y.read()
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(ModelFolder(other).read(name), do.read(name))
