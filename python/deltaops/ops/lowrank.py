"""Public ops of the low-rank family: LoRA merge / unmerge, low-rank compression
of a delta, multi-LoRA shrink / expand.

Semantics (layouts, rounding points, the error bound) are defined in
:mod:`deltaops.reference.lowrank`; this module checks arguments (raising before
anything is written) and routes to the custom ops ``torch.ops.deltaops.
lora_merge_ / lora_shrink / lora_expand``, whose kernels are chosen by
:mod:`deltaops.backends`. :func:`low_rank` is composed from torch's BLAS and
LAPACK calls (matmul, QR, SVD): no custom kernel, the work is theirs.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..reference import lowrank as ref
from ..reference.philox import check_seed
from . import _checks as check
from ._registry import define
from .sparse import DeltaUndo, _draw_seed, run_in_place

__all__ = ["lora_merge_", "lora_unmerge_", "low_rank", "lora_shrink", "lora_expand"]

# ---- the custom ops ---------------------------------------------------------------


def _lora_merge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float,
                 fan_in_fan_out: bool) -> None:
    ref.lora_merge_(weight, lora_A, lora_B, scale, fan_in_fan_out)


def _lora_shrink(x: Tensor, lora_a_stack: Tensor, token_lora_ids: Tensor, scale: float) -> Tensor:
    return ref.lora_shrink(x, lora_a_stack, token_lora_ids, scale)


def _lora_shrink_fake(x, lora_a_stack, token_lora_ids, scale):
    return x.new_empty((x.shape[0], lora_a_stack.shape[1]), dtype=torch.float32)


def _lora_expand(y: Tensor, intermediate: Tensor, lora_b_stack: Tensor,
                 token_lora_ids: Tensor) -> None:
    ref.lora_expand(y, intermediate, lora_b_stack, token_lora_ids)


def _nothing(*args):
    return None


lora_merge_op = define("lora_merge_", _lora_merge_, _nothing, mutates_args=("weight",))
lora_shrink_op = define("lora_shrink", _lora_shrink, _lora_shrink_fake)
lora_expand_op = define("lora_expand", _lora_expand, _nothing, mutates_args=("y",))

# ---- argument checks ----------------------------------------------------------------


def _matrix(name: str, value, dim: int = 2) -> Tensor:
    check.tensor(name, value)
    if value.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(value.shape)}")
    return value


def check_lora(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale, fan_in_fan_out) -> float:
    """Validate a merge's arguments (nothing is written); returns ``scale`` as a float."""
    _matrix("weight", weight)
    _matrix("lora_A", lora_A)
    _matrix("lora_B", lora_B)
    check.same_device(weight=weight, lora_A=lora_A, lora_B=lora_B)
    if not isinstance(fan_in_fan_out, bool):
        raise TypeError(f"fan_in_fan_out must be a bool, got {type(fan_in_fan_out).__name__}")
    rank, fan_in = lora_A.shape
    fan_out = lora_B.shape[0]
    if lora_B.shape[1] != rank:
        raise ValueError(f"lora_B has shape {tuple(lora_B.shape)}; expected ({fan_out}, {rank}) "
                         f"to match lora_A's rank {rank} (lora_A is [r, in], lora_B [out, r])")
    expected = (fan_in, fan_out) if fan_in_fan_out else (fan_out, fan_in)
    if tuple(weight.shape) != expected:
        layout = "[in, out] (fan_in_fan_out=True)" if fan_in_fan_out else "[out, in]"
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected {expected}, the "
                         f"{layout} layout for lora_A {tuple(lora_A.shape)} and lora_B "
                         f"{tuple(lora_B.shape)}")
    return check.finite_float("scale", scale)


# ---- merge / unmerge ------------------------------------------------------------------


