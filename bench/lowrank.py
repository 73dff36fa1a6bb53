"""Benchmark of the low-rank family: lora_merge_ against PEFT's own LoRA merge, low_rank
(randomized) against torch.linalg.svd, and the bf16 merge-then-unmerge drift.

    python bench/lowrank.py [--quick] [--out DIR] [--budget S] [--threads N]

Full run: a 4096x11008 bf16 weight (one MLP projection of a 7B model) with a
rank-16 LoRA (targets: lora_merge_ >= 3x PEFT's merge), and a 4096x4096 fp32
delta at rank 64 (target: randomized >= 5x torch.linalg.svd); about 2-4
minutes on 2 cores, most of it the full SVD. ``--quick``: 256x1024 and
256x256 (CI smoke test). Writes <out>/lowrank.csv and <out>/lowrank.png and
prints a markdown table, then the measured scratch and drift.

The peer is PEFT's code itself: a ``peft.tuners.lora.layer.Linear`` holding
the same tensors, timed on ``layer.merge()`` (its ``get_delta_weight`` makes
the fp32 product B @ A * scaling on CPU, rounds it to bf16, then adds in
bf16). Scratch is the growth of the process's peak resident memory during one
call (``VmHWM`` after resetting it through ``/proc/self/clear_refs``).
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
from bench.sparse import import_deltaops  # noqa: E402

FAMILY = "lowrank"
FULL_MERGE = (4096, 11008, 16)  # out, in, rank
QUICK_MERGE = (256, 1024, 16)
FULL_SVD = (4096, 4096, 64)
QUICK_SVD = (256, 256, 16)
LORA_ALPHA = 32


# ---- memory -----------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_growth_bytes(fn) -> int | None:
    """Peak resident memory during ``fn()`` minus the resident memory before it (Linux only)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current VmRSS
    except OSError:
        return None
    before = _status_kib("VmRSS")
    fn()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024


def mib(nbytes: int | None) -> str:
    return "unmeasured" if nbytes is None else f"{nbytes / 2**20:.1f} MiB"


# ---- data -----------------------------------------------------------------------------------


