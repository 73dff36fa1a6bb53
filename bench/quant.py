"""Benchmark of the low-bit delta family: quantize and apply_ (fused dequantize-add) per format.

    python bench/quant.py [--quick] [--out DIR] [--budget S] [--threads N] [--default-allocator]

Full run: a 4096x11008 bf16 weight and delta (one MLP projection of a 7B
model), about 2-4 minutes on 2 cores. ``--quick``: 128x512, a few seconds
(CI smoke test), with the slow ``reference`` backend timed too.

Bytes models (logical bytes, divided by the median time, as % of the copy
bandwidth measured in the same run):

* ``apply_``: the weight read and written (2 x 2 bytes per element) plus the
  stored format read once (``nbytes``: packed codes, scales, zero points).
* ``quantize``: the delta read once (2 bytes per element; 4 for the fp32
  ComPEFT row, the command line's case) plus the format written once.
  The CPU kernels read the delta once: sign and the uniform groups (mean or
  group parameters, then codes, per cache-sized chunk), ComPEFT and bf16
  absmean (codes for a sampled threshold, fixed up once the exact one is
  known). Absmean on fp16/fp32 reads it a second time (its exact mean before
  its codes); that pass is not counted (the model counts what an ideal
  kernel must move).

Allocator: this family keeps freed memory by default (glibc ``mallopt``, as
``--keep-freed-memory`` in the other families; ``--default-allocator`` turns
it off). The targets compare each quantizer, which returns a new format,
with a copy into an existing buffer; with glibc's defaults the output's
memory is sometimes fresh (the 45 MB 8-bit codes always are: above glibc's
mmap limit), so the same kernel measures 3.5 or 5-14 ms depending on what
the cases before it left in the heap. Keeping freed memory times what the
kernel moves (as tcmalloc/jemalloc would, which PyTorch's CPU launcher
``torch.backends.xeon.run_cpu`` preloads by default for this reason). The
header names the mode.

Besides the timing table, a second table gives each format's size against
the bf16 delta and its reconstruction error ``||dq - delta||_F / ||delta||_F``
on two deltas: ``synthetic`` (i.i.d. normal, std 1e-3) and ``real-shaped``
(a fine-tune-like delta built here: a rank-16 part, heavy-tailed Student-t
noise and per-row scales varying over 10x; no checkpoint is downloaded).
"""

from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.harness import Bench, Target, arg_parser, configure  # noqa: E402
from bench.sparse import import_deltaops  # noqa: E402

FAMILY = "quant"
FULL_SHAPE = (4096, 11008)
QUICK_SHAPE = (128, 512)
APPLY_TARGET = Target("pct_of_copy", 50)
QUANTIZE_TARGET = Target("pct_of_copy", 25)


