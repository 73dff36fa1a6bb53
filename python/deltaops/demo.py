"""``make demo``: the sparse family on a generated delta, on every backend that runs here.

For each op it prints the backend, whether the result equals the reference bit
for bit, the median time and the speedup over the reference. Triton runs only
under ``TRITON_INTERPRET=1`` on CPU (the interpreter is slow, so it gets a
small slice of the tensor).
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


def run(rows: int = 1024, cols: int = 4096) -> None:
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
