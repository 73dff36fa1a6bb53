"""``deltaops compress`` / ``deltaops apply`` round trips (the sparse format).

The rebuilt model must equal, bit for bit, ``base`` where the delta was
dropped and ``round(fp32(base) + fp32(stored delta))`` where it was kept,
with the kept set exactly :func:`deltaops.reference.sparse.topk_mask` of each
tensor's fp32 delta (or the whole-model top-k with ``--trim-scope model``);
1-D and small tensors come back exactly.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from deltaops.checkpoint.compress import FORMATS, get_format
from deltaops.checkpoint.family import make_family
from deltaops.checkpoint.io import CheckpointError, ModelFolder
from deltaops.cli import main as cli
from deltaops.reference.merge import topk_thresholds
from deltaops.reference.sparse import magnitude_k, threshold_mask, topk_mask


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        root = tmp_path_factory.mktemp(str(dtype).replace("torch.", ""))
        out[dtype] = make_family(str(root), params=200_000, n_finetunes=1, dtype=dtype,
                                 shard_size=300_000)
    return out


def _roundtrip(tmp_path, family, *args):
    delta, rebuilt = str(tmp_path / "delta"), str(tmp_path / "rebuilt")
    cli(["compress", "--base", family[0], "--finetuned", family[1], *args, delta, "--quiet"])
    cli(["apply", "--base", family[0], "--delta", delta, rebuilt, "--quiet", "--shard-size", "300KB"])
    return delta, ModelFolder(rebuilt)


def _expected(base, tuned, keep, values_dtype):
    delta = (tuned.float() - base.float()).to(values_dtype).float()
    return torch.where(keep, (base.float() + delta).to(base.dtype), base)


@pytest.mark.parametrize("dtype, layout, values_dtype", [
    (torch.float32, "auto", None), (torch.float32, "coo", None),
    (torch.bfloat16, "bitmask", None), (torch.bfloat16, "coo", "float32"),
])
def test_sparse_roundtrip(tmp_path, families, dtype, layout, values_dtype):
    family = families[dtype]
    args = ["--density", "0.25", "--layout", layout]
    if values_dtype:
        args += ["--values-dtype", values_dtype]
    delta_dir, rebuilt = _roundtrip(tmp_path, family, *args)
    base, tuned = ModelFolder(family[0]), ModelFolder(family[1])
    manifest = json.load(open(os.path.join(delta_dir, "delta_manifest.json")))
    stored = torch.float32 if values_dtype else dtype
    assert sorted(rebuilt.tensors) == sorted(tuned.tensors)
    for name in tuned.names():
        b, t, r = base.read(name), tuned.read(name), rebuilt.read(name)
        assert r.dtype == t.dtype
        if b.dim() < 2:
            assert manifest["tensors"][name]["kind"] == "copy"
            assert torch.equal(r, t), name
            continue
        delta = t.float() - b.float()
        keep = topk_mask(delta, magnitude_k(0.25, delta.numel()))
        assert manifest["tensors"][name]["meta"]["nnz"] == int(keep.sum())
        want = _expected(b, t, keep, stored)
        bits = torch.int32 if dtype == torch.float32 else torch.int16
        assert torch.equal(r.view(bits), want.view(bits)), name
        if dtype == torch.float32 or values_dtype:
            assert torch.equal(r[keep], t[keep])  # kept elements are exact
    # Stored in the model's dtype, the delta is smaller than the model (fp32 values for a
    # bf16 model at density 0.25 with coo indices are as large as the model: not checked).
    if values_dtype:
        return
    size = sum(os.path.getsize(os.path.join(delta_dir, f)) for f in manifest["shards"])
    model_size = sum(i.nbytes for i in tuned.tensors.values())
    assert size < 0.6 * model_size


def test_whole_model_trim(tmp_path, families):
    family = families[torch.float32]
    _, rebuilt = _roundtrip(tmp_path, family, "--density", "0.1", "--trim-scope", "model")
    base, tuned = ModelFolder(family[0]), ModelFolder(family[1])
    names = base.names()
    deltas = [tuned.read(n).float() - base.read(n).float() for n in names]
    total = sum(d.numel() for d in deltas)
    pairs = topk_thresholds(deltas, magnitude_k(0.1, total))
    per_tensor_counts = []
    for name, delta, (key, take) in zip(names, deltas, pairs):
        b, t, r = base.read(name), tuned.read(name), rebuilt.read(name)
        if b.dim() < 2:
            assert torch.equal(r, t)
            continue
        keep = threshold_mask(delta, key, take)
        per_tensor_counts.append(float(keep.float().mean()))
        assert torch.equal(r.view(torch.int32), _expected(b, t, keep, torch.float32).view(torch.int32))
    assert max(per_tensor_counts) - min(per_tensor_counts) > 0.01  # not 10% of every tensor


def test_format_table_and_errors(tmp_path, families):
    assert "sparse" in FORMATS
    family = families[torch.float32]
    with pytest.raises(CheckpointError, match="unknown delta format 'int3'"):
        get_format("int3")
    with pytest.raises(SystemExit):
        cli(["compress", "--base", family[0], "--finetuned", family[1], "--format", "int3",
             str(tmp_path / "int3"), "--quiet"])
    with pytest.raises(CheckpointError, match="not the base the delta was made from"):
        from deltaops.checkpoint.compress import run_apply
        from deltaops.checkpoint.merge import RunOptions

        delta = str(tmp_path / "delta")
        cli(["compress", "--base", family[0], "--finetuned", family[1], delta, "--quiet"])
        run_apply(families[torch.bfloat16][0], delta, str(tmp_path / "x"), RunOptions(quiet=True))


def test_info_describes_folders(tmp_path, families, capsys):
    family = families[torch.float32]
    cli(["info", family[0]])
    assert "30 tensors" in capsys.readouterr().out
    delta = str(tmp_path / "delta")
    cli(["compress", "--base", family[0], "--finetuned", family[1], delta, "--quiet"])
    capsys.readouterr()
    cli(["info", delta])
    assert "deltaops delta (sparse" in capsys.readouterr().out


def test_bench_subcommand_reports_against_a_copy(capsys):
    cli(["bench", "--params", "2e5", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert "TIES merge of base + 3 fine-tunes" in out and "a file copy of the base ran at" in out
