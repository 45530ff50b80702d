"""Positions and attention masks in TensorFlow, the TF twins of `opt_core.masks` (as
`opt_torch.attention` holds torch's): apart from `opt_tf.modeling` so that `opt_tf.generation`, which
modeling's `generate` imports, can use them without an import cycle. Shape letters as in
`opt_core.shapes`.
"""

from __future__ import annotations

import tensorflow as tf


def positions_from_mask(attention_mask: tf.Tensor, past_length: tf.Tensor | int, query_length: int) -> tf.Tensor:
    """Position ids [B, T] of the T tokens after `past_length` in `attention_mask` [B, S] (TF twin
    of `opt_core.masks.positions_from_mask`; `past_length` may be a tensor)."""
    mask = tf.cast(attention_mask, tf.int32)
    positions = tf.cumsum(mask, axis=-1) * mask - 1  # [B, S]
    return tf.slice(positions, [0, past_length], [-1, query_length])  # [B, T]


def causal_padding_mask(attention_mask: tf.Tensor, past_length: tf.Tensor | int, query_length: int) -> tf.Tensor:
    """bool [B, 1, T, S]: query t (at slot past + t) may see key s (TF twin of
    `opt_core.masks.causal_padding_mask`). Keys after the query, e.g. empty cache slots, are hidden."""
    key_length = tf.shape(attention_mask)[1]
    q_pos = tf.range(query_length)[:, None] + past_length  # [T, 1]
    k_pos = tf.range(key_length)[None, :]  # [1, S]
    causal = k_pos <= q_pos  # [T, S]
    return causal[None, None] & tf.cast(attention_mask, tf.bool)[:, None, None, :]
