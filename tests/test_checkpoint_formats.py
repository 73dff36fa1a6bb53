"""``deltaops compress`` / ``apply`` with the sign, ternary, int4, int2 and lowrank formats.

For every compressed tensor of a generated family, with ``delta = fp32(F) - fp32(B)``:

* the stored parts are, bit for bit, what the format's own quantizer
  (:func:`deltaops.quantize_sign`, ``quantize_ternary``, ``quantize_uniform``,
  :func:`deltaops.low_rank`) makes of ``delta``;
* the rebuilt tensor is, bit for bit, ``apply_delta_`` of that format object
  (``lora_merge_`` of the factors for lowrank) on the same base tensor, and
  equals ``base + dequantize()`` (bit for bit) / ``base + to_dense()`` (one
  ulp of the model dtype: the fused merge sums in another order);
* the stored bytes are what the format promises (bits per element plus its
  scales / zero points, ``r * (out + in)`` factor elements for lowrank);
* the manifest records the format, its resolved options and per-tensor meta.

Bad options fail before anything is written, with a message naming the option.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

import deltaops
from deltaops.checkpoint.compress import FORMATS, CompressOptions, run_apply, run_compress
from deltaops.checkpoint.family import make_family
from deltaops.checkpoint.io import CheckpointError, ModelFolder
from deltaops.checkpoint.merge import RunOptions
from deltaops.cli import main as cli
from tolerances import assert_bitwise_equal, assert_within_ulps


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        root = tmp_path_factory.mktemp("fmt_" + str(dtype).replace("torch.", ""))
        out[dtype] = make_family(str(root), params=200_000, n_finetunes=1, dtype=dtype,
                                 shard_size=300_000)
    return out


def _compress_apply(tmp_path, family, fmt, args):
    delta, rebuilt = str(tmp_path / "delta"), str(tmp_path / "rebuilt")
    cli(["compress", "--base", family[0], "--finetuned", family[1], "--format", fmt, *args, delta,
         "--quiet"])
    cli(["apply", "--base", family[0], "--delta", delta, rebuilt, "--quiet", "--shard-size", "300KB"])
    manifest = json.load(open(os.path.join(delta, "delta_manifest.json")))
    parts = {}
    for shard in manifest["shards"]:
        parts.update(load_file(os.path.join(delta, shard)))
    return delta, manifest, parts, ModelFolder(rebuilt)


def _rows_cols(shape):
    return math.prod(shape[:-1]), shape[-1]


# ---- the low-bit formats ------------------------------------------------------------------

QUANT_CASES = [
    # dtype, format, CLI args, the format's own quantizer, options the manifest records
    (torch.float32, "sign", [], lambda d: deltaops.quantize_sign(d), {"granularity": "tensor"}),
    (torch.bfloat16, "sign", ["--granularity", "row"],
     lambda d: deltaops.quantize_sign(d, granularity="row"), {"granularity": "row"}),
    (torch.float32, "ternary", [], lambda d: deltaops.quantize_ternary(d), {"method": "absmean"}),
    (torch.bfloat16, "ternary", ["--method", "compeft", "--density", "0.2", "--alpha", "0.5"],
     lambda d: deltaops.quantize_ternary(d, method="compeft", density=0.2, alpha=0.5),
     {"method": "compeft", "density": 0.2, "alpha": 0.5}),
    (torch.float32, "int4", [], lambda d: deltaops.quantize_uniform(d, 4),
     {"group_size": 128, "symmetric": False}),
    (torch.bfloat16, "int4", ["--group-size", "32", "--symmetric"],
     lambda d: deltaops.quantize_uniform(d, 4, group_size=32, symmetric=True),
     {"group_size": 32, "symmetric": True}),
    (torch.float32, "int2", ["--group-size", "-1"],
     lambda d: deltaops.quantize_uniform(d, 2, group_size=-1), {"group_size": -1, "symmetric": False}),
    (torch.bfloat16, "int2", [], lambda d: deltaops.quantize_uniform(d, 2),
     {"group_size": 128, "symmetric": False}),
]


def _promised_nbytes(fmt, options, shape):
    """What each format says it stores for a delta of ``shape``."""
    rows, cols = _rows_cols(shape)
    numel = rows * cols
    if fmt == "sign":  # 1 bit per element, one fp32 scale per tensor or per row
        return math.ceil(numel / 8) + 4 * (rows if options["granularity"] == "row" else 1)
    if fmt == "ternary":  # 2 bits per element, one fp32 scale
        return math.ceil(numel * 2 / 8) + 4
    bits = int(fmt[3:])
    group = cols if options["group_size"] == -1 else options["group_size"]
    groups = rows * math.ceil(cols / group)
    # bits per element, an fp32 scale per group and (asymmetric) a uint8 zero point per group
    return math.ceil(numel * bits / 8) + groups * (4 if options["symmetric"] else 5)


@pytest.mark.parametrize("dtype, fmt, args, quantize, recorded", QUANT_CASES,
                         ids=[f"{c[1]}-{str(c[0])[6:]}-{len(c[2])}" for c in QUANT_CASES])
def test_lowbit_roundtrip(tmp_path, families, dtype, fmt, args, quantize, recorded):
    family = families[dtype]
    delta_dir, manifest, parts, rebuilt = _compress_apply(tmp_path, family, fmt, args)
    assert manifest["delta_format"] == fmt
    assert manifest["options"] == {**recorded, "min_numel": 1024}
    base, tuned = ModelFolder(family[0]), ModelFolder(family[1])
    assert sorted(rebuilt.tensors) == sorted(tuned.tensors)
    compressed_bytes = encoded = 0
    for name in tuned.names():
        b, t, r = base.read(name), tuned.read(name), rebuilt.read(name)
        entry = manifest["tensors"][name]
        assert r.dtype == t.dtype
        if b.dim() < 2:
            assert entry["kind"] == "copy"
            assert torch.equal(r, t), name
            compressed_bytes += t.numel() * t.element_size()
            continue
        assert entry["kind"] == fmt
        obj = quantize(t.float() - b.float())
        stored = {p: parts[f"{name}::{p}"] for p in entry["parts"]}
        want_parts = obj.stored_tensors()
        assert sorted(stored) == sorted(want_parts), name
        for p, value in want_parts.items():
            assert torch.equal(stored[p], value.reshape(stored[p].shape)), (name, p)
        # the fused apply of the same format object on the same base tensor
        want = b.clone()
        deltaops.apply_delta_(want, obj)
        assert_bitwise_equal(r, want, name)
        # and base + the format's own dequantization, one rounding to the model dtype
        assert_bitwise_equal(r, (b.float() + obj.dequantize(torch.float32)).to(dtype), name)
        nbytes = sum(v.numel() * v.element_size() for v in stored.values())
        assert nbytes == _promised_nbytes(fmt, manifest["options"], tuple(b.shape)), name
        compressed_bytes += nbytes
        encoded += 1
    assert encoded >= 20
    # the shard files hold those bytes plus their safetensors headers only
    size = sum(os.path.getsize(os.path.join(delta_dir, f)) for f in manifest["shards"])
    assert compressed_bytes <= size <= compressed_bytes + 32 * 1024


# ---- lowrank ------------------------------------------------------------------------------

LOWRANK_CASES = [
    (torch.float32, ["--rank", "8"], {"rank": 8, "method": "svd", "values_dtype": None, "seed": 0},
     torch.float32),
    (torch.bfloat16, ["--rank", "4", "--method", "randomized", "--seed", "3", "--values-dtype",
                      "float32"],
     {"rank": 4, "method": "randomized", "values_dtype": "float32", "seed": 3}, torch.float32),
    (torch.bfloat16, ["--rank", "4"], {"rank": 4, "method": "svd", "values_dtype": None, "seed": 0},
     torch.bfloat16),
]


@pytest.mark.parametrize("dtype, args, recorded, factor_dtype", LOWRANK_CASES,
                         ids=["svd-float32", "randomized-bfloat16", "svd-bfloat16"])
def test_lowrank_roundtrip(tmp_path, families, dtype, args, recorded, factor_dtype):
    family = families[dtype]
    delta_dir, manifest, parts, rebuilt = _compress_apply(tmp_path, family, "lowrank", args)
    assert manifest["delta_format"] == "lowrank"
    assert manifest["options"] == {**recorded, "min_numel": 1024}
    base, tuned = ModelFolder(family[0]), ModelFolder(family[1])
    for name in tuned.names():
        b, t, r = base.read(name), tuned.read(name), rebuilt.read(name)
        entry = manifest["tensors"][name]
        if b.dim() < 2:
            assert torch.equal(r, t), name
            continue
        delta = t.float() - b.float()
        rank = min(recorded["rank"], *delta.shape)
        assert entry["meta"]["rank"] == rank and entry["meta"]["method"] == recorded["method"]
        extra = {"seed": recorded["seed"]} if recorded["method"] == "randomized" else {}
        factors = deltaops.low_rank(delta, rank, method=recorded["method"], dtype=factor_dtype,
                                    **extra)
        lora_A, lora_B = parts[f"{name}::lora_A"], parts[f"{name}::lora_B"]
        assert lora_A.dtype == factor_dtype and tuple(lora_A.shape) == (rank, delta.shape[1])
        assert torch.equal(lora_A, factors.lora_A) and torch.equal(lora_B, factors.lora_B), name
        assert entry["meta"]["relative_error"] == pytest.approx(factors.relative_error, rel=1e-6)
        # promised size: r * (out + in) factor elements
        assert lora_A.numel() + lora_B.numel() == rank * sum(delta.shape)
        # the fused LoRA merge of the stored factors on the same base tensor
        want = b.clone()
        deltaops.lora_merge_(want, lora_A, lora_B)
        assert_bitwise_equal(r, want, name)
        # base + to_dense(): the same sum but accumulated in another order
        dense = (b.float() + factors.to_dense(torch.float32)).to(dtype)
        assert_within_ulps(r, dense, 1 if dtype == torch.bfloat16 else 64, name)


def test_lowrank_svd_error_is_the_optimum(tmp_path, families):
    family = families[torch.float32]
    _, manifest, _, _ = _compress_apply(tmp_path, family, "lowrank", ["--rank", "8"])
    base, tuned = ModelFolder(family[0]), ModelFolder(family[1])
    name = "model.layers.0.mlp.up_proj.weight"
    delta = tuned.read(name).float() - base.read(name).float()
    s = torch.linalg.svdvals(delta.double())
    optimum = float(s[8:].norm() / s.norm())  # Eckart-Young
    assert manifest["tensors"][name]["meta"]["relative_error"] == pytest.approx(optimum, rel=1e-3)


# ---- the table, options and errors ---------------------------------------------------------


def test_every_issue_format_is_registered():
    assert set(FORMATS) == {"sparse", "sign", "ternary", "int4", "int2", "lowrank"}
    with pytest.raises(CheckpointError, match="unknown delta format 'int3'"):
        run_compress("b", "f", "o", CompressOptions(format="int3"), RunOptions(quiet=True))


@pytest.mark.parametrize("options, message", [
    (dict(format="int4", rank=8), r"--rank does not apply to --format int4 \(it reads: "
                                  r"--group-size, --symmetric\)"),
    (dict(format="sign", trim_scope="model"), "--trim-scope does not apply to --format sign"),
    (dict(format="lowrank", symmetric=True), "--symmetric does not apply to --format lowrank"),
    (dict(format="sparse", method="svd"), "--method does not apply to --format sparse"),
    (dict(format="sign", granularity="col"), "--granularity must be one of tensor, row; got 'col'"),
    (dict(format="ternary", method="median"), "--method must be one of absmean, compeft"),
    (dict(format="ternary", density=0.3), "--density applies to --method compeft only"),
    (dict(format="ternary", method="compeft", density=1.5), r"--density must be in \[0, 1\]"),
    (dict(format="ternary", method="compeft", alpha=float("nan")), "--alpha must be a finite"),
    (dict(format="int2", group_size=0), "--group-size must be an int >= 1 or -1, got 0"),
    (dict(format="lowrank", rank=0), "--rank must be an int >= 1, got 0"),
    (dict(format="lowrank", method="qr"), "--method must be one of svd, randomized"),
    (dict(format="lowrank", seed=1), "--seed applies to --method randomized only"),
    (dict(format="lowrank", values_dtype="int8"), "values dtype must be one of"),
])
def test_bad_options_fail_before_writing(tmp_path, families, options, message):
    family = families[torch.float32]
    out = str(tmp_path / "out")
    with pytest.raises(CheckpointError, match=message):
        run_compress(family[0], family[1], out, CompressOptions(**options), RunOptions(quiet=True))
    assert not os.path.exists(out)


def test_cli_reports_bad_options(tmp_path, families, capsys):
    family = families[torch.float32]
    with pytest.raises(SystemExit) as exit_info:
        cli(["compress", "--base", family[0], "--finetuned", family[1], "--format", "int2",
             "--rank", "4", str(tmp_path / "x"), "--quiet"])
    assert exit_info.value.code == 2
    assert "--rank does not apply to --format int2" in capsys.readouterr().err


def test_corrupt_entry_is_reported(tmp_path, families):
    family = families[torch.float32]
    delta = str(tmp_path / "delta")
    cli(["compress", "--base", family[0], "--finetuned", family[1], "--format", "int4", delta,
         "--quiet"])
    path = os.path.join(delta, "delta_manifest.json")
    manifest = json.load(open(path))
    name = "model.layers.0.self_attn.q_proj.weight"
    manifest["tensors"][name]["meta"]["group_size"] = 7  # the stored scales no longer fit
    json.dump(manifest, open(path, "w"))
    with pytest.raises(CheckpointError, match=f"int4 delta of tensor '{name}' is corrupt"):
        run_apply(family[0], delta, str(tmp_path / "rebuilt"), RunOptions(quiet=True))
