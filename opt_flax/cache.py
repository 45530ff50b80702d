"""The static KV cache: preallocated buffers passed into each call and returned updated.

Explicit data, not module state: `KVCache` is a JAX pytree, so jitted prefill/decode functions take
it as an argument and return the new one, and it can carry a `NamedSharding` like any array.
All rows share one write slot (`length`); left padding lives inside the cache, hidden by the mask.
The module functions `init`, `update` and `reorder` are the names every backend's cache module shares.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from opt_core.config import OPTConfig


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class KVCache:
    """Per-layer keys and values [B, H, S, D] (S = slots) and the number of slots written.

    Attributes:
        keys / values: one array per layer, [batch, heads, max_length, head_dim] (the layout the
            attention matmuls read directly).
        length: int32 scalar, tokens written so far (the next write slot).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    length: jax.Array

    @classmethod
    def init(cls, config: OPTConfig, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> KVCache:
        """Zeroed buffers for `batch_size` rows of up to `max_length` tokens."""
        if max_length > config.max_position_embeddings:
            raise ValueError(
                f"cache of {max_length} tokens is longer than max_position_embeddings "
                f"({config.max_position_embeddings})"
            )
        shape = (batch_size, config.num_attention_heads, max_length, config.head_dim)  # [B, H, S, D]
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
        return cls(zeros, tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers)),
                   jnp.zeros((), jnp.int32))

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def reorder(self, rows: jax.Array) -> KVCache:
        """Gather rows (beam search: each beam continues from its parent's cache)."""
        return KVCache(tuple(k[rows] for k in self.keys), tuple(v[rows] for v in self.values), self.length)


def init(config: OPTConfig, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> KVCache:
    """Zeroed buffers for `batch_size` rows of up to `max_length` tokens (`KVCache.init`)."""
    return KVCache.init(config, batch_size, max_length, dtype)


def update(cache: KVCache, layer_idx: int, key: jax.Array, value: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Layer `layer_idx`'s buffers [B, H, S, D] with `key`/`value` [B, H, T, D] written at slot
    `cache.length` (the write the attention layer does; the caller advances `length`)."""
    start = (0, 0, cache.length, 0)
    keys, values = cache.keys[layer_idx], cache.values[layer_idx]
    return (jax.lax.dynamic_update_slice(keys, key.astype(keys.dtype), start),
            jax.lax.dynamic_update_slice(values, value.astype(values.dtype), start))


def reorder(cache: KVCache, rows: jax.Array) -> KVCache:
    """The cache keeping batch rows `rows` (beam search; `KVCache.reorder`)."""
    return cache.reorder(rows)
