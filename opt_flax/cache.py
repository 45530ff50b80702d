"""The static KV cache: preallocated buffers passed into each call and returned updated.

Explicit data, not module state: `StaticCache` is a JAX pytree, so jitted prefill/decode functions
take it as an argument and return the new one, and it can carry a `NamedSharding` like any array.
All rows share one write slot (`length`); left padding lives inside the cache, hidden by the mask.
The names every backend's cache module shares: `StaticCache` (methods `update`, `reorder`,
`max_length`) and its factory `init_cache`.

Letters in shape comments: B batch, H heads, T new tokens, S max_length (slots), D head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from opt_core.config import OPTConfig


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class StaticCache:
    """Per-layer keys and values [B, H, S, D] (S = slots) and the number of slots written.

    Attributes:
        keys / values: one array per layer, [batch, heads, max_length, head_dim] (the layout both
            attention matmuls read without a transpose; a [B, S, H, D] cache made XLA copy the
            whole cache every decode step).
        length: int32 scalar, tokens written so far (the next write slot).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    length: jax.Array

    @property
    def max_length(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def update(self, layer_idx: int, key: jax.Array, value: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Write `key`/`value` [B, H, T, D] of layer `layer_idx` at slots [length, length + T); return
        that layer's full buffers [B, H, S, D] (the caller builds the next cache with `advanced`)."""
        return (_write_slot(self.keys[layer_idx], key, self.length),
                _write_slot(self.values[layer_idx], value, self.length))

    def advanced(self, keys: list[jax.Array], values: list[jax.Array], new_tokens: int | jax.Array) -> StaticCache:
        """The cache after a call that wrote `new_tokens` tokens into every layer."""
        return StaticCache(tuple(keys), tuple(values), self.length + new_tokens)

    def reorder(self, beam_idx: jax.Array) -> StaticCache:
        """Keep batch rows `beam_idx` [B'] (beam search: each beam continues from its parent's cache)."""
        return StaticCache(tuple(k[beam_idx] for k in self.keys), tuple(v[beam_idx] for v in self.values),
                           self.length)


def _write_slot(buffer: jax.Array, new: jax.Array, slot: jax.Array) -> jax.Array:
    """`buffer` [B, H, S, D] with `new` [B, H, T, D] written at slots [slot, slot + T).

    A batch of one is updated without its batch axis: XLA drops that size-1 axis around the
    attention einsums anyway, and an update in the 4-D shape then ends in a reshape that keeps it
    from happening in place (a copy of the whole buffer per layer and decode step)."""
    new = new.astype(buffer.dtype)
    if buffer.shape[0] == 1:
        return jax.lax.dynamic_update_slice(buffer[0], new[0], (0, slot, 0))[None]
    return jax.lax.dynamic_update_slice(buffer, new, (0, 0, slot, 0))


def init_cache(config: OPTConfig, batch_size: int, max_length: int, dtype: Any = jnp.float32) -> StaticCache:
    """An empty cache for `batch_size` rows of at most `max_length` tokens (zeros)."""
    if max_length > config.max_position_embeddings:
        raise ValueError(
            f"a cache of {max_length} tokens is longer than max_position_embeddings "
            f"({config.max_position_embeddings}); use a shorter prompt or fewer new tokens"
        )
    shape = (batch_size, config.num_attention_heads, max_length, config.head_dim)  # [B, H, S, D]
    layers = range(config.num_hidden_layers)
    return StaticCache(
        tuple(jnp.zeros(shape, dtype) for _ in layers),
        tuple(jnp.zeros(shape, dtype) for _ in layers),
        jnp.zeros((), jnp.int32),
    )
