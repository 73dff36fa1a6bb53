"""Whole-checkpoint merge: ``mergekit-yaml`` against ``deltaops merge`` on a generated family.

    python bench/checkpoint.py                 # base + 3 fine-tunes, ~1.05B parameters each, bf16
    python bench/checkpoint.py --quick         # ~3M parameters: a smoke test
    python bench/checkpoint.py --params 3e8 --method ties --root /tmp/family

The family is generated once under ``--root`` (default
``/tmp/deltaops-bench-family-<params>``; about 8.4 GB for the default size)
and reused by later runs. Both tools merge the same YAML (TIES, densities
0.3/0.5/0.2, weights 1/0.6/0.3, bf16 in and out) in child processes, one
after the other, each after the inputs were read once so both start with a
warm page cache. For each child the wall time and its peak resident set
(``ru_maxrss`` from ``os.wait4``, which counts the pages of memory-mapped
files it touched) are recorded. The same run also times a plain file copy of
the base model (``shutil.copyfile`` of its shards) as the I/O yardstick.

mergekit runs with its defaults (``--no-write-model-card``, which would query
the Hugging Face hub, and ``--no-copy-tokenizer`` aside). deltaops computes
in fp32 with one rounding and mergekit in bf16 arithmetic, so the outputs are
compared on a few tensors and reported (share of bit-equal elements, largest
difference in bf16 ulps), not required to match.

Writes ``<out>/checkpoint.csv``, ``<out>/checkpoint.png`` and prints a
markdown table. Targets (the issue's): at least 10x faster than mergekit-yaml
with at most a quarter of its peak memory.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import torch
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from deltaops.checkpoint.family import make_family, shape_for  # noqa: E402
from deltaops.checkpoint.io import ModelFolder  # noqa: E402

TARGET_SPEEDUP = 10.0
TARGET_MEMORY_RATIO = 0.25


def run_child(command: list[str], env=None) -> tuple[float, int, str]:
    """Wall seconds, peak RSS in bytes, and stderr tail of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=env)
    stderr_chunks = []
    # Read stderr while waiting (a full pipe would block the child); wait4 gives its rusage.
    for line in process.stderr:
        stderr_chunks.append(line.decode(errors="replace"))
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])}... failed ({process.returncode}):\n"
                           + "".join(stderr_chunks)[-3000:])
    return seconds, usage.ru_maxrss * 1024, "".join(stderr_chunks)[-500:]


def warm(paths: list[str]) -> int:
    """Read every shard once (page cache warm for whoever runs next); returns bytes."""
    total = 0
    for path in paths:
        for name in sorted(os.listdir(path)):
            if name.endswith(".safetensors"):
                with open(os.path.join(path, name), "rb", buffering=0) as handle:
                    while chunk := handle.read(64 << 20):
                        total += len(chunk)
    return total


def copy_seconds(source: str, target: str) -> tuple[float, int]:
    os.makedirs(target, exist_ok=True)
    start = time.perf_counter()
    size = 0
    for name in sorted(os.listdir(source)):
        if name.endswith(".safetensors"):
            shutil.copyfile(os.path.join(source, name), os.path.join(target, name))
            size += os.path.getsize(os.path.join(source, name))
    for name in os.listdir(target):
        with open(os.path.join(target, name), "rb+") as handle:
            os.fsync(handle.fileno())
    return time.perf_counter() - start, size


