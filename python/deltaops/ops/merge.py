"""Public merge op: ``deltaops.merge_tensors``.

Semantics: :mod:`deltaops.reference.merge` (fp32 arithmetic, sums in model
order, the sparse family's top-k tie rule). The sign-elect / task-arithmetic
methods (:data:`FUSED_METHODS`) go through the custom op
``torch.ops.deltaops.merge_sign_elect``, whose CPU kernel
(``deltaops._C.merge_sign_elect``) makes one fused pass over the elements
after its selection pre-passes (histogram thresholds, equal-key counts, and the
norms of a rescale), with no per-model temporaries of the tensor's size; the
``triton`` backend (``deltaops.triton_kernels.merge``, CUDA tensors, or CPU
tensors under ``TRITON_INTERPRET=1``) and the ``cuda`` backend
(``deltaops._C_cuda.merge_sign_elect``) run the same plan on the GPU.
``linear`` goes through ``torch.ops.deltaops.merge_linear`` (one fused pass
on every backend: ``fma`` accumulation in model order). ``della`` and
``della_linear`` run fused on the ``cpu`` backend only (each row's rank
probabilities come from a radix sort of that row, per model, when the CPU
kernel's della passes reach it); the triton and cuda backends run their
reference. The other methods (slerp, model_stock, sce) and the ``reference``
backend run the reference. With ``out=``, the same kernels write into the
caller's tensor through the mutating ops ``merge_sign_elect_out_`` and
``merge_linear_out_`` (the allocating ops are those plus an allocation).

Exactness: the kernels are bit-exact against the reference (and each other)
except for ``rescale`` ``"l1"``/``"l2"`` (the default of dare_* and della*):
the reference takes the norms from torch's fp32 reductions, whose order is
not pinned; the CPU kernel sums in double per fixed chunk, the GPU kernels in
double per tile, so their scale factors (and results) agree within a few ulps.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ..reference import merge as ref
from ..reference.merge import METHODS, topk_thresholds
from . import _checks as check
from ._registry import define

__all__ = ["METHODS", "FUSED_METHODS", "GPU_FUSED_METHODS", "merge_tensors", "topk_thresholds"]

FUSED_METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                 "breadcrumbs_ties", "della", "della_linear")
# della's per-row ranks have a CPU kernel only: the triton and cuda backends run its
# reference (see _use_fused). The op passes della's epsilons in the ``gammas`` slot
# (della has no gamma), so the op's schema is the same for every method.
DELLA_METHODS = ("della", "della_linear")
# The methods of the triton and cuda kernels (deltaops::merge_sign_elect on the GPU).
GPU_FUSED_METHODS = tuple(m for m in FUSED_METHODS if m not in DELLA_METHODS)
# "linear" has its own kernel (deltaops::merge_linear): a weighted average, no base.

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}


# ---- thresholds: (key, take) pairs flattened to 4 ints per model -----------------


def _encode_one(threshold) -> tuple[int, int]:
    if isinstance(threshold, int):
        return int(threshold), -1  # keep key >= threshold: every equal key
    key, take = threshold
    return int(key), int(take)


def encode_thresholds(thresholds, kind: Optional[str]) -> list[int]:
    """``thresholds`` (checked) as ``[keep_key, keep_take, drop_key, drop_take] * n``."""
    if thresholds is None:
        return []
    flat: list[int] = []
    for entry in thresholds:
        if entry is None:
            flat += [-1, 0, -1, 0]
        elif kind == "magnitude_outliers":
            drop, keep = entry
            flat += [*_encode_one(keep), *(_encode_one(drop) if drop is not None else (-1, 0))]
        else:
            flat += [*_encode_one(entry), -1, 0]
    return flat


def _decode_one(key: int, take: int):
    return key if take < 0 else (key, take)


def decode_thresholds(flat: list[int], n: int, kind: Optional[str]) -> list:
    if not flat:
        return [None] * n
    out = []
    for i in range(n):
        keep_key, keep_take, drop_key, drop_take = flat[4 * i:4 * i + 4]
        if keep_key < 0:
            out.append(None)
        elif kind == "magnitude_outliers":
            drop = _decode_one(drop_key, drop_take) if drop_key >= 0 else None
            out.append((drop, _decode_one(keep_key, keep_take)))
        else:
            out.append(_decode_one(keep_key, keep_take))
    return out


# ---- the custom op ------------------------------------------------------------------


def _merge_sign_elect(base: Tensor, models: list[Tensor], method: str, weights: list[float],
                      densities: list[float], gammas: list[float], lambda_: float,
                      normalize: bool, rescale: str, sign_method: str, seed: int,
                      thresholds: list[int], out_dtype: str) -> Tensor:
    spec = ref.TASK_ARITHMETIC[method]
    epsilons = list(gammas) if method in DELLA_METHODS else [0.15] * len(models)
    return ref.task_arithmetic_family(
        base, models, spec, weights=list(weights), densities=list(densities),
        gammas=list(gammas), epsilons=epsilons, lambda_=lambda_,
        normalize=normalize, rescale=rescale or None, sign_method=sign_method, seed=seed,
        thresholds=decode_thresholds(list(thresholds), len(models), spec.sparsification),
        out_dtype=_DTYPES[out_dtype])


def _merge_sign_elect_fake(base, models, method, weights, densities, gammas, lambda_, normalize,
                           rescale, sign_method, seed, thresholds, out_dtype):
    return torch.empty(base.shape, dtype=_DTYPES[out_dtype], device=base.device)


def _merge_sign_elect_out_(base: Tensor, models: list[Tensor], method: str, weights: list[float],
                           densities: list[float], gammas: list[float], lambda_: float,
                           normalize: bool, rescale: str, sign_method: str, seed: int,
                           thresholds: list[int], out: Tensor) -> None:
    out.copy_(_merge_sign_elect(base, models, method, weights, densities, gammas, lambda_,
                                normalize, rescale, sign_method, seed, thresholds,
                                _DTYPE_NAMES[out.dtype]))


def _nothing(*args):
    return None


merge_sign_elect_op = define("merge_sign_elect", _merge_sign_elect, _merge_sign_elect_fake)
merge_sign_elect_out_op = define("merge_sign_elect_out_", _merge_sign_elect_out_, _nothing,
                                 mutates_args=("out",))


def _merge_linear(models: list[Tensor], weights: list[float], normalize: bool,
                  out_dtype: str) -> Tensor:
    return ref.linear(models, list(weights), normalize, _DTYPES[out_dtype])


def _merge_linear_fake(models, weights, normalize, out_dtype):
    return torch.empty(models[0].shape, dtype=_DTYPES[out_dtype], device=models[0].device)


def _merge_linear_out_(models: list[Tensor], weights: list[float], normalize: bool,
                       out: Tensor) -> None:
    out.copy_(_merge_linear(models, weights, normalize, _DTYPE_NAMES[out.dtype]))


merge_linear_op = define("merge_linear", _merge_linear, _merge_linear_fake)
merge_linear_out_op = define("merge_linear_out_", _merge_linear_out_, _nothing,
                             mutates_args=("out",))

# The reference backend's table lists deltaops.reference.sparse only: give it these
# ops' references too, so that use_backend("reference") runs them (opcheck does).
for _name, _reference in (("merge_sign_elect", _merge_sign_elect),
                          ("merge_sign_elect_out_", _merge_sign_elect_out_),
                          ("merge_linear", _merge_linear),
                          ("merge_linear_out_", _merge_linear_out_)):
    backends.get("reference").table.setdefault(_name, _reference)


def _use_fused(op: str, method: str = "", base: Optional[Tensor] = None) -> bool:
    """Whether ``merge_tensors`` calls the custom op ``op`` (else the reference directly).

    Every backend but the reference calls it; the op then resolves the backend
    (:func:`deltaops.backends.resolve`): ``auto`` picks ``cpu`` on CPU tensors,
    ``cuda``, then ``triton``, then the reference on CUDA tensors; an explicit
    backend that cannot run here raises ``BackendUnavailableError`` (triton on
    CPU tensors needs ``TRITON_INTERPRET=1``). An explicit, usable backend
    without a kernel for ``op`` runs the reference.

    della and della_linear have a kernel in the CPU backend only: they call the
    op where it resolves to ``cpu`` (``auto`` on CPU tensors, or ``cpu``
    chosen) and run the reference on every other backend. A 0-d tensor has no
    dim 1 to rank along: the reference raises for it.
    """
    choice = backends.selected()
    if choice == "reference":
        return False
    if method in DELLA_METHODS:
        if base is None or base.dim() == 0:
            return False
        return choice == "cpu" or (choice == "auto" and base.device.type == "cpu")
    if choice == "auto":
        return True
    backend = backends.get(choice)
    return not backend.usable or op in backend.table


# ---- public API -----------------------------------------------------------------------


def merge_tensors(base: Tensor, models, method: str, *, weights=None, density=1.0,
                  lambda_: float = 1.0, normalize: Optional[bool] = None, rescale=None,
                  sign_method: str = "sum", gamma=0.01, epsilon=0.15,
                  seed: Optional[int] = None, thresholds=None,
                  out_dtype: Optional[torch.dtype] = None, out: Optional[Tensor] = None) -> Tensor:
    """Merge ``models`` (fine-tunes of ``base``) into one tensor: see
    :func:`deltaops.reference.merge.merge_tensors` (the specification, options,
    errors). The methods in :data:`FUSED_METHODS` and ``linear`` run the fused
    kernel of the selected backend (``cpu``, ``triton`` or ``cuda``; ``auto``
    picks by device).

    ``out``: write the merge there and return it: a contiguous tensor of
    ``base``'s shape and device whose dtype is the output dtype (``out_dtype``
    defaults to it). A loop over a checkpoint reuses one buffer instead of
    faulting in a fresh output per tensor, and ``out=base`` merges in place
    (``out`` may be ``base`` or one of the models, but must not partially
    overlap them). Every check runs before the first write to ``out``.
    """
    given = {"weights": weights, "density": density, "lambda_": lambda_, "normalize": normalize,
             "rescale": rescale, "sign_method": sign_method, "gamma": gamma,
             "epsilon": epsilon, "thresholds": thresholds}
    if out is not None:
        check.tensor("out", out)
        if out_dtype is None:
            out_dtype = out.dtype
    fused = method in FUSED_METHODS or method == "linear"
    op = "merge_linear" if method == "linear" else "merge_sign_elect"
    if out is not None:
        op += "_out_"
    if not fused or not isinstance(base, Tensor) or not _use_fused(op, method, base):
        if out is None:
            return ref.merge_tensors(base, models, method, seed=seed, out_dtype=out_dtype, **given)
        models, out_dtype = ref.check_call(base, models, method, out_dtype, given)
        _check_out(out, base, models, out_dtype)
        return out.copy_(ref.merge_tensors(base, models, method, seed=seed, out_dtype=out_dtype,
                                           **given))
    models, out_dtype = ref.check_call(base, models, method, out_dtype, given)
    if out is not None:
        _check_out(out, base, models, out_dtype)
    n = len(models)
    if base.numel() == 0:
        ref._per_model("weights", weights, n, 1.0)  # still validate
        return out if out is not None else torch.empty(base.shape, dtype=out_dtype,
                                                       device=base.device)
    models = [m.contiguous() for m in models]
    if method == "linear":
        weights, normalize = ref.linear_options(n, weights, normalize)
        weights = [float(w) for w in weights]
        if out is not None:
            merge_linear_out_op(models, weights, normalize, out)
            return out
        return merge_linear_op(models, weights, normalize, _DTYPE_NAMES[out_dtype])
    options = ref.task_arithmetic_options(method, n, seed=seed, **given)
    spec = ref.TASK_ARITHMETIC[method]
    flat = encode_thresholds(None if thresholds is None else options["thresholds"],
                             spec.sparsification)
    rescale, densities = options["rescale"], options["densities"]
    gammas = options["gammas"]
    if method in DELLA_METHODS:
        gammas = options["epsilons"]
        for i, (d, e) in enumerate(zip(densities, gammas)):
            if 0 < d < 1 and not (0 < d - e and d + e < 1):  # as the reference's sparsify_delta
                raise ValueError(f"della: epsilon={e} must leave density +- epsilon inside "
                                 f"(0, 1) (model {i} has density={d})")
    if rescale == "density" and spec.sparsification is not None:
        for i, d in enumerate(densities):
            if d <= 0 and (thresholds is not None and options["thresholds"][i] is not None):
                raise ValueError(f"rescale='density' needs density > 0 (model {i})")
    args = (base.contiguous(), models, method, [float(w) for w in options["weights"]],
            [float(d) for d in densities], [float(g) for g in gammas],
            float(options["lambda_"]), bool(options["normalize"]), rescale or "",
            options["sign_method"], int(options["seed"]), flat)
    if out is not None:
        merge_sign_elect_out_op(*args, out)
        return out
    return merge_sign_elect_op(*args, _DTYPE_NAMES[out_dtype])


def _check_out(out: Tensor, base: Tensor, models: list[Tensor], out_dtype: torch.dtype) -> None:
    """``out`` of a merge: the output dtype, base's shape and device, contiguous, and
    either disjoint from each input or that input itself (elementwise in place)."""
    if out.dtype != out_dtype:
        raise TypeError(f"out has dtype {out.dtype}, but out_dtype is {out_dtype}")
    if out.shape != base.shape or out.device != base.device:
        raise ValueError(f"out must have base's shape and device: expected {tuple(base.shape)} "
                         f"on {base.device}, got {tuple(out.shape)} on {out.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    start, end = out.data_ptr(), out.data_ptr() + out.nbytes
    for name, t in (("base", base), *((f"models[{i}]", m) for i, m in enumerate(models))):
        t_start = t.data_ptr()
        t_end = t_start + t.numel() * t.element_size()
        same = t_start == start and t.is_contiguous() and t.dtype == out.dtype
        if start < t_end and t_start < end and not same:
            raise ValueError(f"out partially overlaps {name}; it may be {name} itself "
                             "(same memory, contiguous, same dtype) or separate from it")
