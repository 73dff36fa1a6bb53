"""Triton backend of the low-rank family: LoRA merge, multi-LoRA shrink and expand.

Semantics: :mod:`deltaops.reference.lowrank` (tested within its documented
bound: the fp32 summation order of the low-rank product is not pinned).

* The factors are converted to fp32 on the host (``r * (out + in)`` floats,
  the only scratch; PEFT's ``[out, in]`` layout or its transpose for
  ``fan_in_fan_out``), then one kernel tiles the weight: a ``BLOCK_M x
  BLOCK_N`` tile of the product is accumulated in fp32 by ``tl.dot`` with
  ``input_precision="ieee"`` (never TF32) over rank blocks of 16 (zero
  padded), then ``round(fp32(w) + fp32(scale) * acc)`` once per element.
* Weights and outputs travel as raw bits and are rounded with the integer
  code of :mod:`deltaops.triton_kernels.sparse` (which mirrors
  ``csrc/include/deltaops/bits.h``), so ties go to even on the GPU and in the
  interpreter alike. Launched with ``enable_fp_fusion=False``: the final
  multiply and add are not fused (as ``deltaops/lowrank.h``).
* Shrink and expand: one program per (token, block of outputs), the adapter
  id read in the kernel; tokens with id ``-1`` read nothing that matters
  (their loads are masked) and write zeros (shrink) or nothing (expand).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sparse import _bits, _f32, _from_f32, _kind, _to_f32

__all__ = ["lora_merge_", "lora_shrink", "lora_expand"]

_LAUNCH = {"enable_fp_fusion": False}
BLOCK_K = 16  # rank block of tl.dot (its minimum)


def _ids_in_range(ids: torch.Tensor, adapters: int) -> None:
    if ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < -1 or high >= adapters:
            raise ValueError(f"token_lora_ids holds {low if low < -1 else high}, out of range "
                             f"[-1, {adapters})")


# ---- merge ------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["scale"])
def _lora_merge_kernel(w_ptr, l_ptr, r_ptr, M, N, R, scale, KIND: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_K):
        k = k0 + ks
        k_ok = k < R
        left = tl.load(l_ptr + rows[:, None].to(tl.int64) * R + k[None, :],
                       mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        right = tl.load(r_ptr + k[:, None].to(tl.int64) * N + cols[None, :],
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(left, right, acc, input_precision="ieee")
    offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    w = _to_f32(tl.load(w_ptr + offsets, mask=mask, other=0), KIND)
    scaled = tl.cast(scale, tl.float32) * acc
    tl.store(w_ptr + offsets, _from_f32(w + scaled, KIND), mask=mask)


def lora_merge_(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float,
                fan_in_fan_out: bool, *, block_m: int = 32, block_n: int = 64) -> None:
    """In place ``weight += scale * lora_B @ lora_A`` (weight contiguous; see the module docstring)."""
    if not weight.is_contiguous():
        raise ValueError("lora_merge_ (triton): weight must be contiguous")
    rank = lora_A.shape[0]
    rows, cols = weight.shape
    if rows == 0 or cols == 0 or rank == 0:
        return
    left = (lora_A.t() if fan_in_fan_out else lora_B).float().contiguous()
    right = (lora_B.t() if fan_in_fan_out else lora_A).float().contiguous()
    grid = (triton.cdiv(rows, block_m), triton.cdiv(cols, block_n))
    _lora_merge_kernel[grid](_bits(weight), left, right, rows, cols, rank, _f32(scale),
                             KIND=_kind(weight), BLOCK_M=block_m, BLOCK_N=block_n,
                             BLOCK_K=BLOCK_K, **_LAUNCH)


# ---- shrink / expand ------------------------------------------------------------------------


@triton.jit(do_not_specialize=["scale"])
def _lora_shrink_kernel(x_ptr, a_ptr, ids_ptr, out_ptr, IN, R, scale,
                        BLOCK_R: tl.constexpr, BLOCK_IN: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    rank_ok = ranks < R
    adapter = tl.load(ids_ptr + token).to(tl.int64)
    used = adapter >= 0
    in_limit = tl.where(used, IN, 0)  # a token without adapter loads nothing
    base = tl.maximum(adapter, 0) * R * IN
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for i0 in range(0, IN, BLOCK_IN):
        i = i0 + tl.arange(0, BLOCK_IN)
        i_ok = i < in_limit
        x = tl.load(x_ptr + token * IN + i, mask=i_ok, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + base + ranks[:, None].to(tl.int64) * IN + i[None, :],
                    mask=rank_ok[:, None] & i_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(a * x[None, :], axis=1)
    out = tl.where(used, tl.cast(scale, tl.float32) * acc, 0.0)
    tl.store(out_ptr + token * R + ranks, out, mask=rank_ok)


def lora_shrink(x: torch.Tensor, lora_a_stack: torch.Tensor, token_lora_ids: torch.Tensor,
                scale: float, *, block_r: int = 16, block_in: int = 64) -> torch.Tensor:
    """fp32 ``[T, r]``: ``scale * lora_a_stack[id_t] @ x[t]``, zeros where ``id_t == -1``."""
    tokens, fan_in = x.shape
    adapters, rank = lora_a_stack.shape[:2]
    _ids_in_range(token_lora_ids, adapters)
    out = torch.empty(tokens, rank, dtype=torch.float32, device=x.device)
    if tokens == 0 or rank == 0:
        return out
    if fan_in == 0:
        return out.zero_()
    grid = (tokens, triton.cdiv(rank, block_r))
    _lora_shrink_kernel[grid](x.contiguous(), lora_a_stack.contiguous(),
                              token_lora_ids.contiguous(), out, fan_in, rank, _f32(scale),
                              BLOCK_R=block_r, BLOCK_IN=block_in, **_LAUNCH)
    return out


@triton.jit
def _lora_expand_kernel(y_ptr, inter_ptr, b_ptr, ids_ptr, OUT, R, KIND: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    adapter = tl.load(ids_ptr + token).to(tl.int64)
    used = adapter >= 0
    col_ok = cols < tl.where(used, OUT, 0)  # a token without adapter loads and stores nothing
    r_limit = tl.where(used, R, 0)
    base = tl.maximum(adapter, 0) * OUT * R
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j0 in range(0, R, BLOCK_R):
        j = j0 + tl.arange(0, BLOCK_R)
        j_ok = j < r_limit
        inter = tl.load(inter_ptr + token * R + j, mask=j_ok, other=0.0)
        b = tl.load(b_ptr + base + cols[:, None].to(tl.int64) * R + j[None, :],
                    mask=col_ok[:, None] & j_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(b * inter[None, :], axis=1)
    offsets = token * OUT + cols
    y = _to_f32(tl.load(y_ptr + offsets, mask=col_ok, other=0), KIND)
    tl.store(y_ptr + offsets, _from_f32(y + acc, KIND), mask=col_ok)


def lora_expand(y: torch.Tensor, intermediate: torch.Tensor, lora_b_stack: torch.Tensor,
                token_lora_ids: torch.Tensor, *, block_n: int = 64, block_r: int = 16) -> None:
    """In place ``y[t] = round(y[t] + lora_b_stack[id_t] @ intermediate[t])`` for ``id_t >= 0``."""
    if not y.is_contiguous():
        raise ValueError("lora_expand (triton): y must be contiguous")
    tokens, features = y.shape
    adapters, _, rank = lora_b_stack.shape
    _ids_in_range(token_lora_ids, adapters)
    if tokens == 0 or features == 0 or rank == 0:
        return
    grid = (tokens, triton.cdiv(features, block_n))
    _lora_expand_kernel[grid](_bits(y), intermediate.contiguous(), lora_b_stack.contiguous(),
                              token_lora_ids.contiguous(), features, rank, KIND=_kind(y),
                              BLOCK_N=block_n, BLOCK_R=block_r, **_LAUNCH)
