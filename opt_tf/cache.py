"""The static key/value cache: preallocated buffers, passed into the model call and returned.

TensorFlow tensors are immutable, so the cache is a value: `update` returns a new cache whose
buffers XLA updates in place (`dynamic_update_slice`). The shapes never change while decoding, so
a compiled decoding loop carries it through `tf.while_loop` unchanged in structure.

The names every backend's cache module shares: `StaticCache` (methods `update`, `get_seq_length`,
`reorder`, `max_length`) and its factory `init_cache`.

Letters in shape comments: B batch, H heads, T new tokens, S max_length (slots), D head_dim.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf
from tensorflow.compiler.tf2xla.python.xla import dynamic_update_slice

from opt_core import OPTConfig


class StaticCache(NamedTuple):
    """Per decoder layer, keys and values [B, H, S, D]; `length` slots (int32 scalar) are filled.

    Slot j holds the token at column j of the attention mask the caller keeps; new tokens go to
    slots [length, length + T).
    """

    keys: tuple[tf.Tensor, ...]
    values: tuple[tf.Tensor, ...]
    length: tf.Tensor

    @property
    def max_length(self) -> int:
        """The most tokens the cache can hold."""
        return int(self.keys[0].shape[2])

    def get_seq_length(self) -> int:
        """Tokens held (eager only: a Python int)."""
        return int(self.length)

    def update(self, layer_idx: int, key: tf.Tensor, value: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """Write `key`/`value` [B, H, T, D] of layer `layer_idx` at slot `length`; return that
        layer's full buffers [B, H, S, D] (the caller builds the next cache with `replace_layers`)."""
        start = [0, 0, self.length, 0]
        return (
            dynamic_update_slice(self.keys[layer_idx], tf.cast(key, self.keys[layer_idx].dtype), start),
            dynamic_update_slice(self.values[layer_idx], tf.cast(value, self.values[layer_idx].dtype), start),
        )

    def advanced(self, keys: list[tf.Tensor], values: list[tf.Tensor], new_tokens: int | tf.Tensor) -> StaticCache:
        """The cache after a call that wrote `new_tokens` tokens into every layer."""
        return StaticCache(tuple(keys), tuple(values), self.length + tf.cast(new_tokens, tf.int32))

    def reorder(self, beam_idx: tf.Tensor) -> StaticCache:
        """Keep batch rows `beam_idx` [B'] (beam search)."""
        return StaticCache(
            tuple(tf.gather(k, beam_idx, axis=0) for k in self.keys),
            tuple(tf.gather(v, beam_idx, axis=0) for v in self.values),
            self.length,
        )


def init_cache(config: OPTConfig, batch_size: int, max_length: int, dtype: tf.DType | str = tf.float32) -> StaticCache:
    """An empty cache for `batch_size` rows of at most `max_length` tokens (zeros)."""
    if max_length > config.max_position_embeddings:
        raise ValueError(
            f"a cache of {max_length} tokens is longer than max_position_embeddings "
            f"({config.max_position_embeddings}); use a shorter prompt or fewer new tokens"
        )
    shape = (batch_size, config.num_attention_heads, max_length, config.head_dim)  # [B, H, S, D]
    layers = range(config.num_hidden_layers)
    return StaticCache(
        tuple(tf.zeros(shape, dtype) for _ in layers),
        tuple(tf.zeros(shape, dtype) for _ in layers),
        tf.constant(0, tf.int32),
    )
