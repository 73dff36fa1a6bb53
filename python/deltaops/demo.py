"""``make demo`` / ``deltaops demo``: the main job on a small generated model family.

1. generate a base and three fine-tunes (Llama layout, bf16, sharded
   safetensors folders with config and tokenizer files);
2. merge them with the shipped ``examples/ties.yml`` (mergekit's YAML) by the
   streaming ``deltaops merge``, and check two merged tensors against the
   reference implementation;
3. compress one fine-tune's delta (sparse, 10% of the elements) and re-apply
   it to the base, checking that the kept elements come back exactly;

printing what happened and how fast. ``deltaops demo --kernels`` tours the
sparse ops on every backend instead (:func:`kernels`); ``deltaops bench``
times a merge against a file copy (:func:`bench`).
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from . import backends
from .formats.sparse import SparseDelta
from .ops.sparse import apply_delta_, dare, sparsify, topk_mask
from .backends import use_backend


def _median_seconds(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.is_floating_point():
        return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(
            torch.nan_to_num(a).view(torch.int16 if a.element_size() == 2 else torch.int32),
            torch.nan_to_num(b).view(torch.int16 if b.element_size() == 2 else torch.int32))
    return torch.equal(a, b)


def _cases(weight: torch.Tensor, delta: torch.Tensor):
    """(name, callable returning the result) for each op shown."""
    bitmask = SparseDelta.from_dense(delta, 0.1, layout="bitmask")
    coo = bitmask.to_layout("coo")

    def applied(patch):
        def run():
            w = weight.clone()
            apply_delta_(w, patch)
            return w
        return run

    return [
        ("topk_mask d=0.2", lambda: topk_mask(delta, 0.2)),
        ("dare d=0.1", lambda: dare(delta, 0.1, seed=0)),
        ("sparsify breadcrumbs", lambda: sparsify(delta, 0.2, "magnitude_outliers", gamma=0.01)),
        ("apply dense", applied(delta)),
        ("apply bitmask d=0.1", applied(bitmask)),
        ("apply coo d=0.1", applied(coo)),
    ]


def _measure(backend: str, tensors, repeats: int):
    """[(op name, result, median seconds)] for every case on ``backend``."""
    with use_backend(backend):
        return [(name, fn(), _median_seconds(fn, repeats)) for name, fn in _cases(*tensors)]


def kernels(rows: int = 1024, cols: int = 4096) -> None:
    """The sparse ops on a generated delta, each backend against the reference."""
    torch.manual_seed(0)
    weight = (torch.randn(rows, cols) * 0.02).bfloat16()
    delta = (torch.randn(rows, cols) * 1e-3).bfloat16()
    names = ["reference"] + [n for n in ("cpu", "triton") if not backends._why_not(n, "dare", "cpu")]
    print(f"deltaops demo: {rows}x{cols} bf16 weight and delta, {torch.get_num_threads()} threads; "
          f"backends here: {', '.join(names)}")
    if "triton" not in names:
        print("(triton runs on CPU tensors only under TRITON_INTERPRET=1: skipped)")
    print(f"{'op':<22} {'backend':<18} {'bit-exact':<10} {'median ms':>10} {'vs reference':>13}")
    full = (weight, delta)
    small = (weight[:8].contiguous(), delta[:8].contiguous())  # the interpreter is slow
    reference = {"full": _measure("reference", full, 1)}
    for backend in names:
        size = "small" if backend == "triton" else "full"
        if size not in reference:
            reference[size] = _measure("reference", small, 1)
        measured = reference[size] if backend == "reference" else _measure(
            backend, small if size == "small" else full, 1 if backend == "triton" else 5)
        label = backend + (f" ({small[0].shape[0]} rows)" if size == "small" else "")
        for (name, expected, base), (_, result, seconds) in zip(reference[size], measured):
            exact = "yes" if _identical(result, expected) else "NO"
            print(f"{name:<22} {label:<18} {exact:<10} {seconds * 1e3:>10.2f} {base / seconds:>12.1f}x")


# ---- the checkpoint job ------------------------------------------------------------------

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "examples")


def _example(name: str) -> str:
    """A shipped example config (examples/ in a source checkout; a copy of ties.yml otherwise)."""
    path = os.path.join(EXAMPLES, name)
    if os.path.exists(path):
        with open(path) as handle:
            return handle.read()
    return _FALLBACK_TIES


_FALLBACK_TIES = """merge_method: ties
base_model: base
models:
  - {model: ft1, parameters: {weight: 1.0, density: 0.3}}
  - {model: ft2, parameters: {weight: [0.5, 1.0], density: 0.3}}
  - {model: ft3, parameters: {weight: [{filter: mlp, value: 0.5}, {value: 1.0}], density: 0.3}}
