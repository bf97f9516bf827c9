"""An independent Philox4x32-10 and dropout keep-mask, for testing the kernels' dropout.

Written from the algorithm's definition (Salmon et al., "Parallel random numbers: as easy
as 1, 2, 3", SC'11, and Random123's philox.h), not from Triton's or csrc/'s code; checked
against Random123's published known-answer vectors in tests/test_dropout_oracle.py.

Philox4x32 on a 128-bit counter (c0, c1, c2, c3) and a 64-bit key (k0, k1), one round:
    hi0:lo0 = M0 · c0,  hi1:lo1 = M1 · c2        (32 x 32 -> 64-bit products)
    (c0, c1, c2, c3) <- (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
with M0 = 0xD2511F53, M1 = 0xCD9E8D57; between rounds the key is bumped by the Weyl
constants (0x9E3779B9, 0xBB67AE85). Ten rounds.

The dropout rule under test (kernels/dropout.py, csrc/philox.h): element (m, k) of an
M x K input is kept when u >= p, where u is the first Philox word of counter (m·K + k, 0, 0, 0)
and key (seed mod 2**32, seed >> 32), read as a signed int32 x, folded to x' = x if x >= 0
else -x - 1, and scaled in fp32: u = fp32(x') · fp32(4.6566127342e-10), compared with fp32(p).

Vectorized with NumPy uint64 arithmetic so a mask of a few thousand elements takes
milliseconds; the scalar `philox4x32` is the same code on one counter.
"""

from __future__ import annotations

import numpy as np

M0 = 0xD2511F53
M1 = 0xCD9E8D57
W0 = 0x9E3779B9
W1 = 0xBB67AE85
ROUNDS = 10
MASK32 = 0xFFFFFFFF
UNIFORM_SCALE = np.float32(4.6566127342e-10)  # the largest s with (2**31 - 1) · s < 1 in fp32


def _rounds(c0, c1, c2, c3, k0, k1, rounds: int):
    """Philox rounds on uint64 arrays (or Python ints) holding 32-bit words."""
    for i in range(rounds):
        if i:
            k0 = (k0 + W0) & MASK32
            k1 = (k1 + W1) & MASK32
        p0 = M0 * c0  # < 2**64: exact in uint64 and in Python ints
        p1 = M1 * c2
        hi0, lo0 = p0 >> 32, p0 & MASK32
        hi1, lo1 = p1 >> 32, p1 & MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def philox4x32(counter: tuple[int, int, int, int], key: tuple[int, int], rounds: int = ROUNDS) -> tuple[int, ...]:
    """Philox4x32-`rounds` of one 128-bit counter under a 64-bit key, as four 32-bit words."""
    for w in (*counter, *key):
        if not 0 <= w <= MASK32:
            raise ValueError(f"counter and key words must be 32-bit unsigned integers, got {w!r}")
    return tuple(int(w) for w in _rounds(*counter, *key, rounds))


def philox_first_words(seed: int, counters: np.ndarray) -> np.ndarray:
    """First output word (uint32) of Philox4x32-10 for counters (c, 0, 0, 0), key = the 64-bit seed."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be a 64-bit unsigned integer, got {seed}")
    c0 = np.asarray(counters, dtype=np.uint64) & np.uint64(MASK32)
    zero = np.zeros_like(c0)
    k0, k1 = np.uint64(seed & MASK32), np.uint64(seed >> 32)
    with np.errstate(over="ignore"):
        words = _rounds(c0, zero, zero, zero, k0, k1, ROUNDS)
    # numpy keeps uint64 with numpy-int constants; the masks above keep every word < 2**32
    return words[0].astype(np.uint32)


def uniform_from_words(words: np.ndarray) -> np.ndarray:
    """fp32 uniforms in [0, 1) from uint32 words: signed reading, negative x folded to -x - 1."""
    x = words.astype(np.uint32).view(np.int32).astype(np.int64)
    x = np.where(x < 0, -x - 1, x)
    return x.astype(np.float32) * UNIFORM_SCALE


def keep_mask(seed: int, M: int, K: int, p: float) -> np.ndarray:
    """(M, K) bool: True where element (m, k) survives dropout with probability p."""
    index = np.arange(M * K, dtype=np.uint64)
    u = uniform_from_words(philox_first_words(seed, index))
    return (u >= np.float32(p)).reshape(M, K)
