"""Positions and attention masks, as OPT defines them (NumPy; backends mirror these).

Positions count real tokens only, so left padding does not shift them:
`pos = cumsum(mask) * mask - 1`, and the learned table is read at row `pos + POSITION_OFFSET`
(padding lands on row 1, the first real token on row 2).
"""

from __future__ import annotations

import numpy as np

POSITION_OFFSET = 2  # OPT's learned positions table reserves rows 0 and 1


def positions_from_mask(attention_mask: np.ndarray, past_length: int = 0) -> np.ndarray:
    """Position ids [batch, new] for the last `new = mask_len - past_length` tokens.

    Args:
        attention_mask: [batch, past + new], 1 for real tokens and 0 for padding.
        past_length: tokens already in the cache; only the positions after them are returned.
    Returns:
        int64 [batch, new]: 0 for the first real token of each row, -1 at padding.
    """
    mask = np.asarray(attention_mask).astype(np.int64)
    positions = np.cumsum(mask, axis=-1) * mask - 1
    return positions[:, past_length:]


def causal_padding_mask(attention_mask: np.ndarray, query_length: int) -> np.ndarray:
    """Which keys each query may attend to: bool [batch, 1, query, key].

    The queries are the last `query_length` of the `key = attention_mask.shape[1]` tokens, so the
    same function serves a full pass (query == key) and cached decoding (query < key). A query sees
    key j when j is not padding and j is not after the query. A padded query whose row has no real
    key before it gets an all-False row; callers must keep such rows finite (they are ignored).
    """
    mask = np.asarray(attention_mask).astype(bool)
    key_length = mask.shape[1]
    past = key_length - query_length
    q_pos = np.arange(query_length)[:, None] + past
    k_pos = np.arange(key_length)[None, :]
    causal = k_pos <= q_pos  # [query, key]
    return causal[None, None, :, :] & mask[:, None, None, :]


def last_non_pad_indices(input_ids: np.ndarray, pad_token_id: int | None) -> np.ndarray:
    """Index of the right-most token of each row that is not `pad_token_id` (the position the
    sequence-classification head pools). Works with left and right padding. Like Hugging Face,
    the ids decide, not the attention mask; with no pad id every row pools its last position, and
    a row of padding only pools position 0."""
    ids = np.asarray(input_ids)
    length = ids.shape[1]
    if pad_token_id is None:
        return np.full(ids.shape[0], length - 1, dtype=np.int64)
    non_pad = ids != pad_token_id
    return np.argmax(np.arange(length)[None, :] * non_pad, axis=1).astype(np.int64)
