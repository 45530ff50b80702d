"""Positions and masks: left and right padding, cache offsets, classification pooling."""

from __future__ import annotations

import numpy as np

from opt_core.masks import causal_padding_mask, last_non_pad_indices, positions_from_mask


def test_positions_left_and_right_padding():
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert positions_from_mask(mask, 0, 5).tolist() == [[-1, -1, 0, 1, 2], [0, 1, 2, -1, -1], [0, 1, 2, 3, 4]]


def test_positions_with_cache_offset():
    mask = np.array([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert positions_from_mask(mask, past_length=3, query_length=1).tolist() == [[2], [3]]
    assert positions_from_mask(mask, past_length=2, query_length=2).tolist() == [[1, 2], [2, 3]]


def test_causal_padding_mask_full_pass():
    m = causal_padding_mask(np.array([[0, 1, 1]]), 0, 3)[0, 0]
    assert m.tolist() == [[False, False, False], [False, True, False], [False, True, True]]


def test_causal_padding_mask_decoding():
    # 3 cached tokens (first is padding), 1 new query: sees every real key.
    m = causal_padding_mask(np.array([[0, 1, 1, 1]]), 3, 1)
    assert m.shape == (1, 1, 1, 4) and m[0, 0, 0].tolist() == [False, True, True, True]


def test_last_non_pad_indices():
    ids = np.array([[1, 1, 2, 5], [2, 5, 6, 1], [2, 5, 6, 7], [1, 1, 1, 1]])
    assert last_non_pad_indices(ids, pad_token_id=1).tolist() == [3, 2, 3, 0]
    assert last_non_pad_indices(ids, pad_token_id=None).tolist() == [3, 3, 3, 3]
