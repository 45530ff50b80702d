"""Checks on model inputs, shared by every backend so each bad input gets the same clear error."""

from __future__ import annotations

import numpy as np

from opt_core.config import OPTConfig


def validate_inputs(
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None,
    config: OPTConfig,
    past_length: int = 0,
) -> None:
    """Raise `ValueError` naming the problem when the inputs cannot be run by `config`'s model.

    Args:
        input_ids: [batch, seq] integer token ids (the new tokens only when decoding with a cache).
        attention_mask: None, or [batch, past_length + seq] of 0/1.
        config: the model's config.
        past_length: tokens already held in the cache.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be 2-D [batch, seq], got shape {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise ValueError("input_ids is empty: give at least one token per row")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= config.vocab_size):
        bad = ids[(ids < 0) | (ids >= config.vocab_size)]
        raise ValueError(
            f"token id {int(bad.flat[0])} is outside the vocabulary [0, {config.vocab_size})"
        )
    total = past_length + ids.shape[1]
    if total > config.max_position_embeddings:
        raise ValueError(
            f"sequence of {total} tokens is longer than max_position_embeddings "
            f"({config.max_position_embeddings}); truncate the prompt or generate fewer tokens"
        )
    if attention_mask is not None:
        mask = np.asarray(attention_mask)
        if mask.shape != (ids.shape[0], total):
            raise ValueError(
                f"attention_mask has shape {tuple(mask.shape)}; expected "
                f"{(ids.shape[0], total)} (batch, cached + new tokens)"
            )
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("attention_mask must hold only 0 and 1")


def validate_generation_args(
    config: OPTConfig,
    prompt_length: int,
    max_new_tokens: int,
    *,
    num_beams: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    allow_zero_new_tokens: bool = False,
) -> None:
    """Raise `ValueError` naming the bad generation argument.

    Superseded by `opt_core.generation_config.resolve_generation_options` (the one resolution and
    validation of the generation contract, which torch uses); kept only until the TF and Flax
    backends move to it, then removed."""
    least = 0 if allow_zero_new_tokens else 1
    if max_new_tokens < least:
        raise ValueError(f"max_new_tokens must be >= {least}, got {max_new_tokens}")
    total = prompt_length + max_new_tokens
    if total > config.max_position_embeddings:
        raise ValueError(
            f"prompt of {prompt_length} tokens + max_new_tokens {max_new_tokens} = {total} exceeds "
            f"max_position_embeddings ({config.max_position_embeddings}); shorten the prompt or generate fewer tokens"
        )
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    if num_beams > 1 and do_sample:
        raise ValueError("beam sampling (num_beams > 1 with do_sample=True) is not supported")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
