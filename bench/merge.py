"""Benchmark of the fused merge kernels (deltaops.merge_tensors, CPU backend)
against mergekit's ``merge_tensors`` and PEFT's ``ties`` on the same tensors.

    python bench/merge.py [--quick] [--out DIR] [--budget S] [--threads N] [--keep-freed-memory]

Full run: base + 3 fine-tunes of a 4096x11008 bf16 tensor (one MLP projection
of a 7B model). Cases: TIES (density 0.2, sign "sum"), DARE-TIES (density 0.2,
rescale "density"), task_arithmetic, linear and DELLA (density 0.2, mergekit's
default epsilon 0.15 and l1 rescale; no target), each against the peers
(task_arithmetic and linear also into a reused buffer, ``out=``, the like-for-like
case for their copy-bandwidth targets, as the copy writes a preallocated one); the
peak memory above the inputs (output included) of TIES for every
implementation; then the scaling of ties and task_arithmetic with the number
of models (1, 2, 4, 8) and with the tensor size. ``--quick``: small shapes
and the reference backend too. Writes <out>/merge.csv and <out>/merge.png.

Bytes model ("one pass"): N + 1 input tensors read once and the output
written once, (N + 2) * numel * element_size (linear: N + 1, no base). The
kernel makes more passes than that for TIES (two histogram passes per model
and, when take_equal splits the equal keys, a count pass), so its % of copy
under this model is a lower bound on the bandwidth it draws.
"""

from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.harness import Bench, Target, arg_parser, configure, optional_import  # noqa: E402
from bench.sparse import import_deltaops, load_peft_merge_utils  # noqa: E402

FAMILY = "merge"
FULL_SHAPE = (4096, 11008)
QUICK_SHAPE = (128, 512)
N_MODELS = 3
DENSITY = 0.2


