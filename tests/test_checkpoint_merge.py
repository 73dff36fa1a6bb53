"""``deltaops merge``: whole-model trimming, resume, interrupted runs, and input errors.

* ``trim_scope: model`` against a straightforward flattened implementation:
  every model's tensors concatenated into one vector (in output order), merged
  by the reference ``merge_tensors`` (whose per-tensor top-k on that vector is
  the whole-model top-k), split back: bit-identical.
* An interrupted run leaves no output folder; ``--resume`` finishes it
  without redoing completed shards, and the result equals a clean run.
* Missing / corrupt shards, shape mismatches and NaN inputs: the error names
  the tensor and the file.
* The YAML reader's gradient/filter evaluation equals mergekit's.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from deltaops.checkpoint import merge as merge_module
from deltaops.checkpoint.config import ConfigError, evaluate_setting, layer_position, load_config
from deltaops.checkpoint.family import make_family
from deltaops.checkpoint.io import CheckpointError, ModelFolder
from deltaops.checkpoint.merge import RunOptions, run_merge
from deltaops.reference.merge import merge_tensors as reference_merge


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    return make_family(str(root), params=200_000, dtype=torch.float32, shard_size=300_000)


def _config(tmp_path, family, method="ties", params=None, name="c.yml", **extra):
    params = params or [{"weight": 1.0, "density": 0.2}, {"weight": 0.5, "density": 0.4},
                        {"weight": 0.7, "density": 0.1}]
    data = {"merge_method": method, "base_model": family[0],
            "models": [{"model": p, "parameters": q} for p, q in zip(family[1:], params)], **extra}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return load_config(str(path)), params


def _options(**kw):
    kw.setdefault("quiet", True)
    kw.setdefault("shard_size", 250_000)
    return RunOptions(**kw)


def _shard_bytes(folder):
    return {f: open(os.path.join(folder, f), "rb").read() for f in sorted(os.listdir(folder))
            if f.endswith(".safetensors")}


# ---- trim_scope: model --------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_model_scope_equals_flattened_merge(tmp_path, family, method):
    params = [{"weight": 1.0, "density": 0.2}, {"weight": 0.5, "density": 0.4},
              {"weight": 0.7, "density": 0.1}]
    if method != "ties":
        params = [dict(p, gamma=g) for p, g in zip(params, [0.01, 0.05, 0.0])]
    config, _ = _config(tmp_path, family, method, params, trim_scope="model")
    out = str(tmp_path / "out")
    run_merge(config, out, _options())
    folders = [ModelFolder(p) for p in family]
    names = folders[0].names()  # the output order is the base's storage order
    flat = [torch.cat([f.read(n).reshape(-1) for n in names]) for f in folders]
    kwargs = {"weights": [p["weight"] for p in params], "density": [p["density"] for p in params]}
    if method != "ties":
        kwargs["gamma"] = [p["gamma"] for p in params]
    expected = reference_merge(flat[0], flat[1:], method, **kwargs)
    merged = ModelFolder(out)
    position = 0
    for name in names:
        got = merged.read(name).reshape(-1)
        want = expected[position:position + got.numel()]
        position += got.numel()
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), name
    # Not vacuous: per-tensor trimming gives another model.
    per_tensor, _ = _config(tmp_path, family, method, params, name="t.yml")
    run_merge(per_tensor, str(tmp_path / "per_tensor"), _options())
    assert _shard_bytes(out) != _shard_bytes(str(tmp_path / "per_tensor"))


def test_model_scope_rejects_varying_density(tmp_path, family):
    params = [{"weight": 1.0, "density": [0.1, 0.5]}, {"weight": 1.0, "density": 0.4},
              {"weight": 1.0, "density": 0.1}]
    config, _ = _config(tmp_path, family, "ties", params, trim_scope="model")
    with pytest.raises(ConfigError, match="one density per model"):
        run_merge(config, str(tmp_path / "out"), _options())


def test_model_scope_is_for_magnitude_methods(tmp_path, family):
    with pytest.raises(ConfigError, match="trim_scope: model applies to"):
        _config(tmp_path, family, "dare_ties", trim_scope="model")


# ---- resume and interrupted runs ------------------------------------------------------------


class _Interrupt(Exception):
    pass


def test_interrupted_run_leaves_no_output_and_resumes(tmp_path, family, monkeypatch):
    config, _ = _config(tmp_path, family, trim_scope="model")
    clean = str(tmp_path / "clean")
    run_merge(config, clean, _options())
    out = str(tmp_path / "out")
    calls = {"n": 0}
    original = merge_module.MergeJob.merge_one

    def interrupted(self, name, thresholds=None):
        calls["n"] += 1
        if calls["n"] == 20:
            raise _Interrupt()
        return original(self, name, thresholds)

    monkeypatch.setattr(merge_module.MergeJob, "merge_one", interrupted)
    with pytest.raises(_Interrupt):
        run_merge(config, out, _options())
    monkeypatch.setattr(merge_module.MergeJob, "merge_one", original)
    assert not os.path.exists(out)
    partial = str(tmp_path / ".out.partial")
    done = [f for f in os.listdir(partial) if f.endswith(".safetensors")]
    assert done and len(done) < len(_shard_bytes(clean))
    assert any(f.endswith(".tmp") for f in os.listdir(partial))  # the shard cut short
    with pytest.raises(CheckpointError, match="--resume"):
        run_merge(config, out, _options())
    summary = run_merge(config, out, _options(resume=True))
    assert summary.skipped_shards == len(done)
    assert summary.tensors < 30
    assert _shard_bytes(out) == _shard_bytes(clean)
    assert not os.path.exists(partial)
    assert sorted(os.listdir(out)) == sorted(os.listdir(clean))


def test_resume_refuses_another_configuration(tmp_path, family, monkeypatch):
    config, params = _config(tmp_path, family)
    out = str(tmp_path / "out")
    monkeypatch.setattr(merge_module.MergeJob, "merge_one",
                        lambda *a, **k: (_ for _ in ()).throw(_Interrupt()))
    with pytest.raises(_Interrupt):
        run_merge(config, out, _options())
    monkeypatch.undo()
    params[0]["density"] = 0.9
    other, _ = _config(tmp_path, family, params=params, name="other.yml")
    with pytest.raises(CheckpointError, match="another configuration"):
        run_merge(other, out, _options(resume=True))


def test_existing_output_needs_overwrite(tmp_path, family):
    config, _ = _config(tmp_path, family)
    out = str(tmp_path / "out")
    run_merge(config, out, _options())
    with pytest.raises(CheckpointError, match="--overwrite"):
        run_merge(config, out, _options())
    run_merge(config, out, _options(overwrite=True))
    assert len(ModelFolder(out).tensors) == 30


def test_output_folder_is_a_model(tmp_path, family):
    config, _ = _config(tmp_path, family, out_dtype="bfloat16")
    out = str(tmp_path / "out")
    summary = run_merge(config, out, _options())
    files = set(os.listdir(out))
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "model.safetensors.index.json", "deltaops_merge.yml"} <= files
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert set(index["weight_map"]) == set(ModelFolder(family[0]).tensors)
    assert index["metadata"]["total_size"] == sum(i.nbytes for i in ModelFolder(out).tensors.values())
    # The shards load with safetensors itself.
    loaded = {}
    for shard in set(index["weight_map"].values()):
        loaded.update(load_file(os.path.join(out, shard)))
    assert all(t.dtype == torch.bfloat16 for t in loaded.values())
    assert summary.tensors == 30 and summary.bytes_read > 0 and summary.bytes_written > 0


# ---- errors name the tensor and the file ------------------------------------------------------


def _copy_family(tmp_path, family):
    root = tmp_path / "copy"
    paths = []
    for p in family:
        target = root / os.path.basename(p)
        shutil.copytree(p, target)
        paths.append(str(target))
    return paths


def _shard_of(folder, tensor):
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    return os.path.join(folder, index["weight_map"][tensor])


def _rewrite(path, change):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_shard(tmp_path, family):
    paths = _copy_family(tmp_path, family)
    shard = _shard_of(paths[2], "model.layers.1.mlp.up_proj.weight")
    os.remove(shard)
    config, _ = _config(tmp_path, paths)
    with pytest.raises(CheckpointError, match=f"{shard}: shard file is missing.*e.g. 'model"):
        run_merge(config, str(tmp_path / "out"), _options())


def test_truncated_shard(tmp_path, family):
    paths = _copy_family(tmp_path, family)
    shard = _shard_of(paths[1], "lm_head.weight")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as handle:
        handle.truncate(size - 100)
    config, _ = _config(tmp_path, paths)
    with pytest.raises(CheckpointError, match=f"{shard}: tensor 'lm_head.weight'.*truncated"):
        run_merge(config, str(tmp_path / "out"), _options())


def test_corrupt_header(tmp_path, family):
    paths = _copy_family(tmp_path, family)
    shard = _shard_of(paths[3], "lm_head.weight")
    with open(shard, "r+b") as handle:
        handle.seek(8)
        handle.write(b"\x00garbage")
    config, _ = _config(tmp_path, paths)
    with pytest.raises(CheckpointError, match=f"{shard}: corrupt safetensors file"):
        run_merge(config, str(tmp_path / "out"), _options())


def test_shape_mismatch(tmp_path, family):
    paths = _copy_family(tmp_path, family)
    name = "model.layers.2.self_attn.q_proj.weight"
    shard = _shard_of(paths[2], name)
    _rewrite(shard, lambda t: t.__setitem__(name, t[name][:-1].contiguous()))
    config, _ = _config(tmp_path, paths)
    with pytest.raises(CheckpointError, match=f"tensor '{name}': shape \\[63, 64\\] in {shard} differs"):
        run_merge(config, str(tmp_path / "out"), _options())


def test_nan_input(tmp_path, family):
    paths = _copy_family(tmp_path, family)
    name = "model.layers.0.mlp.down_proj.weight"
    shard = _shard_of(paths[3], name)
    _rewrite(shard, lambda t: t[name].view(-1).__setitem__(17, float("nan")))
    for method, extra in (("ties", {}), ("ties", {"trim_scope": "model"}), ("dare_linear", {})):
        config, _ = _config(tmp_path, paths, method, **extra)
        out = str(tmp_path / f"out-{method}-{len(extra)}")
        expected = f"{shard}: tensor '{name}' contains NaN"
        with pytest.raises(CheckpointError, match=expected):
            run_merge(config, out, _options())
        assert not os.path.exists(out)


def test_missing_tensor(tmp_path, family):
    paths = _copy_family(tmp_path, family)
    name = "model.norm.weight"
    shard = _shard_of(paths[1], name)
    _rewrite(shard, lambda t: t.pop(name))
    index_path = os.path.join(paths[1], "model.safetensors.index.json")
    index = json.load(open(index_path))
    del index["weight_map"][name]
    json.dump(index, open(index_path, "w"))
    config, _ = _config(tmp_path, paths)
    with pytest.raises(CheckpointError, match=f"{paths[1]}: tensor '{name}'.*missing"):
        run_merge(config, str(tmp_path / "out"), _options())


# ---- the YAML reader ---------------------------------------------------------------------------


SETTINGS = [
    0.5, [0.0, 1.0], [0.1, 0.9, 0.3], [1, 2, 3, 4, 5],
    [{"filter": "mlp", "value": 0.3}, {"value": [0.2, 0.8]}],
    {"filter": "self_attn", "value": 0.4},
    [{"filter": "*", "value": 0.25}], "1e-3",
]


@pytest.mark.parametrize("setting", SETTINGS)
def test_settings_evaluate_like_mergekit(setting):
    config = pytest.importorskip("mergekit.config")
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.3.self_attn.q_proj.weight",
                 "lm_head.weight"):
        for t in (0.0, 0.25, 1 / 3, 0.5, 0.9, 1.0):
            ours = evaluate_setting("weight", setting, name, t)
            mk_setting = setting
            if isinstance(setting, dict):
                mk_setting = config.ConditionalParameter(**setting)
            elif isinstance(setting, list) and setting and isinstance(setting[0], dict):
                mk_setting = [config.ConditionalParameter(**s) for s in setting]
            theirs = config.evaluate_setting(name, mk_setting, t, validate=float)
            assert ours == theirs, (setting, name, t)


def test_layer_position():
    assert layer_position("model.layers.0.mlp.up_proj.weight", 5) == 0.0
    assert layer_position("model.layers.4.mlp.up_proj.weight", 5) == 1.0
    assert layer_position("model.layers.2.mlp.up_proj.weight", 5) == 0.5
    assert layer_position("model.embed_tokens.weight", 5) == 0.0


@pytest.mark.parametrize("data, message", [
    ({"merge_method": "frobnicate", "models": [{"model": "a"}]}, "merge_method must be one of"),
    ({"merge_method": "ties", "models": [{"model": "a"}]}, "ties needs a base_model"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}],
      "slices": [{"sources": []}]}, "'slices' is not supported"),
    ({"merge_method": "ties", "base_model": "b",
      "models": [{"model": "a", "parameters": {"densty": 0.5}}]}, "ties does not take densty"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a"}], "dtype": "fp8"},
     "dtype must be one of"),
    ({"merge_method": "slerp", "base_model": "b", "models": [{"model": "a"}, {"model": "c"}]},
     "exactly one other model"),
])
def test_config_errors(data, message):
    from deltaops.checkpoint.config import parse_config

    with pytest.raises(ConfigError, match=message):
        parse_config(data)


def test_missing_required_weight_names_model_and_tensor(tmp_path, family):
    config, _ = _config(tmp_path, family, params=[{"density": 0.5}] * 3)
    out = str(tmp_path / "out")
    with pytest.raises(ConfigError, match="missing required parameter 'weight' for .*ft1: model"):
        run_merge(config, out, _options())
    assert not os.path.exists(str(tmp_path / ".out.partial"))  # found before anything is written
