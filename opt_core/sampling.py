"""The counter-based random stream that every backend samples from, so one seed draws the same
tokens in torch, TF, JAX and NumPy.

A stateful generator (torch.Generator, tf.random, a split JAX key) gives different numbers in each
framework. Here the random bits of vocabulary entry v, for batch row b, at generated step t, are a
pure function of (seed, t, b, v), built only from 32-bit xor, shift and multiply, which all three
frameworks compute exactly:

    fmix32(x)   = MurmurHash3's finaliser (x ^= x >> 16; x *= 0x85EBCA6B; x ^= x >> 13;
                  x *= 0xC2B2AE35; x ^= x >> 16), all mod 2**32
    row key     r = fmix32(fmix32(fmix32(fmix32(k0 ^ 0x243F6A88) ^ k1) ^ t) ^ b)
                  with k0, k1 the low and high 32 bits of the seed (0 <= seed < 2**64)
    bits        = fmix32(r ^ fmix32(v + 0x9E3779B9))
    uniform     u = ((bits >> 8) + 0.5) / 2**24, a float32 in (0, 1), exact
    Gumbel      g = -log(-log(u))

A token is drawn by Gumbel-max: argmax over v of (processed logits + g), where the processed logits
are the temperature-scaled, top-k / top-p filtered scores (filtered entries are -inf). That argmax
has the distribution softmax(processed logits). `t` counts generated tokens from 0; `b` is the row
index in the batch (batch * num_beams + beam when beams are sampled).

The integer stream and `u` are bit-identical across frameworks; `g` goes through each framework's
float32 log, so two backends can only disagree when two candidates tie to within a few ULPs.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

MASK32 = 0xFFFFFFFF
SEED_SALT = 0x243F6A88
VOCAB_SALT = 0x9E3779B9
MAX_SEED = 2**64 - 1


def fmix32(value: npt.ArrayLike) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser, elementwise on a uint32 array (or scalar)."""
    x: np.ndarray = np.asarray(value, dtype=np.uint32)
    with np.errstate(over="ignore"):  # multiplication mod 2**32 is the point
        x = x ^ (x >> np.uint32(16))
        x = x * np.uint32(0x85EBCA6B)
        x = x ^ (x >> np.uint32(13))
        x = x * np.uint32(0xC2B2AE35)
        return x ^ (x >> np.uint32(16))


def check_seed(seed: int) -> int:
    """Return `seed` as an int in [0, 2**64); raise `ValueError` naming the bad value otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    if not 0 <= int(seed) <= MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return int(seed)


def row_keys(seed: int, step: int, rows: int) -> np.ndarray:
    """The per-row keys r [rows] (uint32) for generated step `step`."""
    seed = check_seed(seed)
    k0, k1 = np.uint32(seed & MASK32), np.uint32(seed >> 32)
    r = fmix32(fmix32(k0 ^ np.uint32(SEED_SALT)) ^ k1)
    r = fmix32(r ^ np.uint32(step & MASK32))
    return fmix32(r ^ np.arange(rows, dtype=np.uint32))


def random_bits(seed: int, step: int, rows: int, vocab_size: int) -> np.ndarray:
    """The uint32 random bits [rows, vocab_size] of generated step `step`."""
    with np.errstate(over="ignore"):
        salt = fmix32(np.arange(vocab_size, dtype=np.uint32) + np.uint32(VOCAB_SALT))
        return fmix32(row_keys(seed, step, rows)[:, None] ^ salt[None, :])


def uniforms(seed: int, step: int, rows: int, vocab_size: int) -> np.ndarray:
    """float32 uniforms in (0, 1) [rows, vocab_size], exact: ((bits >> 8) + 0.5) / 2**24."""
    bits = random_bits(seed, step, rows, vocab_size)
    return (((bits >> np.uint32(8)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0**-24)).astype(np.float32)


def gumbel_noise(seed: int, step: int, rows: int, vocab_size: int) -> np.ndarray:
    """float32 Gumbel(0, 1) noise [rows, vocab_size]: -log(-log(u))."""
    u = uniforms(seed, step, rows, vocab_size)
    return (-np.log(-np.log(u))).astype(np.float32)


def sample_from_logits(processed_logits: np.ndarray, seed: int, step: int) -> np.ndarray:
    """The reference sampler: Gumbel-max over already processed float32 logits [rows, V] (filtered
    entries -inf). Returns the drawn token ids [rows] (int64)."""
    logits = np.asarray(processed_logits, dtype=np.float32)
    rows, vocab = logits.shape
    return np.argmax(logits + gumbel_noise(seed, step, rows, vocab), axis=-1).astype(np.int64)
