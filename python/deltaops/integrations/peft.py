"""Drop-in replacements for PEFT's merge utilities (``peft.utils.merge_utils``).

PEFT combines adapters in ``LoraModel.add_weighted_adapter`` with five
functions over a list of task tensors (the adapters' A or B matrices, no base):
``task_arithmetic``, ``magnitude_prune``, ``ties``, ``dare_linear`` and
``dare_ties``. The functions here take the same arguments and follow PEFT's
semantics, which differ from mergekit's in ways that matter (source: PEFT
0.21, ``peft/utils/merge_utils.py``):

* pruning (``prune``): ``density >= 1`` keeps the tensor as it is (PEFT warns);
  ``density < 0`` raises. Magnitude pruning keeps ``k = int(density * numel)``
  elements (``torch.topk``); random pruning keeps each element with
  probability ``density`` and, for the DARE methods, divides the kept by it in
  the tensor's dtype.
* sign election (``ties``, ``dare_ties``) runs on the pruned, *unweighted*
  task tensors: ``majority = +1 where sum_i t_i >= 0 else -1`` for
  ``majority_sign_method="total"``, the sum of signs for ``"frequency"``. An
  element agrees when ``sign(t_i) == majority`` (zeros never agree).
* the disjoint merge sums the *weighted* agreeing values and divides by the
  *count* of agreeing models (at least 1), not by their weights.
* results come out in ``promote_types(task dtype, weights dtype)``: fp32 for
  bf16 adapters and PEFT's fp32 ``weights`` tensor.

What deltaops changes, on purpose:

* magnitude pruning uses :func:`deltaops.topk_mask` (histogram selection, no
  sort; among equal magnitudes the lowest flat index wins, where
  ``torch.topk`` picks arbitrarily) and raises on NaN, which ``torch.topk``
  would rank first;
* random pruning uses :func:`deltaops.dare`: Philox draws keyed by ``seed``
  and the model's position, compared against ``fp32(density)`` (PEFT draws
  ``torch.bernoulli`` with the probability rounded to the tensor's dtype).
  Without ``seed`` one is drawn from torch's default generator, so
  ``torch.manual_seed`` makes a run repeatable, as it does for PEFT.
  ``density == 0`` gives zeros where PEFT's ``0 / 0`` gives NaN;

The combining arithmetic is PEFT's own (the same torch ops in the same
dtypes), so given the same keep decisions the results are bit-identical to
PEFT's (tested against the installed PEFT in ``tests/test_peft_integration.py``).
What deltaops speeds up is the selection: ``torch.topk`` over each task
tensor is where PEFT's merges spend their time.

:func:`patch_peft` makes PEFT's ``add_weighted_adapter`` use these functions;
:func:`unpatch_peft` restores PEFT's own.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..ops.sparse import _draw_seed, dare, topk_mask
from ..reference.philox import check_seed

__all__ = ["task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties", "prune",
           "patch_peft", "unpatch_peft", "is_patched"]

MAJORITY_SIGN_METHODS = ("total", "frequency")


# ---- argument checks -------------------------------------------------------------------


def _check_task_tensors(task_tensors) -> list[Tensor]:
    tensors = list(task_tensors) if isinstance(task_tensors, (list, tuple)) else None
    if not tensors:
        raise ValueError("task_tensors must be a non-empty list of tensors")
    first = tensors[0]
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"task_tensors[{i}] must be a floating-point tensor, got "
                            f"{type(t).__name__ if not isinstance(t, Tensor) else t.dtype}")
        if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"task_tensors[{i}] is {tuple(t.shape)} {t.dtype} on {t.device}; "
                             f"expected {tuple(first.shape)} {first.dtype} on {first.device} "
                             f"like task_tensors[0]")
    return tensors


def _check_weights(weights, n: int) -> Tensor:
    """``weights`` as a 1-D tensor of ``n`` values."""
    if not isinstance(weights, Tensor):
        weights = torch.tensor(weights, dtype=torch.float32)
    if weights.dim() != 1 or weights.numel() != n:
        raise ValueError(f"weights must hold one value per task tensor ({n}), got shape "
                         f"{tuple(weights.shape)}")
    if not (weights.is_floating_point() or weights.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"weights must be a real tensor, got {weights.dtype}")
    return weights


def _check_density(density) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"density must be a number, got {type(density).__name__}")
    density = float(density)
    if density != density:
        raise ValueError("density must not be NaN")
    if density < 0:
        raise ValueError(f"Density should be >= 0, got {density}")  # PEFT's message
    return density


# ---- pruning ---------------------------------------------------------------------------------


def prune(tensor: Tensor, density: float, method: str, rescale: bool = False, *,
          seed: Optional[int] = None, stream: int = 0) -> Tensor:
    """PEFT's ``prune``: ``method`` "magnitude" (top-k by |x|) or "random" (DARE)."""
    density = _check_density(density)
    if method not in ("magnitude", "random"):
        raise ValueError(f"Unknown method {method}")
    if density >= 1:
        warnings.warn(f"The density {density} is greater than or equal to 1, no pruning will be "
                      "performed.")
        return tensor
    if method == "magnitude":
        keep = topk_mask(tensor, density)
        return torch.where(keep, tensor, torch.zeros((), dtype=tensor.dtype, device=tensor.device))
    seed = _draw_seed() if seed is None else check_seed(seed)
    return dare(tensor, density, seed=seed, stream=stream, rescale=rescale)


def _pruned(tensors: list[Tensor], density: float, method: str, seed: Optional[int]) -> list[Tensor]:
    if method == "random" and density < 1:  # one seed per call, one Philox stream per model
        seed = _draw_seed() if seed is None else check_seed(seed)
    return [prune(t, density, method, rescale=True, seed=seed, stream=i)
            for i, t in enumerate(tensors)]


