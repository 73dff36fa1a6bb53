"""Benchmark of the sparse-delta family: topk_mask, dare, apply_delta_ (dense,
SparseDelta bitmask, SparseDelta coo) against torch / PEFT / mergekit peers.

    python bench/sparse.py [--quick] [--out DIR] [--budget S] [--threads N] [--keep-freed-memory]

Full run: a 4096x11008 bf16 tensor (one MLP projection of a 7B model), plus
fp16 copies for dare (out=) and the dense apply, about 2-3 minutes on 2 cores. ``--quick``: 256x1024, a few seconds (CI smoke test),
and the slow ``reference`` backend timed too. Writes <out>/sparse.csv and
<out>/sparse.png and prints a markdown table; bench/README.md explains the
bytes models and targets.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.harness import Bench, Target, arg_parser, configure, optional_import  # noqa: E402

FAMILY = "sparse"
FULL_SHAPE = (4096, 11008)
QUICK_SHAPE = (128, 512)
TOPK_DENSITY = 0.2
SPARSE_DENSITY = 0.1
CACHE_LINE = 64


def import_deltaops():
    """``deltaops`` as installed, else from the source tree (``python/``); None if neither."""
    try:
        import deltaops
        return deltaops
    except ImportError:
        pass
    sys.path.insert(0, os.path.join(ROOT, "python"))
    try:
        import deltaops
        print("deltaops is not installed: using the source tree (no compiled backend "
              "unless built in place)", file=sys.stderr)
        return deltaops
    except ImportError as error:
        print(f"deltaops does not import ({error}): peers only", file=sys.stderr)
        return None


def load_peft_merge_utils():
    """PEFT's ``peft/utils/merge_utils.py`` without importing ``peft`` (whose
    ``__init__`` pulls in transformers: about 4 s). The module imports only torch."""
    spec = importlib.util.find_spec("peft")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "utils", "merge_utils.py")
    file_spec = importlib.util.spec_from_file_location("_bench_peft_merge_utils", path)
    module = importlib.util.module_from_spec(file_spec)
    try:
        file_spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001
        print(f"PEFT merge_utils unavailable: {error}", file=sys.stderr)
        return None
    return module


def make_data(shape, device, seed=0):
    """bf16 weight ~ N(0, 0.02) and delta ~ N(0, 1e-3) (rounded to bf16: many ties)."""
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    delta = (torch.randn(shape, generator=g) * 1e-3).to(torch.bfloat16)
    return weight.to(device), delta.to(device)


def touched_lines(indices: torch.Tensor, element_size: int) -> int:
    """Distinct 64-byte lines of the weight holding at least one touched element
    (the weight's storage is 64-byte aligned: torch allocations are)."""
    per_line = CACHE_LINE // element_size
    return int(torch.unique_consecutive(indices.to(torch.int64) // per_line).numel())


def backends_for(device: str, quick: bool) -> list[str]:
    names = ["cpu"] if device == "cpu" else ["cuda", "triton"]
    if quick:
        names.append("reference")  # pure torch: far too slow on the full shape
    return names


def bench_device(bench: Bench, do, device: str, shape, quick: bool) -> None:
    weight0, delta = make_data(shape, device)
    n = delta.numel()
    es = delta.element_size()
    weight = weight0.clone()
    restore = lambda: weight.copy_(weight0)  # noqa: E731  untimed setup of in-place ops
    backends = backends_for(device, quick)
    print(f"[{device}] shape {tuple(shape)} bf16, backends {backends}", file=sys.stderr)

    bench.copy_reference(weight0)
    bench.alloc_reference(delta)

    def slow(name):
        """The reference backend (quick mode only) is timed once, without warm-up."""
        return {"warmup": 0, "min_repeat": 1, "max_repeat": 1} if name == "reference" else {}

    def with_backend(name, fn):
        def run():
            with do.use_backend(name):
                return fn()
        return run

    # ---- topk_mask(x, 0.2): read x, write a bool mask ---------------------
    k = int(TOPK_DENSITY * n)
    topk_bytes = n * es + n
    case = f"density={TOPK_DENSITY}"

    def torch_topk_mask():
        mask = torch.zeros(n, dtype=torch.bool, device=delta.device)
        mask[torch.topk(delta.abs().flatten().float(), k).indices] = True
        return mask.view(delta.shape)

    peer = bench.case("topk_mask", case, "torch.topk", torch_topk_mask, bytes=topk_bytes,
                      tensor=delta, status="peer", min_repeat=3)
    sparsify = optional_import("mergekit.sparsify")
    if sparsify is not None:
        bench.case("topk_mask", case, "mergekit.magnitude",
                   lambda: sparsify.magnitude(delta, TOPK_DENSITY), bytes=topk_bytes,
                   tensor=delta, status="peer", min_repeat=3,
                   notes="argsort; returns the masked tensor, not a mask")
    for name in backends if do else []:
        row = bench.case("topk_mask", case, name,
                         with_backend(name, lambda: do.topk_mask(delta, TOPK_DENSITY)),
                         bytes=topk_bytes, tensor=delta, peer=peer, target=Target("speedup", 10),
                         **slow(name))
        if row.median_ms is not None:
            with do.use_backend(name):
                got = int(do.topk_mask(delta, TOPK_DENSITY).sum())
            if got != k:
                row.notes = f"WRONG: {got} True, expected {k}"

    # ---- dare(delta, 0.1, seed=0), rescaled: read delta, write out ------------
    dare_bytes = 2 * n * es
    case = f"density={SPARSE_DENSITY}"
    merge_utils = load_peft_merge_utils()
    peer = None
    if merge_utils is not None:
        peer = bench.case("dare", case, "peft.random_pruning",
                          lambda: merge_utils.random_pruning(delta, SPARSE_DENSITY, rescale=True),
                          bytes=dare_bytes, tensor=delta, status="peer")
    for name in backends if do else []:
        bench.case("dare", case, name,
                   with_backend(name, lambda: do.dare(delta, SPARSE_DENSITY, seed=0)),
                   bytes=dare_bytes, tensor=delta, peer=peer,
                   notes="out of place: includes allocating (page-faulting) the output",
                   **slow(name))
        # Like for like with the copy reference, which writes a preallocated buffer.
        buffer = torch.empty_like(delta)
        bench.case("dare", case + " out=", name,
                   with_backend(name, lambda: do.dare(delta, SPARSE_DENSITY, seed=0, out=buffer)),
                   bytes=dare_bytes, tensor=delta, peer=peer, target=Target("pct_of_copy", 40),
                   notes="into a reused buffer (out=), as dst.copy_(src) writes one", **slow(name))

    # ---- apply_delta_(weight, delta) dense: read w + d, write w ---------------
    dense_bytes = 3 * n * es
    case = "dense alpha=1"
    peer = bench.case("apply_delta_", case, "torch add_",
                      lambda: weight.add_(delta, alpha=1.0), setup=restore, bytes=dense_bytes,
                      tensor=weight, status="peer")
    expected = weight0.clone().add_(delta, alpha=1.0)
    for name in backends if do else []:
        row = bench.case("apply_delta_", case, name,
                         with_backend(name, lambda: do.apply_delta_(weight, delta, alpha=1.0)),
                         setup=restore, bytes=dense_bytes, tensor=weight, peer=peer,
                         target=Target("pct_of_copy", 40), **slow(name))
        if row.median_ms is not None and not torch.equal(weight, expected):
            row.notes = "differs from torch add_ (bitwise)"
    del expected

    # ---- fp16: dare into a buffer and the dense apply on fp16 copies -------------
    # No targets: they show that fp16 runs at the share of the copy bandwidth bf16
    # does (same element size), since its conversions go through F16C blocks.
    delta16, weight16_0 = delta.half(), weight0.half()
    weight16, buffer16 = weight16_0.clone(), torch.empty_like(delta16)
    for name in backends if do else []:
        bench.case("dare", f"density={SPARSE_DENSITY} fp16 out=", name,
                   with_backend(name, lambda: do.dare(delta16, SPARSE_DENSITY, seed=0,
                                                      out=buffer16)),
                   bytes=dare_bytes, tensor=delta16, **slow(name))
        bench.case("apply_delta_", "dense alpha=1 fp16", name,
                   with_backend(name, lambda: do.apply_delta_(weight16, delta16, alpha=1.0)),
                   setup=lambda: weight16.copy_(weight16_0), bytes=dense_bytes, tensor=weight16,
                   **slow(name))
    del delta16, weight16_0, weight16, buffer16

    # ---- apply_delta_(weight, SparseDelta) at density 0.1 -----------------------
    # Bytes: the stored format (packed mask or int32 indices, plus values) read
    # once, and every 64-byte line of the weight holding a touched element read
    # and written back (at density 0.1 in bf16 that is ~97% of the lines). The
    # element-only count (4 bytes per touched bf16) is the alternative model.
    if do is None:
        return
    try:
        with do.use_backend("auto"):
            sds = {layout: do.SparseDelta.from_dense(delta, SPARSE_DENSITY, layout=layout)
                   for layout in ("bitmask", "coo")}
    except Exception as error:  # noqa: BLE001
        for layout, goal in (("bitmask", 40), ("coo", 20)):
            bench.skip("apply_delta_", f"SparseDelta {layout} d={SPARSE_DENSITY}", "-",
                       f"SparseDelta.from_dense failed: {type(error).__name__}: {error}",
                       tensor=weight, target=Target("pct_of_copy", goal))
        return
    indices = sds["coo"].indices.to(torch.int64)
    values = sds["coo"].values
    nnz = values.numel()
    lines = touched_lines(indices, weight.element_size())
    weight_traffic = 2 * lines * CACHE_LINE
    element_traffic = 2 * nnz * weight.element_size()
    case_peer = f"index_add_ d={SPARSE_DENSITY}"
    peer = bench.case("apply_delta_", case_peer, "torch index_add_",
                      lambda: weight.view(-1).index_add_(0, indices, values), setup=restore,
                      bytes=nnz * (8 + values.element_size()) + weight_traffic, tensor=weight,
                      status="peer", notes="int64 indices given, already decoded")
    share = lines / -(-n // (CACHE_LINE // weight.element_size()))
    for layout, goal in (("bitmask", 40), ("coo", 20)):
        sd = sds[layout]
        layout_bytes = sd.nbytes  # values + packed mask (n/8 B) or int32 indices
        case = f"SparseDelta {layout} d={SPARSE_DENSITY}"
        for name in backends:
            bench.case("apply_delta_", case, name,
                       with_backend(name, lambda sd=sd: do.apply_delta_(weight, sd)),
                       setup=restore, bytes=layout_bytes + weight_traffic, tensor=weight,
                       peer=peer, target=Target("pct_of_copy", goal), **slow(name),
                       notes=f"{share:.1%} of the weight's 64 B lines touched",
                       alt_bytes=layout_bytes + element_traffic,
                       alt_model="element-only (touched elements, not lines)")

    bench.copy_reference(weight0)  # again: the drift over the run shows


def main(argv=None) -> int:
    args = arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    configure(args)
    torch.manual_seed(0)
    do = import_deltaops()
    bench = Bench(FAMILY, quick=args.quick, out_dir=args.out, budget_s=args.budget)
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    with torch.no_grad():
        for device in devices:
            bench_device(bench, do, device, shape, args.quick)
    bench.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