def make_weight_and_delta(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
    delta = (torch.randn(shape, generator=g) * 1e-3).to(torch.bfloat16)
    return weight, delta


def make_real_shaped_delta(shape, seed=1):
    """Fine-tune-like: low-rank structure + heavy tails + uneven row scales (bf16)."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape
    low_rank = torch.randn(rows, 16, generator=g) @ torch.randn(16, cols, generator=g) / 16
    # Student-t(3) noise from normals: z / sqrt(chi2_3 / 3), drawn with the generator
    z = torch.randn(rows, cols, generator=g)
    chi2 = (torch.randn(3, rows, cols, generator=g) ** 2).sum(0) / 3
    noise = z / chi2.sqrt()
    row_scale = torch.exp(torch.rand(rows, 1, generator=g) * 2.3)  # 1x .. 10x
    return ((0.5 * low_rank + noise) * row_scale * 2e-4).to(torch.bfloat16)


def formats(do):
    """(name, quantize callable(delta) -> format)."""
    return [
        ("sign tensor", lambda d: do.quantize_sign(d)),
        ("sign row", lambda d: do.quantize_sign(d, granularity="row")),
        ("ternary absmean", lambda d: do.quantize_ternary(d)),
        ("ternary compeft d=0.1", lambda d: do.quantize_ternary(d, method="compeft", density=0.1)),
        ("uniform 2b g128", lambda d: do.quantize_uniform(d, 2, group_size=128)),
        ("uniform 3b g128", lambda d: do.quantize_uniform(d, 3, group_size=128)),
        ("uniform 4b g128", lambda d: do.quantize_uniform(d, 4, group_size=128)),
        ("uniform 4b g128 sym", lambda d: do.quantize_uniform(d, 4, group_size=128, symmetric=True)),
        ("uniform 8b g128", lambda d: do.quantize_uniform(d, 8, group_size=128)),
    ]


def bench_cpu(bench: Bench, do, shape, quick: bool) -> list[str]:
    weight0, delta = make_weight_and_delta(shape)
    weight = weight0.clone()
    restore = lambda: weight.copy_(weight0)  # noqa: E731
    n, es = delta.numel(), delta.element_size()
    names = ["cpu"] + (["reference"] if quick else [])
    slow = {"warmup": 0, "min_repeat": 1, "max_repeat": 1}
    print(f"[cpu] shape {tuple(shape)} bf16, backends {names}", file=sys.stderr)
    bench.copy_reference(weight0)

    def on(name, fn):
        def run():
            with do.use_backend(name):
                return fn()
        return run

    for label, quantize in formats(do):
        with do.use_backend("cpu"):
            fmt = quantize(delta)
        for name in names:
            extra = slow if name == "reference" else {}
            bench.case("quantize", label, name, on(name, lambda q=quantize: q(delta)),
                       bytes=n * es + fmt.nbytes, tensor=delta, target=QUANTIZE_TARGET, **extra)
        peer = bench.case("apply_", label, "torch dequantize+add_",
                          lambda f=fmt: weight.add_(f.dequantize(torch.bfloat16)), setup=restore,
                          bytes=2 * n * es + fmt.nbytes, tensor=weight, status="peer",
                          notes="deltaops dequantize (bf16, allocates) then torch add_")
        for name in names:
            extra = slow if name == "reference" else {}
            bench.case("apply_", label, name, on(name, lambda f=fmt: do.apply_delta_(weight, f)),
                       setup=restore, bytes=2 * n * es + fmt.nbytes, tensor=weight, peer=peer,
                       target=APPLY_TARGET, **extra)
    # The command line computes each delta in fp32 (fine-tune minus base) before it
    # quantizes: ComPEFT on that fp32 delta (4 bytes read per element).
    delta32 = delta.float()
    label = "ternary compeft d=0.1, fp32 delta"
    with do.use_backend("cpu"):
        fmt32 = do.quantize_ternary(delta32, method="compeft", density=0.1)
    for name in names:
        extra = slow if name == "reference" else {}
        bench.case("quantize", label, name,
                   on(name, lambda: do.quantize_ternary(delta32, method="compeft", density=0.1)),
                   bytes=n * 4 + fmt32.nbytes, tensor=delta32, target=QUANTIZE_TARGET, **extra)
    bench.copy_reference(weight0)

    # sizes and reconstruction error
    real = make_real_shaped_delta(shape)
    lines = ["| format | bytes / bf16 delta | rel. Frobenius error (synthetic) "
             "| rel. Frobenius error (real-shaped) |", "|---|---:|---:|---:|"]
    for label, quantize in formats(do):
        errors = []
        for d in (delta, real):
            with do.use_backend("cpu"):
                fmt = quantize(d)
            dq = fmt.dequantize(torch.float32)
            errors.append(float((dq - d.float()).norm() / d.float().norm()))
        ratio = fmt.nbytes / (n * es)
        lines.append(f"| {label} | {ratio:.4f} | {errors[0]:.4f} | {errors[1]:.4f} |")
    return lines


def main(argv=None) -> int:
    args = arg_parser(__doc__.splitlines()[0], keep_freed_memory=True).parse_args(argv)
    configure(args)
    torch.manual_seed(0)
    do = import_deltaops()
    if do is None:
        print("deltaops does not import: nothing to benchmark", file=sys.stderr)
        return 1
    bench = Bench(FAMILY, quick=args.quick, out_dir=args.out, budget_s=args.budget)
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    with torch.no_grad():
        sizes = bench_cpu(bench, do, shape, args.quick)
    bench.finish()
    print(f"\nSizes and reconstruction error, {shape[0]}x{shape[1]}:\n")
    print("\n".join(sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
