"""Pure-torch reference of the merge family: the specification.

``merge_tensors(base, models, method, ...)`` merges fine-tuned tensors of one
weight into one tensor. Methods and their defaults follow mergekit's per-tensor
merge methods (mergekit 0.1.5, ``mergekit.merge_methods.merge_tensors`` is the
oracle the tests compare against); each method's formula and sources are in its
function below. Every backend is tested against these functions.

Conventions
-----------
* Inputs: ``base`` and ``models[i]`` of one shape, one dtype (float32,
  bfloat16, float16) and one device. ``delta_i = fp32(models[i]) - fp32(base)``.
* Arithmetic is fp32 whatever the input dtype, then one rounding (nearest,
  ties to even) to ``out_dtype`` (default: the input dtype). mergekit computes
  the task-arithmetic family and model_stock in the input dtype (bf16
  arithmetic, a rounding after every op for bf16 inputs); deltaops does not.
  For fp32 inputs the two agree; ``linear`` and ``slerp`` compute in fp32 in
  mergekit too, so they agree for every dtype.
* Sums over the models run in model order, one fp32 rounding per addition
  (:func:`sum_in_order`), so a fused kernel that loops over the models per
  element reproduces them bit for bit. torch's ``sum(dim=0)``, which mergekit
  uses, reassociates from five models on: results then differ from mergekit in
  the last bits (the tests bound it).
* Reductions over the elements of a tensor (the L1 norms of ``rescale``,
  slerp's and model_stock's norms and dot products, sce's mean squares) are
  torch's full reductions, exactly as mergekit computes them; their order is
  not pinned, so backends agree with them within a few ulps.
* Magnitude selection (ties, breadcrumbs, sce) uses deltaops' top-k rule:
  exactly ``k`` kept, among equal magnitudes the lowest flat index wins
  (:func:`deltaops.reference.sparse.topk_mask`); mergekit's sorts break ties
  arbitrarily, so the two agree whenever magnitudes are distinct.
* Random drops (dare_*, della*) use Philox keyed by ``(seed, stream=i, flat
  index)`` for model ``i``: model i keeps element j iff
  ``philox_uniform_like(delta_i, seed, stream=i)[j] < p`` with
  ``p = fp32(density_i)`` (DARE, exactly :func:`deltaops.dare`'s mask) or
  della's per-element probability. Same seed, same result, on every backend.

Per-model values
----------------
``weights``, ``density``, ``gamma`` and ``epsilon`` take a scalar (broadcast)
or one value per model. ``weights=None`` means 1.0 for every model (mergekit
requires an explicit weight).

Precomputed thresholds (``thresholds=``)
---------------------------------------
For the magnitude methods (``ties``, ``breadcrumbs``, ``breadcrumbs_ties``)
``thresholds`` replaces the per-tensor top-k of each model, so a whole-model
top-k (the TIES paper's ``k`` over all of a model's tensors) can be computed
once, e.g. from summed :func:`deltaops.magnitude_histogram` s, and passed to
every tensor's merge. It is a sequence with one entry per model; an entry is
``None`` (select per tensor from ``density_i`` as mergekit does) or, with keys
as in :func:`deltaops.reference.sparse.magnitude_keys` of the fp32 delta:

* ``ties``: a threshold, either ``(threshold_key, take_equal)`` -- keep
  ``key > threshold_key`` plus the first ``take_equal`` elements (flat order)
  with ``key == threshold_key``, :func:`deltaops.reference.sparse.threshold_mask`
  -- or a bare int ``threshold_key``, meaning keep ``key >= threshold_key``.
* ``breadcrumbs*``: a pair ``(drop, keep)`` of such thresholds (``drop`` may be
  ``None``): keep what ``keep`` selects and ``drop`` does not, i.e. the top
  ``n_drop + n_keep`` minus the top ``n_drop`` outliers.

With a threshold, ``density_i`` no longer selects (its ``>= 1`` / ``<= 0``
short cuts do not apply); ``rescale`` still does. :func:`topk_thresholds`
turns a k over many tensors into one ``(threshold_key, take_equal)`` per tensor,
with the lowest-index rule extended across tensors in the order given.

Method options (``None`` takes mergekit's default for the method)
-----------------------------------------------------------------
=================  =========  =======  ========================================
method             normalize  rescale  other options
=================  =========  =======  ========================================
linear             True       --       weights
task_arithmetic    False      --       weights, lambda_
ties               True       False    weights, density, lambda_, sign_method, thresholds
dare_ties          False      True     weights, density, lambda_, sign_method, seed
dare_linear        False      True     weights, density, lambda_, seed
breadcrumbs        False      False    weights, density, gamma, lambda_, thresholds
breadcrumbs_ties   False      False    as breadcrumbs, plus sign_method
della              True       True     weights, density, epsilon, lambda_, sign_method, seed
della_linear       False      True     weights, density, epsilon, lambda_, seed
slerp              --         --       weights = t (one model)
model_stock        --         --       (two or more models)
sce                --         --       density = select_topk
=================  =========  =======  ========================================

An option a method does not use raises ``ValueError`` when set to anything but
its default (``seed`` is ignored by deterministic methods).
``rescale``: ``True`` is mergekit's ``rescale`` (``"l1"``: scale each
sparsified delta back to its L1 norm -- mergekit's rescale for DARE and DELLA,
*not* the papers' division by the keep probability); ``"l2"``, ``"linf"``
restore those norms; ``"density"`` divides each kept value by its keep
probability (the DARE and DELLA papers; :func:`deltaops.dare`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from .philox import check_seed
from .sparse import (
    SUPPORTED_DTYPES,
    della_keep_probability,
    magnitude_k,
    magnitude_keys,
    outlier_band,
    philox_uniform_like,
    rescale_to_norm,
    threshold_mask,
    topk_mask,
)

F32 = torch.float32

# A threshold key above every magnitude key: a threshold that keeps nothing.
KEY_NONE = 1 << 32


@dataclass(frozen=True)
class TaskArithmeticSpec:
    """One member of mergekit's ``GeneralizedTaskArithmeticMerge`` family."""

    sparsification: Optional[str]  # None, "magnitude", "random", "magnitude_outliers", "della"
    consensus: bool                # TIES sign election
    normalize: bool                # default of ``normalize``
    rescale: bool                  # default of ``rescale``


