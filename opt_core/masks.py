"""Positions and attention masks, as OPT defines them (NumPy; backends mirror these).

Each backend's modeling.py has a twin of every function here with the same name, arguments and
order (`positions_from_mask(attention_mask, past_length, query_length)`,
`causal_padding_mask(attention_mask, past_length, query_length)`,
`last_non_pad_indices(input_ids, pad_token_id)`); tests/core/test_masks.py holds them to these.
`check_pooling_pad_token` is not mirrored: every backend's sequence-classification head calls this
one, so the refusal reads the same everywhere.

Positions count real tokens only, so left padding does not shift them:
`pos = cumsum(mask) * mask - 1`, and the learned table is read at row `pos + POSITION_OFFSET`
(padding lands on row 1, the first real token on row 2).
"""

from __future__ import annotations

import numpy as np

POSITION_OFFSET = 2  # OPT's learned positions table reserves rows 0 and 1


def positions_from_mask(attention_mask: np.ndarray, past_length: int, query_length: int) -> np.ndarray:
    """Position ids [B, T] of the `T = query_length` tokens after the first `past_length`.

    Args:
        attention_mask: [B, S], 1 for real tokens and 0 for padding; S >= past + T (a static
            cache's mask may run on past the new tokens).
        past_length: tokens already in the cache; only the positions after them are returned.
        query_length: the new tokens.
    Returns:
        int64 [B, T]: 0 for the first real token of each row, -1 at padding.
    """
    mask = np.asarray(attention_mask).astype(np.int64)
    positions = np.cumsum(mask, axis=-1) * mask - 1  # [B, S]
    return positions[:, past_length : past_length + query_length]


def causal_padding_mask(attention_mask: np.ndarray, past_length: int, query_length: int) -> np.ndarray:
    """Which keys each query may attend to: bool [B, 1, T, S].

    The `T = query_length` queries sit at slots [past_length, past_length + T) of the
    `S = attention_mask.shape[1]` keys, so the same function serves a full pass (past 0, T == S),
    cached decoding (T < S) and a static cache (keys after the queries, e.g. empty slots, are
    hidden). A query sees key j when j is not padding and j is not after the query. A padded query
    whose row has no real key before it gets an all-False row; callers must keep such rows finite
    (they are ignored).
    """
    mask = np.asarray(attention_mask).astype(bool)
    q_pos = np.arange(query_length)[:, None] + past_length  # [T, 1]
    k_pos = np.arange(mask.shape[1])[None, :]  # [1, S]
    causal = k_pos <= q_pos  # [T, S]
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


def check_pooling_pad_token(pad_token_id: int | None, batch_size: int) -> None:
    """Raise ValueError when a sequence-classification head cannot find each row's end: with no
    `pad_token_id`, a batch of more than one row has no way to tell padding from tokens (one row
    pools its last position, as Hugging Face does). The same message in every backend."""
    if pad_token_id is None and batch_size != 1:
        raise ValueError(
            f"config.pad_token_id is None, so sequence classification cannot find where each of the "
            f"{batch_size} rows ends; set pad_token_id in the config or classify one row at a time"
        )