# ---- combining -------------------------------------------------------------------------------


def _stacked(tensors: list[Tensor], weights: Tensor) -> tuple[Tensor, Tensor]:
    """The task tensors stacked on dim 0, and ``weights`` shaped to broadcast against them.

    The sums below reduce the stack over dim 0 with torch's own reduction, as
    PEFT does, because torch's summation order over that dim (sequential for
    full vectors, four interleaved accumulators for the tail columns) is what
    makes the results bit-identical to PEFT's; the adapters' matrices are small.
    """
    stacked = torch.stack(tensors, dim=0)
    w = weights.to(stacked.device).view(weights.shape + (1,) * (stacked.dim() - 1))
    return stacked, w


def _weighted_sum(tensors: list[Tensor], weights: Tensor) -> Tensor:
    stacked, w = _stacked(tensors, weights)
    return (stacked * w).sum(dim=0)


def _disjoint_merge(tensors: list[Tensor], weights: Tensor, majority_sign_method: str) -> Tensor:
    """Elect on the unweighted tensors, sum the weighted agreeing values, divide by the count."""
    if majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise RuntimeError(f'Unimplemented mask method "{majority_sign_method}"')  # PEFT's error
    stacked, w = _stacked(tensors, weights)
    signs = stacked.sign()
    votes = (stacked if majority_sign_method == "total" else signs).sum(dim=0)
    agrees = signs == torch.where(votes >= 0, 1, -1)  # zeros never agree
    weighted = stacked * w
    mixed = torch.where(agrees, weighted, torch.zeros((), dtype=weighted.dtype,
                                                      device=weighted.device)).sum(dim=0)
    return mixed / agrees.sum(dim=0).clamp(min=1.0)


def task_arithmetic(task_tensors: Sequence[Tensor], weights) -> Tensor:
    """``sum_i weights[i] * task_tensors[i]`` (PEFT's ``task_arithmetic``)."""
    tensors = _check_task_tensors(task_tensors)
    weights = _check_weights(weights, len(tensors))
    return _weighted_sum(tensors, weights)


def magnitude_prune(task_tensors: Sequence[Tensor], weights, density: float) -> Tensor:
    """Top-``density`` magnitude pruning of each tensor, then the weighted sum."""
    tensors = _check_task_tensors(task_tensors)
    weights = _check_weights(weights, len(tensors))
    density = _check_density(density)
    return _weighted_sum(_pruned(tensors, density, "magnitude", None), weights)


def ties(task_tensors: Sequence[Tensor], weights, density: float,
         majority_sign_method: str = "total") -> Tensor:
    """TIES as PEFT does it: magnitude pruning, sign election on the unweighted
    pruned tensors, then the disjoint mean of the weighted agreeing values."""
    tensors = _check_task_tensors(task_tensors)
    weights = _check_weights(weights, len(tensors))
    density = _check_density(density)
    return _disjoint_merge(_pruned(tensors, density, "magnitude", None), weights,
                           majority_sign_method)


def dare_linear(task_tensors: Sequence[Tensor], weights, density: float, *,
                seed: Optional[int] = None) -> Tensor:
    """DARE drop-and-rescale of each tensor (Philox keyed by ``seed`` and position), then
    the weighted sum."""
    tensors = _check_task_tensors(task_tensors)
    weights = _check_weights(weights, len(tensors))
    density = _check_density(density)
    return _weighted_sum(_pruned(tensors, density, "random", seed), weights)


def dare_ties(task_tensors: Sequence[Tensor], weights, density: float,
              majority_sign_method: str = "total", *, seed: Optional[int] = None) -> Tensor:
    """DARE drop-and-rescale, then PEFT's sign election and disjoint mean."""
    tensors = _check_task_tensors(task_tensors)
    weights = _check_weights(weights, len(tensors))
    density = _check_density(density)
    return _disjoint_merge(_pruned(tensors, density, "random", seed), weights,
                           majority_sign_method)


# ---- patching PEFT -----------------------------------------------------------------------------

# Where PEFT looks the functions up: merge_utils defines them and the LoRA model
# imports them by name, so both namespaces are patched.
_PEFT_MODULES = ("peft.utils.merge_utils", "peft.tuners.lora.model")
_PATCHED_NAMES = ("task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties")
_originals: dict[tuple[str, str], object] = {}


def _extra_patchers():
    """Other deltaops integrations that patch PEFT (LoRA merge and unmerge), when built."""
    try:
        module = importlib.import_module(f"{__package__}.peft_lora")
    except ImportError:
        return []
    return [module]


def patch_peft() -> None:
    """Make PEFT's ``add_weighted_adapter`` combine adapters with deltaops' functions
    (and route LoRA merge/unmerge through deltaops where that integration exists).
    Idempotent; :func:`unpatch_peft` undoes it."""
    ours = globals()
    for module_name in _PEFT_MODULES:
        module = importlib.import_module(module_name)
        for name in _PATCHED_NAMES:
            key = (module_name, name)
            if key not in _originals:
                _originals[key] = getattr(module, name)
            setattr(module, name, ours[name])
    for patcher in _extra_patchers():
        patcher.patch()


def unpatch_peft() -> None:
    """Restore PEFT's own functions."""
    for (module_name, name), original in list(_originals.items()):
        setattr(importlib.import_module(module_name), name, original)
        del _originals[(module_name, name)]
    for patcher in _extra_patchers():
        patcher.unpatch()


def is_patched() -> bool:
    return bool(_originals)
