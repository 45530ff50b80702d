"""Layout transforms: each one and its inverse, bit for bit, and metaseq's K,V,Q order."""

from __future__ import annotations

import numpy as np
import pytest

from opt_core.layout import (
    from_layout,
    fuse_qkv,
    merge_model_parallel,
    merge_qkv_model_parallel,
    split_model_parallel,
    split_qkv,
    split_qkv_model_parallel,
    to_layout,
    transpose,
)
from opt_core.params import Layout

DTYPES = [np.float32, np.float16]


def _rand(shape, dtype, seed=0):
    # Random bit patterns (not just random values) so that any lossy step shows.
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_transpose_round_trip(dtype):
    x = _rand((6, 4), dtype)
    for layout in Layout:
        y = to_layout(x, layout)
        assert np.array_equal(from_layout(y, layout), x)
    assert transpose(x).shape == (4, 6) and np.array_equal(transpose(x)[1, 2], x[2, 1])
    with pytest.raises(ValueError, match="2-D"):
        transpose(np.zeros(3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fuse_split_qkv_order(dtype):
    q, k, v = (np.full((2, 3), val, dtype) for val in (1, 2, 3))
    fused = fuse_qkv(q, k, v)
    assert fused[:, 0].tolist() == [2, 2, 3, 3, 1, 1]  # K, V, Q: metaseq's order
    q2, k2, v2 = split_qkv(fused)
    assert all(np.array_equal(a, b) for a, b in ((q, q2), (k, k2), (v, v2)))
    x = _rand((9, 5), dtype)
    assert np.array_equal(fuse_qkv(*split_qkv(x)), x)  # inverse in the other direction too
    with pytest.raises(ValueError, match="divisible by 3"):
        split_qkv(np.zeros((4, 2)))


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("parts", [1, 2, 4])
def test_model_parallel_round_trip(axis, parts):
    x = _rand((8, 12), np.float16)
    pieces = split_model_parallel(x, parts, axis)
    assert len(pieces) == parts and np.array_equal(merge_model_parallel(pieces, axis), x)
    with pytest.raises(ValueError, match="equal parts"):
        split_model_parallel(np.zeros((3, 5)), 2, 0)


def test_metaseq_qkv_parts():
    """Each model-parallel part fuses its own slice of heads: part p holds [k_p; v_p; q_p]."""
    d = 8
    q, k, v = (_rand((d, 4), np.float32, seed) for seed in (1, 2, 3))
    parts = split_qkv_model_parallel(q, k, v, 2)
    assert np.array_equal(parts[1][: d // 2], k[d // 2 :])  # part 1 starts with the second half of k
    assert np.array_equal(parts[0][d : d + d // 2], q[: d // 2])
    q2, k2, v2 = merge_qkv_model_parallel(parts)
    assert all(np.array_equal(a, b) for a, b in ((q, q2), (k, k2), (v, v2)))
    assert all(np.array_equal(a, b) for a, b in zip(split_qkv_model_parallel(q2, k2, v2, 2), parts))
