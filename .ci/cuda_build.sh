#!/usr/bin/env bash
# Prove that the CUDA extension deltaops._C_cuda compiles, links and imports
# on a machine without a GPU, and print every kernel's registers and spills.
#
# Run from the repository root:  bash .ci/cuda_build.sh
#
# Steps: (1) create or reuse a venv holding the CUDA build of torch; (2) copy
# the source tree to a temporary directory (never touches ./build or the .so
# files of a CPU build in the checkout); (3) build only deltaops._C_cuda with
# the repository's setup.py (its flags and sources), for sm_80 and sm_90,
# with ptxas -v; (4) fail unless the .so exists, imports and exposes the
# contract's functions; (5) print a table of registers / spills per kernel.
#
# Environment (all optional):
#   DELTAOPS_CUDA_VENV     venv for the CUDA torch      (default: .venv-cuda in the repo)
#   DELTAOPS_CUDA_TORCH    pip requirement for torch    (default: torch==2.14.1, CUDA 13.0)
#   CUDA_HOME              CUDA toolkit root with lib64/libcudart.so (default: /usr/local/cuda-13.0)
#   TORCH_CUDA_ARCH_LIST   target architectures         (default: "8.0;9.0")
#   MAX_JOBS               parallel compile jobs        (default: 2)
#   PYTHON                 interpreter for a new venv   (default: python3)
#   DELTAOPS_CI_KEEP=1     keep the temporary build directory (its path is printed)
#   DELTAOPS_CI_FULL_TABLE=1  one row per template instance instead of per kernel
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${DELTAOPS_CUDA_VENV:-$ROOT/.venv-cuda}
TORCH_REQ=${DELTAOPS_CUDA_TORCH:-torch==2.14.1}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda-13.0}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
export MAX_JOBS=${MAX_JOBS:-2}
PYTHON=${PYTHON:-python3}
START=$SECONDS

step() { printf '\n=== [%4ds] %s\n' "$((SECONDS - START))" "$*"; }
die() { printf 'cuda_build: FAILED: %s\n' "$*" >&2; exit 1; }

# ---- toolkit ------------------------------------------------------------------
step "CUDA toolkit: $CUDA_HOME"
[[ -x $CUDA_HOME/bin/nvcc ]] || die "no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)"
[[ -e $CUDA_HOME/lib64/libcudart.so ]] || die "no $CUDA_HOME/lib64/libcudart.so (set CUDA_HOME to the toolkit root)"
export PATH=$CUDA_HOME/bin:$PATH
nvcc --version | tail -n 2

# ---- venv with the CUDA build of torch ------------------------------------------
step "venv: $VENV ($TORCH_REQ)"
if [[ ! -x $VENV/bin/python ]]; then
  "$PYTHON" -m venv "$VENV"
fi
PY=$VENV/bin/python
"$PY" -m pip install --quiet --disable-pip-version-check \
  "$TORCH_REQ" pybind11 ninja numpy setuptools wheel 2>&1 |
  { grep -v 'is ignored: it is neither a file nor a directory' || true; }
"$PY" - <<'EOF'
import torch
print(f"torch {torch.__version__}, built for CUDA {torch.version.cuda}")
if torch.version.cuda is None:
    raise SystemExit("cuda_build: FAILED: this torch has no CUDA; set DELTAOPS_CUDA_TORCH")
EOF
SITE=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
CU_MAJOR=$("$PY" -c 'import torch; print(torch.version.cuda.split(".")[0])')
# ATen's CUDA headers include cuBLAS / cuSPARSE headers that a bare toolkit may
# lack; torch's wheels ship them.
CU_INCLUDE=$SITE/nvidia/cu$CU_MAJOR/include
[[ -d $CU_INCLUDE ]] || die "no CUDA headers from torch's wheels at $CU_INCLUDE"
export CPATH=$CU_INCLUDE${CPATH:+:$CPATH}

# ---- copy of the source tree --------------------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/deltaops-cuda-build.XXXXXX")
if [[ ${DELTAOPS_CI_KEEP:-0} == 1 ]]; then
  echo "build directory kept: $WORK"