def make_data(shape, n, seed=0):
    """bf16 base ~ N(0, 0.02); fine-tunes = base + N(0, 1e-3), rounded to bf16."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    models = [(base.float() + torch.randn(shape, generator=g) * 1e-3).to(torch.bfloat16)
              for _ in range(n)]
    return base, models


def scaling(bench, do, ours, shape, *, quick):
    """ties and task_arithmetic with N = 1, 2, 4, 8 models, then with the tensor size."""
    sizes = [(64, 128), (128, 512), (256, 1024)] if quick else \
        [(1024, 1024), (2048, 4096), (4096, 11008), (8192, 11008)]
    cases = [(shape, n_models) for n_models in (1, 2, 4, 8)]
    cases += [(size, N_MODELS) for size in sizes if size != shape]
    for size, n_models in cases:
        tensors = make_data(size, n_models, seed=1)
        numel = tensors[0].numel()
        for method, opts in (("ties", {"density": DENSITY}), ("task_arithmetic", {})):
            bench.case(method, f"scaling N={n_models}", "cpu", ours("cpu", method, opts, tensors),
                       bytes=(n_models + 2) * numel * tensors[0].element_size(),
                       tensor=tensors[0])
        del tensors


def main(argv=None) -> int:
    args = arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    configure(args)
    torch.manual_seed(0)
    do = import_deltaops()
    bench = Bench(FAMILY, quick=args.quick, out_dir=args.out, budget_s=args.budget)
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    base, models = make_data(shape, N_MODELS)
    n, es = base.numel(), base.element_size()
    one_pass = (N_MODELS + 2) * n * es
    backends = ["cpu"] + (["reference"] if args.quick else [])
    print(f"shape {tuple(shape)} bf16, {N_MODELS} models, backends {backends}", file=sys.stderr)
    mm = optional_import("mergekit.merge_methods")
    peft = load_peft_merge_utils()
    weights = [1.0] * N_MODELS

    def with_backend(name, fn):
        def run():
            with do.use_backend(name):
                return fn()
        return run

    def slow(name):
        return {"warmup": 0, "min_repeat": 1, "max_repeat": 1} if name == "reference" else {}

    def ours(name, method, opts, tensors=None):
        b, ms = tensors or (base, models)
        return with_backend(name, lambda: do.merge_tensors(b, ms, method,
                                                           weights=[1.0] * len(ms), **opts))

    with torch.no_grad():
        bench.copy_reference(base)
        bench.alloc_reference(base)
        for method, opts, goal in (
                # The merge issue's targets: TIES at least 50x mergekit (and PEFT);
                # task_arithmetic and linear at least 40% of the copy bandwidth.
                ("ties", {"density": DENSITY}, Target("speedup", 50)),
                # dare_ties: no target in the issue (its 50x is TIES'); the speedup is reported.
                ("dare_ties", {"density": DENSITY, "rescale": "density", "seed": 0}, None),
                ("task_arithmetic", {}, Target("pct_of_copy", 40)),
                ("linear", {}, Target("pct_of_copy", 40)),
                # DELLA (mergekit's defaults: epsilon 0.15, l1 rescale): no target, the
                # speedup over mergekit is reported.
                ("della", {"density": DENSITY, "seed": 0}, None)):
            case = f"N={N_MODELS}" + (f" density={DENSITY}" if "density" in opts else "")
            bytes_ = (N_MODELS + (1 if method == "linear" else 2)) * n * es
            memory = method == "ties"
            peer = None
            if mm is not None:
                params = {"weight": 1.0, **({"density": DENSITY} if "density" in opts else {})}
                if method == "dare_ties":
                    params["rescale"] = False  # mergekit's rescale is l1; closest: none
                notes = "bf16 arithmetic, stacked deltas"
                if method == "della":
                    notes += "; torch argsort per row, l1 rescale"
                peer = bench.case(method, case, "mergekit", lambda method=method, params=params:
                                  mm.merge_tensors([base, *models], method, parameters=params,
                                                   base_index=0),
                                  bytes=bytes_, tensor=base, status="peer",
                                  min_repeat=1 if method == "della" else 3,
                                  memory=memory, notes=notes)
            if method == "ties" and peft is not None:
                def peft_ties():
                    deltas = [m - base for m in models]
                    return base + peft.ties(deltas, torch.ones(N_MODELS, dtype=base.dtype),
                                            DENSITY, "total")
                bench.case(method, case, "peft.ties", peft_ties, bytes=bytes_, tensor=base,
                           status="peer", min_repeat=3, memory=memory,
                           notes="deltas formed and added in the timing")
            # The bandwidth targets are judged like for like with the copy reference,
            # which writes a preallocated buffer: merge_tensors(..., out=buffer).
            into_buffer = goal is not None and goal.kind == "pct_of_copy"
            for name in backends if do else []:
                notes = "allocates its output; bytes: one pass over the inputs + output"
                if method == "della" and name == "cpu":
                    notes += " (sorts each row per model twice: l1 norms, then the merge)"
                row = bench.case(method, case, name, ours(name, method, opts),
                                 bytes=bytes_, tensor=base,
                                 peer=peer if goal is None or goal.kind == "speedup" else None,
                                 target=None if into_buffer else goal, memory=memory,
                                 **slow(name), notes=notes)
                if into_buffer:
                    buffer = torch.empty_like(base)
                    bench.case(method, case + " out=", name,
                               ours(name, method, {**opts, "out": buffer}),
                               bytes=bytes_, tensor=base, peer=peer, target=goal, **slow(name),
                               notes="into a reused buffer (out=), as dst.copy_(src) writes one")
                if name == "cpu" and row.median_ms is not None and args.quick:
                    got = ours("cpu", method, opts)()
                    from deltaops.reference.merge import merge_tensors as ref_merge
                    want = ref_merge(base, models, method, weights=weights, **opts)
                    # della's l1 rescale factor may differ in its last fp32 bit (double
                    # sums in the kernel, torch's fp32 sum in the reference): 1 bf16 ulp
                    ulps = 1 if method == "della" else 0
                    off = (got.view(torch.int16).int() - want.view(torch.int16).int()).abs()
                    if int(off.max()) > ulps:
                        row.notes = "WRONG: differs from the reference"
        if do is not None:
            scaling(bench, do, ours, shape, quick=args.quick)
        bench.copy_reference(base)
    bench.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
