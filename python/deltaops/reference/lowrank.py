"""Pure-torch reference of the low-rank family: the specification.

Every backend (C++ CPU, Triton, CUDA) is tested against these functions, and
the benchmarks import them from here.

Layouts (PEFT's, ``peft.tuners.lora.layer.Linear``)
----------------------------------------------------
* ``lora_A``: ``[r, in]``, ``lora_B``: ``[out, r]``, ``weight``: ``[out, in]``
  (``torch.nn.Linear``), or ``[in, out]`` when ``fan_in_fan_out`` is set
  (GPT-2's ``Conv1D``); PEFT's ``get_delta_weight`` is
  ``transpose(B @ A, fan_in_fan_out) * scaling``.
* Multi-LoRA stacks (serving, the punica / vLLM layout): ``lora_a_stack``
  ``[L, r, in]`` (adapter ``l``'s ``lora_A``), ``lora_b_stack`` ``[L, out, r]``
  (its ``lora_B``); ``token_lora_ids[t]`` in ``[-1, L)``, ``-1`` meaning no
  adapter for token ``t``. Adapters of lower rank are zero-padded to ``r``.

Arithmetic
----------
* Element types: float32, bfloat16, float16 (any mix of the three).
* Merge: ``acc[o, i] = sum_k fp32(B[o, k]) * fp32(A[k, i])`` in fp32 (the
  summation order, and whether products are fused, is not pinned: backends
  differ in the last fp32 bits of ``acc``), then per element
  ``w = round(fp32(w) + fp32(scale) * acc)``: one fp32 multiply, one fp32 add
  (no fused multiply-add), one rounding (nearest, ties to even) to
  ``weight.dtype``. PEFT instead rounds ``B @ A * scaling`` to the weight's
  dtype and then adds in that dtype (two roundings for bf16/fp16).
* Unmerge is the merge with ``-scale``: ``round(fp32(w) - fp32(scale) * acc)``
  (``x + (-y)`` and ``x - y`` are the same IEEE operation).
* Error bound (documented in the README, checked by the tests against an fp64
  product): ``|w_new - exact| <= 1 ulp_dtype(exact) + (r + 2) * 2^-24 *
  (|w| + |scale| * sum_k |B[o, k] A[k, i]|)``; the second term is the fp32
  accumulation, the first the final rounding. Where ``w + delta`` does not
  cancel, bf16 and fp16 results are within 1 ulp of the exact sum, and fp32
  results within ``r + 3`` ulps.
* Shrink: ``out[t, j] = fp32(scale) * (sum_i fp32(A[id_t, j, i]) *
  fp32(x[t, i]))`` (fp32 sum, order not pinned), ``0`` for ``id_t == -1``;
  fp32 output.
* Expand: ``y[t, o] = round(fp32(y[t, o]) + sum_j fp32(B[id_t, o, j]) *
  inter[t, j])`` for ``id_t >= 0`` (fp32 sum, one rounding); rows of ``-1``
  tokens are not written.

Low-rank compression of a dense delta
-------------------------------------
``delta ~= B @ A`` with ``B = U_r diag(S_r)`` ``[m, r]`` and ``A = Vh_r``
``[r, n]`` (the truncated SVD: the best rank-r approximation in the Frobenius
and spectral norms, Eckart-Young). ``method="randomized"`` is the randomized
range finder with power iterations of Halko, Martinsson and Tropp, "Finding
structure with randomness" (SIAM Review 2011), Algorithms 4.4 (subspace
iteration, re-orthonormalised by QR after every product) and 5.1 (direct SVD
of the projected matrix), with ``rank + oversample`` Gaussian test vectors and
``niter`` power iterations.
"""

from __future__ import annotations

from typing import Optional

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int32, torch.int64)
LOW_RANK_METHODS = ("svd", "randomized")

__all__ = ["lora_merge_", "lora_shrink", "lora_expand"]  # the backend table's ops


def _f32(value: float, device) -> torch.Tensor:
    return torch.tensor(float(value), dtype=torch.float32, device=device)


# ---- merge / unmerge ------------------------------------------------------------------


def lora_product(lora_A: torch.Tensor, lora_B: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """fp32 ``B @ A`` in the weight's layout (``[out, in]``, or ``[in, out]`` with fan_in_fan_out)."""
    product = lora_B.float() @ lora_A.float()
    return product.t() if fan_in_fan_out else product


def lora_merged(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                fan_in_fan_out: bool = False) -> torch.Tensor:
    """``round(fp32(w) + fp32(scale) * fp32(B @ A))`` as a new tensor of ``weight``'s dtype."""
    product = lora_product(lora_A, lora_B, fan_in_fan_out)
    return (weight.float() + _f32(scale, weight.device) * product).to(weight.dtype)


def lora_merge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                fan_in_fan_out: bool) -> None:
    """In place ``weight += scale * B @ A`` (see the module docstring); unmerge passes ``-scale``."""
    weight.copy_(lora_merged(weight, lora_A, lora_B, scale, fan_in_fan_out))


