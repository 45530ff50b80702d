"""Every backend's mask helpers are twins of `opt_core.masks`: same names, same arguments, same
answers (left and right padding, a cache offset, a static cache's trailing slots)."""

from __future__ import annotations

import numpy as np
import pytest

from opt_core import masks

MASKS = [
    np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
    np.array([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]]),  # the last two columns: empty cache slots
]


@pytest.mark.parametrize("mask", MASKS, ids=["padded", "static_cache"])
@pytest.mark.parametrize("past, query", [(0, 3), (2, 2), (3, 1), (0, 1)])
def test_mask_helpers_match_opt_core(backend, mask, past, query):
    m = backend.modeling
    want = masks.positions_from_mask(mask, past, query)
    assert np.array_equal(backend.to_numpy(m.positions_from_mask(backend.tensor(mask), past, query)), want)
    want = masks.causal_padding_mask(mask, past, query)
    assert np.array_equal(backend.to_numpy(m.causal_padding_mask(backend.tensor(mask), past, query)), want)


@pytest.mark.parametrize("pad", [1, None])
def test_last_non_pad_indices_match_opt_core(backend, pad):
    ids = np.array([[1, 1, 2, 5], [2, 5, 6, 1], [2, 5, 6, 7], [1, 1, 1, 1]])
    got = backend.to_numpy(backend.modeling.last_non_pad_indices(backend.tensor(ids), pad))
    assert np.array_equal(got, masks.last_non_pad_indices(ids, pad))
