"""An independent Philox4x32-10 and dropout keep-mask, for testing the kernels' dropout.

Written from the algorithm's definition (Salmon et al., "Parallel random numbers: as easy
as 1, 2, 3", SC'11, and Random123's philox.h), not from Triton's or csrc/'s code; checked
against Random123's published known-answer vectors in tests/test_dropout_oracle.py.

Philox4x32 on a 128-bit counter (c0, c1, c2, c3) and a 64-bit key (k0, k1), one round:
    hi0:lo0 = M0 · c0,  hi1:lo1 = M1 · c2        (32 x 32 -> 64-bit products)
    (c0, c1, c2, c3) <- (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
with M0 = 0xD2511F53, M1 = 0xCD9E8D57; between rounds the key is bumped by the Weyl
constants (0x9E3779B9, 0xBB67AE85). Ten rounds.

The dropout rule under test (kernels/dropout.py, csrc/philox.h): one Philox evaluation
serves 8 elements of a row. Element (m, k) of an M x K input takes counter
(m · ceil(K/8) + k // 8, 0, 0, 0) under key (seed mod 2**32, seed >> 32), output word
(k % 8) // 2 of the four, its low 16 bits for even k and high 16 bits for odd k; it is kept
when those bits u satisfy u >= fp32(fp32(p) · 65536).

Vectorized with NumPy uint64 arithmetic so a mask of a few thousand elements takes
milliseconds; the scalar `philox4x32` is the same code on one counter. (Simple over fast:
`keep_mask` evaluates each counter once per element, 8 times more than the kernels.)
"""

from __future__ import annotations

import numpy as np

M0 = 0xD2511F53
M1 = 0xCD9E8D57
W0 = 0x9E3779B9
W1 = 0xBB67AE85
ROUNDS = 10
MASK32 = 0xFFFFFFFF


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


def philox_words(seed: int, counters: np.ndarray) -> np.ndarray:
    """The four output words (uint32, shape counters.shape + (4,)) of Philox4x32-10 for
    counters (c, 0, 0, 0) under the 64-bit seed as key (low word first)."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be a 64-bit unsigned integer, got {seed}")
    c0 = np.asarray(counters, dtype=np.uint64) & np.uint64(MASK32)
    zero = np.zeros_like(c0)
    k0, k1 = np.uint64(seed & MASK32), np.uint64(seed >> 32)
    with np.errstate(over="ignore"):
        words = _rounds(c0, zero, zero, zero, k0, k1, ROUNDS)
    # every word is masked to 32 bits above, so the uint32 cast is exact
    return np.stack([w.astype(np.uint32) for w in words], axis=-1)


def philox_first_words(seed: int, counters: np.ndarray) -> np.ndarray:
    """First output word (uint32) of Philox4x32-10 for counters (c, 0, 0, 0), key = the 64-bit seed."""
    return philox_words(seed, counters)[..., 0]


def keep_mask(seed: int, M: int, K: int, p: float) -> np.ndarray:
    """(M, K) bool: True where element (m, k) survives dropout with probability p."""
    m = np.arange(M, dtype=np.uint64)[:, None]
    k = np.arange(K, dtype=np.uint64)[None, :]
    counter = m * np.uint64((K + 7) // 8) + k // np.uint64(8)
    words = philox_words(seed, counter)  # (M, K, 4)
    word = np.take_along_axis(words, ((k % np.uint64(8)) // np.uint64(2)).astype(np.int64)[..., None].repeat(M, 0), -1)
    word = word[..., 0].astype(np.uint64)
    bits = np.where(k % np.uint64(2) == 0, word & np.uint64(0xFFFF), word >> np.uint64(16))
    threshold = np.float32(np.float32(p) * np.float32(65536.0))
    return bits.astype(np.float32) >= threshold