def lora_merged_exact(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                      scale: float, fan_in_fan_out: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 ``w + scale * B @ A`` (unrounded) and the fp64 magnitude ``|w| + |scale| |B| @ |A|``
    that scales the fp32 accumulation error: what the tests measure backends against."""
    product = lora_B.double() @ lora_A.double()
    magnitude = lora_B.double().abs() @ lora_A.double().abs()
    if fan_in_fan_out:
        product, magnitude = product.t(), magnitude.t()
    s = float(_f32(scale, "cpu"))
    w = weight.double()
    return w + s * product, w.abs() + abs(s) * magnitude


# ---- multi-LoRA shrink / expand (per token) ----------------------------------------------


def lora_shrink(x: torch.Tensor, lora_a_stack: torch.Tensor, token_lora_ids: torch.Tensor,
                scale: float) -> torch.Tensor:
    """fp32 ``[T, r]``: ``scale * A[id_t] @ x[t]`` per token, zeros where ``id_t == -1``."""
    tokens, rank = x.shape[0], lora_a_stack.shape[1]
    out = torch.zeros(tokens, rank, dtype=torch.float32, device=x.device)
    scale32 = _f32(scale, x.device)
    for t in range(tokens):
        adapter = int(token_lora_ids[t])
        if adapter >= 0:
            out[t] = scale32 * (lora_a_stack[adapter].float() @ x[t].float())
    return out


def lora_expand(y: torch.Tensor, intermediate: torch.Tensor, lora_b_stack: torch.Tensor,
                token_lora_ids: torch.Tensor) -> None:
    """In place ``y[t] = round(fp32(y[t]) + B[id_t] @ intermediate[t])`` for tokens with ``id_t >= 0``."""
    for t in range(y.shape[0]):
        adapter = int(token_lora_ids[t])
        if adapter >= 0:
            added = y[t].float() + lora_b_stack[adapter].float() @ intermediate[t].float()
            y[t] = added.to(y.dtype)


# ---- low-rank compression ---------------------------------------------------------------


def low_rank_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD of fp32 ``delta``: ``(B = U_r S_r, A = Vh_r, S)`` with S every singular value."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank].clone(), s


def low_rank_randomized(delta: torch.Tensor, rank: int, oversample: int = 8, niter: int = 2,
                        generator: Optional[torch.Generator] = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Halko et al. 2011, Alg. 4.4 + 5.1: ``(B = U_r S_r, A = Vh_r)`` of fp32 ``delta``."""
    d = delta.float()
    m, n = d.shape
    width = min(rank + oversample, m, n)
    omega = torch.randn(n, width, generator=generator, dtype=torch.float32, device="cpu").to(d.device)
    q = torch.linalg.qr(d @ omega).Q  # [m, width], orthonormal basis of the sampled range
    for _ in range(niter):  # subspace iteration: sharpens a slowly decaying spectrum
        z = torch.linalg.qr(d.t() @ q).Q
        q = torch.linalg.qr(d @ z).Q
    small = q.t() @ d  # [width, n]
    ub, s, vh = torch.linalg.svd(small, full_matrices=False)
    return (q @ ub[:, :rank]) * s[:rank], vh[:rank].clone()


def relative_error(delta: torch.Tensor, lora_B: torch.Tensor, lora_A: torch.Tensor,
                   rows_per_block: int = 1024) -> float:
    """``||delta - B @ A||_F / ||delta||_F`` (fp32 products, fp64 sums), computed in row blocks
    so that no full-size temporary of ``B @ A`` is held. 0 for an all-zero delta equal to B @ A."""
    residual = 0.0
    total = 0.0
    a = lora_A.float()
    for start in range(0, delta.shape[0], rows_per_block):
        d = delta[start:start + rows_per_block].float()
        block = d - lora_B[start:start + rows_per_block].float() @ a
        residual += float(block.double().square().sum())
        total += float(d.double().square().sum())
    if total == 0.0:
        return 0.0 if residual == 0.0 else float("inf")
    return (residual / total) ** 0.5


def optimal_relative_error(singular_values: torch.Tensor, rank: int) -> float:
    """Eckart-Young: ``sqrt(sum_{i > r} s_i^2 / sum_i s_i^2)``, the best any rank-r factorisation does."""
    s2 = singular_values.double().square()
    total = float(s2.sum())
    return (float(s2[rank:].sum()) / total) ** 0.5 if total > 0 else 0.0
