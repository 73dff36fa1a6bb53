"""Small benchmark harness shared by every bench/<family>.py script.

What it gives a family script:

* :func:`measure`: warm-up, then repeated timed runs of a callable
  (``time.perf_counter``), with an untimed ``setup`` before each run (restore
  the weight of an in-place op) and an optional ``sync`` hook inside the timed
  region (``torch.cuda.synchronize`` for CUDA tensors). Runs stop after a time
  budget, within ``[min_repeat, max_repeat]`` runs; median, min and IQR.
* :class:`Bench`: one family's run. It measures the copy bandwidth of each
  device with the same harness (``dst.copy_(src)``, bytes = 2 * nbytes), then
  each case's GB/s (from a bytes model given by the family script), its
  percentage of that copy bandwidth, and its speedup over a peer timed in the
  same process on the same tensors; it checks each case against its target,
  and writes a CSV, a PNG bar plot and a markdown table.

Machines are shared and timings drift, so results are meant to be read as
ratios (to a peer, or to the copy bandwidth of the same run), not as absolute
numbers.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import gc
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

COPY_CASE = "dst.copy_(src)"

# ---------------------------------------------------------------------------
# timing


@dataclass
class Measurement:
    times_s: list[float]

    @property
    def n(self) -> int:
        return len(self.times_s)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)

    @property
    def iqr_s(self) -> float:
        if len(self.times_s) < 4:
            return max(self.times_s) - min(self.times_s)
        q = statistics.quantiles(self.times_s, n=4)
        return q[2] - q[0]


def cuda_sync_for(*tensors) -> Optional[Callable[[], None]]:
    """``torch.cuda.synchronize`` if any tensor lives on a CUDA device, else None."""
    if any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors):
        return torch.cuda.synchronize
    return None


def measure(fn: Callable[[], object], *, setup: Optional[Callable[[], object]] = None,
            sync: Optional[Callable[[], None]] = None, warmup: int = 1, min_repeat: int = 3,
            max_repeat: int = 50, budget_s: float = 1.0) -> Measurement:
    """Time ``fn``: untimed warm-up calls, then timed runs.

    Warm-up: at least ``warmup`` calls, and more until they took a tenth of
    ``budget_s`` (a few ms-long op gets about ten: the first calls of a
    process pay for the allocator's heap growing to the op's outputs, e.g.
    +10 MB and 5-14 ms per call over the first ten ComPEFT calls, against
    3.7 ms once warm; a slow peer still gets one).

    ``setup`` runs before every call (warm-up and timed) outside the timed
    region. ``sync`` runs before the clock starts and before it stops (so
    asynchronous device work is counted). Timed runs stop once their total
    reaches ``budget_s`` (or the wall time, setups included, reaches
    ``3 * budget_s``) and at least ``min_repeat`` ran, or at ``max_repeat``.
    A callable slower than the budget thus runs ``warmup + min_repeat`` times.
    """
    def one() -> float:
        if setup is not None:
            setup()
        if sync is not None:
            sync()
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        return time.perf_counter() - start

    warm0 = time.perf_counter()
    done = 0
    while done < warmup or time.perf_counter() - warm0 < 0.1 * budget_s:
        one()
        done += 1
    times: list[float] = []
    wall0 = time.perf_counter()
    while len(times) < max_repeat:
        times.append(one())
        if len(times) >= min_repeat and (sum(times) >= budget_s
                                         or time.perf_counter() - wall0 >= 3 * budget_s):
            break
    return Measurement(times)


# ---------------------------------------------------------------------------
# machine facts


def optional_import(module_name: str):
    """A peer library's module, or None (with the reason on stderr) when it does not import."""
    import importlib

    try:
        return importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001  (a peer's import may fail in many ways)
        print(f"{module_name} unavailable: {error}", file=sys.stderr)
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_facts() -> dict[str, str]:
    facts = {
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "cpu": cpu_model(),
        "cpu_count": str(os.cpu_count()),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        facts["gpu"] = torch.cuda.get_device_name()
    facts["malloc"] = _MALLOC_MODE
    return facts


_MALLOC_MODE = "default allocator"


def keep_freed_memory() -> bool:
    """glibc only: serve large blocks from the heap and never trim it, so a freed
    output buffer is reused by the next call without page faults."""
    global _MALLOC_MODE
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 2**31 - 1)
    except (OSError, AttributeError):
        ok = False
    if ok:
        _MALLOC_MODE = "freed memory kept (mallopt)"
    return bool(ok)


def peak_rss_growth(fn: Callable[[], object]) -> Optional[int]:
    """Bytes by which the process's peak RSS rose above its RSS while ``fn`` ran
    (its result, usually the output, included); None where Linux's peak-RSS reset
    (``/proc/self/clear_refs``) is unavailable. Run it after the timing, with the
    inputs already resident."""
    def status_kb(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise OSError(field)

    try:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        before = status_kb("VmRSS")
        result = fn()
        peak = status_kb("VmHWM")
        del result
    except OSError:
        return None
    return max(0, peak - before) * 1024


# ---------------------------------------------------------------------------
# targets and rows


@dataclass
class Target:
    """A goal for one case: ``kind`` is "pct_of_copy" or "speedup"."""
    kind: str
    value: float

    def describe(self) -> str:
        if self.kind == "pct_of_copy":
            return f">={self.value:g}% copy"
        if self.kind == "speedup":
            return f">={self.value:g}x peer"
        raise ValueError(f"unknown target kind {self.kind!r}")

    def met(self, row: "Row") -> Optional[bool]:
        got = row.pct_of_copy if self.kind == "pct_of_copy" else row.speedup
        return None if got is None else got >= self.value


@dataclass
class Row:
    family: str
    op: str
    case: str
    backend: str
    device: str
    shape: str
    dtype: str
    bytes: Optional[int] = None
    median_ms: Optional[float] = None
    min_ms: Optional[float] = None
    iqr_ms: Optional[float] = None
    runs: int = 0
    gbps: Optional[float] = None
    pct_of_copy: Optional[float] = None
    speedup: Optional[float] = None
    peer: str = ""
    target: str = ""
    status: str = ""  # pass / FAIL / ran (quick: no verdict) / n/a (not run) / peer / ref
    notes: str = ""
    alt_bytes: Optional[int] = None  # the same case under a second bytes model
    alt_model: str = ""  # what that second model counts
    alt_pct_of_copy: Optional[float] = None
    peak_extra_mb: Optional[float] = None  # peak RSS above the inputs (output included)

    CSV_FIELDS = ("family", "op", "case", "backend", "device", "shape", "dtype", "median_ms",
                  "min_ms", "iqr_ms", "runs", "bytes", "gbps", "pct_of_copy", "speedup",
                  "peer", "target", "status", "notes", "alt_bytes", "alt_pct_of_copy", "alt_model", "peak_extra_mb")

    def csv_dict(self) -> dict:
        out = {}
        for name in self.CSV_FIELDS:
            value = getattr(self, name)
            if isinstance(value, float):
                value = f"{value:.6g}"
            out[name] = "" if value is None else value
        return out


def describe_shape(t) -> str:
    return "x".join(str(s) for s in t.shape) if isinstance(t, torch.Tensor) else str(t)


def describe_dtype(t) -> str:
    return str(t.dtype).replace("torch.", "") if isinstance(t, torch.Tensor) else str(t)


# ---------------------------------------------------------------------------
# one family's run


class Bench:
    """Collects the rows of one family; see the module docstring."""

    def __init__(self, family: str, *, quick: bool = False, out_dir: Optional[str] = None,
                 budget_s: Optional[float] = None, verbose: bool = True):
        self.family = family
        self.quick = quick
        self.out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results")
        self.budget_s = budget_s if budget_s is not None else (0.05 if quick else 1.0)
        self.min_repeat = 3 if quick else 5
        self.verbose = verbose
        self.rows: list[Row] = []
        self._links: list[tuple[Row, Optional[Target], Optional[Row]]] = []
        self.facts = machine_facts()
        self.started = time.perf_counter()

    # -- helpers -----------------------------------------------------------
    def _log(self, row: Row) -> None:
        if not self.verbose:
            return
        if row.median_ms is None:
            print(f"  {row.op:<14} {row.case:<22} {row.backend:<22} n/a: {row.notes}",
                  file=sys.stderr, flush=True)
            return
        extra = f"{row.pct_of_copy:6.1f}% copy" if row.pct_of_copy is not None else ""
        if row.speedup is not None:
            extra += f"  {row.speedup:6.2f}x vs {row.peer}"
        print(f"  {row.op:<14} {row.case:<22} {row.backend:<22} {row.median_ms:10.3f} ms"
              f" (n={row.runs}) {extra}", file=sys.stderr, flush=True)

    def _measure(self, fn, setup, sync, budget_s, min_repeat, max_repeat, warmup) -> Measurement:
        return measure(fn, setup=setup, sync=sync, warmup=warmup,
                       min_repeat=min_repeat if min_repeat is not None else self.min_repeat,
                       max_repeat=max_repeat,
                       budget_s=budget_s if budget_s is not None else self.budget_s)

    # -- copy reference ----------------------------------------------------
    def copy_reference(self, like: torch.Tensor) -> Row:
        """Copy bandwidth on ``like``'s device: ``dst.copy_(src)``, bytes = 2 * nbytes.

        Call it more than once (say, first and last) to see the drift of a
        shared machine: percentages use the median of a device's copy rows.
        """
        src = torch.empty_like(like).copy_(like)
        dst = torch.empty_like(like)
        dst.copy_(src)  # fault the pages in
        nbytes = src.numel() * src.element_size()
        return self.case("copy", COPY_CASE, "torch", lambda: dst.copy_(src),
                         bytes=2 * nbytes, tensor=src, status="ref")

    def alloc_reference(self, like: torch.Tensor) -> Row:
        """``like.clone()``: a copy into a fresh buffer, the floor of an out-of-place op.

        On CPU a fresh large buffer is page-faulted in on first touch (glibc
        returns freed large blocks to the OS) unless ``--keep-freed-memory``.
        """
        nbytes = like.numel() * like.element_size()
        return self.case("copy", "clone() (allocates)", "torch", lambda: like.clone(),
                         bytes=2 * nbytes, tensor=like, status="ref",
                         notes="floor for out-of-place ops: allocation + copy")

    @property
    def copy_gbps(self) -> dict[str, float]:
        """Device type -> median GB/s of its copy rows so far."""
        seen: dict[str, list[float]] = {}
        for r in self.rows:
            if r.op == "copy" and r.case == COPY_CASE and r.gbps:
                seen.setdefault(r.device, []).append(r.gbps)
        return {device: statistics.median(v) for device, v in seen.items()}

    def _derive(self, row: Row, target: Optional[Target], peer: Optional[Row]) -> None:
        """GB/s, % of copy, speedup and status from the timings."""
        if row.median_ms is None:
            return
        if row.bytes:
            row.gbps = row.bytes / (row.median_ms * 1e-3) / 1e9
            copy = self.copy_gbps.get(row.device)
            if copy:
                row.pct_of_copy = 100.0 * row.gbps / copy
                if row.alt_bytes:
                    alt_gbps = row.alt_bytes / (row.median_ms * 1e-3) / 1e9
                    row.alt_pct_of_copy = 100.0 * alt_gbps / copy
        if peer is not None and peer.median_ms:
            row.speedup = peer.median_ms / row.median_ms
        if target is not None:
            met = target.met(row)
            if met is None:
                row.status = "n/a"
            elif self.quick:  # tiny cached shapes: a smoke test, not a verdict
                row.status = "ran"
            else:
                row.status = "pass" if met else "FAIL"

    def refresh(self) -> None:
        """Recompute derived columns with the final copy bandwidth (all copy rows)."""
        for row, target, peer in self._links:
            self._derive(row, target, peer)

    # -- a case ------------------------------------------------------------
    def case(self, op: str, case: str, backend: str, fn: Callable[[], object], *,
             bytes: Optional[int] = None, tensor: Optional[torch.Tensor] = None,
             setup: Optional[Callable[[], object]] = None, peer: Optional[Row] = None,
             target: Optional[Target] = None, status: str = "", notes: str = "",
             shape: Optional[str] = None, dtype: Optional[str] = None,
             budget_s: Optional[float] = None, min_repeat: Optional[int] = None,
             max_repeat: int = 50, warmup: int = 1, alt_bytes: Optional[int] = None,
             alt_model: str = "", memory: bool = False) -> Row:
        """Time ``fn`` and record a row.

        ``tensor`` gives the shape, dtype and device of the case (and the
        sync hook for CUDA). ``peer`` is a row timed earlier on the same
        tensors; the speedup is ``peer.median / this median``. An exception
        from ``fn`` (an op or backend not available) gives an ``n/a`` row
        instead of stopping the run. ``alt_bytes``/``alt_model``: a second
        bytes model, reported beside the first (the target uses ``bytes``).
        ``memory``: also run ``fn`` once under :func:`peak_rss_growth`.
        """
        device = tensor.device.type if isinstance(tensor, torch.Tensor) else "cpu"
        row = Row(self.family, op, case, backend, device,
                  shape or describe_shape(tensor), dtype or describe_dtype(tensor),
                  bytes=bytes, peer=peer.backend if peer is not None else "",
                  target=target.describe() if target else "", status=status, notes=notes,
                  alt_bytes=alt_bytes, alt_model=alt_model)
        try:
            m = self._measure(fn, setup, cuda_sync_for(tensor), budget_s, min_repeat,
                              max_repeat, warmup)
        except Exception as error:  # noqa: BLE001  (report it, keep benchmarking)
            row.status = "n/a"
            msg = f"{type(error).__name__}: {error}".replace("\n", " ")
            row.notes = (msg[:200] + (" | " + notes if notes else "")).strip()
            self.rows.append(row)
            self._log(row)
            return row
        row.median_ms, row.min_ms, row.iqr_ms, row.runs = (m.median_s * 1e3, m.min_s * 1e3,
                                                            m.iqr_s * 1e3, m.n)
        if memory:
            grown = peak_rss_growth(fn)
            row.peak_extra_mb = None if grown is None else grown / 2**20
        self.rows.append(row)
        self._links.append((row, target, peer))
        self._derive(row, target, peer)
        self._log(row)
        return row

    def skip(self, op: str, case: str, backend: str, reason: str, *,
             tensor: Optional[torch.Tensor] = None, target: Optional[Target] = None) -> Row:
        """Record a case that was not run, with the reason."""
        row = Row(self.family, op, case, backend,
                  tensor.device.type if isinstance(tensor, torch.Tensor) else "cpu",
                  describe_shape(tensor), describe_dtype(tensor),
                  target=target.describe() if target else "", status="n/a", notes=reason)
        self.rows.append(row)
        self._log(row)
        return row

    # -- output ------------------------------------------------------------
    def header_lines(self) -> list[str]:
        f = self.facts
        lines = [f"deltaops bench `{self.family}`{' (quick)' if self.quick else ''}: "
                 f"torch {f['torch']}, {f['threads']} threads, CPU {f['cpu']} "
                 f"({f['cpu_count']} logical cpus), python {f['python']}, {f['malloc']}"
                 + (f", GPU {f['gpu']}" if "gpu" in f else "")]
        for device, gbps in self.copy_gbps.items():
            each = [f"{r.gbps:.2f}" for r in self.rows
                    if r.op == "copy" and r.case == COPY_CASE and r.device == device and r.gbps]
            lines.append(f"copy bandwidth ({device}, dst.copy_(src), same run): {gbps:.2f} GB/s"
                         f" (median of {', '.join(each)}); % copy uses it")
        return lines

    def markdown(self) -> str:
        def fmt(v, spec):
            return "" if v is None else format(v, spec)

        out = [*(f"_{line}_  " for line in self.header_lines()), "",
               "| op | case | backend | shape | dtype | median ms | GB/s | % copy | speedup | peer"
               " | target | status | peak extra MB |",
               "|---|---|---|---|---|---:|---:|---:|---:|---|---|---|---:|"]
        for r in self.rows:
            out.append(f"| {r.op} | {r.case} | {r.backend} | {r.shape} | {r.dtype} "
                       f"| {fmt(r.median_ms, '.3f')} | {fmt(r.gbps, '.2f')} "
                       f"| {fmt(r.pct_of_copy, '.1f')} "
                       f"| {fmt(r.speedup, '.2f') + ('x' if r.speedup is not None else '')} "
                       f"| {r.peer} | {r.target} | {r.status} | {fmt(r.peak_extra_mb, '.0f')} |")
        notes = [r for r in self.rows if (r.status == "n/a" or r.status == "FAIL" or r.notes
                                          or r.alt_pct_of_copy is not None)
                 and r.status not in ("ref",)]
        if notes:
            out.append("")
        for r in notes:
            text = r.notes
            if r.alt_pct_of_copy is not None:
                text = (f"{text}; " if text else "") + (f"{r.alt_pct_of_copy:.1f}% copy under the "
                                                        f"{r.alt_model} bytes model")
            if text:
                out.append(f"- {r.status} `{r.op}` {r.case} [{r.backend}]: {text}")
        return "\n".join(out)

    def write_csv(self, path: Optional[str] = None) -> str:
        path = path or os.path.join(self.out_dir, f"{self.family}.csv")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", newline="") as f:
            for line in self.header_lines():
                f.write(f"# {line}\n")
            writer = csv.DictWriter(f, fieldnames=Row.CSV_FIELDS)
            writer.writeheader()
            for r in self.rows:
                writer.writerow(r.csv_dict())
        return path

    def plot(self, path: Optional[str] = None) -> Optional[str]:
        """Two panels: % of copy bandwidth, and speedup vs peer (log). None without matplotlib."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib missing: no plot", file=sys.stderr)
            return None
        path = path or os.path.join(self.out_dir, f"{self.family}.png")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        rows = [r for r in self.rows if r.median_ms is not None]
        labels = [f"{r.op} {r.case} [{r.backend}]" for r in rows]
        colors = ["tab:gray" if r.status in ("ref", "peer") else
                  "tab:green" if r.status == "pass" else
                  "tab:red" if r.status == "FAIL" else "tab:blue" for r in rows]
        fig, axes = plt.subplots(1, 2, figsize=(14, 0.38 * len(rows) + 1.8), sharey=True)
        y = list(range(len(rows)))
        pct = [r.pct_of_copy or 0.0 for r in rows]
        axes[0].barh(y, pct, color=colors)
        axes[0].set_xlabel("% of copy bandwidth (same run)")
        axes[0].axvline(100, color="k", lw=0.6)
        for i, r in enumerate(rows):
            if r.target.endswith("% copy"):
                goal = float(r.target[2:].split("%")[0])
                axes[0].plot([goal, goal], [i - 0.4, i + 0.4], color="k", lw=1.5)
        spd = [r.speedup or 0.0 for r in rows]
        axes[1].barh(y, [s if s > 0 else float("nan") for s in spd], color=colors)
        axes[1].set_xscale("log")
        axes[1].axvline(1, color="k", lw=0.6)
        axes[1].set_xlabel("speedup vs peer (x, log)")
        for i, r in enumerate(rows):
            if r.target.endswith("x peer"):
                goal = float(r.target[2:].split("x")[0])
                axes[1].plot([goal, goal], [i - 0.4, i + 0.4], color="k", lw=1.5)
        axes[0].set_yticks(y)
        axes[0].set_yticklabels(labels, fontsize=8)
        axes[0].invert_yaxis()
        fig.suptitle("\n".join(self.header_lines()), fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def finish(self) -> str:
        """Write the CSV and the plot, print the markdown table to stdout; return it."""
        self.refresh()
        csv_path = self.write_csv()
        png_path = self.plot()
        table = self.markdown()
        print(table)
        print(f"\nwrote {csv_path}" + (f" and {png_path}" if png_path else "")
              + f" in {time.perf_counter() - self.started:.1f} s", file=sys.stderr)
        return table


def arg_parser(description: str, *, keep_freed_memory: bool = False) -> argparse.ArgumentParser:
    """The common CLI: ``--quick``, ``--out DIR``, ``--budget``, ``--threads`` and the
    allocator mode. ``keep_freed_memory``: the family's default mode keeps freed
    memory (``--default-allocator`` turns it off), for families whose targets
    compare out-of-place ops with a copy into an existing buffer."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true",
                   help="small shapes and few repeats (a smoke test: seconds)")
    p.add_argument("--out", default=None,
                   help="output folder for <family>.csv and <family>.png (default bench/results)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed runs per measurement (default 1.0, quick 0.05)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's choice; quick: 1, since a"
                        " busy shared machine stalls parallel regions on tiny tensors)")
    p.add_argument("--keep-freed-memory", action="store_true", default=keep_freed_memory,
                   help="glibc mallopt so freed large buffers are reused without page faults"
                        " (out-of-place ops then time the kernel, not the first touch)"
                        + (" (this family's default)" if keep_freed_memory else ""))
    if keep_freed_memory:
        p.add_argument("--default-allocator", dest="keep_freed_memory", action="store_false",
                       help="leave glibc's allocator as it is (outputs page-faulted in when"
                            " glibc has returned their memory)")
    return p


def configure(args) -> None:
    """Apply ``--threads`` (quick mode defaults to 1) and ``--keep-freed-memory``;
    call before creating the :class:`Bench` (its header records both)."""
    threads = args.threads if args.threads is not None else (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    if getattr(args, "keep_freed_memory", False) and not keep_freed_memory():
        print("--keep-freed-memory: mallopt unavailable (not glibc?)", file=sys.stderr)
