"""The merge family's reference against mergekit, whose per-tensor merge methods it follows.

mergekit's functional ``mergekit.merge_methods.merge_tensors`` is the oracle.
Inputs are fp32 with pairwise distinct delta magnitudes inside each model (the
peers break magnitude ties arbitrarily, deltaops by lowest index). Random
methods are compared by injecting deltaops' Philox draws into mergekit's
``torch.bernoulli``, one stream per model in the order mergekit sparsifies
them, so mergekit's own arithmetic runs on deltaops' keep decisions.

How close, and why (see tests/tolerances.py):

* exact (torch.equal) for up to four models, and for any number when every
  sum is exact (dyadic inputs and weights, no norm rescale): the reference
  sums over models in model order, mergekit with torch's ``sum(dim=0)``,
  which reassociates from five models on.
* otherwise (five or more models with a norm rescale, or sce) within the
  error bound of a reordered fp32 sum, ``2 N eps * sum_i |w_i d_i|`` scaled
  as the method scales the sum, plus two ulps of the result.

bf16/fp16 inputs are checked against the reference itself: they are computed
in fp32 and rounded once, so a bf16 merge equals the fp32 merge of the same
values rounded to bf16, bit for bit (mergekit computes most methods in the
input dtype instead; ``linear`` and ``slerp`` compute in fp32 there too and
are compared with mergekit in bf16 as well).
"""

import pytest
import torch

from deltaops.reference import merge as ref
from deltaops.reference.merge import merge_tensors
from deltaops.reference.sparse import magnitude_k, outlier_band, philox_uniform_like

mk_merge_methods = pytest.importorskip("mergekit.merge_methods")
mk_sparsify = pytest.importorskip("mergekit.sparsify")
from mergekit.merge_methods.generalized_task_arithmetic import (  # noqa: E402
    ConsensusMethod,
    GeneralizedTaskArithmeticMerge,
)

SEED = 1234
EPS32 = torch.finfo(torch.float32).eps
TASK_ARITHMETIC = tuple(ref.TASK_ARITHMETIC)
RANDOM = ("dare_ties", "dare_linear", "della", "della_linear")
SHAPES = [(1,), (13,), (31, 29), (4, 8, 16)]
MK_NAMES = {"weights": "weight", "lambda_": "lambda"}


# ---- inputs ----------------------------------------------------------------------------


def dyadic_inputs(shape, n, dtype=torch.float32):
    """base in [-1, 1] on a 1/64 grid; deltas = distinct multiples of 2**-14 (exact sums)."""
    numel = torch.Size(shape).numel()
    base = torch.randint(-64, 65, shape).float() / 64
    models = []
    for _ in range(n):
        magnitudes = (torch.randperm(numel).float() + 1) * 2.0**-14
        signs = torch.where(torch.rand(numel) < 0.5, -1.0, 1.0)
        models.append(base + (magnitudes * signs).reshape(shape))
    return base.to(dtype), [m.to(dtype) for m in models]


def generic_inputs(shape, n, dtype=torch.float32):
    base = torch.randn(shape)
    return base.to(dtype), [(base + 0.1 * torch.randn(shape)).to(dtype) for _ in range(n)]


def options_for(method, n):
    """Mixed scalar and per-model options, densities 0 and 1 among them for n >= 3."""
    opts = {}
    if method in ("ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties"):
        densities = [0.2, 0.5, 1.0, 0.35, 0.0, 0.9, 0.05, 0.6][:n]
    elif method in ("della", "della_linear"):
        densities = [0.3, 0.5, 1.0, 0.4, 0.0, 0.7, 0.25, 0.6][:n]
    else:
        densities = None
    if densities is not None:
        opts["density"] = densities if n % 2 == 0 or n >= 3 else 0.4
        if n == 5:
            opts["density"] = 0.45  # a scalar with many models
    if n >= 5:
        opts["weights"] = [0.5, 0.75, 1.25, 0.25, 1.5, 0.625, 1.0, 0.875][:n]
    elif n % 2:
        opts["weights"] = [0.5, -0.75, 1.25, 1.5][:n]
    else:
        opts["weights"] = 0.75
    if method.startswith("breadcrumbs"):
        opts["gamma"] = [0.05, 0.1, 0.0, 0.2, 0.01, 0.3, 0.02, 0.15][:n] if n % 2 else 0.1
    if method.startswith("della") and n >= 3:
        opts["epsilon"] = [0.1, 0.2, 0.05, 0.15, 0.1, 0.2, 0.1, 0.05][:n]
    return opts