def lora_merge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float = 1.0, *,
                fan_in_fan_out: bool = False, keep_original: bool = False) -> Optional[DeltaUndo]:
    """In place ``weight += scale * lora_B @ lora_A`` in PEFT's layouts.

    ``lora_A``: ``[r, in]``, ``lora_B``: ``[out, r]``, ``weight``: ``[out, in]``
    (``[in, out]`` with ``fan_in_fan_out``, as GPT-2's Conv1D). Any mix of
    float32 / bfloat16 / float16. Per element: ``round(fp32(w) + fp32(scale) *
    acc)`` with ``acc`` the fp32 dot product of B's row and A's column, one
    rounding to ``weight.dtype`` (PEFT rounds twice for bf16/fp16 and
    materialises the whole fp32 product). The CPU kernel keeps the product in
    registers: no scratch of the weight's size. Error bound: see
    :mod:`deltaops.reference.lowrank`.

    ``keep_original=True`` returns a :class:`deltaops.DeltaUndo` (a copy of the
    weight in its own dtype) whose ``revert()`` restores it bit for bit; pass
    it to :func:`lora_unmerge_` as ``undo``. All arguments are checked before
    the weight is touched.
    """
    scale = check_lora(weight, lora_A, lora_B, scale, fan_in_fan_out)
    undo = DeltaUndo(weight, None) if keep_original else None
    with torch.no_grad():
        run_in_place(weight, lambda w: lora_merge_op(w, lora_A, lora_B, scale, fan_in_fan_out))
    return undo


def lora_unmerge_(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float = 1.0, *,
                  fan_in_fan_out: bool = False, undo: Optional[DeltaUndo] = None) -> None:
    """In place ``weight -= scale * lora_B @ lora_A``: the merge with ``-scale``.

    Merge then unmerge does not give the weight back bit for bit in bf16/fp16
    (each step rounds; the README gives the measured drift). With ``undo``
    (from ``lora_merge_(..., keep_original=True)`` on this weight) the saved
    weight is restored instead, exactly.
    """
    scale = check_lora(weight, lora_A, lora_B, scale, fan_in_fan_out)
    if undo is not None:
        if not isinstance(undo, DeltaUndo):
            raise TypeError(f"undo must be a DeltaUndo from lora_merge_(keep_original=True), "
                            f"got {type(undo).__name__}")
        if undo.weight is not weight:
            raise ValueError("undo was made for another weight tensor")
        undo.revert()
        return
    with torch.no_grad():
        run_in_place(weight, lambda w: lora_merge_op(w, lora_A, lora_B, -scale, fan_in_fan_out))


# ---- low-rank compression ---------------------------------------------------------------


