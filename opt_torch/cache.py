"""Explicit key/value caches: passed into the model call and returned from it.

The names every backend's cache module shares: `StaticCache` (preallocated buffers, what generation
uses) and its factory `init_cache`; each cache's methods `update` (write one layer's new
keys/values, return all of them), `get_seq_length`, `reorder` (keep beam rows), `max_length`.
torch has two kinds of cache with those methods:

- `DynamicCache` grows by concatenation; any length, no setup.
- `StaticCache` preallocates `[batch, heads, max_length, head_dim]` buffers once and writes new
  keys/values in place, so a decoding loop allocates nothing per step and `torch.compile` sees the
  same buffers every step.

Letters in shape comments: B batch, H heads, T new tokens, S cached + new tokens, D head_dim.
"""

from __future__ import annotations

import torch

from opt_core import OPTConfig


class Cache:
    """Interface shared by the caches (per decoder layer: keys and values [B, H, S, D])."""

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append `key`/`value` [B, H, T, D] for layer `layer_idx`; return all keys/values [B, H, S, D]."""
        raise NotImplementedError

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens held for layer `layer_idx` (0 when nothing was stored yet)."""
        raise NotImplementedError

    def reorder(self, beam_idx: torch.Tensor) -> None:
        """Keep batch rows `beam_idx` (beam search / contrastive search), in place."""
        raise NotImplementedError

    @property
    def max_length(self) -> int | None:
        """The most tokens the cache can hold (None: unbounded)."""
        return None


class DynamicCache(Cache):
    """A cache that grows by concatenation: `layers[i] = (keys, values)`, each [B, H, S, D]."""

    def __init__(self) -> None:
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.layers):
            self.layers.append((key, value))
        elif layer_idx < len(self.layers):
            old_k, old_v = self.layers[layer_idx]
            self.layers[layer_idx] = (torch.cat([old_k, key], dim=2), torch.cat([old_v, value], dim=2))
        else:
            raise ValueError(f"cache update for layer {layer_idx} before layer {len(self.layers)}")
        return self.layers[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx][0].shape[2] if layer_idx < len(self.layers) else 0

    def reorder(self, beam_idx: torch.Tensor) -> None:
        self.layers = [
            (k.index_select(0, beam_idx.to(k.device)), v.index_select(0, beam_idx.to(v.device)))
            for k, v in self.layers
        ]

    def crop(self, length: int) -> None:
        """Drop everything after the first `length` tokens."""
        self.layers = [(k[:, :, :length], v[:, :, :length]) for k, v in self.layers]

    def to_legacy(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """The tuple-of-tuples format older code passes around."""
        return tuple(self.layers)

    @classmethod
    def from_legacy(cls, past: tuple[tuple[torch.Tensor, torch.Tensor], ...] | list) -> DynamicCache:
        cache = cls()
        cache.layers = [(k, v) for k, v in past]
        return cache

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[layer_idx]


class StaticCache(Cache):
    """Preallocated keys/values for at most `max_length` tokens of `batch_size` rows.

    `update` copies the new entries into the buffers and returns views of the filled part, so
    attention reads only real entries and no step allocates cache memory.
    """

    def __init__(
        self,
        config: OPTConfig,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        num_heads: int | None = None,
    ) -> None:
        """`num_heads`: the heads this process holds (fewer under tensor parallelism); default all."""
        if max_length > config.max_position_embeddings:
            raise ValueError(
                f"StaticCache max_length {max_length} exceeds max_position_embeddings "
                f"({config.max_position_embeddings})"
            )
        heads = config.num_attention_heads if num_heads is None else num_heads
        shape = (batch_size, heads, max_length, config.head_dim)  # [B, H, S_max, D]
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self._lengths = [0] * config.num_hidden_layers
        self._max_length = max_length

    @property
    def max_length(self) -> int:
        return self._max_length

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start = self._lengths[layer_idx]
        end = start + key.shape[2]
        if end > self._max_length:
            raise ValueError(
                f"StaticCache is full: {start} cached + {key.shape[2]} new tokens > max_length {self._max_length}"
            )
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        k_buf[:, :, start:end].copy_(key)
        v_buf[:, :, start:end].copy_(value)
        self._lengths[layer_idx] = end
        return k_buf[:, :, :end], v_buf[:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._lengths[layer_idx]

    def reorder(self, beam_idx: torch.Tensor) -> None:
        for buf in (*self.keys, *self.values):
            buf.copy_(buf.index_select(0, beam_idx.to(buf.device)))

    def reset(self) -> None:
        """Forget every token (the buffers are reused as they are)."""
        self._lengths = [0] * len(self._lengths)

    def crop(self, length: int) -> None:
        """Drop everything after the first `length` tokens."""
        self._lengths = [min(n, length) for n in self._lengths]


# ---------------------------------------------------------------- the factory every backend shares
def init_cache(
    config: OPTConfig, batch_size: int, max_length: int, dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None, num_heads: int | None = None,
) -> StaticCache:
    """An empty `StaticCache` for `batch_size` rows of at most `max_length` tokens (what generation
    uses); `num_heads`: the heads this process holds (fewer under tensor parallelism), default all."""
    return StaticCache(config, batch_size, max_length, dtype=dtype, device=device, num_heads=num_heads)