# ---- running mergekit --------------------------------------------------------------------


def bernoulli_streams(method, n, density):
    """Model indices in the order mergekit calls ``torch.bernoulli`` for them."""
    densities = density if isinstance(density, (list, tuple)) else [density] * n
    if method.startswith("dare"):  # mergekit's bernoulli: every model with density < 1
        return [i for i, d in enumerate(densities) if d < 1]
    if method.startswith("della"):  # della_magprune returns early for density <= 0
        return [i for i, d in enumerate(densities) if 0 < d < 1]
    return []


def mergekit(base, models, method, *, streams=(), **options):
    """mergekit's functional merge, with deltaops' Philox draws as its ``torch.bernoulli``."""
    parameters = {MK_NAMES.get(k, k): v for k, v in options.items() if v is not None}
    remaining = iter(streams)

    def philox_bernoulli(probabilities):
        stream = next(remaining)
        u = philox_uniform_like(probabilities.float(), SEED, stream)
        return (u < probabilities.float()).to(probabilities.dtype)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mk_sparsify.torch, "bernoulli", philox_bernoulli)
        if method == "linear":
            result = mk_merge_methods.merge_tensors(models, method, parameters=parameters)
        else:
            result = mk_merge_methods.merge_tensors([base, *models], method,
                                                    parameters=parameters, base_index=0)
    assert next(remaining, None) is None, "mergekit drew fewer masks than there are streams"
    return result


# ---- comparing -----------------------------------------------------------------------------


def assert_exact(actual, expected, what=""):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    differ = actual != expected
    assert not bool(differ.any()), (
        f"{what}: {int(differ.sum())} of {differ.numel()} differ, max |diff| "
        f"{(actual.double() - expected.double()).abs().max().item():.3g}")


def assert_reordered_sum_close(actual, expected, base, models, method, opts, what=""):
    """Within the bound of summing the weighted sparsified deltas in another order."""
    spec = ref.TASK_ARITHMETIC.get(method)
    n = len(models)
    weights = ref._per_model("weights", opts.get("weights"), n, 1.0)
    if spec is None:  # sce: a weighted mean of the kept deltas, |result - base| <= max |d_i|
        scale = sum((m.float() - base.float()).abs() for m in models)
    else:
        densities = ref._per_model("density", opts.get("density", 1.0), n, 1.0)
        gammas = ref._per_model("gamma", opts.get("gamma", 0.01), n, 0.01)
        epsilons = ref._per_model("epsilon", opts.get("epsilon", 0.15), n, 0.15)
        rescale = opts.get("rescale", spec.rescale)
        rescale = "l1" if rescale is True else (rescale or None)
        terms = 0
        for i, m in enumerate(models):
            d = m.float() - base.float()
            if spec.sparsification:
                d = ref.sparsify_delta(d, i, spec.sparsification, densities[i], gamma=gammas[i],
                                       epsilon=epsilons[i], rescale=rescale, seed=SEED)
            terms = terms + abs(weights[i]) * d.abs()
        normalize = opts.get("normalize", spec.normalize)
        assert min(weights) > 0, "the bound assumes positive weights"
        scale = terms * abs(opts.get("lambda_", 1.0)) / (min(weights) if normalize else 1.0)
    bound = 2 * n * EPS32 * scale + 2 * EPS32 * expected.abs()
    excess = (actual.double() - expected.double()).abs() - bound.double()
    assert not bool((excess > 0).any()), f"{what}: {int((excess > 0).sum())} beyond the bound"


