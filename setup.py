"""Build deltaops: the Python package, the CPU extension and the CUDA extension.

Switches (environment variables):
  DELTAOPS_SKIP_CPP=1        build no extension; every op runs its reference.
  DELTAOPS_BUILD_CUDA=auto   (default) build deltaops._C_cuda when torch has CUDA
                             and nvcc is found; 1 forces it (set
                             TORCH_CUDA_ARCH_LIST on a machine with no GPU);
                             0 skips it.
  DELTAOPS_CPU_BASELINE      -march for the CPU extension (default x86-64-v3:
                             AVX2/FMA/F16C; AVX-512 kernels are compiled beside
                             it and chosen at run time when the CPU has them).
  DELTAOPS_CUDA_VERBOSE=1    pass -Xptxas -v so nvcc prints registers and spills.
  MAX_JOBS                   parallel compile jobs (ninja).

A failed extension build degrades to the reference with a warning: both
extensions are optional, and `import deltaops` never fails because one is
missing (`python -m deltaops.info` says why).
"""

import glob
import os
import platform
import shutil

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE = [os.path.join(ROOT, "csrc", "include")]


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


def _cpu_extension(cpp_extension, torch):
    baseline = os.environ.get("DELTAOPS_CPU_BASELINE", "x86-64-v3")
    # No -std flag: torch's build helper adds the standard its headers need
    # (C++17 for torch 2.13, C++20 for 2.14).
    cxx = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-Wall"]
    if platform.machine() in ("x86_64", "AMD64") and baseline:
        cxx.append(f"-march={baseline}")
    link = []
    if torch.backends.openmp.is_available():
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    sources.append("csrc/bindings.cpp")
    return cpp_extension.CppExtension(
        "deltaops._C", sources, include_dirs=INCLUDE,
        extra_compile_args={"cxx": cxx}, extra_link_args=link, optional=True,
    )


def _want_cuda(torch, cpp_extension):
    switch = os.environ.get("DELTAOPS_BUILD_CUDA", "auto").lower()
    if switch in ("0", "false", "no", "off"):
        return False
    has_toolchain = torch.version.cuda is not None and (
        cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None)
    if switch in ("1", "true", "yes", "on"):
        if not has_toolchain:
            raise RuntimeError("DELTAOPS_BUILD_CUDA=1 but torch has no CUDA or nvcc is missing")
        return True
    return has_toolchain


def _cuda_extension(cpp_extension):
    nvcc = ["-O3", "--fmad=false", "--expt-relaxed-constexpr", "-lineinfo"]
    if os.environ.get("DELTAOPS_CUDA_VERBOSE") == "1":
        nvcc.append("-Xptxas=-v")
    sources = _rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    sources.append("csrc/bindings_cuda.cpp")
    return cpp_extension.CUDAExtension(
        "deltaops._C_cuda", sources, include_dirs=INCLUDE,
        extra_compile_args={"cxx": ["-O3", "-ffp-contract=off"], "nvcc": nvcc},
        optional=True,
    )


def _extensions():
    if os.environ.get("DELTAOPS_SKIP_CPP") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("deltaops: torch is not importable at build time; building no extension "
              "(install torch first and build with --no-build-isolation)")
        return [], {}
    extensions = [_cpu_extension(cpp_extension, torch)]
    if _want_cuda(torch, cpp_extension) and os.path.exists(os.path.join(ROOT, "csrc", "bindings_cuda.cpp")):
        extensions.append(_cuda_extension(cpp_extension))
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)
    return extensions, {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

setup(
    packages=[
        "deltaops", "deltaops.ops", "deltaops.reference", "deltaops.formats",
        "deltaops.integrations", "deltaops.backends", "deltaops.triton_kernels",
        "deltaops.checkpoint",
    ],
    package_dir={"deltaops": "python/deltaops", "deltaops.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
