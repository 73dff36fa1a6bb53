"""Philox4x32-10 in Triton, keyed bit for bit like ``csrc/include/deltaops/philox.h``.

Keying (the contract; :mod:`deltaops.reference.philox` is the executable
specification)::

    key     = (lo32(seed), hi32(seed))
    counter = (lo32(i >> 2), hi32(i >> 2), stream, 0)
    word_i  = philox(counter, key)[i & 3]
    u_i     = (word_i >> 8) * 2**-24          # exact in fp32

Everything is uint32 arithmetic: ``tl.umulhi`` gives the high word of the
32x32 product and a wrapping uint32 multiply the low word. Seeds travel as two
32-bit halves (``split_seed``) so that no 64-bit scalar reaches a kernel.

:func:`philox_uniform_tile` computes one Philox block per four consecutive
elements (not one per element) and interleaves the four words back into flat
element order with ``tl.join`` + ``tl.reshape``.
"""

from __future__ import annotations

import triton
import triton.language as tl

# tl.constexpr: a @triton.jit function compiled for a GPU may read only constexpr
# globals (the interpreter reads any, so only a GPU compile shows it).
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)
MASK32 = 0xFFFFFFFF
SEED_MAX = 2**63 - 1


def split_seed(seed: int) -> tuple[int, int]:
    """``(lo32(seed), hi32(seed))`` as non-negative Python ints (kernel scalar args)."""
    seed = int(seed)
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed & MASK32, seed >> 32


def stream_word(stream: int) -> int:
    """The counter word of ``stream`` (``stream & 0xFFFFFFFF``, as the reference keys it)."""
    return int(stream) & MASK32


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Ten Philox rounds over uint32 tensors (counter c0..c3, key k0, k1); four uint32 words."""
    m0 = tl.full([], PHILOX_M0, tl.uint32)
    m1 = tl.full([], PHILOX_M1, tl.uint32)
    w0 = tl.full([], PHILOX_W0, tl.uint32)
    w1 = tl.full([], PHILOX_W1, tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(m0, c0)
        lo0 = m0 * c0
        hi1 = tl.umulhi(m1, c2)
        lo1 = m1 * c2
        n0 = hi1 ^ c1 ^ k0
        n2 = hi0 ^ c3 ^ k1
        c0 = n0
        c1 = lo1
        c2 = n2
        c3 = lo0
        k0 = k0 + w0
        k1 = k1 + w1
    return c0, c1, c2, c3


@triton.jit
def uniform_from_word(word):
    """24 random bits scaled into [0, 1): ``(word >> 8) * 2^-24``, exact in fp32."""
    return (word >> 8).to(tl.float32) * 5.9604644775390625e-08


@triton.jit
def philox_words_tile(first_block, seed_lo, seed_hi, stream, NBLOCKS: tl.constexpr):
    """Words of elements ``4*first_block .. 4*first_block + 4*NBLOCKS`` in flat order.

    ``first_block`` is an int64 scalar (element index // 4); seed_lo, seed_hi,
    stream are scalars holding uint32 values.
    """
    block = first_block.to(tl.int64) + tl.arange(0, NBLOCKS).to(tl.int64)
    c0 = (block & 0xFFFFFFFF).to(tl.uint32)
    c1 = (block >> 32).to(tl.uint32)
    c2 = tl.zeros([NBLOCKS], tl.uint32) + tl.cast(stream, tl.uint32)
    c3 = tl.zeros([NBLOCKS], tl.uint32)
    k0 = tl.cast(seed_lo, tl.uint32)
    k1 = tl.cast(seed_hi, tl.uint32)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, c2, c3, k0, k1)
    # join(join(r0, r2), join(r1, r3))[n, i, j] = r_{2i+j}: row-major flattening
    # gives element 4n + 2i + j its word r_{(4n + 2i + j) & 3}.
    words = tl.join(tl.join(r0, r2), tl.join(r1, r3))
    return tl.reshape(words, [4 * NBLOCKS])


@triton.jit
def philox_uniform_tile(first_block, seed_lo, seed_hi, stream, NBLOCKS: tl.constexpr):
    """fp32 uniforms of elements ``4*first_block ..`` (``4*NBLOCKS`` of them) in flat order."""
    return uniform_from_word(philox_words_tile(first_block, seed_lo, seed_hi, stream, NBLOCKS))