def compare_with_mergekit(base, models, method, opts, *, exact):
    streams = bernoulli_streams(method, len(models), opts.get("density", 1.0))
    expected = mergekit(base, models, method, streams=streams, **opts)
    actual = merge_tensors(base, models, method, seed=SEED, **opts)
    what = f"{method} n={len(models)} shape={tuple(base.shape)} {opts}"
    if exact:
        assert_exact(actual, expected, what)
    else:
        assert_reordered_sum_close(actual, expected, base, models, method, opts, what)


def sums_are_exact(method, n, opts):
    """Whether every sum in the merge is exact, so summation order cannot matter."""
    if n <= 4:
        return True  # torch's dim-0 sum is sequential for up to four rows
    rescale = opts.get("rescale", ref.TASK_ARITHMETIC[method].rescale)
    return rescale in (False, None)


# ---- the task-arithmetic family -----------------------------------------------------------------


@pytest.mark.parametrize("data", ["dyadic", "generic"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("method", TASK_ARITHMETIC)
def test_task_arithmetic_family_matches_mergekit(method, n, shape, data):
    if method.startswith("della") and shape == (1,):
        pytest.skip("della ranks along rows; a one-element row is 0/0 in mergekit (see test below)")
    opts = options_for(method, n)
    if data == "dyadic":
        base, models = dyadic_inputs(shape, n)
        exact = sums_are_exact(method, n, opts)
    else:  # inexact sums: exact only while torch's sum(dim=0) is sequential
        base, models = generic_inputs(shape, n)
        if isinstance(opts["weights"], list):
            opts["weights"] = [w * 1.1 for w in opts["weights"]]
        exact = n <= 4
    compare_with_mergekit(base, models, method, opts, exact=exact)


@pytest.mark.parametrize("n", [2, 8])
@pytest.mark.parametrize("change", ["normalize", "rescale", "lambda_", "all"])
@pytest.mark.parametrize("method", TASK_ARITHMETIC)
def test_options_match_mergekit(method, change, n):
    spec = ref.TASK_ARITHMETIC[method]
    if change == "rescale" and spec.sparsification is None:
        pytest.skip("task_arithmetic does not sparsify")
    base, models = dyadic_inputs((23, 7), n)
    opts = options_for(method, n)
    if change in ("normalize", "all"):
        opts["normalize"] = not spec.normalize
    if change in ("rescale", "all") and spec.sparsification is not None:
        opts["rescale"] = not spec.rescale
    if change in ("lambda_", "all"):
        opts["lambda_"] = 0.6
    exact = sums_are_exact(method, n, opts)
    compare_with_mergekit(base, models, method, opts, exact=exact)


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("method", ["ties", "dare_linear", "breadcrumbs", "della"])
def test_other_norms_match_mergekit(method, norm):
    """rescale='l2'/'linf': mergekit's rescale with its L1 norm swapped for that norm."""
    import mergekit.merge_methods.generalized_task_arithmetic as gta

    class Norms:
        l1 = mk_sparsify.RescaleNorm(norm)

    base, models = dyadic_inputs((15, 8), 3)
    opts = options_for(method, 3)
    streams = bernoulli_streams(method, 3, opts["density"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gta, "RescaleNorm", Norms)
        expected = mergekit(base, models, method, streams=streams, rescale=True, **opts)
    actual = merge_tensors(base, models, method, rescale=norm, seed=SEED, **opts)
    assert_exact(actual, expected, f"{method} rescale={norm}")


@pytest.mark.parametrize("n", [1, 2, 3, 8])
@pytest.mark.parametrize("sparsification", ["magnitude", "random", "magnitude_outliers",
                                            "della_magprune"])
def test_sign_method_count_matches_mergekit(sparsification, n):
    """mergekit registers only 'sum' consensus; build its 'count' variant directly."""
    name = {"magnitude": "ties", "random": "dare_ties", "magnitude_outliers": "breadcrumbs_ties",
            "della_magprune": "della"}[sparsification]
    spec = ref.TASK_ARITHMETIC[name]
    counting = GeneralizedTaskArithmeticMerge(
        consensus_method=ConsensusMethod.count,
        sparsification_method=mk_sparsify.SparsificationMethod(sparsification),
        default_normalize=spec.normalize, default_rescale=spec.rescale,
        method_name=f"{name}_count", method_pretty_name=None, method_reference_url=None)
    base, models = dyadic_inputs((17, 11), n)
    opts = options_for(name, n)
    streams = bernoulli_streams(name, n, opts.get("density", 1.0))
    expected = mergekit(base, models, counting, streams=streams, **opts)
    actual = merge_tensors(base, models, name, sign_method="count", seed=SEED, **opts)
    if sums_are_exact(name, n, opts):
        assert_exact(actual, expected, f"{name} count n={n}")
    else:
        assert_reordered_sum_close(actual, expected, base, models, name, opts)


@pytest.mark.parametrize("method", [m for m in TASK_ARITHMETIC if m != "task_arithmetic"])
@pytest.mark.parametrize("density", [0.0, 1.0])
def test_density_zero_and_one_match_mergekit(method, density):
    base, models = dyadic_inputs((9, 13), 3)
    opts = {"weights": [0.5, 1.0, 0.25], "density": density}
    compare_with_mergekit(base, models, method, opts, exact=True)
    merged = merge_tensors(base, models, method, seed=SEED, **opts)
    if density == 0:
        assert_exact(merged, base, "density 0 keeps the base")
    elif not ref.TASK_ARITHMETIC[method].consensus:
        plain = merge_tensors(base, models, "task_arithmetic", weights=opts["weights"],
                              normalize=ref.TASK_ARITHMETIC[method].normalize)
        assert_exact(merged, plain, "density 1 is task arithmetic")


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
def test_cancelling_weights_match_mergekit(method):
    """Agreeing models whose weights sum to zero: the TIES divisor 0 becomes 1."""
    base, models = dyadic_inputs((12, 11), 2)
    models[1] = 2 * base - models[0]  # opposite deltas, opposite weights: same sign of w * d
    opts = {"weights": [1.0, -1.0], "density": 0.6, "normalize": True}
    compare_with_mergekit(base, models, method, opts, exact=True)


def test_della_one_element_rows():
    """mergekit's della rank is 0/0 on a row of one element; deltaops keeps it with p = density."""
    base, models = dyadic_inputs((5, 1), 1)
    with pytest.raises(RuntimeError):
        mk_merge_methods.merge_tensors([base, *models], "della", parameters={"weight": 1.0,
                                       "density": 0.5}, base_index=0)
    merged = merge_tensors(base, models, "della_linear", weights=1.0, density=0.5, seed=SEED,
                           rescale=False)
    keep = philox_uniform_like(models[0] - base, SEED, 0) < 0.5
    assert_exact(merged, torch.where(keep, models[0], base))


# ---- zero deltas ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["all", "one"])
@pytest.mark.parametrize("method", [*TASK_ARITHMETIC, "linear", "slerp", "model_stock", "sce"])
def test_zero_deltas_match_mergekit(method, which):
    n = 1 if method == "slerp" else 3
    base, models = dyadic_inputs((7, 5), n)
    if which == "all":
        models = [base.clone() for _ in models]
    else:
        models[0] = base.clone()
    if method in ref.TASK_ARITHMETIC:
        opts = options_for(method, n)
    elif method == "linear":
        opts = {"weights": [0.5, 1.0, 0.25]}
    elif method == "slerp":
        opts = {"t": 0.3}
    elif method == "sce":
        opts = {"select_topk": 0.5}
    else:
        opts = {}
    streams = bernoulli_streams(method, n, opts.get("density", 1.0))
    expected = mergekit(base, models, method, streams=streams, **opts)
    ours = dict(opts)
    if "t" in ours:
        ours["weights"] = ours.pop("t")
    if "select_topk" in ours:
        ours["density"] = ours.pop("select_topk")
    actual = merge_tensors(base, models, method, seed=SEED, **ours)
    assert_exact(actual, expected, f"{method} zero deltas ({which})")
    if which == "all" and method not in ("slerp",):
        assert_exact(actual, base, f"{method}: no delta, no change")


# ---- linear, slerp, model_stock, sce ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n", [1, 2, 3, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_linear_matches_mergekit(shape, n, normalize, dtype):
    base, models = generic_inputs(shape, n, dtype)
    weights = 0.7 if n == 2 else [0.3, -0.2, 1.1, 0.45, 0.8, 0.05, 0.6, 0.9][:n]
    expected = mergekit(base, models, "linear", weights=weights, normalize=normalize)
    actual = merge_tensors(base, models, "linear", weights=weights, normalize=normalize)
    assert_exact(actual, expected, f"linear n={n}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0, 1.3])
@pytest.mark.parametrize("shape", SHAPES)
def test_slerp_matches_mergekit(shape, t, dtype):
    base, (model,) = generic_inputs(shape, 1, dtype)
    model = (model.float() + torch.randn(shape)).to(dtype)  # far from collinear
    expected = mergekit(base, [model], "slerp", t=t)
    assert_exact(merge_tensors(base, [model], "slerp", weights=t), expected, f"slerp t={t}")


@pytest.mark.parametrize("case", ["collinear", "antiparallel", "zero_base", "one_element"])
def test_slerp_edge_cases_match_mergekit(case):
    base = torch.randn(37)
    model = {"collinear": lambda: 2.5 * base, "antiparallel": lambda: -base,
             "zero_base": lambda: torch.randn(37), "one_element": lambda: torch.randn(37)}[case]()
    if case == "zero_base":
        base = torch.zeros(37)
    if case == "one_element":
        base, model = base[:1].clone(), model[:1].clone()
    for t in (0.2, [0.6]):
        expected = mergekit(base, [model], "slerp", t=t if isinstance(t, float) else t[0])
        assert_exact(merge_tensors(base, [model], "slerp", weights=t), expected, case)


@pytest.mark.parametrize("n", [2, 3, 5, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_model_stock_matches_mergekit(shape, n):
    base, models = generic_inputs(shape, n)
    expected = mergekit(base, models, "model_stock")
    assert_exact(merge_tensors(base, models, "model_stock"), expected, f"model_stock n={n}")


def test_model_stock_singular_keeps_base():
    base, (model,) = generic_inputs((19, 3), 1)
    opposite = 2 * base - model  # cos = -1 for two models: 1 + (N - 1) cos = 0
    expected = mergekit(base, [model, opposite], "model_stock")
    actual = merge_tensors(base, [model, opposite], "model_stock")
    assert_exact(actual, expected)
    assert_exact(actual, base)


@pytest.mark.parametrize("select_topk", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("n", [1, 2, 3, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_sce_matches_mergekit(shape, n, select_topk):
    base, models = generic_inputs(shape, n)
    expected = mergekit(base, models, "sce", select_topk=select_topk)
    actual = merge_tensors(base, models, "sce", density=select_topk)
    if n <= 4:
        assert_exact(actual, expected, f"sce n={n} topk={select_topk}")
    else:
        assert_reordered_sum_close(actual, expected, base, models, "sce", {})


def test_sce_tiny_deltas_match_mergekit():
    """Mean squares summing below 1e-6 switch sce to uniform coefficients."""
    base = torch.randn(40)
    models = [base + 1e-4 * torch.randn(40) * (i + 1) for i in range(3)]
    expected = mergekit(base, models, "sce", select_topk=0.5)
    assert_exact(merge_tensors(base, models, "sce", density=0.5), expected)


def test_sce_k_is_rounded_in_fp32():
    """k = int(count_nonzero(var) * density) is computed in fp32: 100 * 0.29 -> 29, not 28."""
    base = torch.zeros(100)
    models = [torch.randn(100), torch.randn(100)]
    expected = mergekit(base, models, "sce", select_topk=0.29)
    actual = merge_tensors(base, models, "sce", density=0.29)
    assert_exact(actual, expected)
    assert int((actual != 0).sum()) == 29 > int(100 * 0.29)


# ---- random methods ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", RANDOM)
def test_random_methods_are_keyed_by_seed(method):
    base, models = generic_inputs((33, 17), 3, torch.bfloat16)
    opts = options_for(method, 3)
    first = merge_tensors(base, models, method, seed=7, **opts)
    assert_exact(merge_tensors(base, models, method, seed=7, **opts), first, "same seed")
    assert not torch.equal(merge_tensors(base, models, method, seed=8, **opts), first)
    torch.manual_seed(3)
    drawn = merge_tensors(base, models, method, **opts)
    torch.manual_seed(3)
    assert_exact(merge_tensors(base, models, method, **opts), drawn, "seed from torch's generator")


def test_dare_density_rescale_is_deltaops_dare():
    """rescale='density' is the DARE paper's 1/p: model i is deltaops.dare(d_i, p_i, stream=i)."""
    import deltaops

    base, models = generic_inputs((41, 9), 4)
    weights, densities = [0.5, 1.5, 0.25, 1.0], [0.1, 0.9, 0.5, 0.3]
    actual = merge_tensors(base, models, "dare_linear", weights=weights, density=densities,
                           rescale="density", seed=SEED)
    mixed = None
    for i, (m, w, p) in enumerate(zip(models, weights, densities)):
        term = deltaops.dare(m - base, p, seed=SEED, stream=i) * w
        mixed = term if mixed is None else mixed + term
    assert_exact(actual, base + mixed)


def test_della_density_rescale_is_deltaops_sparsify():
    import deltaops

    base, (model,) = generic_inputs((21, 16), 1)
    actual = merge_tensors(base, [model], "della_linear", weights=1.0, density=0.4, epsilon=0.2,
                           rescale="density", seed=SEED)
    delta = deltaops.sparsify(model - base, 0.4, "della", epsilon=0.2, rescale="density", seed=SEED)
    assert_exact(actual, base + delta)


# ---- precomputed thresholds --------------------------------------------------------------------------------


def split(flat, sizes):
    return list(torch.split(flat, sizes))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties"])
def test_whole_model_thresholds(method, dtype):
    """thresholds from topk_thresholds over a model's tensors == one merge of their concatenation."""
    sizes = [37, 1, 64, 29]
    n = 3
    if dtype == torch.bfloat16:  # many equal magnitudes: take_equal decides
        base = torch.zeros(sum(sizes), dtype=dtype)
        models = [torch.randint(-4, 5, (sum(sizes),)).to(dtype) for _ in range(n)]
    else:
        base, models = dyadic_inputs((sum(sizes),), n)
    densities, gammas, weights = [0.3, 0.6, 0.15], [0.05, 0.2, 0.0], [1.0, 0.5, 2.0]
    opts = {"weights": weights, "density": densities}
    if method != "ties":
        opts["gamma"] = gammas
    whole = merge_tensors(base, models, method, **opts)

    pieces_of = [split(m.float() - base.float(), sizes) for m in models]
    per_tensor = []  # per_tensor[j][i]: model i's threshold for tensor j
    for i, pieces in enumerate(pieces_of):
        total = sum(sizes)
        if method == "ties":
            model_pairs = ref.topk_thresholds(pieces, magnitude_k(densities[i], total))
        else:
            n_drop, n_keep = outlier_band(densities[i], gammas[i], total)
            model_pairs = list(zip(ref.topk_thresholds(pieces, n_drop),
                                   ref.topk_thresholds(pieces, n_drop + n_keep)))
        per_tensor.append(model_pairs)
    bases = split(base, sizes)
    for j, b in enumerate(bases):
        thresholds = [per_tensor[i][j] for i in range(n)]
        part = merge_tensors(b, [split(m, sizes)[j] for m in models], method,
                             thresholds=thresholds, **opts)
        assert_exact(part, split(whole, sizes)[j], f"tensor {j}")


def test_threshold_forms():
    base, models = dyadic_inputs((10, 10), 2)
    deltas = [m - base for m in models]
    keys = [ref.magnitude_keys(d) for d in deltas]
    t0 = int(torch.sort(keys[0], descending=True).values[9])  # the 10th largest key of model 0
    ours = merge_tensors(base, models, "ties", thresholds=[t0, None], density=[1.0, 0.3])
    expected = merge_tensors(base, models, "ties", density=[0.1, 0.3])
    assert_exact(ours, expected, "bare key keeps key >= T")
    pair = merge_tensors(base, models, "ties", thresholds=[(t0, 1), (ref.KEY_NONE, 0)])
    only_first = merge_tensors(base, models, "ties", density=[0.1, 0.0])
    assert_exact(pair, only_first, "(key, take_equal) pair; KEY_NONE keeps nothing")
    band = merge_tensors(base, models, "breadcrumbs", thresholds=[(None, t0), None],
                         density=[1.0, 0.4], gamma=0.0)
    assert_exact(band, merge_tensors(base, models, "breadcrumbs", density=[0.1, 0.4], gamma=0.0))


# ---- low-precision inputs -------------------------------------------------------------------------------------


ALL_METHODS = [*TASK_ARITHMETIC, "linear", "slerp", "model_stock", "sce"]


def low_precision_options(method, n):
    if method == "slerp":
        return {"weights": 0.35}
    if method == "sce":
        return {"density": 0.5}
    if method == "model_stock":
        return {}
    opts = options_for(method, n)
    if method == "linear":
        opts = {"weights": opts["weights"]}
    return opts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ALL_METHODS)
def test_low_precision_is_fp32_math_rounded_once(method, dtype):
    n = 1 if method == "slerp" else 3
    base, models = generic_inputs((29, 31), n, dtype)
    opts = low_precision_options(method, n)
    merged = merge_tensors(base, models, method, seed=SEED, **opts)
    assert merged.dtype == dtype
    assert_exact(merge_tensors(base, models, method, seed=SEED, **opts), merged, "deterministic")
    wide = merge_tensors(base.float(), [m.float() for m in models], method, seed=SEED, **opts)
    assert_exact(merged, wide.to(dtype), "fp32 math, one rounding")
    as_fp32 = merge_tensors(base, models, method, seed=SEED, out_dtype=torch.float32, **opts)
    assert_exact(as_fp32, wide, "out_dtype=float32 skips the rounding")


@pytest.mark.parametrize("method", ALL_METHODS)
def test_empty_tensors(method):
    base = torch.empty(3, 0)
    models = [torch.empty(3, 0) for _ in range(1 if method == "slerp" else 2)]
    opts = low_precision_options(method, len(models))
    merged = merge_tensors(base, models, method, seed=SEED, **opts)
    assert merged.shape == (3, 0) and merged.dtype == torch.float32


# ---- argument errors ------------------------------------------------------------------------------------------


def test_mismatched_inputs_raise():
    base = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"models\[1\] has shape \(5, 4\), expected base's shape \(4, 5\)"):
        merge_tensors(base, [base.clone(), torch.randn(5, 4)], "ties")
    with pytest.raises(TypeError, match=r"models\[0\] has dtype bfloat16, base has float32"):
        merge_tensors(base, [base.bfloat16()], "task_arithmetic")
    with pytest.raises(TypeError, match="base has dtype float64"):
        merge_tensors(base.double(), [base.double()], "linear")
    with pytest.raises(ValueError, match=r"models\[0\] is on meta"):
        merge_tensors(base, [torch.empty(4, 5, device="meta")], "linear")
    with pytest.raises(TypeError, match="models must be a list or tuple of tensors, got Tensor"):
        merge_tensors(base, torch.stack([base, base]), "linear")
    with pytest.raises(TypeError, match=r"models\[0\] must be a torch.Tensor"):
        merge_tensors(base, [[1.0]], "linear")
    with pytest.raises(ValueError, match="at least one tensor"):
        merge_tensors(base, [], "ties")


@pytest.mark.parametrize("kwargs,error,message", [
    ({"method": "nope"}, ValueError, "method must be one of"),
    ({"weights": [1.0, 2.0, 3.0]}, ValueError, "weights has 3 values for 2 models"),
    ({"weights": "a"}, TypeError, "weights must be a float"),
    ({"weights": [1.0, float("nan")]}, ValueError, r"weights\[1\] must be finite"),
    ({"density": 1.5}, ValueError, r"density must be in \[0, 1\]"),
    ({"density": [0.5, -0.1]}, ValueError, r"density\[1\] must be in \[0, 1\]"),
    ({"gamma": 0.1}, ValueError, "ties does not use gamma"),
    ({"method": "linear", "density": 0.5}, ValueError, "linear does not use density"),
    ({"method": "task_arithmetic", "rescale": True}, ValueError, "task_arithmetic does not use rescale"),
    ({"method": "dare_linear", "sign_method": "count"}, ValueError, "dare_linear does not use sign_method"),
    ({"method": "dare_ties", "thresholds": [0, 0]}, ValueError, "dare_ties does not use thresholds"),
    ({"sign_method": "mean"}, ValueError, "sign_method must be 'sum' or 'count'"),
    ({"rescale": "l3"}, ValueError, "rescale must be None, a bool or one of"),
    ({"normalize": 1}, TypeError, "normalize must be a bool"),
    ({"lambda_": float("inf")}, ValueError, "lambda_ must be finite"),
    ({"out_dtype": torch.float64}, TypeError, "out_dtype must be one of"),
    ({"thresholds": [0]}, ValueError, "thresholds has 1 entries for 2 models"),
    ({"thresholds": [(1, 2, 3), None]}, TypeError, r"thresholds\[0\] must be an int key or a"),
    ({"thresholds": [(-1, 0), None]}, ValueError, "must be >= 0"),
    ({"method": "breadcrumbs", "thresholds": [5, None]}, TypeError, "a \\(drop, keep\\) pair"),
    ({"method": "della", "density": 0.1}, ValueError, "epsilon=0.15 must leave density"),
    ({"method": "slerp"}, ValueError, "slerp merges exactly one model"),
    ({"method": "model_stock", "weights": 0.5}, ValueError, "model_stock does not use weights"),
    ({"method": "sce", "density": [0.5, 0.5]}, TypeError, "density must be a float"),
    ({"method": "linear", "weights": [1.0, -1.0]}, ValueError, "sum of the weights, which is 0"),
    ({"method": "dare_ties", "seed": -1}, ValueError, "seed must be in"),
])
def test_bad_options_raise(kwargs, error, message):
    base = torch.randn(6, 3)
    models = [base + 0.1 * torch.randn(6, 3) for _ in range(2)]
    kwargs = dict(kwargs)
    method = kwargs.pop("method", "ties")
    with pytest.raises(error, match=message):
        merge_tensors(base, models, method, **kwargs)


def test_method_arity_raises():
    base = torch.randn(5)
    with pytest.raises(ValueError, match="slerp needs the interpolation factor t"):
        merge_tensors(base, [base + 1], "slerp")
    with pytest.raises(ValueError, match="model_stock needs at least two models; got 1"):
        merge_tensors(base, [base + 1], "model_stock")
