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
``linear`` goes through ``torch.ops.deltaops.merge_linear`` (one fused pass;
CPU kernel only so far: the triton and cuda backends run its reference). The
other methods (della*, slerp, model_stock, sce) and the ``reference`` backend
run the reference.

Exactness: the kernels are bit-exact against the reference (and each other)
except for ``rescale`` ``"l1"``/``"l2"`` (the default of dare_*): the reference
takes the norms from torch's fp32 reductions, whose order is not pinned; the
CPU kernel sums in double per fixed chunk, the GPU kernels in double per tile,
so their scale factors (and results) agree within a few ulps.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import backends
from ..reference import merge as ref
from ..reference.merge import METHODS, topk_thresholds
from ._registry import define

__all__ = ["METHODS", "FUSED_METHODS", "merge_tensors", "topk_thresholds"]

FUSED_METHODS = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                 "breadcrumbs_ties")
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
    return ref.task_arithmetic_family(
        base, models, spec, weights=list(weights), densities=list(densities),
        gammas=list(gammas), epsilons=[0.15] * len(models), lambda_=lambda_,
        normalize=normalize, rescale=rescale or None, sign_method=sign_method, seed=seed,
        thresholds=decode_thresholds(list(thresholds), len(models), spec.sparsification),
        out_dtype=_DTYPES[out_dtype])


def _merge_sign_elect_fake(base, models, method, weights, densities, gammas, lambda_, normalize,
                           rescale, sign_method, seed, thresholds, out_dtype):
    return torch.empty(base.shape, dtype=_DTYPES[out_dtype], device=base.device)


merge_sign_elect_op = define("merge_sign_elect", _merge_sign_elect, _merge_sign_elect_fake)
# The reference backend's table lists deltaops.reference.sparse only: give it this op's
# reference too, so that use_backend("reference") runs the op (opcheck does).
backends.get("reference").table.setdefault("merge_sign_elect", _merge_sign_elect)


def _merge_linear(models: list[Tensor], weights: list[float], normalize: bool,
                  out_dtype: str) -> Tensor:
    return ref.linear(models, list(weights), normalize, _DTYPES[out_dtype])


def _merge_linear_fake(models, weights, normalize, out_dtype):
    return torch.empty(models[0].shape, dtype=_DTYPES[out_dtype], device=models[0].device)


merge_linear_op = define("merge_linear", _merge_linear, _merge_linear_fake)
backends.get("reference").table.setdefault("merge_linear", _merge_linear)


def _use_fused(op: str) -> bool:
    """Whether ``merge_tensors`` calls the custom op ``op`` (else the reference directly).

    Every backend but the reference calls it; the op then resolves the backend
    (:func:`deltaops.backends.resolve`): ``auto`` picks ``cpu`` on CPU tensors,
    ``cuda``, then ``triton``, then the reference on CUDA tensors; an explicit
    backend that cannot run here raises ``BackendUnavailableError`` (triton on
    CPU tensors needs ``TRITON_INTERPRET=1``). An explicit, usable backend
    without a kernel for ``op`` (merge_linear on triton or cuda) runs the
    reference, as before that kernel existed.
    """
    choice = backends.selected()
    if choice == "reference":
        return False
    if choice == "auto":
        return True
    backend = backends.get(choice)
    return not backend.usable or op in backend.table


# ---- public API -----------------------------------------------------------------------


def merge_tensors(base: Tensor, models, method: str, *, weights=None, density=1.0,
                  lambda_: float = 1.0, normalize: Optional[bool] = None, rescale=None,
                  sign_method: str = "sum", gamma=0.01, epsilon=0.15,
                  seed: Optional[int] = None, thresholds=None,
                  out_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Merge ``models`` (fine-tunes of ``base``) into one tensor: see
    :func:`deltaops.reference.merge.merge_tensors` (the specification, options,
    errors). The methods in :data:`FUSED_METHODS` run the fused kernel of the
    selected backend (``cpu``, ``triton`` or ``cuda``; ``auto`` picks by device)."""
    given = {"weights": weights, "density": density, "lambda_": lambda_, "normalize": normalize,
             "rescale": rescale, "sign_method": sign_method, "gamma": gamma,
             "epsilon": epsilon, "thresholds": thresholds}
    fused = method in FUSED_METHODS or method == "linear"
    op = "merge_linear" if method == "linear" else "merge_sign_elect"
    if not fused or not isinstance(base, Tensor) or not _use_fused(op):
        return ref.merge_tensors(base, models, method, seed=seed, out_dtype=out_dtype, **given)
    models, out_dtype = ref.check_call(base, models, method, out_dtype, given)
    n = len(models)
    if base.numel() == 0:
        ref._per_model("weights", weights, n, 1.0)  # still validate
        return torch.empty(base.shape, dtype=out_dtype, device=base.device)
    if method == "linear":
        weights, normalize = ref.linear_options(n, weights, normalize)
        return merge_linear_op([m.contiguous() for m in models], [float(w) for w in weights],
                               normalize, _DTYPE_NAMES[out_dtype])
    options = ref.task_arithmetic_options(method, n, seed=seed, **given)
    spec = ref.TASK_ARITHMETIC[method]
    flat = encode_thresholds(None if thresholds is None else options["thresholds"],
                             spec.sparsification)
    rescale, densities = options["rescale"], options["densities"]
    if rescale == "density" and spec.sparsification is not None:
        for i, d in enumerate(densities):
            if d <= 0 and (thresholds is not None and options["thresholds"][i] is not None):
                raise ValueError(f"rescale='density' needs density > 0 (model {i})")
    return merge_sign_elect_op(base.contiguous(), [m.contiguous() for m in models], method,
                               [float(w) for w in options["weights"]],
                               [float(d) for d in densities],
                               [float(g) for g in options["gammas"]], float(options["lambda_"]),
                               bool(options["normalize"]), rescale or "",
                               options["sign_method"], int(options["seed"]), flat,
                               _DTYPE_NAMES[out_dtype])