def low_rank(delta: Tensor, rank: int, *, method: str = "svd", oversample: int = 8, niter: int = 2,
             seed: Optional[int] = None, dtype: Optional[torch.dtype] = None):
    """Compress a 2-D ``delta`` ``[out, in]`` to a rank-``rank`` :class:`deltaops.LowRankDelta`.

    ``B = U_r diag(S_r)`` ``[out, r]`` and ``A = Vh_r`` ``[r, in]`` (PEFT's
    lora_B / lora_A layout), computed in fp32 and stored in ``dtype`` (default:
    ``delta.dtype``). ``method="svd"``: the truncated SVD (``torch.linalg.svd``),
    the optimal rank-r error (Eckart-Young). ``method="randomized"``: Halko,
    Martinsson & Tropp 2011 (randomized range finder with ``rank +
    oversample`` Gaussian test vectors from ``seed`` and ``niter`` QR-
    orthonormalised power iterations, then the SVD of the small projection):
    far faster, within a few percent of the optimum on decaying spectra.
    ``relative_error`` of the result is the achieved ``||delta - B A||_F /
    ||delta||_F`` of the stored factors.
    """
    from ..formats.lowrank import LowRankDelta

    _matrix("delta", delta)
    check.one_of("method", method, ref.LOW_RANK_METHODS)
    out_dtype = delta.dtype if dtype is None else dtype
    check.one_of("dtype", out_dtype, ref.SUPPORTED_DTYPES)
    limit = min(delta.shape)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(f"rank must be an int in [1, {limit}] for a delta of shape "
                         f"{tuple(delta.shape)}, got {rank!r}")
    for name, value in (("oversample", oversample), ("niter", niter)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if not bool(torch.isfinite(delta).all()):
        raise ValueError("delta contains NaN or inf; a low-rank factorisation needs finite values")
    if method == "svd":
        lora_B, lora_A, _ = ref.low_rank_svd(delta, rank)
    else:
        seed = _draw_seed() if seed is None else check_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        lora_B, lora_A = ref.low_rank_randomized(delta, rank, oversample, niter, generator)
    lora_B, lora_A = lora_B.to(out_dtype).contiguous(), lora_A.to(out_dtype).contiguous()
    error = ref.relative_error(delta, lora_B, lora_A)
    return LowRankDelta(lora_A, lora_B, relative_error=error, method=method)


# ---- multi-LoRA shrink / expand ------------------------------------------------------------


def _check_ids(token_lora_ids, tokens: int, adapters: int) -> Tensor:
    check.tensor("token_lora_ids", token_lora_ids, check.INDEX_DTYPES)
    if token_lora_ids.dim() != 1 or token_lora_ids.shape[0] != tokens:
        raise ValueError(f"token_lora_ids has shape {tuple(token_lora_ids.shape)}; expected "
                         f"({tokens},), one adapter id per token")
    # Value checks read the ids (a device sync): skipped while torch.compile traces, where
    # the kernels' own checks (cpu, cuda) still raise before writing.
    if tokens and not torch.compiler.is_compiling():
        low, high = int(token_lora_ids.min()), int(token_lora_ids.max())
        if low < -1 or high >= adapters:
            bad = low if low < -1 else high
            raise ValueError(f"token_lora_ids holds {bad}, out of range [-1, {adapters}) "
                             f"(-1 means no adapter)")
    return token_lora_ids.contiguous()


def lora_shrink(x: Tensor, lora_a_stack: Tensor, token_lora_ids: Tensor, scale: float = 1.0) -> Tensor:
    """Multi-LoRA shrink: fp32 ``[T, r]`` with row ``t = scale * lora_a_stack[id_t] @ x[t]``.

    ``x``: ``[T, in]``; ``lora_a_stack``: ``[L, r, in]`` (adapter ``l``'s
    lora_A; lower ranks zero-padded); ``token_lora_ids``: int32/int64 ``[T]``
    in ``[-1, L)``, ``-1`` = no adapter (a zero row). fp32 accumulation.
    """
    _matrix("x", x)
    _matrix("lora_a_stack", lora_a_stack, 3)
    check.same_device(x=x, lora_a_stack=lora_a_stack, token_lora_ids=token_lora_ids)
    if lora_a_stack.shape[2] != x.shape[1]:
        raise ValueError(f"lora_a_stack has shape {tuple(lora_a_stack.shape)}; expected "
                         f"(adapters, r, {x.shape[1]}) to match x's {x.shape[1]} features")
    scale = check.finite_float("scale", scale)
    ids = _check_ids(token_lora_ids, x.shape[0], lora_a_stack.shape[0])
    return lora_shrink_op(x.contiguous(), lora_a_stack.contiguous(), ids, scale)


def lora_expand(y: Tensor, intermediate: Tensor, lora_b_stack: Tensor, token_lora_ids: Tensor) -> None:
    """Multi-LoRA expand, in place: ``y[t] += lora_b_stack[id_t] @ intermediate[t]`` for ``id_t >= 0``.

    ``y``: ``[T, out]`` (float32/bfloat16/float16; rounded once per element);
    ``intermediate``: fp32 ``[T, r]`` (from :func:`lora_shrink`);
    ``lora_b_stack``: ``[L, out, r]``. Rows of tokens with id ``-1`` are not
    written. Everything is checked before ``y`` is touched.
    """
    _matrix("y", y)
    check.tensor("intermediate", intermediate, (torch.float32,))
    if intermediate.dim() != 2:
        raise ValueError(f"intermediate must be 2-D, got shape {tuple(intermediate.shape)}")
    _matrix("lora_b_stack", lora_b_stack, 3)
    check.same_device(y=y, intermediate=intermediate, lora_b_stack=lora_b_stack,
                      token_lora_ids=token_lora_ids)
    tokens, features = y.shape
    if lora_b_stack.shape[1] != features:
        raise ValueError(f"lora_b_stack has shape {tuple(lora_b_stack.shape)}; expected "
                         f"(adapters, {features}, r) to match y's {features} features")
    rank = lora_b_stack.shape[2]
    if tuple(intermediate.shape) != (tokens, rank):
        raise ValueError(f"intermediate has shape {tuple(intermediate.shape)}; expected "
                         f"({tokens}, {rank})")
    ids = _check_ids(token_lora_ids, tokens, lora_b_stack.shape[0])
    inter, stack = intermediate.contiguous(), lora_b_stack.contiguous()
    with torch.no_grad():
        run_in_place(y, lambda out: lora_expand_op(out, inter, stack, ids))