# mergekit/merge_methods/registry.py
TASK_ARITHMETIC = {
    "task_arithmetic": TaskArithmeticSpec(None, False, False, False),
    "ties": TaskArithmeticSpec("magnitude", True, True, False),
    "dare_ties": TaskArithmeticSpec("random", True, False, True),
    "dare_linear": TaskArithmeticSpec("random", False, False, True),
    "breadcrumbs": TaskArithmeticSpec("magnitude_outliers", False, False, False),
    "breadcrumbs_ties": TaskArithmeticSpec("magnitude_outliers", True, False, False),
    "della": TaskArithmeticSpec("della", True, True, True),
    "della_linear": TaskArithmeticSpec("della", False, False, True),
}
METHODS = ("linear", *TASK_ARITHMETIC, "slerp", "model_stock", "sce")
RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear")
THRESHOLD_METHODS = ("ties", "breadcrumbs", "breadcrumbs_ties")
SIGN_METHODS = ("sum", "count")
RESCALE_MODES = ("l1", "l2", "linf", "density")

# Options each method uses (beyond base and models); see the module docstring.
_OPTIONS = {
    "linear": {"weights", "normalize"},
    "task_arithmetic": {"weights", "lambda_", "normalize"},
    "slerp": {"weights"},
    "model_stock": set(),
    "sce": {"density"},
}
for _name, _spec in TASK_ARITHMETIC.items():
    if _spec.sparsification is not None:
        _OPTIONS[_name] = {"weights", "density", "lambda_", "normalize", "rescale"}
        _OPTIONS[_name] |= {"sign_method"} if _spec.consensus else set()
        _OPTIONS[_name] |= {"gamma"} if _spec.sparsification == "magnitude_outliers" else set()
        _OPTIONS[_name] |= {"epsilon"} if _spec.sparsification == "della" else set()
        _OPTIONS[_name] |= {"thresholds"} if _name in THRESHOLD_METHODS else set()
del _name, _spec

_DEFAULTS = {"weights": None, "density": 1.0, "lambda_": 1.0, "normalize": None, "rescale": None,
             "sign_method": "sum", "gamma": 0.01, "epsilon": 0.15, "thresholds": None}


