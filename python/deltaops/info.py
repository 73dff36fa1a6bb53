"""``python -m deltaops.info``: which backends are built and usable here, and why not."""

from __future__ import annotations

import os
import platform
import sys

import torch

from . import __version__, backends


def cpu_isa() -> str:
    """The SIMD extensions of this CPU that deltaops' kernels care about."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        return platform.machine()
    wanted = ["avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
              "avx512_fp16", "avx512_vnni", "amx_tile", "amx_bf16"]
    have = [f for f in wanted if f in flags]
    return f"{platform.machine()} " + " ".join(have) if have else platform.machine()


def report() -> str:
    lines = [f"deltaops {__version__}  python {sys.version.split()[0]}  torch {torch.__version__}"]
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    cuda = torch.version.cuda or "none (CPU build of torch)"
    lines.append(f"triton {triton_version}  torch CUDA {cuda}  CUDA devices "
                 f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}")
    lines.append(f"CPU: {cpu_isa()}")
    lines.append(f"threads: {torch.get_num_threads()}  (torch.set_num_threads / OMP_NUM_THREADS)")
    try:
        from . import _C

        lines.append(f"CPU kernels: {_C._isa()} loops in use (DELTAOPS_CPU_ISA=avx2 forces the baseline)")
    except ImportError:
        pass
    lines.append(f"selected backend: {backends.selected()}  (DELTAOPS_BACKEND or deltaops.use_backend)")
    lines.append(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    lines.append("")
    lines.append(f"{'backend':<10} {'usable':<7} {'runs on':<10} detail")
    for name, backend in backends.status().items():
        devices = ",".join(backends.DEVICES[name])
        detail = backend.reason or f"{len(backend.table)} functions"
        lines.append(f"{name:<10} {'yes' if backend.usable else 'no':<7} {devices:<10} {detail}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