parameters: {normalize: true}
dtype: bfloat16
"""


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def run(params: int = 16_000_000, keep: str | None = None) -> None:
    import shutil
    import tempfile

    import yaml

    from .checkpoint.compress import CompressOptions, run_apply, run_compress
    from .checkpoint.config import parse_config
    from .checkpoint.family import Shape, make_family
    from .checkpoint.io import ModelFolder
    from .checkpoint.merge import MergeJob, RunOptions, human_bytes, run_merge
    from .reference.merge import merge_tensors as reference_merge

    root = keep or tempfile.mkdtemp(prefix="deltaops-demo-")
    os.makedirs(root, exist_ok=True)
    quiet = RunOptions(quiet=True, overwrite=True, shard_size=64 * 1024**2)
    try:
        # Few, larger tensors: per-tensor overheads would dominate a tiny model.
        shape = Shape(hidden=512, intermediate=1408, vocab=4096,
                      layers=max(1, round((params - 2 * 4096 * 512) / 3_196_928)))
        print(f"deltaops demo ({torch.get_num_threads()} threads) in {root}")
        start = time.perf_counter()
        paths = make_family(root, shape=shape, dtype=torch.bfloat16, shard_size=64 * 1024**2)
        size = _folder_bytes(paths[0])
        print(f"1. generated a base and 3 fine-tunes: Llama layout, {shape.layers} layers, "
              f"hidden {shape.hidden}, {shape.params / 1e6:.1f}M parameters, bf16, "
              f"{human_bytes(size)} each ({time.perf_counter() - start:.1f} s)")

        text = _example("ties.yml")
        config = parse_config(yaml.safe_load(text), text, source_dir=root)
        merged = os.path.join(root, "merged")
        summary = run_merge(config, merged, quiet)
        print(f"2. deltaops merge examples/ties.yml -> {merged}")
        print(f"   {summary.line()}")
        folders = [ModelFolder(p) for p in paths]
        out = ModelFolder(merged)
        for name in ("model.layers.0.mlp.up_proj.weight", "lm_head.weight"):
            inputs = [f.read(name) for f in folders]
            kwargs = MergeJob(config, quiet).merge_kwargs(name)
            want = reference_merge(inputs[0], inputs[1:], "ties", **kwargs)
            same = torch.equal(want.view(torch.int16), out.read(name).view(torch.int16))
            print(f"   {name}: {'bit-identical to' if same else 'DIFFERS from'} "
                  f"deltaops.reference.merge (weights {kwargs['weights']})")
        print(f"   files: {', '.join(sorted(os.listdir(merged)))}")

        delta = os.path.join(root, "ft1.delta")
        summary = run_compress(paths[0], paths[1], delta, CompressOptions(density=0.1), quiet)
        ratio = _folder_bytes(delta) / size
        print(f"3. deltaops compress --format sparse --density 0.1: {human_bytes(_folder_bytes(delta))} "
              f"({100 * ratio:.0f}% of the model)")
        print(f"   {summary.line()}")
        rebuilt = os.path.join(root, "ft1.rebuilt")
        summary = run_apply(paths[0], delta, rebuilt, quiet)
        print(f"   deltaops apply -> {rebuilt}")
        print(f"   {summary.line()}")
        base, tuned, back = folders[0], folders[1], ModelFolder(rebuilt)
        kept = exact = within_ulp = 0
        err = norm = 0.0
        for name in tuned.names():
            b, t, r = base.read(name), tuned.read(name), back.read(name)
            changed = r != b
            distance = (r.view(torch.int16).int() - t.view(torch.int16).int()).abs()[changed]
            kept += int(changed.sum())
            exact += int((distance == 0).sum())
            within_ulp += int((distance <= 1).sum())
            err += float((r.float() - t.float()).square().sum())
            norm += float((t.float() - b.float()).square().sum())
        print(f"   rebuilt fine-tune: of the {kept} changed elements {100 * exact / kept:.0f}% equal "
              f"the fine-tune, {100 * within_ulp / kept:.0f}% within one bf16 ulp (values stored "
              f"in bf16; --values-dtype float32 makes them exact); the dropped 90% of the delta "
              f"held {100 * (err / norm) ** 0.5:.0f}% of its L2 norm")
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)


def bench(params: int = 20_000_000, dtype: str = "bfloat16") -> None:
    """Time a TIES merge of a generated family against a file copy of the base (same run)."""
    import shutil
    import tempfile

    from .checkpoint.config import DTYPES, parse_config
    from .checkpoint.family import make_family
    from .checkpoint.merge import RunOptions, human_bytes, run_merge

    root = tempfile.mkdtemp(prefix="deltaops-bench-")
    try:
        paths = make_family(root, params, dtype=DTYPES[dtype], shard_size=1024**3)
        start = time.perf_counter()
        copied = 0
        os.makedirs(os.path.join(root, "copy"))
        for name in os.listdir(paths[0]):
            shutil.copyfile(os.path.join(paths[0], name), os.path.join(root, "copy", name))
            copied += os.path.getsize(os.path.join(paths[0], name))
        copy_rate = copied / (time.perf_counter() - start)
        config = parse_config({"merge_method": "ties", "base_model": paths[0], "models": [
            {"model": p, "parameters": {"weight": 1.0, "density": 0.3}} for p in paths[1:]]})
        summary = run_merge(config, os.path.join(root, "merged"), RunOptions(quiet=True))
        rate = summary.bytes_read / summary.seconds
        print(f"TIES merge of base + 3 fine-tunes ({params / 1e6:.0f}M parameters, {dtype}): "
              f"{summary.line()}")
        print(f"inputs read at {human_bytes(rate)}/s; a file copy of the base ran at "
              f"{human_bytes(copy_rate)}/s in the same run ({100 * rate / copy_rate:.0f}%)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