# ---- the entry point -------------------------------------------------------------


def merge_tensors(base: torch.Tensor, models: Sequence[torch.Tensor], method: str, *,
                  weights=None, density=1.0, lambda_: float = 1.0,
                  normalize: Optional[bool] = None, rescale=None, sign_method: str = "sum",
                  gamma=0.01, epsilon=0.15, seed: Optional[int] = None, thresholds=None,
                  out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Merge ``models`` (fine-tunes of ``base``) into one tensor of ``base``'s shape.

    ``method`` is one of :data:`METHODS`; the options each method takes, their
    defaults and the meaning of ``thresholds`` are in this module's docstring.
    ``seed=None`` draws a seed from torch's default generator (random methods
    only). Returns a new tensor of ``out_dtype`` (default: the input dtype).
    Raises ``TypeError`` for wrong types and dtypes, ``ValueError`` for wrong
    shapes, devices, values, and options the method does not use.
    """
    given = {"weights": weights, "density": density, "lambda_": lambda_, "normalize": normalize,
             "rescale": rescale, "sign_method": sign_method, "gamma": gamma,
             "epsilon": epsilon, "thresholds": thresholds}
    models, out_dtype = check_call(base, models, method, out_dtype, given)
    n = len(models)
    if base.numel() == 0:
        _per_model("weights", weights, n, 1.0)  # still validate
        return torch.empty(base.shape, dtype=out_dtype, device=base.device)

    if method == "linear":
        return linear(models, *linear_options(n, weights, normalize), out_dtype)
    if method == "slerp":
        if n != 1:
            raise ValueError(f"slerp merges exactly one model into the base; got {n} models")
        if weights is None:
            raise ValueError("slerp needs the interpolation factor t as weights=t")
        (t,) = _per_model("weights", weights, 1, None)
        return slerp(base, models[0], t, out_dtype)
    if method == "model_stock":
        if n < 2:
            raise ValueError(f"model_stock needs at least two models; got {n}")
        return model_stock(base, models, out_dtype)
    if method == "sce":
        return sce(base, models, _fraction("density", density), out_dtype)

    options = task_arithmetic_options(method, n, seed=seed, **given)
    return task_arithmetic_family(base, models, TASK_ARITHMETIC[method], out_dtype=out_dtype,
                                  **options)


def check_call(base, models, method: str, out_dtype, given: dict) -> tuple[list, torch.dtype]:
    """The checks every method shares: tensors, method, out_dtype, and no unused option.

    Returns the models as a list and the output dtype (default: the input's).
    """
    models = _check_tensors(base, models)
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    if out_dtype is None:
        out_dtype = base.dtype
    elif out_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"out_dtype must be one of {_dtype_names(SUPPORTED_DTYPES)}; "
                        f"got {out_dtype}")
    for name, value in given.items():
        if name not in _OPTIONS[method] and not _is_default(name, value):
            raise ValueError(f"{method} does not use {name} (got {value!r}); it takes "
                             f"{', '.join(sorted(_OPTIONS[method])) or 'no options'}")
    return models, out_dtype


def task_arithmetic_options(method: str, n: int, *, weights, density, lambda_, normalize,
                            rescale, sign_method, gamma, epsilon, seed, thresholds) -> dict:
    """Checked, per-model options of a task-arithmetic-family method for ``n`` models.

    Applies the method's defaults (``normalize``, ``rescale``; ``True`` means
    ``"l1"``), draws a seed for random methods when ``seed`` is None, and
    returns the keyword arguments of :func:`task_arithmetic_family`.
    """
    spec = TASK_ARITHMETIC[method]
    if rescale is None:
        rescale = spec.rescale
    if rescale is True:
        rescale = "l1"
    elif rescale is False:
        rescale = None
    elif rescale not in RESCALE_MODES:
        raise ValueError(f"rescale must be None, a bool or one of {', '.join(RESCALE_MODES)}; "
                         f"got {rescale!r}")
    if sign_method not in SIGN_METHODS:
        raise ValueError(f"sign_method must be 'sum' or 'count'; got {sign_method!r}")
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item()) if method in RANDOM_METHODS else 0
    return dict(
        weights=_per_model("weights", weights, n, 1.0),
        densities=_per_model_fractions("density", density, n),
        gammas=_per_model_fractions("gamma", gamma, n),
        epsilons=_per_model("epsilon", epsilon, n, 0.15),
        lambda_=_finite("lambda_", lambda_),
        normalize=spec.normalize if normalize is None else _bool("normalize", normalize),
        rescale=rescale, sign_method=sign_method, seed=check_seed(seed),
        thresholds=_check_thresholds(thresholds, n, spec.sparsification))


# ---- the methods -----------------------------------------------------------------


def sum_in_order(terms: Sequence[torch.Tensor]) -> torch.Tensor:
    """``((t_0 + t_1) + t_2) + ...``: fp32, one rounding per addition, model order."""
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def linear_options(n: int, weights, normalize) -> tuple[list[float], bool]:
    """``linear``'s weights (one per model, default 1) and ``normalize`` (default True),
    checked: a zero weight sum cannot normalize."""
    weights = _per_model("weights", weights, n, 1.0)
    normalize = True if normalize is None else _bool("normalize", normalize)
    if normalize and float(torch.tensor(weights, dtype=F32).sum()) == 0:
        raise ValueError(f"linear: normalize=True divides by the sum of the weights, "
                         f"which is 0 for weights={weights}")
    return weights, normalize


def linear(models: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool,
           out_dtype: torch.dtype) -> torch.Tensor:
    """Weighted average of the models (the base is not used).

    ``acc = 0; acc = fma(fp32(m_i), fp32(w_i), acc)`` for i in model order (a
    fused multiply-add, one rounding per model: mergekit's ``addcmul_``);
    with ``normalize``, ``acc / fp32(sum_i w_i)`` (the weights summed in fp32).
    Source: Wortsman et al. 2022, "Model soups" (arXiv:2203.05482); mergekit
    ``linear_merge`` (merge_methods/linear.py).

    mergekit divides by zero (inf/NaN) when ``normalize`` meets weights
    summing to zero; :func:`merge_tensors` raises ``ValueError`` instead.
    """
    w = torch.tensor(weights, dtype=F32, device=models[0].device)
    acc = torch.zeros(models[0].shape, dtype=F32, device=models[0].device)
    for model, weight in zip(models, w.unbind(0)):
        acc = torch.addcmul(acc, model.float(), weight)
    if normalize:
        acc = acc / w.sum()
    return acc.to(out_dtype)


def elect_signs(weighted: Sequence[torch.Tensor], sign_method: str) -> list[torch.Tensor]:
    """TIES sign election: the per-model masks of deltas that agree with the elected sign.

    ``"sum"`` elects ``+1`` where ``sum_i w_i d_i >= 0`` (in model order) and
    ``-1`` elsewhere (TIES' "mass"); ``"count"`` elects by ``sum_i sign(w_i d_i)
    >= 0``. A zero sum elects ``+1``. Model i is kept where
    ``sign(w_i d_i) == elected``, so zero deltas are never kept and never
    count in the normalizing divisor. Source: mergekit ``get_mask``
    (merge_methods/generalized_task_arithmetic.py).
    """
    signs = [x.sign() for x in weighted]
    votes = sum_in_order(weighted if sign_method == "sum" else signs)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(F32)
    return [s == elected for s in signs]


def sparsify_delta(delta: torch.Tensor, index: int, kind: str, density: float, *,
                   gamma: float, epsilon: float, rescale: Optional[str], seed: int,
                   threshold=None) -> torch.Tensor:
    """mergekit's ``sparsify`` of model ``index``'s fp32 delta, deltaops' selections.

    * ``magnitude``: keep the ``magnitude_k(density, n)`` largest ``|d|``
      (mergekit ``magnitude``: at least one for density > 0).
    * ``magnitude_outliers`` (Model Breadcrumbs): drop the top ``int(gamma n)``,
      keep the next ``int(density n)`` (:func:`..sparse.outlier_band`).
    * ``random`` (DARE): keep iff ``philox(seed, stream=index) < fp32(density)``
      (mergekit ``bernoulli``).
    * ``della`` (MAGPRUNE): keep iff ``philox(seed, stream=index) < p`` with
      the per-row rank probabilities of :func:`..sparse.della_keep_probability`
      (mergekit ``della_magprune``; a row of one element gets ``density``
      where mergekit fails on a 0/0 rank).

    Without a threshold, ``density >= 1`` returns ``delta`` untouched (no
    rescale) and ``density <= 0`` returns zeros, as mergekit does. The kept
    values are ``delta * keep``; ``rescale`` then restores a norm
    (:func:`..sparse.rescale_to_norm`: ``masked * (|d| / |masked|)``, skipped
    when either norm is below 1e-7) or, for ``"density"``, divides each kept
    value by its keep probability.
    """
    if threshold is None:
        if density >= 1:
            return delta
        if density <= 0:
            return torch.zeros_like(delta)
    probability = None
    if kind == "magnitude":
        keep = (topk_mask(delta, magnitude_k(density, delta.numel())) if threshold is None
                else _threshold_select(delta, threshold))
    elif kind == "magnitude_outliers":
        if threshold is None:
            n_drop, n_keep = outlier_band(density, gamma, delta.numel())
            keep = topk_mask(delta, n_drop + n_keep) & ~topk_mask(delta, n_drop)
        else:
            drop, kept = threshold
            keep = _threshold_select(delta, kept)
            if drop is not None:
                keep &= ~_threshold_select(delta, drop)
    elif kind == "random":
        probability = torch.tensor(density, dtype=F32, device=delta.device)
        keep = philox_uniform_like(delta, seed, index) < probability
    elif kind == "della":
        if not (0 < density - epsilon and density + epsilon < 1):
            raise ValueError(f"della: epsilon={epsilon} must leave density +- epsilon inside "
                             f"(0, 1) (model {index} has density={density})")
        probability = della_keep_probability(delta, density, epsilon)
        keep = philox_uniform_like(delta, seed, index) < probability
    else:
        raise ValueError(f"unknown sparsification {kind!r}")

    masked = delta * keep
    if rescale is None:
        return masked
    if rescale == "density":
        if probability is None:
            if density <= 0:
                raise ValueError(f"rescale='density' needs density > 0 (model {index})")
            probability = torch.tensor(density, dtype=F32, device=delta.device)
        return torch.where(keep, delta / probability, 0.0)
    return rescale_to_norm(delta, masked, rescale)


def task_arithmetic_family(base, models, spec: TaskArithmeticSpec, *, weights, densities, gammas,
                           epsilons, lambda_, normalize, rescale, sign_method, seed, thresholds,
                           out_dtype) -> torch.Tensor:
    """mergekit's ``GeneralizedTaskArithmeticMerge.merge_group``, fp32 throughout.

    ::

        d_i     = sparsify(fp32(m_i) - fp32(base))          (per model, in model order)
        x_i     = fp32(w_i) * d_i
        keep_i  = sign(x_i) == elected sign                 (consensus methods only)
        mixed   = sum_i keep_i * x_i                        (model order)
        divisor = sum_i keep_i * fp32(w_i), 0 -> 1          (consensus)
                  sum_i fp32(w_i), |.| < 1e-8 -> 1          (otherwise)
        mixed   = mixed / divisor   if normalize
        mixed   = mixed * fp32(lambda_)
        out     = round(fp32(base) + mixed)

    Methods and sources: task_arithmetic (Ilharco et al. 2023, "Editing
    Models with Task Arithmetic", arXiv:2212.04089); ties (Yadav et al. 2023,
    "TIES-Merging", arXiv:2306.01708: trim by magnitude, elect sign, disjoint
    mean); dare_ties / dare_linear (Yu et al. 2024, "Language Models are Super
    Mario", arXiv:2311.03099); breadcrumbs / breadcrumbs_ties (Davari &
    Belilovsky 2024, "Model Breadcrumbs", arXiv:2312.06795); della /
    della_linear (Deep et al. 2024, "DELLA-Merging", arXiv:2406.11617).
    mergekit: merge_methods/generalized_task_arithmetic.py, registry.py,
    sparsify.py.

    mergekit quirks kept: the sign is elected on the *weighted* sparsified
    deltas; the TIES divisor sums the weights of the agreeing models per
    element (a disjoint weighted mean), and elements where none agrees keep the
    base; ``normalize`` divides before ``lambda_`` scales; ``rescale`` is an L1
    norm rescale, not DARE's ``1 / density``; ``int8_mask`` only changes a
    temporary's dtype and is not an option here.
    """
    b = base.float()
    deltas = []
    for i, model in enumerate(models):
        delta = model.float() - b
        if spec.sparsification is not None:
            delta = sparsify_delta(delta, i, spec.sparsification, densities[i], gamma=gammas[i],
                                   epsilon=epsilons[i], rescale=rescale, seed=seed,
                                   threshold=thresholds[i])
        deltas.append(delta)
    w = [torch.tensor(weight, dtype=F32, device=base.device) for weight in weights]
    weighted = [delta * weight for delta, weight in zip(deltas, w)]
    if spec.consensus:
        keep = elect_signs(weighted, sign_method)
        mixed = sum_in_order([x * k for x, k in zip(weighted, keep)])
        if normalize:
            divisor = sum_in_order([weight * k for weight, k in zip(w, keep)])
            mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed = sum_in_order(weighted)
        if normalize:
            divisor = sum_in_order(w)
            mixed = mixed / torch.where(divisor.abs() < 1e-8, 1.0, divisor)
    if lambda_ != 1:
        mixed = mixed * torch.tensor(lambda_, dtype=F32, device=base.device)
    return (b + mixed).to(out_dtype)


def slerp(base: torch.Tensor, model: torch.Tensor, t: float, out_dtype: torch.dtype,
          dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation from ``base`` (t = 0) to ``model`` (t = 1), whole tensor.

    The tensors are flattened to one vector each (fp32): ``a``, ``b``;
    ``dot = clamp(sum((a / |a|) * (b / |b|)), -1, 1)`` (norms below 1e-8
    replaced by 1); if ``|dot| > 0.9995`` linear interpolation
    ``(1 - t) a + t b``, else with ``theta = acos(dot)``:
    ``sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b``.
    Source: Shoemake 1985, "Animating rotation with quaternion curves";
    mergekit ``slerp`` (merge_methods/slerp.py), which computes the norms and
    the dot product in 1M-element chunks (the same value up to the order of
    the sums; equal bit for bit below 1M elements).
    """
    a = base.float().reshape(1, -1)
    b = model.float().reshape(1, -1)
    t32 = torch.tensor([[t]], dtype=F32, device=base.device)
    norm_a = torch.linalg.vector_norm(a, dim=1, keepdim=True)
    norm_b = torch.linalg.vector_norm(b, dim=1, keepdim=True)
    norm_a = torch.where(norm_a > eps, norm_a, 1)
    norm_b = torch.where(norm_b > eps, norm_b, 1)
    dot = ((a / norm_a) * (b / norm_b)).sum(dim=1, keepdim=True).clamp(-1, 1)
    linear_branch = dot.abs() > dot_threshold
    theta = torch.acos(torch.where(linear_branch, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear_branch, 1 - t32, torch.sin((1 - t32) * theta) / sin_theta)
    coef_b = torch.where(linear_branch, t32, torch.sin(t32 * theta) / sin_theta)
    return (coef_a * a + coef_b * b).reshape(base.shape).to(out_dtype)


def model_stock(base: torch.Tensor, models: Sequence[torch.Tensor],
                out_dtype: torch.dtype) -> torch.Tensor:
    """Model Stock (Jang et al. 2024, arXiv:2403.19522), whole tensor (mergekit's default).

    ``cos`` = mean over model pairs of ``clamp(<d_i, d_j> / max(|d_i| |d_j|,
    1e-6), -1, 1)``; ``t = N cos / (1 + (N - 1) cos)`` (``t = 0``, i.e. the
    base, where ``|1 + (N - 1) cos| < 1e-6``); ``out = t * mean_i(m_i) + (1 - t)
    * base`` with the mean summed in model order then divided by N. Source:
    mergekit ``model_stock_merge_method`` (merge_methods/model_stock.py) with
    ``filter_wise=False`` (its per-row variant is not offered).
    """
    w0 = base.float().reshape(-1)
    ws = [model.float().reshape(-1) for model in models]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, da in enumerate(offsets):
        for db in offsets[i + 1:]:
            norm_product = torch.norm(da, dim=-1) * torch.norm(db, dim=-1)
            cosines.append(((da * db).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, (count * cos) / torch.where(singular, 1.0, denominator))
    average = sum_in_order(ws) / count
    return (t * average + (1 - t) * w0).reshape(base.shape).to(out_dtype)


def sce(base: torch.Tensor, models: Sequence[torch.Tensor], select_topk: float,
        out_dtype: torch.dtype) -> torch.Tensor:
    """SCE: select, calculate, erase (Wan et al. 2024, "FuseChat", arXiv:2408.07990).

    ``d_i = m_i - base``. Select: for ``0 < select_topk < 1`` keep the
    ``k = int(fp32(count_nonzero(var)) * fp32(select_topk))`` elements of
    largest ``var_i(d_i)`` (population variance over the models; deltaops'
    top-k tie rule); ``select_topk <= 0`` keeps none. Calculate:
    ``c_i = mean(d_i^2)`` over the elements, ``c_i /= sum_i c_i`` (uniform
    ``1/N`` when that sum is below 1e-6). Erase: TIES' "sum" sign election on
    the unweighted selected deltas. ``out = base + sum_i c_i keep_i d_i /
    max(sum_i c_i keep_i, 1e-6)``. Source: mergekit ``sce_merge``
    (merge_methods/sce.py), whose k is a fraction of the *nonzero* variances,
    rounded in fp32 (``int(tensor * float)``).
    """
    b = base.float()
    deltas = [model.float() - b for model in models]
    if select_topk < 1:
        if select_topk <= 0:
            mask = torch.zeros(b.shape, dtype=torch.bool, device=b.device)
        else:
            var = torch.var(torch.stack(deltas), dim=0, unbiased=False)
            nonzero = torch.count_nonzero(var).to(F32)
            k = int(nonzero * torch.tensor(select_topk, dtype=F32))
            mask = topk_mask(var, k)
        deltas = [delta * mask for delta in deltas]
    keep = elect_signs(deltas, "sum")
    squares = torch.stack([delta.square().reshape(-1) for delta in deltas]).mean(dim=1)
    total = torch.sum(squares).item()
    if abs(total) < 1e-6:
        coefficients = torch.ones_like(squares) / squares.shape[0]
    else:
        coefficients = squares / total
    erased = [c * k for c, k in zip(coefficients.unbind(0), keep)]
    merged = sum_in_order([delta * e for delta, e in zip(deltas, erased)])
    return (b + merged / sum_in_order(erased).clamp(min=1e-6)).to(out_dtype)


# ---- thresholds over many tensors -----------------------------------------------------


def topk_thresholds(tensors: Sequence[torch.Tensor], k: int) -> list[tuple[int, int]]:
    """Split one top-k over several tensors into a ``(threshold_key, take_equal)`` per tensor.

    The ``k`` largest magnitudes over all ``tensors`` together, ties going to
    the earlier tensor, then the lower flat index: exactly what
    :func:`deltaops.reference.sparse.topk_mask` would keep on their
    concatenation. Pass each model's pairs as ``thresholds`` to the merges of
    its tensors: for ``ties`` with ``k = magnitude_k(density, total_numel)``
    (the TIES paper's whole-model trim); for ``breadcrumbs*`` as
    ``(drop, keep)`` from ``outlier_band(density, gamma, total_numel)``:
    ``drop = topk_thresholds(ts, n_drop)``, ``keep = topk_thresholds(ts,
    n_drop + n_keep)``. The keys are those of the fp32 deltas merge_tensors
    computes (``fp32(m) - fp32(base)``).

    Kernels reach the same pairs without a sort: the summed radix histograms
    give ``(T, take_equal_total)`` (:mod:`deltaops.selection`), then
    ``take_equal`` is dealt to the tensors in order, each taking at most its
    own count of keys equal to ``T``.
    """
    total = sum(t.numel() for t in tensors)
    if not 0 <= k <= total:
        raise ValueError(f"k must be in [0, {total}], got {k}")
    if k == 0:
        return [(KEY_NONE, 0) for _ in tensors]
    keys = torch.cat([magnitude_keys(t) for t in tensors])
    threshold = int(torch.sort(keys, descending=True).values[k - 1])
    left = k - int((keys > threshold).sum())
    pairs = []
    for t in tensors:
        equal = int((magnitude_keys(t) == threshold).sum())
        pairs.append((threshold, min(left, equal)))
        left -= pairs[-1][1]
    return pairs


def _threshold_select(delta: torch.Tensor, threshold) -> torch.Tensor:
    if isinstance(threshold, int):
        return magnitude_keys(delta).reshape(delta.shape) >= threshold
    key, take_equal = threshold
    return threshold_mask(delta, key, take_equal)


# ---- argument checks -------------------------------------------------------------------


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _check_tensors(base, models) -> list[torch.Tensor]:
    if not isinstance(base, torch.Tensor):
        raise TypeError(f"base must be a torch.Tensor, got {type(base).__name__}")
    if base.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"base has dtype {str(base.dtype).replace('torch.', '')}; "
                        f"expected one of {_dtype_names(SUPPORTED_DTYPES)}")
    if isinstance(models, torch.Tensor) or not isinstance(models, Sequence):
        raise TypeError(f"models must be a list or tuple of tensors, got {type(models).__name__}")
    if len(models) == 0:
        raise ValueError("models must hold at least one tensor")
    for i, model in enumerate(models):
        if not isinstance(model, torch.Tensor):
            raise TypeError(f"models[{i}] must be a torch.Tensor, got {type(model).__name__}")
        if model.dtype != base.dtype:
            raise TypeError(f"models[{i}] has dtype {str(model.dtype).replace('torch.', '')}, "
                            f"base has {str(base.dtype).replace('torch.', '')}; "
                            f"cast them to one dtype")
        if model.shape != base.shape:
            raise ValueError(f"models[{i}] has shape {tuple(model.shape)}, expected base's "
                             f"shape {tuple(base.shape)}")
        if model.device != base.device:
            raise ValueError(f"models[{i}] is on {model.device}, base on {base.device}")
    return list(models)


def _is_default(name: str, value) -> bool:
    default = _DEFAULTS[name]
    if default is None:
        return value is None
    return type(value) in (int, float, str) and value == default


def _number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def _finite(name: str, value) -> float:
    value = _number(name, value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _fraction(name: str, value) -> float:
    value = _number(name, value)
    if not 0.0 <= value <= 1.0:  # NaN fails too
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def _bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool or None, got {type(value).__name__}")
    return value


def _per_model(name: str, value, n: int, default) -> list:
    """A scalar broadcast to ``n`` models, or a sequence of ``n`` finite floats."""
    if value is None:
        return [default] * n
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values for {n} models")
        return [_finite(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return [_finite(name, value)] * n


def _per_model_fractions(name: str, value, n: int) -> list[float]:
    values = _per_model(name, value, n, None)
    if isinstance(value, (list, tuple)):
        return [_fraction(f"{name}[{i}]", v) for i, v in enumerate(values)]
    return [_fraction(name, v) for v in values]


def _check_threshold(where: str, threshold) -> None:
    if isinstance(threshold, bool):
        raise TypeError(f"{where} must be an int key or a (key, take_equal) pair, got bool")
    if isinstance(threshold, int):
        if threshold < 0:
            raise ValueError(f"{where}: threshold key must be >= 0, got {threshold}")
        return
    if not (isinstance(threshold, (tuple, list)) and len(threshold) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in threshold)):
        raise TypeError(f"{where} must be an int key or a (key, take_equal) pair of ints, "
                        f"got {threshold!r}")
    if threshold[0] < 0 or threshold[1] < 0:
        raise ValueError(f"{where}: key and take_equal must be >= 0, got {tuple(threshold)}")


def _check_thresholds(thresholds, n: int, kind: Optional[str]) -> list:
    if thresholds is None:
        return [None] * n
    if not isinstance(thresholds, (list, tuple)):
        raise TypeError(f"thresholds must be a list or tuple with one entry per model, "
                        f"got {type(thresholds).__name__}")
    if len(thresholds) != n:
        raise ValueError(f"thresholds has {len(thresholds)} entries for {n} models")
    for i, entry in enumerate(thresholds):
        if entry is None:
            continue
        if kind == "magnitude_outliers":
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
                raise TypeError(f"thresholds[{i}] must be a (drop, keep) pair of thresholds "
                                f"for breadcrumbs, got {entry!r}")
            if entry[0] is not None:
                _check_threshold(f"thresholds[{i}][0] (drop)", entry[0])
            _check_threshold(f"thresholds[{i}][1] (keep)", entry[1])
        else:
            _check_threshold(f"thresholds[{i}]", entry)
    return list(thresholds)