else
  trap 'rm -rf "$WORK"' EXIT
fi
step "copying the source tree to $WORK"
tar -C "$ROOT" \
  --exclude=./.git --exclude='./.venv*' --exclude=./build --exclude=./dist \
  --exclude='*.egg-info' --exclude='*.so' --exclude=__pycache__ --exclude=.pytest_cache \
  -cf - . | tar -C "$WORK" -xf -
[[ -f $WORK/csrc/bindings_cuda.cpp ]] || die "csrc/bindings_cuda.cpp is missing"

# ---- build ------------------------------------------------------------------------------
step "building deltaops._C_cuda for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST (MAX_JOBS=$MAX_JOBS)"
LOG=$WORK/cuda_build.log
# The repository's setup.py defines the extension (sources, flags); only its
# CUDA extension is built here: the CPU extension has its own CI job.
set +e
(
  cd "$WORK" &&
  DELTAOPS_BUILD_CUDA=1 DELTAOPS_CUDA_VERBOSE=1 "$PY" - <<'EOF'
import os, sys
import setuptools

real_setup = setuptools.setup

def setup_cuda_only(**kwargs):
    extensions = [e for e in kwargs.get("ext_modules", []) if e.name == "deltaops._C_cuda"]
    if not extensions:
        raise SystemExit("cuda_build: FAILED: setup.py defines no deltaops._C_cuda extension")
    kwargs["ext_modules"] = extensions
    return real_setup(**kwargs)

setuptools.setup = setup_cuda_only
sys.argv = ["setup.py", "build_ext", "--inplace"]
path = os.path.abspath("setup.py")
exec(compile(open(path).read(), path, "exec"), {"__name__": "__main__", "__file__": path})
EOF
) >"$LOG" 2>&1
BUILD_RC=$?
set -e
SO=$(find "$WORK/python/deltaops" -maxdepth 1 -name '_C_cuda*.so' -print -quit)
if [[ $BUILD_RC -ne 0 || -z $SO ]]; then
  echo "---- compiler errors (full log below) ----"
  grep -nE 'error|Error|FAILED' "$LOG" | head -n 40 || true
  echo "---- last 80 lines of the build log ----"
  tail -n 80 "$LOG"
  die "deltaops._C_cuda did not build (setup.py exited $BUILD_RC; errors above, full log in the build directory with DELTAOPS_CI_KEEP=1)"
fi
echo "built $(basename "$SO") ($(du -h "$SO" | cut -f1)) in $((SECONDS - START))s since start"

# ---- import --------------------------------------------------------------------------------
step "importing deltaops._C_cuda (no GPU needed)"
"$PY" - "$SO" <<'EOF'
import importlib.util, sys
import torch  # loads libtorch / libc10 / CUDA runtime the extension links against