def lora_data(out, fan_in, rank, seed=0):
    """bf16 W ~ N(0, 0.02); A as PEFT initialises it (kaiming-uniform-like), B ~ N(0, 0.01)
    (a trained B; PEFT's B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out, fan_in, generator=g) * 0.02).bfloat16()
    bound = 1.0 / fan_in ** 0.5
    lora_A = ((torch.rand(rank, fan_in, generator=g) * 2 - 1) * bound).bfloat16()
    lora_B = (torch.randn(out, rank, generator=g) * 0.01).bfloat16()
    return weight, lora_A, lora_B


def peft_layer(weight, lora_A, lora_B):
    """A PEFT LoRA Linear holding these tensors (None when peft does not import)."""
    layer_mod = optional_import("peft.tuners.lora.layer")
    peft = optional_import("peft")
    if layer_mod is None or peft is None:
        return None
    out, fan_in = weight.shape
    rank = lora_A.shape[0]
    base = torch.nn.Linear(fan_in, out, bias=False, dtype=weight.dtype)
    config = peft.LoraConfig(r=rank, lora_alpha=LORA_ALPHA, target_modules=["base"])
    layer = layer_mod.Linear(base, "default", config, r=rank, lora_alpha=LORA_ALPHA)
    with torch.no_grad():
        layer.lora_A["default"].weight.data = lora_A.clone()
        layer.lora_B["default"].weight.data = lora_B.clone()
        base.weight.data = weight.clone()
    return layer


def drift_stats(original, back, merged):
    """Fraction of elements not restored, and the max drift in ulps of the merged weight."""
    changed = back != original
    eps = torch.finfo(original.dtype).eps
    ulp = eps * merged.double().abs().clamp_min(torch.finfo(original.dtype).tiny)
    drift = (back.double() - original.double()).abs() / ulp
    return float(changed.double().mean()), float(drift.max())


# ---- cases -----------------------------------------------------------------------------------


def bench_merge(bench: Bench, do, shape, quick: bool) -> list[str]:
    out, fan_in, rank = shape
    weight0, lora_A, lora_B = lora_data(out, fan_in, rank)
    scale = LORA_ALPHA / rank
    notes = []
    bench.copy_reference(weight0)
    nbytes = 2 * weight0.numel() * weight0.element_size()  # read + write the weight once
    case = f"r={rank}"

    layer = peft_layer(weight0, lora_A, lora_B)
    peer = None
    if layer is not None:
        base_weight = layer.get_base_layer().weight

        def peft_restore():
            base_weight.data.copy_(weight0)
            layer.merged_adapters.clear()

        peft_restore()
        peft_scratch = peak_growth_bytes(lambda: layer.merge())
        peer = bench.case("lora_merge_", case, "peft Linear.merge", lambda: layer.merge(),
                          bytes=nbytes, tensor=weight0, setup=peft_restore, status="peer",
                          notes=f"scratch {mib(peft_scratch)}")
        notes.append(f"- scratch of one merge (peak RSS growth): PEFT `Linear.merge` "
                     f"{mib(peft_scratch)}")

    if do is not None:
        weight = weight0.clone()

        def restore():
            weight.copy_(weight0)

        backends = ["cpu"] + (["reference"] if quick else [])
        for name in backends:
            def run(name=name):
                with do.use_backend(name):
                    do.lora_merge_(weight, lora_A, lora_B, scale)
            restore()
            scratch = peak_growth_bytes(run)
            row = bench.case("lora_merge_", case, name, run, bytes=nbytes, tensor=weight0,
                             setup=restore, peer=peer, target=Target("speedup", 3),
                             notes=f"scratch {mib(scratch)}")
            notes.append(f"- scratch of one merge (peak RSS growth): deltaops `{name}` "
                         f"{mib(scratch)}")
            if name == "cpu" and row.median_ms is not None:
                restore()
                run()
                exact = (weight0.double() + scale * (lora_B.double() @ lora_A.double()))
                ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp_min(1e-30)
                worst = float(((weight.double() - exact).abs() / ulp).max())
                notes.append(f"- `cpu` merge error against the fp64 product: max {worst:.2f} ulp "
                             f"of bf16")

        # drift: merge then unmerge, deltaops (one rounding each) against PEFT (two each)
        restore()
        do.lora_merge_(weight, lora_A, lora_B, scale)
        merged = weight.clone()
        do.lora_unmerge_(weight, lora_A, lora_B, scale)
        frac, worst = drift_stats(weight0, weight, merged)
        notes.append(f"- bf16 merge then unmerge, deltaops: {100 * frac:.2f}% of elements not "
                     f"restored, max drift {worst:.2f} ulp of the merged weight")
        if layer is not None:
            peft_restore()
            layer.merge()
            peft_merged = base_weight.detach().clone()
            layer.unmerge()
            frac, worst = drift_stats(weight0, base_weight.detach(), peft_merged)
            notes.append(f"- bf16 merge then unmerge, PEFT: {100 * frac:.2f}% of elements not "
                         f"restored, max drift {worst:.2f} ulp of the merged weight")
        restore()
        undo = do.lora_merge_(weight, lora_A, lora_B, scale, keep_original=True)
        do.lora_unmerge_(weight, lora_A, lora_B, scale, undo=undo)
        notes.append(f"- with `keep_original=True` / `undo=`: restored bit for bit: "
                     f"{bool(torch.equal(weight, weight0))}")
    return notes


def bench_low_rank(bench: Bench, do, shape, quick: bool) -> list[str]:
    m, n, rank = shape
    g = torch.Generator().manual_seed(1)
    # A fine-tuning-like delta: a decaying spectrum (s_i ~ 1 / (1 + i / 8)) times random bases.
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    s = 1.0 / (1.0 + torch.arange(k, dtype=torch.float32) / 8)
    delta = (u * s) @ v.t()
    del u, v
    notes = []
    case = f"r={rank}"
    peer = bench.case("low_rank", case, "torch.linalg.svd",
                      lambda: torch.linalg.svd(delta, full_matrices=False), tensor=delta,
                      status="peer", warmup=0, min_repeat=1, max_repeat=3 if quick else 1)
    if do is None:
        return notes
    bench.case("low_rank", case + " svd", "deltaops svd",
               lambda: do.low_rank(delta, rank, method="svd"), tensor=delta,
               warmup=0, min_repeat=1, max_repeat=3 if quick else 1,
               notes="the svd method is torch.linalg.svd plus the error check")
    bench.case("low_rank", case + " randomized", "deltaops randomized",
               lambda: do.low_rank(delta, rank, method="randomized", seed=0), tensor=delta,
               peer=peer, target=Target("speedup", 5), min_repeat=3)
    from deltaops.reference.lowrank import optimal_relative_error

    optimum = optimal_relative_error(s, rank)
    fast = do.low_rank(delta, rank, method="randomized", seed=0)
    notes.append(f"- low_rank rank {rank} on {m}x{n}: randomized relative error "
                 f"{fast.relative_error:.4f}, optimum (Eckart-Young) {optimum:.4f} "
                 f"({100 * (fast.relative_error / optimum - 1):.2f}% above)")
    return notes


def main(argv=None) -> int:
    args = arg_parser(__doc__.splitlines()[0]).parse_args(argv)
    configure(args)
    do = import_deltaops()
    bench = Bench(FAMILY, quick=args.quick, out_dir=args.out, budget_s=args.budget)
    notes = bench_merge(bench, do, QUICK_MERGE if args.quick else FULL_MERGE, args.quick)
    notes += bench_low_rank(bench, do, QUICK_SVD if args.quick else FULL_SVD, args.quick)
    bench.finish()
    print("\nMeasured in the same run:\n")
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
