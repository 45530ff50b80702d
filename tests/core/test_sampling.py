"""The counter-based random stream (opt_core.sampling): exact integers, uniform output, and
Gumbel-max draws that follow softmax."""

from __future__ import annotations

import numpy as np
import pytest

from opt_core import sampling


def fmix32_python(x: int) -> int:
    """MurmurHash3's finaliser with Python ints, written independently of the NumPy version."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_bits_equal_a_plain_python_derivation():
    seed, step, rows, vocab = (7 << 32) | 12345, 3, 2, 5
    got = sampling.random_bits(seed, step, rows, vocab)
    k0, k1 = seed & 0xFFFFFFFF, seed >> 32
    for b in range(rows):
        r = fmix32_python(fmix32_python(fmix32_python(fmix32_python(k0 ^ 0x243F6A88) ^ k1) ^ step) ^ b)
        for v in range(vocab):
            assert int(got[b, v]) == fmix32_python(r ^ fmix32_python((v + 0x9E3779B9) & 0xFFFFFFFF))


def test_fmix32_reference_values():
    # MurmurHash3 fmix32: 0 is a fixed point; the avalanche of 1 is the published 0x514E28B7.
    assert int(sampling.fmix32(np.uint32(0))) == 0
    assert int(sampling.fmix32(np.uint32(1))) == 0x514E28B7 == fmix32_python(1)


def test_uniforms_are_in_the_open_interval_and_uniform():
    u = sampling.uniforms(0, 0, 64, 4096)
    assert u.dtype == np.float32 and u.min() > 0 and u.max() < 1
    counts, _ = np.histogram(u, bins=16, range=(0, 1))
    expected = u.size / 16
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 37.7  # 15 degrees of freedom, p = 0.001


def test_streams_differ_by_seed_step_and_row():
    a = sampling.random_bits(1, 0, 2, 100)
    assert not np.array_equal(a, sampling.random_bits(2, 0, 2, 100))
    assert not np.array_equal(a, sampling.random_bits(1, 1, 2, 100))
    assert not np.array_equal(a[0], a[1])
    np.testing.assert_array_equal(a, sampling.random_bits(1, 0, 2, 100))


def test_gumbel_max_follows_softmax():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    draws = np.array([sampling.sample_from_logits(logits, seed=11, step=t)[0] for t in range(4000)])
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_filtered_entries_are_never_drawn():
    logits = np.array([[0.0, -np.inf, 1.0, -np.inf]], dtype=np.float32)
    draws = {int(sampling.sample_from_logits(logits, seed=3, step=t)[0]) for t in range(300)}
    assert draws == {0, 2}


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True, "1"])
def test_bad_seeds_are_refused(seed):
    with pytest.raises(ValueError, match="seed"):
        sampling.check_seed(seed)