spec = importlib.util.spec_from_file_location("deltaops._C_cuda", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
expected = ["radix_histogram", "threshold_mask", "topk_mask", "philox_uniform_like", "dare", "dare_out_",
            "apply_dense_", "apply_coo_", "apply_bitmask_",
            "merge_sign_elect", "merge_sign_elect_out_", "merge_linear", "merge_linear_out_",
            "merge_delta_histogram", "merge_delta_topk",
            "lora_merge_", "lora_shrink", "lora_expand",
            "pack_bits", "unpack_bits", "quantize_sign", "quantize_ternary_absmean",
            "quantize_uniform", "compeft_pack", "compeft_quantize", "apply_quantized_", "delta_bmm"]
missing = [name for name in expected if not callable(getattr(module, name, None))]
if missing:
    raise SystemExit(f"cuda_build: FAILED: deltaops._C_cuda lacks {missing}")
# The bindings run without a GPU up to the device check: a CPU tensor is refused.
try:
    module.radix_histogram(torch.zeros(4), 0, 0)
except RuntimeError as error:
    assert "CUDA tensor" in str(error), error
else:
    raise SystemExit("cuda_build: FAILED: radix_histogram accepted a CPU tensor")
try:
    module.merge_sign_elect(torch.zeros(4), [torch.zeros(4)], "ties", [1.0], [0.5], [0.01], 1.0,
                            True, "", "sum", 0, [], "float32")
except RuntimeError as error:
    assert "CUDA tensor" in str(error), error
else:
    raise SystemExit("cuda_build: FAILED: merge_sign_elect accepted a CPU tensor")
print("import ok:", ", ".join(expected))
EOF

# ---- registers and spills --------------------------------------------------------------------
step "registers and spills per kernel (ptxas -v)"
"$PY" - "$LOG" <<'EOF'
import os, re, shutil, subprocess, sys

entry = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'")
spill = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
used = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")
rows, current = [], None
for line in open(sys.argv[1], errors="replace"):
    if m := entry.search(line):
        current = {"mangled": m.group(1), "arch": m.group(2)}
    elif current and (m := spill.search(line)):
        current.update(stack=int(m.group(1)), stores=int(m.group(2)), loads=int(m.group(3)))
    elif current and (m := used.search(line)):
        current.update(regs=int(m.group(1)), smem=int(m.group(2) or 0))
        rows.append(current)
        current = None
if not rows:
    raise SystemExit("cuda_build: FAILED: no ptxas -v output in the build log "
                     "(is DELTAOPS_CUDA_VERBOSE honoured by setup.py?)")

names = [r["mangled"] for r in rows]
if shutil.which("c++filt"):
    names = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True,
                           text=True, check=True).stdout.splitlines()

def short(name):
    name = re.sub(r"deltaops::cuda::\(anonymous namespace\)::", "", name)
    name = re.sub(r"deltaops::", "", name)
    name = re.sub(r"\bunsigned long long\b", "u64", name)
    name = re.sub(r"\blong\b", "i64", re.sub(r"\bint\b", "i32", name))
    name = re.sub(r"\(.*\)$", "", name)  # drop the parameter list, keep template arguments
    return name

for row, name in zip(rows, names):
    row["name"] = short(name).removeprefix("void ")
    row["base"] = row["name"].split("<")[0]
archs = sorted({r["arch"] for r in rows})

def cell(group):
    """regs as 'min-max' over the template instances of one kernel on one arch."""
    if not group:
        return "-"
    lo, hi = min(r["regs"] for r in group), max(r["regs"] for r in group)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"

full = os.environ.get("DELTAOPS_CI_FULL_TABLE") == "1"
keys = sorted({r["name" if full else "base"] for r in rows})
by = lambda key: [r for r in rows if r["name" if full else "base"] == key]
width = max(len(k) for k in keys + ["kernel"])
head = f"{'kernel':<{width}}  {'inst':>4}  " + "  ".join(f"{a + ' regs':>12}" for a in archs)
print(head + f"  {'spill st/ld':>11}  {'stack':>5}  {'smem(static)':>12}")
print("-" * (len(head) + 30))
for key in keys:
    group = by(key)
    instances = len({r["name"] for r in group})
    regs = "  ".join(f"{cell([r for r in group if r['arch'] == a]):>12}" for a in archs)
    spills = f"{max(r['stores'] for r in group)}/{max(r['loads'] for r in group)}"
    print(f"{key:<{width}}  {instances:>4}  {regs}  {spills:>11}  "
          f"{max(r['stack'] for r in group):>5}  {max(r['smem'] for r in group):>12}")
spilling = sorted({f"{r['name']} ({r['arch']})" for r in rows if r["stores"] or r["loads"]})
print(f"\n{len(rows)} kernel builds ({len({r['name'] for r in rows})} instances x {', '.join(archs)}); "
      f"max {max(r['regs'] for r in rows)} registers; {len(spilling)} with spills"
      + (": " + ", ".join(spilling) if spilling else "")
      + ("" if full else "; per instance: DELTAOPS_CI_FULL_TABLE=1"))
EOF

step "deltaops._C_cuda OK (total $((SECONDS - START))s)"