def compare(mk_dir: str, do_dir: str, names: list[str]) -> tuple[float, int]:
    """Share of bit-equal elements and the largest difference in bf16 ulps over ``names``."""
    mk, do = ModelFolder(mk_dir), ModelFolder(do_dir)
    equal = total = 0
    worst = 0
    for name in names:
        a, b = mk.read(name), do.read(name)
        ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
        equal += int((ia == ib).sum())
        total += a.numel()
        same_sign = (ia >= 0) == (ib >= 0)
        worst = max(worst, int(((ia - ib).abs() * same_sign).max()))
    return equal / total, worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~3M parameters per model")
    parser.add_argument("--params", type=float, default=None, help="parameters per model")
    parser.add_argument("--root", default=None, help="where the family is generated")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both tools")
    parser.add_argument("--skip-mergekit", action="store_true")
    args = parser.parse_args()
    params = int(args.params or (3e6 if args.quick else 1.05e9))
    shape = shape_for(params)
    root = args.root or f"/tmp/deltaops-bench-family-{shape.params}"
    marker = os.path.join(root, "family.json")
    if not os.path.exists(marker):
        shutil.rmtree(root, ignore_errors=True)
        print(f"generating base + 3 fine-tunes of {shape.params / 1e9:.2f}B parameters (bf16) "
              f"in {root}", file=sys.stderr)
        start = time.perf_counter()
        make_family(root, shape=shape, dtype=torch.bfloat16, shard_size=2 * 10**9)
        with open(marker, "w") as handle:
            json.dump({"shape": shape.__dict__}, handle)
        print(f"  generated in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    family = [os.path.join(root, n) for n in ("base", "ft1", "ft2", "ft3")]
    config = {"merge_method": "ties", "base_model": family[0], "dtype": "bfloat16",
              "models": [{"model": p, "parameters": {"weight": w, "density": d}}
                         for p, w, d in zip(family[1:], (1.0, 0.6, 0.3), (0.3, 0.5, 0.2))]}
    work = os.path.join(root, "runs")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    config_path = os.path.join(work, "ties.yml")
    with open(config_path, "w") as handle:
        yaml.safe_dump(config, handle)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    threads = args.threads or torch.get_num_threads()

    rows = []
    input_bytes = warm(family)
    copy_s, copy_bytes = copy_seconds(family[0], os.path.join(work, "copy"))
    shutil.rmtree(os.path.join(work, "copy"))
    copy_gbps = copy_bytes / copy_s / 1e9

    do_out = os.path.join(work, "deltaops")
    warm(family)
    do_cmd = [sys.executable, "-m", "deltaops", "merge", config_path, do_out, "--quiet"]
    if args.threads:
        do_cmd += ["--threads", str(args.threads)]
    do_s, do_rss, _ = run_child(do_cmd, env)
    rows.append({"op": "deltaops merge", "wall_s": do_s, "peak_rss_gib": do_rss / 2**30})
    print(f"deltaops merge: {do_s:.1f} s, peak RSS {do_rss / 2**30:.2f} GiB", file=sys.stderr)

    if not args.skip_mergekit:
        mk_out = os.path.join(work, "mergekit")
        warm(family)
        mk_cmd = [sys.executable, "-m", "mergekit.scripts.run_yaml", config_path, mk_out,
                  "--no-write-model-card", "--no-copy-tokenizer", "--quiet"]
        mk_s, mk_rss, _ = run_child(mk_cmd, env)
        rows.append({"op": "mergekit-yaml", "wall_s": mk_s, "peak_rss_gib": mk_rss / 2**30})
        print(f"mergekit-yaml: {mk_s:.1f} s, peak RSS {mk_rss / 2**30:.2f} GiB", file=sys.stderr)
        names = [n for n in ModelFolder(family[0]).names() if "layers.0." in n or "lm_head" in n]
        equal_share, worst_ulps = compare(mk_out, do_out, names)
    for row in rows:
        row["read_gbps"] = input_bytes / row["wall_s"] / 1e9
        row["pct_copy"] = 100 * row["read_gbps"] / copy_gbps

    os.makedirs(args.out, exist_ok=True)
    facts = {"torch": torch.__version__, "threads": threads, "python": platform.python_version(),
             "params_per_model": shape.params, "input_GB": round(input_bytes / 1e9, 3),
             "copy_GBps": round(copy_gbps, 3)}
    with open(os.path.join(args.out, "checkpoint.csv"), "w", newline="") as handle:
        for key, value in facts.items():
            handle.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(8, 3))
        labels = [r["op"] for r in rows]
        axes[0].bar(labels, [r["wall_s"] for r in rows])
        axes[0].set_ylabel("wall time (s)")
        axes[1].bar(labels, [r["peak_rss_gib"] for r in rows], color="tab:orange")
        axes[1].set_ylabel("peak RSS (GiB)")
        fig.suptitle(f"TIES, base + 3 fine-tunes, {shape.params / 1e9:.2f}B params bf16, "
                     f"{threads} threads")
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "checkpoint.png"), dpi=100)
    except ImportError:
        print("matplotlib missing: no plot", file=sys.stderr)

    print(f"Whole-checkpoint TIES merge, base + 3 fine-tunes of {shape.params / 1e9:.2f}B "
          f"parameters each (bf16), {threads} threads, torch {torch.__version__}; inputs "
          f"{input_bytes / 1e9:.2f} GB (page cache warm); file copy of the base in the same "
          f"run: {copy_gbps:.2f} GB/s.\n")
    print("| op | wall s | peak RSS GiB | inputs read GB/s | % of file copy | vs mergekit |")
    print("|---|---|---|---|---|---|")
    mk_row = next((r for r in rows if r["op"] == "mergekit-yaml"), None)
    for row in rows:
        versus = "1.0x" if row is mk_row else "-"
        if mk_row is not None and row is not mk_row:
            versus = (f"{mk_row['wall_s'] / row['wall_s']:.1f}x faster, "
                      f"{row['peak_rss_gib'] / mk_row['peak_rss_gib']:.2f}x the memory")
        print(f"| {row['op']} | {row['wall_s']:.1f} | {row['peak_rss_gib']:.2f} | "
              f"{row['read_gbps']:.2f} | {row['pct_copy']:.0f}% | {versus} |")
    if mk_row is not None:
        speedup = mk_row["wall_s"] / rows[0]["wall_s"]
        memory = rows[0]["peak_rss_gib"] / mk_row["peak_rss_gib"]
        print(f"\nTargets: >= {TARGET_SPEEDUP:.0f}x faster: {speedup:.1f}x "
              f"({'met' if speedup >= TARGET_SPEEDUP else 'NOT met'}); <= "
              f"{TARGET_MEMORY_RATIO:.2f}x the peak memory: {memory:.2f}x "
              f"({'met' if memory <= TARGET_MEMORY_RATIO else 'NOT met'}).")
        print(f"Outputs on layer 0 and lm_head: {100 * equal_share:.2f}% of elements bit-equal, "
              f"largest difference {worst_ulps} bf16 ulp (mergekit rounds to bf16 after each op, "
              f"deltaops once).")
    if not args.quick:
        pass
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
