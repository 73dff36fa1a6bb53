"""Public ops of the sparse-delta family: validate, then call ``torch.ops.deltaops``.

Semantics are defined in :mod:`deltaops.reference.sparse`; this module only
checks arguments (raising before anything is written) and routes to the
custom ops, whose kernels are chosen by :mod:`deltaops.backends`.
"""

from typing import Callable, Optional

import torch
from torch import Tensor

from ..reference import sparse as ref
from ..reference.philox import check_seed
from . import _checks as check
from ._registry import define

# ---- the custom ops ------------------------------------------------------------


def _radix_histogram(x: Tensor, level: int, prefix: int) -> Tensor:
    return ref.radix_histogram(x, level, prefix)


def _radix_histogram_fake(x, level, prefix):
    level1 = x.dtype == torch.float32 and level == 1
    return x.new_empty(ref.HIST_BINS_FP32_LEVEL1 if level1 else ref.HIST_BINS_16BIT, dtype=torch.int64)


def _threshold_mask(x: Tensor, threshold_key: int, take_equal: int) -> Tensor:
    return ref.threshold_mask(x, threshold_key, take_equal)


def _topk_mask(x: Tensor, k: int) -> Tensor:
    return ref.topk_mask(x, k)


def _bool_like(x, *args):
    return torch.empty_like(x, dtype=torch.bool)


def _philox_uniform_like(x: Tensor, seed: int, stream: int) -> Tensor:
    return ref.philox_uniform_like(x, seed, stream)


def _dare(delta: Tensor, density: float, seed: int, stream: int, rescale: bool) -> Tensor:
    return ref.dare(delta, density, seed, stream, rescale)


def _dare_out_(delta: Tensor, density: float, seed: int, stream: int, rescale: bool,
               out: Tensor) -> None:
    ref.dare_out_(delta, density, seed, stream, rescale, out)


def _apply_dense_(weight: Tensor, delta: Tensor, alpha: float) -> None:
    ref.apply_dense_(weight, delta, alpha)


def _apply_coo_(weight: Tensor, indices: Tensor, values: Tensor, alpha: float) -> None:
    ref.apply_coo_(weight, indices, values, alpha)


def _apply_bitmask_(weight: Tensor, packed_mask: Tensor, values: Tensor, alpha: float) -> None:
    ref.apply_bitmask_(weight, packed_mask, values, alpha)


def _nothing(*args):
    return None


radix_histogram_op = define("radix_histogram", _radix_histogram, _radix_histogram_fake)
threshold_mask_op = define("threshold_mask", _threshold_mask, _bool_like)
topk_mask_op = define("topk_mask", _topk_mask, _bool_like)
philox_uniform_like_op = define("philox_uniform_like", _philox_uniform_like,
                                lambda x, seed, stream: torch.empty_like(x, dtype=torch.float32))
dare_op = define("dare", _dare, lambda delta, *args: torch.empty_like(delta))
dare_out_op = define("dare_out_", _dare_out_, _nothing, mutates_args=("out",))
apply_dense_op = define("apply_dense_", _apply_dense_, _nothing, mutates_args=("weight",))
apply_coo_op = define("apply_coo_", _apply_coo_, _nothing, mutates_args=("weight",))
apply_bitmask_op = define("apply_bitmask_", _apply_bitmask_, _nothing, mutates_args=("weight",))

# ---- public API ------------------------------------------------------------------

SPARSIFY_METHODS = ("magnitude", "random", "magnitude_outliers", "della")
RESCALE_MODES = (None, "density", "l1", "l2", "linf")


def magnitude_histogram(x: Tensor, level: int = 0, prefix: int = 0) -> Tensor:
    """Radix histogram of ``|x|``'s bit patterns (int64), see :func:`deltaops.reference.sparse.radix_histogram`.

    Sum the histograms of many tensors (or all-reduce them across processes)
    and :func:`deltaops.selection.threshold_from_histograms` gives the exact
    top-k threshold over all of them.
    """
    check.tensor("x", x)
    if x.dtype == torch.float32:
        check.one_of("level", level, (0, 1))
    else:
        check.one_of("level", level, (0,))
    if not 0 <= prefix < (1 << 15):
        raise ValueError(f"prefix must be in [0, 32768), got {prefix}")
    return radix_histogram_op(x.contiguous(), level, prefix)


def threshold_mask(x: Tensor, threshold_key: int, take_equal: int) -> Tensor:
    """Mask of ``key(x) > threshold_key`` plus the first ``take_equal`` elements equal to it."""
    check.tensor("x", x)
    if threshold_key < 0 or take_equal < 0:
        raise ValueError("threshold_key and take_equal must be non-negative")
    return threshold_mask_op(x.contiguous(), int(threshold_key), int(take_equal))


