"""Philox4x32-10 in pure torch: the executable specification of deltaops' RNG.

Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3"
(SC'11). Keying, shared bit for bit with ``csrc/include/deltaops/philox.h`` and
``triton_kernels/philox.py``::

    key     = (lo32(seed), hi32(seed))
    counter = (lo32(i >> 2), hi32(i >> 2), stream, 0)
    word_i  = philox(counter, key)[i & 3]
    u_i     = (word_i >> 8) * 2**-24          # exact in fp32
    keep_i  = u_i < fp32(p_i)

The arithmetic runs on int64 tensors holding uint32 values; products are split
into 16-bit halves so that nothing overflows int64.
"""

from __future__ import annotations

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF
SEED_MAX = 2**63 - 1  # seeds travel through int64 op schemas


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi32, lo32) of the 64-bit product of uint32 tensor ``a`` and constant ``m``."""
    m_hi, m_lo = m >> 16, m & 0xFFFF
    p_hi = a * m_hi  # < 2**48
    p_lo = a * m_lo  # < 2**48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Ten Philox rounds over uint32-valued int64 tensors; returns four words."""
    for _ in range(10):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & _MASK32
        k1 = (k1 + PHILOX_W1) & _MASK32
    return c0, c1, c2, c3


def check_seed(seed: int, name: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name} must be an int in [0, 2**63), got {type(seed).__name__}")
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"{name} must be in [0, 2**63), got {seed}")
    return seed


def philox_words(numel: int, seed: int, stream: int = 0, *, device=None) -> torch.Tensor:
    """The uint32 word of elements ``0..numel-1`` as an int64 tensor."""
    check_seed(seed)
    block = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    zeros = torch.zeros_like(block)
    words = philox4x32_10(
        block & _MASK32, block >> 32, zeros + (stream & _MASK32), zeros,
        seed & _MASK32, seed >> 32,
    )
    # Element i takes word i & 3 of block i >> 2.
    return torch.stack(words, dim=1).reshape(-1)[:numel]


def philox_uniform(numel: int, seed: int, stream: int = 0, *, device=None) -> torch.Tensor:
    """fp32 uniforms in [0, 1) with 24 random bits each, one per element."""
    words = philox_words(numel, seed, stream, device=device)
    return (words >> 8).to(torch.float32) * (2.0**-24)