def topk_mask(x: Tensor, density: Optional[float] = None, *, k: Optional[int] = None) -> Tensor:
    """Boolean mask of the largest ``|x|``: exactly ``k = int(density * x.numel())`` True.

    Among equal magnitudes the lowest flat (row-major) index wins, so the mask
    is the same on every backend. Selection is by radix histogram over the bit
    patterns of ``|x|`` (one pass for bf16/fp16, two for fp32), never a sort.
    Pass ``density`` in [0, 1] or ``k`` directly. NaN in ``x`` raises.

    Shapes: any; dtypes: float32, bfloat16, float16. Returns bool of x's shape.
    """
    check.tensor("x", x)
    if (density is None) == (k is None):
        raise TypeError("topk_mask: pass exactly one of density or k")
    if k is None:
        k = int(check.fraction("density", density) * x.numel())
    elif isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= x.numel():
        raise ValueError(f"k must be an int in [0, {x.numel()}], got {k!r}")
    return topk_mask_op(x.contiguous(), k)


def _stream(stream: int) -> int:
    if isinstance(stream, bool) or not isinstance(stream, int) or not 0 <= stream < 2**32:
        raise ValueError(f"stream must be an int in [0, 2**32), got {stream!r}")
    return stream


def dare(delta: Tensor, density: float, *, seed: int, rescale: bool = True, stream: int = 0,
         out: Optional[Tensor] = None) -> Tensor:
    """DARE: keep each element with probability ``density``, divide the kept by it.

    ``keep_i = u_i < fp32(density)`` with ``u_i`` the Philox4x32-10 uniform of
    flat index ``i`` keyed by ``(seed, stream)``: the same mask on every
    backend and thread count. Kept: ``fp32(d) / fp32(density)`` (or ``d``
    without ``rescale``), rounded to ``delta.dtype``; dropped: ``+0.0``.
    ``out``: write the result there (a contiguous tensor of delta's dtype,
    shape and device; ``delta`` itself is allowed) and return it, so a loop
    over many tensors reuses one buffer instead of faulting in a new one.
    Source: Yu et al. 2024, "Language Models are Super Mario" (DARE); PEFT's
    ``random_pruning`` divides the same way.
    """
    check.tensor("delta", delta)
    density = check.fraction("density", density)
    seed, stream = check_seed(seed), _stream(stream)
    if out is None:
        return dare_op(delta.contiguous(), density, seed, stream, bool(rescale))
    check.tensor("out", out)
    if out.dtype != delta.dtype or out.shape != delta.shape or out.device != delta.device:
        raise ValueError(f"out must match delta: expected {tuple(delta.shape)} {delta.dtype} on "
                         f"{delta.device}, got {tuple(out.shape)} {out.dtype} on {out.device}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    dare_out_op(delta.contiguous(), density, seed, stream, bool(rescale), out)
    return out


def random_uniform_like(x: Tensor, *, seed: int, stream: int = 0) -> Tensor:
    """The fp32 Philox uniforms that :func:`dare` compares against, shaped like ``x``."""
    check.tensor("x", x)
    return philox_uniform_like_op(x.contiguous(), check_seed(seed), _stream(stream))


def _draw_seed() -> int:
    """A seed from torch's default generator, so ``torch.manual_seed`` makes runs repeatable."""
    return int(torch.randint(0, 2**62, ()).item())


def sparsify_with_mask(delta: Tensor, density: float, method: str = "magnitude", *,
                       seed: Optional[int] = None, rescale: Optional[str] = None,
                       gamma: float = 0.01, epsilon: float = 0.15) -> tuple[Tensor, Tensor]:
    """:func:`sparsify` that also returns the boolean keep mask."""
    check.tensor("delta", delta)
    density = check.fraction("density", density)
    gamma = check.fraction("gamma", gamma)
    check.one_of("method", method, SPARSIFY_METHODS)
    check.one_of("rescale", rescale, RESCALE_MODES)
    if method == "della":
        epsilon = check.finite_float("epsilon", epsilon)
        if 0 < density < 1 and not (0 < density - epsilon and density + epsilon < 1):
            raise ValueError(f"epsilon={epsilon} must leave density +- epsilon inside (0, 1) "
                             f"for della (density={density})")
    seed = _draw_seed() if seed is None else check_seed(seed)
    delta = delta.contiguous()
    numel = delta.numel()
    if density >= 1:
        return delta.clone(), torch.ones_like(delta, dtype=torch.bool)
    if density <= 0 or numel == 0:
        return torch.zeros_like(delta), torch.zeros_like(delta, dtype=torch.bool)

    keep_probability: Optional[Tensor] = None
    if method == "magnitude":
        keep = topk_mask_op(delta, ref.magnitude_k(density, numel))
    elif method == "random":
        keep = philox_uniform_like_op(delta, seed, 0) < torch.tensor(density, dtype=torch.float32,
                                                                       device=delta.device)
        if rescale == "density":  # the fused kernel, same keep decisions and division
            return dare_op(delta, density, seed, 0, True), keep
    elif method == "magnitude_outliers":
        n_drop, n_keep = ref.outlier_band(density, gamma, numel)
        keep = topk_mask_op(delta, n_drop + n_keep) & ~topk_mask_op(delta, n_drop)
    else:  # della
        keep_probability = ref.della_keep_probability(delta, density, epsilon)
        keep = philox_uniform_like_op(delta, seed, 0) < keep_probability

    masked = torch.where(keep, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
    if rescale is None:
        return masked, keep
    if rescale == "density":
        divisor = keep_probability if keep_probability is not None else torch.tensor(
            density, dtype=torch.float32, device=delta.device)
        return torch.where(keep, delta.float() / divisor, 0.0).to(delta.dtype), keep
    return ref.rescale_to_norm(delta, masked, rescale), keep


def sparsify(delta: Tensor, density: float, method: str = "magnitude", *,
             seed: Optional[int] = None, rescale: Optional[str] = None,
             gamma: float = 0.01, epsilon: float = 0.15) -> Tensor:
    """Sparsify a delta with mergekit's semantics: see :func:`deltaops.reference.sparse.sparsify`.

    ``method``: ``magnitude`` (top-k by |x|, at least one kept for density >
    0, as mergekit), ``random`` (Philox drops, as :func:`dare`),
    ``magnitude_outliers`` (Model Breadcrumbs: drop the top ``gamma``, keep
    the next ``density``), ``della`` (DELLA's rank-dependent keep probability
    in ``density +- epsilon``). ``rescale``: None, ``"density"`` (divide by
    the keep probability), ``"l1"``/``"l2"``/``"linf"`` (restore that norm,
    mergekit's ``rescale_norm``). ``seed=None`` draws one from torch's
    default generator.
    """
    return sparsify_with_mask(delta, density, method, seed=seed, rescale=rescale,
                              gamma=gamma, epsilon=epsilon)[0]


# ---- applying deltas -----------------------------------------------------------------


def run_in_place(weight: Tensor, kernel: Callable[[Tensor], None]) -> None:
    """Run an in-place kernel that needs a contiguous tensor on ``weight``, whatever its strides."""
    if weight.is_contiguous():
        kernel(weight)
        return
    work = weight.contiguous()
    kernel(work)
    weight.copy_(work)


class DeltaUndo:
    """Exact undo of one :func:`apply_delta_`: saves the touched elements, ``revert()`` restores them.

    ``touched`` is a flat int64 index tensor, or None when the delta touches
    every element (a dense delta); the saved copy is then the whole weight.
    """

    def __init__(self, weight: Tensor, touched: Optional[Tensor]):
        self.weight = weight
        self.touched = touched
        flat = weight.detach().reshape(-1)
        self.saved = flat.clone() if touched is None else flat[touched]
        self.reverted = False

    @property
    def nbytes(self) -> int:
        index_bytes = 0 if self.touched is None else self.touched.numel() * self.touched.element_size()
        return self.saved.numel() * self.saved.element_size() + index_bytes

    def revert(self) -> None:
        """Restore the saved elements bit for bit (once)."""
        if self.reverted:
            raise RuntimeError("DeltaUndo.revert: this undo was already applied")
        saved, touched = self.saved, self.touched

        def restore(w: Tensor) -> None:
            if touched is None:
                w.copy_(saved.reshape(w.shape))
            else:
                w.view(-1)[touched] = saved

        with torch.no_grad():
            run_in_place(self.weight, restore)
        self.reverted = True


def apply_delta_(weight: Tensor, delta, alpha: float = 1.0, *,
                 keep_original: bool = False) -> Optional[DeltaUndo]:
    """In place ``weight += alpha * delta``: one pass, fp32 arithmetic, one rounding.

    ``delta`` is a dense tensor of ``weight``'s shape (any supported float
    dtype) or a delta format object such as :class:`deltaops.SparseDelta`.
    Per element: ``w = round(fp32(w) + fp32(fp32(alpha) * fp32(d)))`` with no
    fused multiply-add, rounded once to ``weight.dtype``. With
    ``keep_original=True`` returns a :class:`DeltaUndo` whose ``revert()``
    restores the touched elements bit for bit. All arguments are checked
    before the weight is touched.
    """
    check.tensor("weight", weight)
    alpha = check.finite_float("alpha", alpha)
    if isinstance(delta, Tensor):
        check.tensor("delta", delta)
        check.same_device(weight=weight, delta=delta)
        check.same_shape("weight", weight, "delta", delta)
        dense = delta.contiguous()
        undo = DeltaUndo(weight, None) if keep_original else None
        with torch.no_grad():
            run_in_place(weight, lambda w: apply_dense_op(w, dense, alpha))
        return undo
    if not hasattr(delta, "apply_into_"):
        raise TypeError(f"delta must be a tensor or a deltaops delta format, got {type(delta).__name__}")
    delta.check_target(weight)
    undo = DeltaUndo(weight, delta.touched_indices()) if keep_original else None
    with torch.no_grad():
        run_in_place(weight, lambda w: delta.apply_into_(w, alpha))
    return undo
